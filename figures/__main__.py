"""``python -m figures ...`` = ``dsgd-figures ...``."""

import sys

from .cli import main

sys.exit(main())

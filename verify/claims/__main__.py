"""``python -m verify.claims [--quick|--full] [--only T1,T6] ...``: the check suite without the main CLI."""

import sys

from .runner import cli

if __name__ == "__main__":
    sys.exit(cli())

"""Rank entry for tests/verify/test_registry.py: register the toy algorithms, then run a plan of
``{"config": RunConfig dict, "out": dir}`` items in turn (``python toy_ranks.py PLAN.json``)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from toy_algorithms import register_toys  # noqa: E402

from verify.config import RunConfig  # noqa: E402
from verify.distributed import DistributedRunError, Options, connect, run_rank  # noqa: E402
from verify.distributed.comm import close  # noqa: E402

if __name__ == "__main__":
    register_toys()
    try:
        comm = connect(timeout=20.0)
        for item in json.loads(open(sys.argv[1]).read()):
            run_rank(
                comm, RunConfig.from_dict(item["config"]), item["out"], Options(timeout=20.0, progress=False)
            )
        close(comm)
    except DistributedRunError as exc:
        print(exc, file=sys.stderr, flush=True)
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""Rank entry for tests/verify/test_distributed.py: join the group once, run several configurations in turn.

Usage (one process per rank, started by ``verify.distributed.launch.launch_local``): ``python dist_ranks.py
PLAN.json [MODULE:FUNCTION]`` with PLAN a list of ``{"config": RunConfig dict, "out": dir, "resume": bool}``;
``MODULE:FUNCTION`` (a module of this folder) is called first, e.g. to register toy algorithms
(tests/verify/test_registry.py). Paying the process start-up once for several runs keeps the test fast.
"""

import importlib
import json
import os
import sys

from verify.config import RunConfig
from verify.distributed import DistributedRunError, Options, connect, run_rank
from verify.distributed.comm import close

if __name__ == "__main__":
    plan = json.loads(open(sys.argv[1]).read())
    if len(sys.argv) > 2:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        module, _, function = sys.argv[2].partition(":")
        getattr(importlib.import_module(module), function)()
    try:
        comm = connect(timeout=20.0)
        for item in plan:
            opts = Options(timeout=20.0, progress=False, resume=item.get("resume", False))
            run_rank(comm, RunConfig.from_dict(item["config"]), item["out"], opts)
        close(comm)
    except DistributedRunError as exc:
        print(exc, file=sys.stderr, flush=True)
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

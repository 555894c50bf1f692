"""A closed-form loss that makes one rank die or hang, for the failure tests of verify.distributed.

``FaultyLoss(rank, step, kind, stamp)``: ``L(w) = 1/2 |w|^2``; on process ``RANK == rank`` the call for local
step ``step`` (the (step+1)-th call: one gradient per step) first writes ``time.time()`` to ``stamp``, then
exits with status 3 (``kind="exit"``) or sleeps for 10 minutes (``kind="hang"``).
"""

import os
import time

import torch


class FaultyLoss:
    def __init__(self, rank: int, step: int, kind: str, stamp: str, d: int = 3) -> None:
        self.rank, self.step, self.kind, self.stamp, self.d = rank, step, kind, stamp, d
        self.calls = 0

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if int(os.environ.get("RANK", -1)) == self.rank:
            if self.calls == self.step:
                with open(self.stamp, "w") as fh:
                    fh.write(repr(time.time()))
                if self.kind == "exit":
                    os._exit(3)
                time.sleep(600)
            self.calls += 1
        return 0.5 * (w * w).sum(-1)

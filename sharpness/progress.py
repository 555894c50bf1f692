"""Progress bars for long measurements: tqdm on stderr, shown only for work that takes more than a second.

The measurement functions know nothing of progress; the report hands them a :class:`ProgressOperator` (ticks
once per Hessian-vector product) or a :func:`counting_loss` (ticks once per loss evaluation) instead.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from .functional import FunctionalLoss
from .hvp import HessianOperator


class Progress:
    """One tqdm bar at a time on stderr, shown only after a second (``delay``)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    @contextlib.contextmanager
    def task(self, desc: str, total: int | None, unit: str) -> Iterator[None]:
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=sys.stderr,
            delay=1.0,
            leave=False,
            disable=not self.enabled,
            dynamic_ncols=True,
        )
        try:
            yield
        finally:
            self.bar.close()
            self.bar = None

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)


class ProgressOperator(HessianOperator):
    """A :class:`HessianOperator` that advances the current progress bar by one per vector multiplied."""

    progress: Progress | None = None

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = super().matmat(V)
        if self.progress is not None:
            self.progress.tick(V.shape[1])
        return out


def counting_loss(fl: FunctionalLoss, progress: Progress) -> FunctionalLoss:
    """The same loss, ticking the bar at every full evaluation ``L(theta)``."""

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        progress.tick()
        return fl.loss(p)

    return FunctionalLoss(
        loss=loss, params=fl.params, batch_losses=fl.batch_losses, weights=fl.weights, parallel=fl.parallel
    )

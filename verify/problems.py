"""The neural problem, :class:`ModelProblem` (an ``nn.Module`` and a data set split into worker shards), and
the one place to import every problem from: the interface :class:`~verify.problem.Problem` (what a problem
is, and its seeded streams) and the closed-form family :class:`~verify.closed_form.ClosedFormProblem`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from sharpness.data import Dataset, shards
from sharpness.functional import FunctionalLoss, Params, flatten, make_loss, training_flags

from .closed_form import ClosedFormProblem
from .models import has_batchnorm
from .problem import (
    STREAM_BATCH,
    STREAM_INIT,
    STREAM_NOISE,
    STREAM_PERTURB,
    Batch,
    Problem,
    ProblemError,
    generator,
)


# --------------------------------------------------------------------------- neural networks on data
def _shards(dataset: Any, m: int, seed: int, alpha: float | None) -> list[Tensor]:
    if not isinstance(dataset, Dataset):
        x, y = _xy(dataset)
        dataset = Dataset(x, y, None if y.is_floating_point() else int(y.max()) + 1, "data")
    return [torch.as_tensor(s, dtype=torch.long) for s in shards(dataset, m, seed=seed, alpha=alpha)]


def _xy(dataset: Any) -> tuple[Tensor, Tensor]:
    if isinstance(dataset, (tuple, list)):
        return dataset[0], dataset[1]
    return dataset.x, dataset.y


class ModelProblem(Problem):
    """An ``nn.Module`` trained by m workers on disjoint shards of a data set (cross-entropy by default).

    ``train``/``test``: a ``sharpness.data.Dataset`` (``.x``, ``.y``) or an ``(x, y)`` pair. Shards: i.i.d. by
    default, Dirichlet(alpha) label skew with ``alpha``. Worker j's batch at step t: epoch e = t // (n_j //
    b), position t % (n_j // b) of a permutation of its shard drawn from ``(seed, j, e)`` (incomplete last
    batch dropped). ``init``: ``"same"`` (every worker starts from ``model``) or ``"independent"`` (worker j
    starts from ``builder()`` run under a seed drawn from ``(seed, j)``, as the paper's code with
    ``--pretrained 0``). ``arch``/``arch_kwargs`` ("MODULE:CALLABLE" rebuilding the model): recorded in the
    saved average model.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Any,
        test: Any = None,
        *,
        m: int,
        local_batch: int,
        seed: int = 0,
        alpha: float | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        init: str = "same",
        builder: Callable[[], nn.Module] | None = None,
        eval_batch: int = 2048,
        arch: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if m < 1 or local_batch < 1:
            raise ProblemError(f"workers and local batch must be >= 1; got m={m}, b={local_batch}")
        if init not in ("same", "independent") or (init == "independent" and builder is None):
            raise ProblemError("init must be 'same', or 'independent' together with a builder")
        self.m, self.local_batch, self.seed = int(m), int(local_batch), int(seed)
        self.device, self.dtype = torch.device(device), dtype
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype)
        self.loss_fn, self.init, self.builder, self.eval_batch = loss_fn, init, builder, int(eval_batch)
        self.arch, self.arch_kwargs = arch, dict(arch_kwargs or {})
        self.stateful = has_batchnorm(self.model)
        self.params = {k: v.detach() for k, v in self.model.named_parameters()}
        self.buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        self.buffer_names = set(self.buffers)
        x, y = _xy(train)
        self.x = x.to(device=self.device, dtype=dtype if x.is_floating_point() else x.dtype)
        self.y = y.to(self.device)
        self.test = None
        if test is not None:
            tx, ty = _xy(test)
            self.test = (
                tx.to(device=self.device, dtype=dtype if tx.is_floating_point() else tx.dtype),
                ty.to(self.device),
            )
        self.shards = [s.to(self.device) for s in _shards(train, self.m, self.seed, alpha)]
        small = [j for j, s in enumerate(self.shards) if s.numel() < self.local_batch]
        if small:
            j = small[0]
            raise ProblemError(
                f"worker {j}'s shard has {self.shards[j].numel()} samples, fewer than the local batch "
                f"{local_batch}"
            )
        self._perm: dict[int, tuple[int, Tensor]] = {}
        self.classify = self.y.dim() == 1 and not self.y.is_floating_point()

    def _forward(self, params: Params, buffers: Params, x: Tensor, train: bool) -> Tensor:
        with training_flags(self.model, train):
            return functional_call(self.model, {**buffers, **params}, (x,))

    def loss(self, params: Params, buffers: Params, batch: Batch) -> Tensor:
        """``loss_fn(f(params; x), y)`` in train mode (BatchNorm: batch statistics, running stats updated in
        place)."""
        x, y = batch
        return self.loss_fn(self._forward(params, buffers, x, True), y)

    def indices(self, j: int, t: int) -> Tensor:
        """Sample indices of worker j's batch at step t (a pure function of ``(seed, j, t)``)."""
        shard = self.shards[j]
        per_epoch = shard.numel() // self.local_batch
        epoch, pos = divmod(int(t), per_epoch)
        cached = self._perm.get(j)
        if cached is None or cached[0] != epoch:
            perm = torch.randperm(shard.numel(), generator=generator(self.seed, STREAM_BATCH, j, epoch))
            cached = (epoch, shard[perm.to(shard.device)])
            self._perm[j] = cached
        return cached[1][pos * self.local_batch : (pos + 1) * self.local_batch]

    def batch(self, j: int, t: int) -> Batch:
        idx = self.indices(j, t)
        return self.x[idx], self.y[idx]

    def batches(self, t: int) -> Batch:
        idx = torch.stack([self.indices(j, t) for j in range(self.m)])
        return self.x[idx], self.y[idx]

    def init_stacked(self) -> tuple[Tensor, Params]:
        if self.init == "same":
            return super().init_stacked()
        rows, bufs = [], []
        for j in range(self.m):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(
                    int(torch.randint(2**62, (1,), generator=generator(self.seed, STREAM_INIT, j)))
                )
                mod = self.builder().to(device=self.device, dtype=self.dtype)  # type: ignore[misc]
            rows.append(flatten({k: v.detach() for k, v in mod.named_parameters()}))
            bufs.append({k: v.detach() for k, v in mod.named_buffers()})
        return torch.stack(rows), {k: torch.stack([b[k] for b in bufs]) for k in self.buffers}

    def _split(self, split: str, samples: int | None = None) -> list[tuple[Tensor, Tensor]]:
        if split == "train":
            x, y = self.x, self.y
        elif self.test is not None:
            x, y = self.test
        else:
            return []
        if samples is not None and samples < x.shape[0]:
            keep = torch.randperm(x.shape[0], generator=generator(self.seed, 7))[:samples].to(x.device)
            x, y = x[keep], y[keep]
        return [
            (x[i : i + self.eval_batch], y[i : i + self.eval_batch])
            for i in range(0, x.shape[0], self.eval_batch)
        ]

    def functional(
        self, w: Tensor, buffers: Params | None = None, samples: int | None = None
    ) -> FunctionalLoss:
        """The full training loss ``L(w) = sum_b n_b loss_b / n`` in eval mode (BatchNorm: the given running
        statistics, default the initial ones) as a :class:`FunctionalLoss` at ``w``, built by the one door
        (:func:`sharpness.functional.make_loss`) on a copy of the model holding ``w``; ``samples``: a fixed
        seeded subset of the training set instead. Cost of building: a copy of the model (no forward pass)."""
        model = copy.deepcopy(self.model)
        bufs = self.buffers if buffers is None else buffers
        model.load_state_dict({**self.unflatten(w.detach()), **bufs})
        return make_loss(model, self.loss_fn, self._split("train", samples), check=False)

    def logits(
        self, w: Tensor, buffers: Params | None = None, split: str = "test", samples: int | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """Eval-mode outputs of one model on a split (or a fixed seeded subset). Cost: one forward pass over
        it."""
        data = self._split(split, samples)
        if not data:
            return None
        p, bufs = self.unflatten(w.detach()), self.buffers if buffers is None else buffers
        with torch.no_grad():
            out = torch.cat([self._forward(p, bufs, x, False) for x, _ in data])
        return out, torch.cat([y for _, y in data])

    def evaluate(
        self, w: Tensor, buffers: Params | None = None, samples: int | None = None
    ) -> dict[str, float]:
        """``{train,test}_{loss,acc}`` of one model (eval mode; ``samples``: a fixed seeded subset of the
        training set for the train metrics). Cost: one forward pass over both splits."""
        out: dict[str, float] = {}
        for split in ("train", "test"):
            res = self.logits(w, buffers, split, samples if split == "train" else None)
            if res is None:
                continue
            z, y = res
            out[f"{split}_loss"] = float(self.loss_fn(z, y))
            if self.classify:
                out[f"{split}_acc"] = float((z.argmax(1) == y).double().mean())
        return out


__all__ = [
    "STREAM_BATCH", "STREAM_INIT", "STREAM_NOISE", "STREAM_PERTURB", "Batch", "ClosedFormProblem",
    "ModelProblem", "Problem", "ProblemError", "generator",
]  # fmt: skip

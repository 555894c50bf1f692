"""Exact Hessian-vector products of a :class:`~sharpness.functional.FunctionalLoss`.

``HessianOperator`` is the linear operator ``v -> H v`` with ``H = nabla^2 L(theta)`` at the measured
point, on flat vectors of length ``num_params``. Products are exact (forward-over-reverse automatic
differentiation, or double backward), never finite differences. Every other curvature routine is built on
``matvec``/``matmat``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from .functional import (
    Batch,
    FunctionalLoss,
    SharpnessInputError,
    make_loss,
    require_finite,
    require_finite_gradient,
    unflatten,
)
from .memory import graph_bytes, parse_budget

#: Largest model for which ``dense()`` agrees to build the full d x d matrix.
DENSE_LIMIT = 20_000


def as_functional(
    model: nn.Module | FunctionalLoss,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    data: Batch | Iterable[Batch] | None = None,
    *,
    params: Sequence[str] | str | None = None,
    train_mode: bool = False,
    device: str | torch.device | None = None,
    group: Any = None,
) -> FunctionalLoss:
    """The one door from ``(model, loss_fn, data)`` to a :class:`FunctionalLoss` (:func:`make_loss`), or a
    ready ``FunctionalLoss`` as it is: it was built with its own ``params``/``train_mode``/``device``, so
    passing any of those (or ``loss_fn``/``data``/``group``) with it is refused, never silently ignored.
    ``group``: the process group whose ranks split the data (:mod:`sharpness.parallel`). Cost: one forward
    pass per batch for a model (the input check)."""
    if isinstance(model, FunctionalLoss):
        if params is not None or train_mode or device is not None or loss_fn is not None or data is not None:
            raise SharpnessInputError(
                "params/train_mode/device/loss_fn/data apply only when a model is given, not a FunctionalLoss"
            )
        return model
    if loss_fn is None or data is None:
        raise SharpnessInputError("a model needs both loss_fn and data")
    return make_loss(model, loss_fn, data, params=params, train_mode=train_mode, device=device, group=group)


class HessianOperator:
    """``H v`` for the Hessian ``H = nabla^2 L(theta)`` of a loss at fixed parameters.

    Build it from ``(model, loss_fn, data)`` or from a :class:`FunctionalLoss`. Costs, in gradient units:
    ``matvec`` about 2-3 gradients (one forward-over-reverse pass per batch); ``matmat`` with ``k`` columns
    runs them ``chunk`` at a time through one vectorised call (default: 1 on CPU, 8 on CUDA).
    ``hvp_count`` counts vectors multiplied. A NaN/inf gradient or product raises
    :class:`~sharpness.functional.NonFiniteError` naming it, never a silent NaN.

    ``backend`` selects how a batch of products is formed: ``"func"`` (``vmap`` over ``jvp(grad)``, nothing
    kept between products) or ``"autograd"`` (double backward with ``is_grads_batched`` on the graph of
    ``grad L_b``).

    ``graph_memory`` (autograd backend): bytes the cached gradient graphs may take (``"auto"``: a quarter of
    the free RAM / GPU memory, see :mod:`sharpness.memory`; ``0``: stream). Batches are cached in order while
    their graphs fit; every later batch is streamed: its graph is rebuilt for each block of products and
    freed at once (cost per product: one extra gradient of that batch), so memory stays bounded by the
    budget plus one batch's graph whatever the number of batches. :meth:`graph_info` says what was done.

    ``group``: a process group whose ranks each pass their share of the data; every product is then the sum
    of the ranks' weighted partial products, one ``all_reduce`` per ``matmat`` (:mod:`sharpness.parallel`).
    """

    def __init__(
        self,
        model: nn.Module | FunctionalLoss,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        data: Batch | Iterable[Batch] | None = None,
        params: Sequence[str] | str | None = None,
        *,
        train_mode: bool = False,
        device: str | torch.device | None = None,
        backend: str = "autograd",
        chunk: int | None = None,
        graph_memory: int | float | str | None = "auto",
        group: Any = None,
    ) -> None:
        if backend not in ("func", "autograd"):
            raise SharpnessInputError(f"backend must be 'func' or 'autograd', not {backend!r}")
        self.fl = as_functional(
            model, loss_fn, data, params=params, train_mode=train_mode, device=device, group=group
        )
        self.backend = backend
        # On CPU one product at a time on the reused graph measured fastest (about 1.2 gradients per vector on
        # a small CNN, against 2.3 for vmapped blocks of 8); on CUDA batching pays. See benchmarks/.
        if chunk is None:
            chunk = 8 if self.fl.device.type == "cuda" else 1
        self.chunk = max(1, int(chunk))
        self.train_mode = train_mode
        self.theta = self.fl.flat_params().detach()
        self.hvp_count = 0
        self._graphs: list[tuple[float, Tensor, Tensor]] | None = None
        self.graph_budget = parse_budget(graph_memory, self.fl.device)
        self.graph_cached_bytes = 0
        self.graph_cached_batches: int | None = None

    # ----------------------------------------------------------------- basics
    @property
    def num_params(self) -> int:
        return self.theta.numel()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @property
    def dtype(self) -> torch.dtype:
        return self.theta.dtype

    @property
    def device(self) -> torch.device:
        return self.theta.device

    def _flat_terms(self) -> list[tuple[float, Callable[[Tensor], Tensor]]]:
        like = self.fl.params
        return [(w, (lambda t, f=f: f(unflatten(t, like)))) for w, f in self.fl.terms()]

    def loss(self) -> float:
        """``L(theta)`` (one forward pass per batch)."""
        with torch.no_grad():
            return float(self.fl.allsum(self.fl.loss(self.fl.params).reshape(1), "the loss")[0])

    def gradient(self) -> Tensor:
        """Flat ``nabla L(theta)`` (one gradient)."""
        g = sum(w * grad(f)(self.theta) for w, f in self._flat_terms())
        return require_finite_gradient(self.fl.allsum(g, "a gradient"), self.fl.params)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- products
    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for one flat vector ``v`` (d,). Cost: 1 HVP."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def matmat(self, V: Tensor) -> Tensor:
        """``H V`` for a (d, k) block, ``chunk`` columns per vectorised call. Cost: k HVPs."""
        if V.dim() != 2 or V.shape[0] != self.num_params:
            raise SharpnessInputError(f"matmat expects a ({self.num_params}, k) block, got {tuple(V.shape)}")
        V = V.to(device=self.device, dtype=self.dtype)
        rows = V.T.contiguous()
        out = [self._hvp_rows(rows[i : i + self.chunk]) for i in range(0, rows.shape[0], self.chunk)]
        self.hvp_count += rows.shape[0]
        if not out:
            return V.clone()
        return require_finite(
            self.fl.allsum(torch.cat(out, 0), "a block of Hessian-vector products").T.contiguous(),
            "a Hessian-vector product at the measured weights",
        )

    def _hvp_rows(self, rows: Tensor) -> Tensor:
        if self.backend == "func":
            return self._hvp_func(rows)
        return self._hvp_autograd(rows)

    def _hvp_func(self, rows: Tensor) -> Tensor:
        theta = self.theta
        total = None
        for w, f in self._flat_terms():
            g = grad(f)

            def one(v: Tensor, g=g) -> Tensor:
                return jvp(g, (theta,), (v,))[1]

            hv = vmap(one)(rows) if rows.shape[0] > 1 else one(rows[0]).unsqueeze(0)
            total = w * hv if total is None else total + w * hv
        return total.detach()  # type: ignore[union-attr]

    def _graph(self, f: Callable[[Tensor], Tensor], i: int) -> tuple[Tensor, Tensor]:
        """``(t, grad L_b(t))`` of batch ``i`` with the graph of the gradient kept (one gradient); a NaN/inf
        loss or gradient raises :class:`~sharpness.functional.NonFiniteError` naming the batch."""
        n = len(self.fl.terms())
        where = "the measured weights" + (f" (batch {i} of {n})" if n > 1 else "")
        t = self.theta.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = require_finite(f(t), f"the loss at {where}")
            (g,) = torch.autograd.grad(loss, t, create_graph=True)
        require_finite_gradient(g, self.fl.params, where)
        return t, g

    def _gradient_graphs(self) -> list[tuple[float, Tensor, Tensor]]:
        """The cached graphs: batches in order while the total stays within ``graph_budget`` (built once,
        reused by every product). The first batch that does not fit is dropped and streamed, like the rest."""
        if self._graphs is None:
            graphs: list[tuple[float, Tensor, Tensor]] = []
            used = 0
            for i, (w, f) in enumerate(self._flat_terms()):
                if used >= self.graph_budget:
                    break
                with graph_bytes(self.device) as size:
                    t, g = self._graph(f, i)
                if used + size() > self.graph_budget:
                    del t, g
                    break
                used += size()
                graphs.append((w, t, g))
            self._graphs, self.graph_cached_bytes, self.graph_cached_batches = graphs, used, len(graphs)
        return self._graphs

    @staticmethod
    def _backward(t: Tensor, g: Tensor, rows: Tensor, retain: bool) -> Tensor:
        if rows.shape[0] == 1:
            (hv,) = torch.autograd.grad(g, t, grad_outputs=rows[0], retain_graph=retain)
            return hv.unsqueeze(0)
        (hv,) = torch.autograd.grad(g, t, grad_outputs=rows, retain_graph=retain, is_grads_batched=True)
        return hv

    def _hvp_autograd(self, rows: Tensor) -> Tensor:
        total = None
        cached = self._gradient_graphs()
        for w, t, g in cached:
            hv = w * self._backward(t, g, rows, True)
            total = hv if total is None else total + hv
        for i, (w, f) in enumerate(
            self._flat_terms()[len(cached) :], start=len(cached)
        ):  # streamed: rebuilt,
            t, g = self._graph(f, i)  # used once, freed
            hv = w * self._backward(t, g, rows, False)
            del t, g
            total = hv if total is None else total + hv
        return total.detach()  # type: ignore[union-attr]

    def graph_info(self) -> dict[str, Any]:
        """How the products were formed: ``mode`` (cached / streamed / mixed / func), batches cached and
        streamed, the budget and the bytes the cached graphs hold."""
        n = len(self.fl.terms())
        if self.backend == "func":
            return {"mode": "func", "batches": n, "cached": 0, "streamed": n, "budget_bytes": None}
        cached = self.graph_cached_batches
        if cached is None:
            mode = "not built"
        else:
            mode = "cached" if cached == n else "streamed" if cached == 0 else "mixed"
        return {
            "mode": mode,
            "batches": n,
            "cached": cached,
            "streamed": None if cached is None else n - cached,
            "budget_bytes": self.graph_budget,
            "cached_bytes": self.graph_cached_bytes,
        }

    def release(self) -> None:
        """Free the cached gradient graphs (the autograd backend keeps them between calls)."""
        self._graphs = None

    # ----------------------------------------------------------------- views
    def dense(self) -> Tensor:
        """The full d x d Hessian (d HVPs); refused above ``DENSE_LIMIT`` parameters."""
        d = self.num_params
        if d > DENSE_LIMIT:
            raise SharpnessInputError(
                f"dense() needs a d x d matrix; d = {d} exceeds the limit of {DENSE_LIMIT}"
            )
        eye = torch.eye(d, dtype=self.dtype, device=self.device)
        H = self.matmat(eye)
        return 0.5 * (H + H.T)

    def to_scipy(self) -> LinearOperator:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` view (:func:`scipy_view`)."""
        return scipy_view(self)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)


def scipy_view(op: Any) -> LinearOperator:
    """A float64 ``scipy.sparse.linalg.LinearOperator`` view of any symmetric operator with ``matvec``,
    ``matmat``, ``num_params``, ``dtype`` and ``device`` (numpy in, numpy out; products counted by ``op``).
    Cost: one product of ``op`` per vector."""

    def mv(x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=op.dtype, device=op.device)
        return op.matvec(v).double().cpu().numpy()

    def mm(X: np.ndarray) -> np.ndarray:
        V = torch.as_tensor(np.asarray(X), dtype=op.dtype, device=op.device)
        return op.matmat(V).double().cpu().numpy()

    d = op.num_params
    return LinearOperator((d, d), matvec=mv, rmatvec=mv, matmat=mm, dtype=np.float64)

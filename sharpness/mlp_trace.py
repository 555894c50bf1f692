"""Closed forms of the exact Hessian trace of a plain MLP: an ``nn.Sequential`` of Linear layers and
elementwise activations, with no backward pass per output column or activation unit.

For such a chain (modules of exactly these types, no hooks; see :func:`chain_of`) with layer ``l`` computing
``out_l = h_(l-1) W_l^T + b_l`` on (n, features) inputs, every per-sample Jacobian is a product of weight
matrices and the activations' diagonal derivatives ``sigma'(z)``. With ``J_il = df_i / d out_il``
(C x width_l) and ``M_il = dz_i / d out_il`` for an activation input ``z`` after layer ``l``, the squared norm
of a row ``r`` of ``d out_il / d(W_l, b_l)`` is ``r^2 (||h_i,l-1||^2 + 1)``, so

    Tr G = sum_i sum_l ||S_i^T J_il||_F^2 (||h_i,l-1||^2 + 1)
    Tr H - Tr G = sum_sites sum_{i,a} delta_ia sigma''(z_ia) sum_l ||M_il[a, :]||^2 (||h_i,l-1||^2 + 1)

(``S_i S_i^T`` = the loss Hessian in the outputs, ``delta = dL/dh`` at the activation's output, the ``+ 1``
only for a measured bias and the ``||h||^2`` only for a measured weight; the second line is
:func:`sharpness.ggn.activation_trace`'s term). ``S^T J`` and ``M`` are carried from the output (from each
site) back to the first measured layer by batched products ``T <- T diag(sigma'(z))`` and ``T <- T W_l``.
Cost: one forward pass, one gradient of the loss in the outputs, and the flops of ``K`` (columns of ``S``)
plus ``width(site)`` backward passes through the layers behind each smooth site, as batched matrix products
over chunks of samples, with no Python loop over columns or units; derivatives ``sigma'``, ``sigma''`` are
torch's own (autograd on the elementwise activation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: modules a chain may hold besides nn.Linear: elementwise, parameter-free, identical in train and eval mode
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.Identity)
SMOOTH = (nn.Tanh, nn.Sigmoid, nn.GELU, nn.Softplus)
#: aten op of each smooth activation module (the names the recorded certificate uses)
SMOOTH_OP = {
    nn.Tanh: "aten.tanh.default",
    nn.Sigmoid: "aten.sigmoid.default",
    nn.GELU: "aten.gelu.default",
    nn.Softplus: "aten.softplus.default",
}
#: Numbers one block of per-sample Jacobians may hold at once (256 MiB in float32).
CHUNK_NUMBERS = 1 << 26


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    mod = torch.nn.modules.module
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")  # fmt: skip
    return any(getattr(mod, n, None) for n in names)


def chain_of(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``(name, module)`` of a plain MLP, or ``None``: ``model`` is exactly ``nn.Sequential`` (no subclass)
    whose children are exactly ``nn.Linear``, ``nn.Flatten(1, -1)``, or the elementwise activations
    ``Tanh``, ``Sigmoid``, ``GELU`` (exact form), ``Softplus``, ``ReLU``, ``LeakyReLU``, ``Identity``, at
    least one Linear, each module used once, and no module or global hook anywhere (a hook could change
    what runs)."""
    if type(model) is not nn.Sequential or _hooked(model) or _global_hooks():
        return None
    out = []
    if len({id(m) for m in model.children()}) != len(model):  # a module used twice shares its weights
        return None
    for name, m in model.named_children():
        t = type(m)
        if _hooked(m) or (t is nn.GELU and m.approximate != "none"):
            return None
        if t is nn.Flatten and (m.start_dim, m.end_dim) != (1, -1):
            return None
        if t not in (nn.Linear, nn.Flatten, *PIECEWISE_LINEAR, *SMOOTH):
            return None
        out.append((name, m))
    return out if any(type(m) is nn.Linear for _, m in out) else None


def derivatives(m: nn.Module, z: Tensor, second: bool) -> tuple[Tensor, Tensor | None]:
    """``sigma'(z)`` and (``second``) ``sigma''(z)`` of an elementwise activation, by torch's autograd of
    ``sum sigma(z)`` (the diagonal of an elementwise map's Jacobian). Cost: one (double) backward of ``z``'s
    size."""
    zr = z.detach().requires_grad_(True)
    with torch.enable_grad():
        (d1,) = torch.autograd.grad(m(zr.clone()).sum(), zr, create_graph=second)
        if not second or not d1.requires_grad:
            return d1.detach(), None if not second else torch.zeros_like(z)
        (d2,) = torch.autograd.grad(d1.sum(), zr)
    return d1.detach(), d2.detach()


class ChainPass:
    """One forward pass of a chain on a batch: per step, ``("linear", name, W, input)`` or
    ``("act", module, input)``; ``first``: the index of the first Linear with a measured parameter (the
    Jacobians stop there); ``out``: the output. ``None`` from :meth:`run` when a Linear sees other than
    (n, features) inputs (the closed forms above assume one position per sample)."""

    def __init__(self, steps: list[tuple[Any, ...]], first: int, out: Tensor, measured: set[str]) -> None:
        self.steps, self.first, self.out, self.measured = steps, first, out, measured

    @classmethod
    def run(
        cls, chain: list[tuple[str, nn.Module]], p: dict[str, Tensor], measured: set[str], x: Tensor
    ) -> ChainPass | None:
        steps: list[tuple[Any, ...]] = []
        first = -1
        h = x
        with torch.no_grad():
            for name, m in chain:
                if type(m) is nn.Flatten:
                    h = torch.flatten(h, 1)
                elif type(m) is nn.Linear:
                    if h.dim() != 2:
                        return None
                    W, b = p[f"{name}.weight"], p.get(f"{name}.bias")
                    if first < 0 and ({f"{name}.weight", f"{name}.bias"} & measured):
                        first = len(steps)
                    steps.append(("linear", name, W, h))
                    h = F.linear(h, W, b)
                else:
                    steps.append(("act", m, h))
                    h = m(h.clone() if getattr(m, "inplace", False) else h)
        return cls(steps, first, h, measured)

    def sites(self) -> list[int]:
        """Steps that apply a smooth activation to a parameter-dependent tensor."""
        return [k for k, s in enumerate(self.steps) if s[0] == "act" and k > self.first >= 0
                and type(s[1]) in SMOOTH]  # fmt: skip

    def _accumulate(
        self,
        T: Tensor | None,
        start: int,
        weight: Tensor | None,
        rows: slice,
        acc: dict[str, Tensor],
        d1: dict[int, Tensor],
    ) -> None:
        """Carry ``T`` (chunk, R, width) = d(rows of something)/d(input of step ``start``) back to the first
        measured layer, adding ``sum weight * ||T_row||^2 (||h||^2 + 1)`` per measured parameter.

        ``T = None`` is the identity (a site's own units); it is then carried as ``W diag(d)`` (the rows of
        one weight matrix scaled by the activation derivatives, squared row norms ``d^2 (W^2)^T``) until a
        second Linear makes it a full (chunk, R, width) block: behind a one-layer site no
        (chunk, width, width) block is formed at all."""
        W_rows: Tensor | None = None  # T = W_rows diag(d) while not None
        d: Tensor | None = None
        for k in range(start - 1, self.first - 1, -1):
            step = self.steps[k]
            if step[0] == "act":
                g = d1[k][rows]
                if W_rows is not None:
                    d = g if d is None else d * g
                elif T is None:
                    T = torch.diag_embed(g)
                else:
                    T = T * g.unsqueeze(1)
                continue
            _, name, W, h = step
            n = h[rows].shape[0]
            if W_rows is not None:
                W2 = (W_rows * W_rows).T
                sq = W2.sum(0).expand(n, -1) if d is None else (d * d) @ W2  # (chunk, R)
            elif T is None:
                sq = torch.ones(n, W.shape[0], dtype=W.dtype, device=W.device)
            else:
                sq = torch.linalg.vecdot(T, T)
            if weight is not None:
                sq = sq * weight
            sq = sq.double().sum(1)
            if f"{name}.weight" in self.measured:
                hh = torch.linalg.vecdot(h[rows], h[rows]).double()
                acc[f"{name}.weight"] = acc.get(f"{name}.weight", 0) + (sq * hh).sum()
            if f"{name}.bias" in self.measured:
                acc[f"{name}.bias"] = acc.get(f"{name}.bias", 0) + sq.sum()
            if k == self.first:
                break
            if T is None and W_rows is None:
                W_rows = W
            elif W_rows is not None and d is None:
                W_rows = W_rows @ W
            else:
                if W_rows is not None:
                    T, W_rows = W_rows * d.unsqueeze(1), None  # type: ignore[union-attr]
                T = (T.reshape(-1, T.shape[2]) @ W).reshape(T.shape[0], T.shape[1], W.shape[1])  # type: ignore[union-attr]

    def _derivatives(self, second: set[int]) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        d1: dict[int, Tensor] = {}
        d2: dict[int, Tensor] = {}
        for k, s in enumerate(self.steps):
            if s[0] == "act" and k > self.first:
                d1[k], two = derivatives(s[1], s[2], k in second)
                if two is not None:
                    d2[k] = two
        return d1, d2

    def _chunk(self, per_sample: int) -> int:
        widths = [s[3].shape[1] for s in self.steps if s[0] == "linear"] + [self.out.shape[1]]
        return max(1, CHUNK_NUMBERS // max(1, per_sample * max(widths)))

    def ggn(self, ST: Tensor) -> dict[str, Tensor]:
        """``sum_i ||S_i^T J_il||^2 (||h||^2 + 1)`` per measured parameter, float64; ``ST`` (n, K, C)."""
        acc: dict[str, Tensor] = {}
        if self.first < 0:
            return acc
        d1, _ = self._derivatives(set())
        n, K = ST.shape[0], ST.shape[1]
        step = self._chunk(K)
        for i in range(0, n, step):
            self._accumulate(ST[i : i + step], len(self.steps), None, slice(i, i + step), acc, d1)
        return acc

    def activation_term(self, delta_out: Tensor) -> tuple[Tensor, dict[str, int]]:
        """``sum_sites sum_{i,a} delta_ia sigma''(z_ia) ||dz_ia/dtheta||^2`` (float64) from the gradient
        of the loss in the outputs ``delta_out`` (n, C), and the smooth sites run (aten op -> count)."""
        sites = self.sites()
        d1, d2 = self._derivatives(set(sites))
        coef: dict[int, Tensor] = {}
        delta = delta_out
        for k in range(len(self.steps) - 1, self.first, -1):  # delta: dL/d(output of step k)
            step = self.steps[k]
            if step[0] == "act":
                if k in d2:
                    coef[k] = delta * d2[k]
                delta = delta * d1[k]
            else:
                delta = delta @ step[2]
        total = torch.zeros((), dtype=torch.float64, device=delta_out.device)
        acc: dict[str, Tensor] = {}
        for k in sites:
            z = self.steps[k][2]
            n, w = z.shape
            step = self._chunk(w)
            for i in range(0, n, step):
                rows = slice(i, i + step)
                self._accumulate(None, k, coef[k][rows], rows, acc, d1)
        for v in acc.values():
            total = total + v
        seen: dict[str, int] = {}
        for k in sites:
            op = SMOOTH_OP[type(self.steps[k][1])]
            seen[op] = seen.get(op, 0) + 1
        return total, seen


def units_of(chain: list[tuple[str, nn.Module]], p: dict[str, Tensor], measured: set[str],
             x: Tensor) -> tuple[dict[str, int], int] | None:  # fmt: skip
    """Smooth sites (aten op -> count) and their units per sample on the first two samples of ``x``
    (``None`` when the chain does not run on ``x`` as an MLP)."""
    try:
        run = ChainPass.run(chain, p, measured, x[:2])
    except (RuntimeError, TypeError, ValueError):
        return None
    if run is None:
        return None
    sites: dict[str, int] = {}
    units = 0
    for k in run.sites():
        m, z = run.steps[k][1], run.steps[k][2]
        op = SMOOTH_OP[type(m)]
        sites[op] = sites.get(op, 0) + 1
        units += int(z.shape[1])
    return sites, units


def loss_gradient(loss_fn: Callable[..., Tensor], out: Tensor, y: Tensor, w: float) -> Tensor:
    """``d (w loss_fn(out, y)) / d out``: one backward through the loss only."""
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(w * loss_fn(o, y), o)
    return g

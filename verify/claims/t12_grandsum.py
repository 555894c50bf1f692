"""T12: the sign of the escaping term ``grandsum((T(w) grad L(w)) (.) Xi*)`` ([I] Theorem 3 / Proposition 4;
paper.md s.2.2, s.3 P12, s.6 T12). ICLR-2023 predecessor only; presence in the ICML version unverified.

Formula: ``(T grad L)_{ij} = sum_k T_{ijk} d_k L`` (the derivative of H along grad L), ``Xi*`` the diagonal of
Xi, ``grandsum(M) = sum_ij M_ij``. For the separable ``L(w) = sum_i |w_i|^p`` (``PowerLoss`` per coordinate)
it is ``sum_i p^2 (p-1) (p-2) |w_i|^(2p-4) Xi*_ii``: zero on a quadratic (p = 2), positive on
super-quadratic (p > 2) and negative on sub-quadratic (p < 2) minima, so D-SGD's escaping term prefers
super-quadratic (flatter) minima. Measured by automatic differentiation (``jvp`` of ``torch.func.hessian``
along ``grad L``), compared with the closed form, at random points ``w`` (every ``|w_i|`` in [0.2, 2]) and
random diagonal ``Xi*``; in d = 1 this is ``L''' L' xi^2``.
Negative control: a quadratic (second-order Taylor) surrogate of L at w has ``T = 0``, so its grandsum is 0
for every p and cannot tell super- from sub-quadratic minima: the sign test fails for p != 2.
Cost: one forward-mode pass over the d x d Hessian per point.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, hessian, jvp

from verify.losses import PowerLoss

from .base import Check, CheckResult, Context, fmt
from .registry import register


def grandsum_term(f: Callable[[Tensor], Tensor], w: Tensor, xi_diag: Tensor) -> float:
    """``sum_ij (T(w) grad f(w))_ij Xi*_ij`` with ``Xi* = diag(xi_diag)``, by autograd."""
    g = grad(f)(w)
    TG = jvp(hessian(f), (w,), (g,))[1]  # d/dt H(w + t g) at t = 0
    return float((torch.diagonal(TG) * xi_diag).sum())


def closed_form(p: float, w: Tensor, xi_diag: Tensor) -> float:
    """``sum_i p^2 (p-1) (p-2) |w_i|^(2p-4) Xi*_ii``."""
    return float((p * p * (p - 1) * (p - 2) * w.abs() ** (2 * p - 4) * xi_diag).sum())


def taylor2(f: Callable[[Tensor], Tensor], w0: Tensor) -> Callable[[Tensor], Tensor]:
    """The quadratic model ``f(w0) + g^T (v - w0) + 1/2 (v - w0)^T H (v - w0)`` of f at w0."""
    f0, g0, H0 = f(w0).detach(), grad(f)(w0).detach(), hessian(f)(w0).detach()
    return lambda v: f0 + g0 @ (v - w0) + 0.5 * (v - w0) @ H0 @ (v - w0)


@register
class GrandsumSign(Check):
    id = "T12"
    title = "Escaping-term sign (P12, [I] only)"
    claim = (
        "grandsum((T grad L) (.) Xi*) is zero on quadratic, positive on super-quadratic and negative on "
        "sub-quadratic minima, so D-SGD prefers super-quadratic (flatter) minima."
    )
    source = "[I] Theorem 3, Definition 3, Proposition 4 (ICML presence unverified); paper.md s.2.2, s.3 P12"
    status = "proven"
    evidence = "theorem at a frozen state"
    prediction = "sign = sign(p - 2); exactly 0 for p = 2"
    criterion = (
        "sign(grandsum) = sign(p - 2) at every point; exactly 0 for p = 2; autograd = closed form to 1e-10"
    )
    control = "quadratic Taylor surrogate of L (T = 0): grandsum 0 for every p, sign test fails for p != 2"

    def run(self, ctx: Context) -> CheckResult:
        ps = ctx.pick([1.5, 2.0, 3.0, 4.0], [1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0])
        dims, n_points = ctx.pick([1, 4], [1, 4, 16]), ctx.pick(4, 16)
        gen = ctx.generator(12)
        cols: dict[str, list] = {k: [] for k in ("p", "d", "point", "grandsum", "closed_form", "surrogate")}
        for p in ctx.progress(ps, desc="p"):
            loss = PowerLoss(p)
            f = lambda w, loss=loss: loss(w).sum()
            for d in dims:
                for k in range(n_points):
                    sign = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).double()
                    w = sign * (0.2 + 1.8 * torch.rand(d, generator=gen, dtype=torch.float64))
                    xi = 0.01 + torch.rand(d, generator=gen, dtype=torch.float64)
                    row = (
                        p,
                        d,
                        k,
                        grandsum_term(f, w, xi),
                        closed_form(p, w, xi),
                        grandsum_term(taylor2(f, w), w, xi),
                    )
                    for key, v in zip(cols, row, strict=True):
                        cols[key].append(v)
        gs, cf, sur = (np.array(cols[k]) for k in ("grandsum", "closed_form", "surrogate"))
        expected = np.sign(np.array(cols["p"]) - 2.0)
        signs_ok = bool(np.all(np.sign(gs) == expected))
        zero_at_2 = bool(np.all(gs[expected == 0] == 0.0))
        rel = np.abs(gs - cf) / np.maximum(np.abs(cf), 1e-300)
        rel_err = float(np.max(np.where(cf == 0, np.abs(gs), rel)))
        holds = signs_ok and zero_at_2 and rel_err < 1e-10
        sur_fails = bool(np.all(np.sign(sur[expected != 0]) != expected[expected != 0]))
        return self.result(
            settings={
                "p": ps,
                "dims": dims,
                "points_per_p_and_d": n_points,
                "|w_i|": "U[0.2, 2]",
                "Xi*_ii": "U[0.01, 1.01]",
            },
            measured={
                "sign_matches_everywhere": signs_ok,
                "exactly_zero_at_p2": zero_at_2,
                "max_abs_at_p2": float(np.max(np.abs(gs[expected == 0]))),
                "autograd_vs_closed_form_rel_error": rel_err,
                **{f"median_p{p:g}": float(np.median(gs[np.array(cols["p"]) == p])) for p in ps},
            },
            criterion_holds=holds,
            control_measured={
                "surrogate_max_abs": float(np.max(np.abs(sur))),
                "surrogate_sign_test_fails": sur_fails,
            },
            control_came_out_other_way=sur_fails,
            series={"grandsum": cols},
            summary=f"signs match at all {len(gs)} points; p=2 exactly 0; vs closed form {fmt(rel_err)}",
            control_summary=f"surrogate grandsum max |.| = {fmt(float(np.max(np.abs(sur))))}",
        )

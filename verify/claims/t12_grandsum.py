"""T12: the sign of the escaping term ``grandsum((T(w) grad L(w)) (.) Xi*)`` ([I] Theorem 3 / Proposition 4;
paper.md s.2.2, s.3 P12, s.6 T12). ICLR-2023 predecessor only; presence in the ICML version unverified.

Formula: ``(T grad L)_{ij} = sum_k T_{ijk} d_k L`` (the derivative of H along grad L), ``Xi*`` the diagonal of
Xi, ``grandsum(M) = sum_ij M_ij``. For the separable ``L(w) = sum_i |w_i|^p`` (``PowerLoss`` per coordinate)
it is ``sum_i p^2 (p-1) (p-2) |w_i|^(2p-4) Xi*_ii``: zero on a quadratic (p = 2), positive on
super-quadratic (p > 2) and negative on sub-quadratic (p < 2) minima, so D-SGD's escaping term prefers
super-quadratic (flatter) minima. Measured by automatic differentiation (``jvp`` of ``torch.func.hessian``
along ``grad L``), compared with the closed form, at random points ``w`` (every ``|w_i|`` in [0.2, 2]) and
random diagonal ``Xi*``; in d = 1 this is ``L''' L' xi^2``.
No negative control ("identity: no control"): the claim is the sign of a closed-form expression, and what is
measured is that automatic differentiation reproduces that closed form to rounding. Every candidate control
fails by construction and tests nothing: a quadratic surrogate has ``T = 0`` (grandsum identically 0), the
derivative along ``-grad L`` flips every sign, a symmetric +-perturbation average cancels the odd term.
Criterion (:func:`criterion`): signs match, exactly 0 at p = 2, autograd = closed form to ``CLOSED_FORM_TOL``.
Cost: one forward-mode pass over the d x d Hessian per point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, hessian, jvp

from verify.losses import PowerLoss

from .base import NO_CONTROL, Check, CheckResult, Context, fmt
from .registry import register

#: relative agreement required between autograd and the closed form
CLOSED_FORM_TOL = 1e-10


def criterion(measured: Mapping[str, Any]) -> bool:
    """``sign_matches_everywhere``, ``exactly_zero_at_p2`` and the autograd-vs-closed-form relative error
    below CLOSED_FORM_TOL."""
    return (
        bool(measured["sign_matches_everywhere"])
        and bool(measured["exactly_zero_at_p2"])
        and measured["autograd_vs_closed_form_rel_error"] < CLOSED_FORM_TOL
    )


def grandsum_term(f: Callable[[Tensor], Tensor], w: Tensor, xi_diag: Tensor) -> float:
    """``sum_ij (T(w) grad f(w))_ij Xi*_ij`` with ``Xi* = diag(xi_diag)``, by autograd."""
    g = grad(f)(w)
    TG = jvp(hessian(f), (w,), (g,))[1]  # d/dt H(w + t g) at t = 0
    return float((torch.diagonal(TG) * xi_diag).sum())


def closed_form(p: float, w: Tensor, xi_diag: Tensor) -> float:
    """``sum_i p^2 (p-1) (p-2) |w_i|^(2p-4) Xi*_ii``."""
    return float((p * p * (p - 1) * (p - 2) * w.abs() ** (2 * p - 4) * xi_diag).sum())


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
    evidence = "identity"
    has_control = False
    prediction = "sign = sign(p - 2); exactly 0 for p = 2"
    criterion = (
        "sign(grandsum) = sign(p - 2) at every point; exactly 0 for p = 2; autograd = closed form to "
        f"{CLOSED_FORM_TOL:g}"
    )
    control = (
        f"{NO_CONTROL} (the sign of a closed form, checked by autograd; a quadratic surrogate or a flipped "
        "direction would fail by construction)"
    )

    def run(self, ctx: Context) -> CheckResult:
        ps = ctx.pick([1.5, 2.0, 3.0, 4.0], [1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0])
        dims, n_points = ctx.pick([1, 4], [1, 4, 16]), ctx.pick(4, 16)
        gen = ctx.generator(12)
        cols: dict[str, list] = {k: [] for k in ("p", "d", "point", "grandsum", "closed_form")}
        for p in ctx.progress(ps, desc="p"):
            loss = PowerLoss(p)
            f = lambda w, loss=loss: loss(w).sum()
            for d in dims:
                for k in range(n_points):
                    sign = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).double()
                    w = sign * (0.2 + 1.8 * torch.rand(d, generator=gen, dtype=torch.float64))
                    xi = 0.01 + torch.rand(d, generator=gen, dtype=torch.float64)
                    row = (p, d, k, grandsum_term(f, w, xi), closed_form(p, w, xi))
                    for key, v in zip(cols, row, strict=True):
                        cols[key].append(v)
        gs, cf = (np.array(cols[k]) for k in ("grandsum", "closed_form"))
        expected = np.sign(np.array(cols["p"]) - 2.0)
        signs_ok = bool(np.all(np.sign(gs) == expected))
        zero_at_2 = bool(np.all(gs[expected == 0] == 0.0))
        rel = np.abs(gs - cf) / np.maximum(np.abs(cf), 1e-300)
        rel_err = float(np.max(np.where(cf == 0, np.abs(gs), rel)))
        measured = {
            "sign_matches_everywhere": signs_ok,
            "exactly_zero_at_p2": zero_at_2,
            "max_abs_at_p2": float(np.max(np.abs(gs[expected == 0]))),
            "autograd_vs_closed_form_rel_error": rel_err,
            **{f"median_p{p:g}": float(np.median(gs[np.array(cols["p"]) == p])) for p in ps},
        }
        return self.result(
            settings={
                "p": ps,
                "dims": dims,
                "points_per_p_and_d": n_points,
                "|w_i|": "U[0.2, 2]",
                "Xi*_ii": "U[0.01, 1.01]",
            },
            measured=measured,
            criterion_holds=criterion(measured),
            series={"grandsum": cols},
            summary=f"signs match at all {len(gs)} points; p=2 exactly 0; vs closed form {fmt(rel_err)}",
            control_summary=NO_CONTROL,
        )

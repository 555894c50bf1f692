"""T0: the exact averaged dynamics of D-SGD (paper.md s.1 "Exact averaged dynamics", s.3 P1, s.6 T0).

Formula: for the AWC update ``W' = P W - eta G`` (rows = workers) and any P with ``1^T P = 1^T``,
``(1/m) 1^T W' = w_bar - eta g_bar`` exactly, so ``w_a(t+1) = w_a(t) - eta (1/m) sum_j g_j(w_j(t))``.
Measured: ``err = max |(1/m) 1^T (P W - eta G) - (w_bar - eta g_bar)|`` over random W (m x d), G, eta, for
the official ring / grid / exponential / complete matrices (:mod:`verify.topology`), through every gossip
implementation the engine can use (:func:`verify.topology.mixer`: dense, sparse, and roll where P is
circulant). Negative control: a row-stochastic but not column-stochastic P breaks the identity (error of the
order of the column-sum defect), so the same :func:`criterion` rejects it, and
:func:`verify.topology.validate` refuses it with a one-line error.
Cost: O(m^2 d) per draw.
"""

from __future__ import annotations

import torch

from .base import Check, CheckResult, Context, fmt
from .registry import register

TOPOLOGIES = ("ring", "grid", "exponential", "complete")
#: the criterion's bound on the averaging error (rounding) and the control's least expected error
ERROR_TOL = 1e-12
CONTROL_ERROR_MIN = 1e-3


def criterion(max_error: float) -> bool:
    """``max_error < ERROR_TOL``: the averaged update is exact to rounding."""
    return max_error < ERROR_TOL


def average_error(mix: object, P: torch.Tensor, W: torch.Tensor, G: torch.Tensor, eta: float) -> float:
    """``max |mean_j (P W - eta G)_j - (mean_j W_j - eta mean_j G_j)|`` with ``P W`` from ``mix(W)``."""
    new = mix(W) - eta * G  # type: ignore[operator]
    return float((new.mean(0) - (W.mean(0) - eta * G.mean(0))).abs().max())


@register
class ExactAveraging(Check):
    id = "T0"
    title = "Exact averaged dynamics"
    claim = (
        "If the columns of P sum to one, averaging the D-SGD update gives exactly "
        "w_a(t+1) = w_a(t) - eta (1/m) sum_j g_j(w_j(t))."
    )
    source = "[I] Eq. (4); poster proof idea [P] (sign corrected); paper.md s.1, s.3 P1, s.6 T0"
    status = "proven"
    evidence = "identity"
    prediction = "error at machine precision for every doubly stochastic P"
    criterion = (
        f"max error < {ERROR_TOL:g} over ring, grid, exponential, complete and every gossip implementation"
    )
    control = (
        "row-stochastic, non-column-stochastic P: the same criterion rejects it (error > "
        f"{CONTROL_ERROR_MIN:g}) and verify.topology.validate refuses P"
    )

    def run(self, ctx: Context) -> CheckResult:
        from verify.mixers import circulant_coefficients
        from verify.topology import TopologyError, mixer, mixing_matrix, validate

        m, d = 16, ctx.pick(64, 512)
        draws = ctx.pick(4, 32)
        gen = ctx.generator(0)
        rows: dict[str, list] = {"topology": [], "method": [], "draw": [], "error": []}
        per_topology: dict[str, float] = {}
        for name in ctx.progress(TOPOLOGIES, desc="topologies"):
            P = mixing_matrix(name, m)
            methods = ["dense", "sparse"] + (["roll"] if circulant_coefficients(P) is not None else [])
            worst = 0.0
            for method in methods:
                mix = mixer(P, method)
                for k in range(draws):
                    W = torch.randn(m, d, generator=gen, dtype=torch.float64)
                    G = torch.randn(m, d, generator=gen, dtype=torch.float64)
                    eta = float(torch.rand((), generator=gen, dtype=torch.float64)) + 1e-3
                    err = average_error(mix, P, W, G, eta)
                    worst = max(worst, err)
                    for key, val in zip(rows, (name, method, k, err), strict=True):
                        rows[key].append(val)
            per_topology[name] = worst
        max_err = max(per_topology.values())

        # Negative control: rows sum to 1, columns do not.
        R = torch.rand(m, m, generator=gen, dtype=torch.float64) ** 3
        R = R / R.sum(1, keepdim=True)
        col_defect = float((R.sum(0) - 1).abs().max())
        W = torch.randn(m, d, generator=gen, dtype=torch.float64)
        G = torch.randn(m, d, generator=gen, dtype=torch.float64)
        ctrl_err = average_error(lambda X: R @ X, R, W, G, 0.1)
        try:
            validate(R)
            refused, message = False, ""
        except TopologyError as exc:
            refused, message = True, str(exc)
        other_way = (
            not criterion(ctrl_err) and ctrl_err > CONTROL_ERROR_MIN and refused and "\n" not in message
        )
        return self.result(
            settings={"m": m, "d": d, "draws_per_method": draws, "eta": "U[0.001, 1.001]"},
            measured={"max_error": max_err, **{f"error_{k}": v for k, v in per_topology.items()}},
            criterion_holds=criterion(max_err),
            control_measured={
                "error": ctrl_err,
                "column_sum_defect": col_defect,
                "refused_by_validate": refused,
                "message": message,
            },
            control_came_out_other_way=other_way,
            series={"errors": rows},
            summary=f"max error {fmt(max_err)} over {len(rows['error'])} updates",
            control_summary=f"error {fmt(ctrl_err)}, validate {'refuses' if refused else 'ACCEPTS'} P",
        )

"""T11: the empirical large-batch gap between D-SGD and C-SGD (abstract [A]; paper.md s.3 P11, s.4.3,
s.6 T11). Full suite only; an empirical claim, not a theorem.

The paper's evidence [C]: with the linear scaling rule, ring D-SGD's test accuracy falls less than C-SGD's
from total batch 1024 to 8192 (ResNet-18 from scratch on CIFAR-10: D-C -0.43 pp at 1024, +2.46 pp at 8192;
C-SGD loses 3.6 pp). The experiment and its three scales (``--scale digits|fmnist|paper``) are in
:mod:`verify.claims.largebatch`: for each seed and batch one lockstep run of D-SGD, C-SGD, C-SGD +
avg-SAM(Xi(t)) and C-SGD + isotropic noise of equal Tr Xi(t), same initialisation and batch stream.

Verdict (the shared rule): precondition: C-SGD loses accuracy from the small to the large batch (t interval
over seeds excludes 0), else INCONCLUSIVE; the paper's reading: the interaction
``(D-C)_large - (D-C)_small`` (claimed +2.89 pp), NOT SUPPORTED if its interval excludes the claim, PASS if
it excludes 0 on the claimed side, else INCONCLUSIVE. Criterion: no D-SGD or C-SGD run diverged (the runs
exist and are paired). Negative control, a counterfactual dynamics through the same rule: the interaction
with the isotropic arm in place of D-SGD must not come out supported. Reported with intervals: each D-C,
the mechanism (avg-SAM(Xi) and isotropic minus D-SGD at the large batch, accuracy and flatness at matched
train loss) and the flatness gaps. Cost: see :mod:`verify.claims.largebatch`; the digits scale takes a few
minutes, fmnist about an hour on 2 CPU cores, the paper scale is for a GPU (estimate printed first).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from .base import Check, CheckResult, Context
from .largebatch import CLAIMED_INTERACTION, analyse, estimate_cost, protocol_for, run_protocol, verdict
from .registry import register


def control_rejected(analysis: dict) -> bool:
    """The control came out the other way: the isotropic arm's interaction is not ``supported``."""
    return analysis["control"].outcome != "supported"


@register
class LargeBatchGap(Check):
    id = "T11"
    title = "Empirical large-batch gap, D-SGD vs C-SGD (--scale digits|fmnist|paper)"
    claim = (
        "In large-batch training with the linear scaling rule, D-SGD generalises better than C-SGD and finds "
        "flatter minima; the gap grows with the total batch."
    )
    source = "abstract [A]; official CSVs [C]; paper.md s.3 P11, s.4.3, s.6 T11"
    status = "empirical"
    evidence = "empirical"
    prediction = (
        f"precondition: C-SGD loses accuracy small -> large B; interaction (D-C)_large - (D-C)_small > 0 "
        f"(claimed {CLAIMED_INTERACTION:+.2f} pp)"
    )
    criterion = (
        "no D-SGD / C-SGD run diverged; the paper's reading decided by the 95 % t interval over seeds of the "
        "interaction (precondition: C-SGD's drop small -> large B, else INCONCLUSIVE)"
    )
    control = (
        "isotropic noise of equal Tr Xi(t) in place of D-SGD, same rule: its interaction must not be "
        "supported"
    )
    full_only = True
    expected = "INCONCLUSIVE"

    single_threaded = True

    def run(self, ctx: Context) -> CheckResult:
        scale = ctx.options.get("scale", "digits")
        protocol = protocol_for(scale, ctx.options.get("data"))
        if scale == "digits":
            protocol = replace(protocol, steps=ctx.pick(600, 2000))
        seeds = [ctx.seed + k for k in range(protocol.seeds)]
        out = Path(ctx.options["report"]) / f"T11-{scale}" if ctx.options.get("report") else None
        if scale != "digits":
            est = estimate_cost(protocol, seed=ctx.seed)
            print(
                f"T11 {scale}: cost estimate from timed steps: {est['seed_s'] / 60:.1f} min per seed, "
                f"{est['total_s'] / 60:.1f} min for {len(seeds)} seeds",
                file=sys.stderr,
                flush=True,
            )
        runs = run_protocol(protocol, out, resume=False, seeds=seeds)
        a = analyse(runs)
        ok = not any(r["diverged"].get(k) is not None for r in runs for k in ("dsgd", "csgd"))
        _, _, ctrl_other = verdict(a, ok)
        reported = {
            **{f"dc_{b}": e.to_dict() for b, e in a["dc"].items()},
            **{f"mechanism_{k}": d for k, d in a["mechanism"].items()},
            **{f"flatness_{k}": d for k, d in a["flatness"].items()},
        }
        inter = a["interaction"]
        return self.result(
            settings=protocol.describe(),
            measured={
                "per_seed": a["per_seed"],
                **reported,
            },
            criterion_holds=ok,
            control_measured={"isotropic_interaction": a["control"].to_dict()},
            control_came_out_other_way=ctrl_other,
            series={f"{r['batch']}_seed{r['seed']}": _columns(r["rows"]) for r in runs},
            effects=[a["precondition"], inter],
            summary=(
                f"{scale}: C drop {a['precondition'].interval.estimate:+.2f} pp; interaction "
                f"{inter.interval.estimate:+.2f} [{inter.interval.low:+.2f}, {inter.interval.high:+.2f}] pp "
                f"(MDE {inter.mde:.2f})"
            ),
            control_summary=f"isotropic interaction: {a['control'].outcome}",
        )


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    return {k: [r.get(k) for r in rows] for k in keys}

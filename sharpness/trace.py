"""The Hessian trace to a stated accuracy: exact where the network allows it, variance-reduced elsewhere.

Methods (``method=``):

- ``"exact-ggn"``: ``Tr H = Tr G`` for networks piecewise linear in each single parameter under a
  cross-entropy or squared-error loss (certified by :func:`sharpness.ggn.piecewise_linear`; refused
  otherwise), with ``Tr G`` computed exactly by :func:`sharpness.ggn.ggn_trace`. ``stderr = 0``. Cost: one
  backward pass per output column (``C`` per batch), no HVP.
- ``"exact"``: ``Tr H = Tr G + sum_sites sum_{i,a} (dL/dh_ia) sigma''(z_ia) ||dz_ia/dtheta||^2`` for networks
  that are piecewise linear except for elementwise smooth activations ``h = sigma(z)`` (Tanh, Sigmoid, GELU,
  Softplus modules; :func:`sharpness.ggn.activation_trace`). ``stderr = 0``. Cost: ``C`` plus one backward
  pass per activation unit of a sample (an MLP's hidden widths), per batch; for a plain ``nn.Sequential`` of
  Linear layers and elementwise activations no backward pass at all: the closed form of
  :mod:`sharpness.mlp_trace` (one forward pass, then the same Jacobian columns by batched products, and a
  certificate read from the modules instead of a recorded forward pass).
- ``"ggn+hutchinson"``: ``Tr H = Tr G + E[z^T (H - G) z]``: exact ``Tr G`` plus Hutchinson on ``H - G``,
  whose variance ``2 ||H - G||_F^2`` (Rademacher: minus the diagonal part) is small near a minimum where the
  residual term ``sum_i (dl_i/df_i) nabla^2 f_i`` is small. Cost: ``Tr G`` plus, per probe, 1 HVP and 1 JVP.
- ``"xtrace"`` (Epperly, Tropp & Webber 2024): ``k`` Rademacher vectors ``W``, ``Q R = qr(A W)``; for each
  ``i`` the exact trace of ``A`` on ``span(Q_(i))`` (the basis without column ``i``, by a rank-one
  downdate of ``Q``) plus a Hutchinson term of the deflated ``A`` with the left-out ``w_i``; the estimate is
  the mean of the ``k`` exchangeable estimates, ``stderr = std_i / sqrt(k)`` (the paper's error estimate).
  Cost: ``2k`` products; with ``rtol``, ``k`` doubles (reusing ``A W``) until it is met.
- ``"hutchinson"``, ``"hutch++"``: below.
- ``"auto"`` (default): ``exact-ggn`` when certified; else ``exact`` when certified with smooth activations
  and its backward passes fit twice the product cap; else ``ggn+hutchinson`` when the loss has a network
  behind it with a known loss Hessian and ``Tr G``'s ``C`` backward passes fit, else ``hutchinson``.


Hutchinson: ``Tr H = E[z^T H z]`` for Rademacher ``z`` (entries +-1), so ``Tr H ~ (1/n) sum_i z_i^T H z_i``
with standard error ``std(z_i^T H z_i) / sqrt(n)``. Hutch++ (Meyer, Musco, Musco & Woodruff 2021) first
removes the dominant part of the spectrum exactly: ``Q = qr(H S)`` for a Rademacher sketch ``S``, then
``Tr H = tr(Q^T H Q) + Tr((I - QQ^T) H (I - QQ^T))`` with Hutchinson on the second term only.
Probes are drawn on a seeded CPU ``torch.Generator`` and moved to the operator's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .functional import (
    GRADIENT_HINT,
    Batch,
    FunctionalLoss,
    NonFiniteError,
    SharpnessInputError,
    require_finite,
    seeded,
)
from .ggn import (
    Applicability,
    activation_trace,
    ggn_quadratic_forms,
    ggn_trace,
    layer_owners,
    loss_kind,
    network_of,
    outputs_per_sample,
    piecewise_linear,
)
from .operators import apply_blocks, rademacher, recorded_mode, release, resolve_operator
from .results import Result

#: Stopping on ``rtol`` never happens before this many Hutchinson probes.
MIN_PROBES = 10
#: Target relative standard error when neither ``n_probes`` nor ``rtol`` is given.
DEFAULT_RTOL = 0.02
#: what a non-finite exact part is called in the error (the per-sample output gradients it sums)
GGN_WHAT = "the gradient of the outputs at the measured weights (summed into the exact Gauss-Newton trace)"


def _require_finite_ggn(g: Any) -> None:
    """One line naming the parameter tensors whose part of ``Tr G`` is not finite (the per-sample output
    gradients there are not), else nothing."""
    bad = [name for name, v in g.per_param.items() if not math.isfinite(v)]
    if bad or not math.isfinite(g.value):
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        where = f" (non-finite in {', '.join(bad[:3])}{more})" if bad else ""
        raise NonFiniteError(f"{GGN_WHAT} is not finite{where}{GRADIENT_HINT}")


#: Cap on probes when stopping on accuracy without ``n_probes``.
DEFAULT_MAX_PROBES = 1000
#: ``auto`` keeps ``ggn+hutchinson`` unless the pilot variance of plain Hutchinson is at most this times
#: that of ``z^T (H - G) z`` (a JVP costs about half an HVP: 1.5x the cost per probe).
SWITCH_RATIO = 1.5
METHODS = ("auto", "exact-ggn", "exact", "ggn+hutchinson", "xtrace", "hutchinson", "hutch++")


@dataclass
class TraceResult(Result):
    """``value ~ Tr H`` with its standard error ``stderr``.

    ``n_probes``: random vectors drawn (Hutch++: sketch columns + residual probes; XTrace: test vectors).
    ``n_hvp``: Hessian-vector products spent. ``n_jvp``: Jacobian-vector products (``z^T G z``).
    ``n_backward``: backward passes of the exact paths (one per output column and batch, plus one per
    activation unit for ``exact``; 0 for the closed form of a plain MLP).
    ``samples``: the Hutchinson quadratic forms ``z^T H z`` (Hutch++: ``w^T H w`` with ``w = (I - QQ^T) z``;
    ggn+hutchinson: ``z^T (H - G) z``; XTrace: the exchangeable estimates). ``converged``: whether ``rtol``
    was met (``None`` without ``rtol``; ``True`` for an exact value). ``exact_part``: ``Tr G`` when used;
    ``why``: one line on why this method (auto) or why the value is exact.
    """

    value: float
    stderr: float
    n_hvp: int
    n_probes: int
    method: str
    converged: bool | None = None
    samples: list[float] = field(default_factory=list)
    sketch_trace: float | None = None
    n_sketch: int = 0
    n_jvp: int = 0
    n_backward: int = 0
    exact_part: float | None = None
    rtol: float | None = None
    why: str = ""


def _quad_forms(Z: Tensor, HZ: Tensor) -> list[float]:
    """Column-wise ``z^T H z``, summed in float64."""
    return [float(torch.dot(Z[:, i].double(), HZ[:, i].double())) for i in range(Z.shape[1])]


def _mean_stderr(samples: list[float]) -> tuple[float, float]:
    x = np.asarray(samples, dtype=np.float64)
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def _hutchinson(
    op: Any,
    gen: torch.Generator,
    n: int,
    batch: int,
    stop: Callable[[float, float], bool] | None,
    Q: Tensor | None = None,
) -> tuple[list[float], bool]:
    """Up to ``n`` samples ``w^T H w`` (``w = z``, or ``(I - QQ^T) z``), ``batch`` per block;
    ``stop(mean, se)`` is asked after each block once ``MIN_PROBES`` samples exist. Cost: 1 HVP per sample."""
    samples: list[float] = []
    while len(samples) < n:
        b = min(batch, n - len(samples))
        Z = rademacher(gen, op.num_params, b, op.dtype, op.device)
        if Q is not None:
            Z = Z - Q @ (Q.T @ Z)
        samples += _quad_forms(Z, op.matmat(Z))
        if stop is not None and len(samples) >= MIN_PROBES and stop(*_mean_stderr(samples)):
            return samples, True
    return samples, False


@seeded
def hessian_trace(
    model: nn.Module | FunctionalLoss | Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    data: Batch | Iterable[Batch] | None = None,
    *,
    n_probes: int | None = None,
    method: str = "auto",
    rtol: float | None = None,
    max_probes: int = DEFAULT_MAX_PROBES,
    batch: int | None = None,
    seed: int = 0,
    params: Sequence[str] | str | None = None,
    device: str | torch.device | None = None,
    train_mode: bool = False,
) -> TraceResult:
    """Estimate ``Tr H`` of the loss Hessian (or of any symmetric operator passed as ``model``).

    Accuracy: with neither ``n_probes`` nor ``rtol``, stop once ``stderr < DEFAULT_RTOL |value|`` (2 %),
    at most ``max_probes`` probes. ``n_probes`` alone: exactly that many (a fixed budget). Both: stop on
    ``rtol`` with ``n_probes`` as the cap. Stopping is tested after each block of ``batch`` probes once at
    least ``MIN_PROBES`` = 10 Hutchinson samples are in (XTrace: once ``k >= 8``).

    ``method``: see the module docstring. ``"hutchinson"``: ``(1/n) sum_i z_i^T H z_i``,
    ``stderr = std_i / sqrt(n)``; cost ``n`` HVPs. ``"hutch++"``: ``n_probes`` is the HVP budget ``m``:
    ``s = m // 3`` products for ``H S``, ``s`` for ``H Q``, the remaining ``m - 2s`` for Hutchinson on
    ``(I - QQ^T) H (I - QQ^T)``; ``stderr`` is that of the residual mean (``tr(Q^T H Q)`` is exact for the
    ``Q`` drawn). Products are formed ``batch`` columns at a time (default: the operator's ``chunk``).
    """
    if method not in METHODS:
        raise SharpnessInputError(f"method must be one of {', '.join(METHODS)}; not {method!r}")
    least = 4 if method in ("hutch++", "xtrace") else 2
    if n_probes is not None and (not isinstance(n_probes, (int, np.integer)) or n_probes < least):
        raise SharpnessInputError(f"n_probes must be an integer >= {least} for {method}, got {n_probes!r}")
    if not isinstance(max_probes, (int, np.integer)) or max_probes < least:
        raise SharpnessInputError(f"max_probes must be an integer >= {least}, got {max_probes!r}")
    if batch is not None and (not isinstance(batch, (int, np.integer)) or batch < 1):
        raise SharpnessInputError(f"batch must be a positive integer, got {batch!r}")
    if rtol is not None and not rtol > 0:
        raise SharpnessInputError(f"rtol must be positive, got {rtol!r}")
    if n_probes is None and rtol is None:
        rtol = DEFAULT_RTOL
    cap = int(n_probes) if n_probes is not None else int(max_probes)
    op, created = resolve_operator(model, loss_fn, data, params=params, train_mode=train_mode, device=device)
    # Default block: the operator's own chunk (1 on CPU, 8 on CUDA). Larger blocks buy no speed on CPU but
    # hold several d x batch blocks at once (5.3x a gradient's peak memory on a 0.6M ResNet at batch 16).
    batch = int(batch) if batch is not None else int(getattr(op, "chunk", 16))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    start = op.hvp_count
    stop = None
    if rtol is not None:

        def stop(mean: float, se: float) -> bool:
            return se == 0.0 or se < rtol * abs(mean)

    extra: dict[str, Any] = {}
    requested = method
    try:
        method, why, cert = choose_method(op, method, cap)
        extra["why"] = why
        if method == "hutchinson":
            samples, hit = _hutchinson(op, gen, cap, batch, stop)
            value, stderr = _mean_stderr(samples)
        elif method == "hutch++":
            value, stderr, samples, hit, sketch, n_sketch = _hutchpp(op, gen, cap, batch, stop)
            extra.update(sketch_trace=sketch, n_sketch=n_sketch)
        elif method == "xtrace":
            value, stderr, samples, hit = _xtrace(op, gen, cap, batch, rtol)
        else:
            _, fl = network_of(op)
            g = ggn_trace(fl)  # type: ignore[arg-type]
            _require_finite_ggn(g)
            extra.update(exact_part=g.value, n_backward=g.n_backward)
            if method == "exact":
                try:
                    rest, passes = activation_trace(fl, cert)  # type: ignore[arg-type]
                except SharpnessInputError as exc:
                    if requested != "auto":
                        raise
                    method, extra["why"] = "ggn+hutchinson", f"exact not possible ({exc}); Tr G + Hutchinson"
                else:
                    require_finite(torch.tensor(rest), "the smooth activations' part of the exact trace")
                    value, stderr, samples, hit = g.value + rest, 0.0, [], True
                    extra["n_backward"] += passes
            if method == "exact-ggn":
                value, stderr, samples, hit = g.value, 0.0, [], True
            elif method == "ggn+hutchinson":
                samples, hit, kept, n_jvp = _ggn_hutchinson(
                    op, fl, gen, cap, batch, stop, g.value, adaptive=requested == "auto"
                )
                mean, stderr = _mean_stderr(samples)
                extra["n_jvp"] = n_jvp
                if kept:
                    value = g.value + mean
                else:
                    value, method = mean, "hutchinson"
                    extra["why"] += (
                        f"; after {MIN_PROBES} probes Var(z^T H z) <= {SWITCH_RATIO} Var(z^T (H - G) z): "
                        "plain Hutchinson on the same probes"
                    )
    finally:
        release(op, created)
    settings = dict(
        n_probes=None if n_probes is None else int(n_probes), method=method, rtol=rtol, max_probes=cap,
        batch=int(batch), params=params, device=None if device is None else str(device),
        train_mode=recorded_mode(model, train_mode),
    )  # fmt: skip
    n_sketch = int(extra.get("n_sketch", 0))
    return TraceResult(
        value=value,
        stderr=stderr,
        n_hvp=op.hvp_count - start,
        n_probes=n_sketch + len(samples),
        method=method,
        converged=hit if (rtol is not None or method.startswith("exact")) else None,
        samples=samples,
        rtol=rtol,
        **extra,
        settings=settings,
        seed=int(seed),
        device=str(op.device),
    )


def _ggn_hutchinson(
    op: Any,
    fl: FunctionalLoss,
    gen: torch.Generator,
    n: int,
    batch: int,
    stop: Callable[[float, float], bool] | None,
    tr_g: float,
    adaptive: bool,
) -> tuple[list[float], bool, bool, int]:
    """Up to ``n`` samples ``z^T (H - G) z`` (1 HVP + 1 JVP each); ``stop(tr_g + mean, se)`` after each block
    once ``MIN_PROBES`` are in. ``adaptive``: after ``MIN_PROBES`` probes, if ``Var(z^T H z) <=
    SWITCH_RATIO Var(z^T (H - G) z)`` (far from a minimum the residual term is not small), continue with plain
    Hutchinson on the same probes (no more JVPs). Returns samples, stopped, kept the GGN split, JVPs spent."""
    h: list[float] = []
    r: list[float] = []
    kept = True
    cache: dict[int, Tensor] = {}
    while len(h) < n:
        b = min(batch, n - len(h))
        Z = rademacher(gen, op.num_params, b, op.dtype, op.device)
        quad = _quad_forms(Z, op.matmat(Z))
        h += quad
        if kept:
            r += [q - float(g) for q, g in zip(quad, ggn_quadratic_forms(fl, Z, cache), strict=True)]
        if adaptive and kept and len(h) >= MIN_PROBES:
            kept = bool(np.var(h, ddof=1) > SWITCH_RATIO * np.var(r, ddof=1))
            adaptive = False
        if stop is not None and len(h) >= MIN_PROBES:
            mean, se = _mean_stderr(r if kept else h)
            if stop(tr_g + mean if kept else mean, se):
                return (r if kept else h), True, kept, len(r)
    return (r if kept else h), False, kept, len(r)


def choose_method(op: Any, method: str, cap: int) -> tuple[str, str, Applicability | None]:
    """The method to run for ``method`` (``"auto"`` decides), one line saying why, and the certificate
    (``piecewise_linear(fl, smooth=True)``) when one was made.

    ``auto``: ``exact-ggn`` when :func:`~sharpness.ggn.piecewise_linear` certifies ``Tr H = Tr G``;
    ``exact`` when it certifies it up to elementwise smooth activations, every parameter sits in a Linear,
    Conv2d or BatchNorm layer, and the ``C + units`` backward passes per batch fit ``2 cap`` (a probe costs
    at least one HVP, about two backward passes); ``ggn+hutchinson`` when a network with a known loss
    Hessian is behind the operator (eval mode) and the ``C`` backward passes of ``Tr G`` fit;
    ``hutchinson`` otherwise. An explicit GGN method on an operator without a network, or an exact method on
    a network that is not certified, is
    refused. Cost: one recorded forward pass of two samples per batch (the certificate).
    """
    parts, fl = network_of(op)
    usable = parts is not None and loss_kind(parts.loss_fn) is not None and not parts.train_mode
    if method in ("exact-ggn", "exact", "ggn+hutchinson") and not usable:
        raise SharpnessInputError(
            f"method {method!r} needs a model in eval mode with a cross-entropy or squared-error loss "
            "(pass model, loss_fn, data or a FunctionalLoss from make_loss)"
        )
    if method not in ("auto", "exact-ggn", "exact"):
        return method, "requested", None
    if not usable:
        return "hutchinson", "no network with a known loss Hessian behind this operator (or train mode)", None
    cert = piecewise_linear(fl, smooth=True)  # type: ignore[arg-type]
    plain = cert.exact and not cert.sites
    owned = layer_owners(parts.model, fl.params) is not None  # type: ignore[union-attr]
    if method == "exact-ggn" and not plain:
        why = cert.reason if not cert.exact else f"the forward pass applies {', '.join(cert.sites)}"
        raise SharpnessInputError(f"exact-ggn refused: Tr H = Tr G is not certified: {why}")
    if method == "exact" and not (cert.exact and owned):
        why = cert.reason if not cert.exact else "a parameter is not in a Linear, Conv2d or BatchNorm layer"
        raise SharpnessInputError(f"exact refused: {why}")
    if method != "auto":
        return method, cert.reason, cert
    if plain:
        return "exact-ggn", cert.reason, cert
    n_out = outputs_per_sample(fl)  # type: ignore[arg-type]
    if cert.exact and owned and n_out + cert.units <= 2 * cap:
        return "exact", cert.reason, cert
    if n_out > 2 * cap:
        return (
            "hutchinson",
            f"Tr G needs {n_out} backward passes per batch, more than {cap} probes allow",
            cert,
        )
    return "ggn+hutchinson", f"not exact ({cert.reason}); exact Tr G + Hutchinson on H - G", cert


def _hutchpp(
    op: Any, gen: torch.Generator, m: int, batch: int, stop: Callable[[float, float], bool] | None
) -> tuple[float, float, list[float], bool, float, int]:
    """Hutch++ with HVP budget ``m``; returns value, stderr, residual samples, stopped, sketch trace, s."""
    d = op.num_params
    s = min(m // 3, d)
    S = rademacher(gen, d, s, op.dtype, op.device)
    Q = torch.linalg.qr(apply_blocks(op, S, batch)).Q
    del S
    sketch = sum(_quad_forms(Q, apply_blocks(op, Q, batch)))
    stop_total = None
    if stop is not None:

        def stop_total(mean: float, se: float) -> bool:
            return stop(sketch + mean, se)

    samples, hit = _hutchinson(op, gen, m - 2 * s, batch, stop_total, Q=Q)
    mean, stderr = _mean_stderr(samples)
    return sketch + mean, stderr, samples, hit, sketch, s


def _xtrace_estimates(W: Tensor, AW: Tensor, op: Any, batch: int) -> list[float]:
    """The ``k`` exchangeable XTrace estimates from test vectors ``W`` (d, k) and ``A W``.

    ``Q R = qr(A W)``; ``S = R^{-T}`` with unit columns ``s_i`` gives
    ``Q_(i) Q_(i)^T = Q (I - s_i s_i^T) Q^T``, the projector onto the span of ``A W`` without column ``i``.
    Estimate ``i``:
    ``tr(Q^T A Q) - s_i^T (Q^T A Q) s_i + w_i^T P_i A P_i w_i`` with ``P_i = I - Q_(i) Q_(i)^T``.
    Cost: ``k`` products (``A Q``), the rest in float64 linear algebra.
    """
    Q, R = torch.linalg.qr(AW.double())
    diag = R.diagonal().abs()
    if float(diag.min()) <= 1e-12 * float(diag.max()):
        raise SharpnessInputError(
            f"xtrace: the {W.shape[1]} sketched columns A W are linearly dependent (the operator has lower "
            "rank than the sketch); use hutch++ or fewer products"
        )
    AQ = apply_blocks(op, Q.to(op.dtype), batch).double()
    T = Q.T @ AQ  # Q^T A Q
    S = torch.linalg.inv(R.T)
    S = S / S.norm(dim=0, keepdim=True)
    W, AW = W.double(), AW.double()
    QtW = Q.T @ W
    out = []
    base = float(torch.trace(T))
    for i in range(W.shape[1]):
        s = S[:, i]
        c = QtW[:, i] - s * (s @ QtW[:, i])  # (I - s s^T) Q^T w
        apw = AW[:, i] - AQ @ c  # A P_i w
        qa = Q.T @ apw
        papw = apw - Q @ (qa - s * (s @ qa))  # P_i A P_i w
        out.append(base - float(s @ T @ s) + float(W[:, i] @ papw))
    return out


def _xtrace(
    op: Any, gen: torch.Generator, cap: int, batch: int, rtol: float | None
) -> tuple[float, float, list[float], bool]:
    """XTrace with at most ``cap`` products: ``k = cap // 2`` test vectors, or with ``rtol``, ``k = 4``
    doubling (the new ``A W`` columns added to the old; ``A Q`` recomputed each round) until
    ``std/sqrt(k) < rtol |mean|`` or the next round would pass ``cap``.
    Returns value, stderr, estimates, converged."""
    d = op.num_params
    k = min(cap // 2, d - 1) if rtol is None else min(4, cap // 2, d - 1)
    if k < 2:
        raise SharpnessInputError(f"xtrace needs at least 2 test vectors (dimension {d}, cap {cap})")
    W = rademacher(gen, d, k, op.dtype, op.device)
    AW = apply_blocks(op, W, batch)
    spent = k
    while True:
        est = _xtrace_estimates(W, AW, op, batch)
        spent += k
        value, stderr = _mean_stderr(est)
        if rtol is None:
            return value, stderr, est, False
        if k >= 8 and (stderr == 0.0 or stderr < rtol * abs(value)):
            return value, stderr, est, True
        new = min(k, d - 1 - k)
        if new < 1 or spent + new + (k + new) > cap:
            return value, stderr, est, False
        Wn = rademacher(gen, d, new, op.dtype, op.device)
        W, AW = torch.cat([W, Wn], 1), torch.cat([AW, apply_blocks(op, Wn, batch)], 1)
        spent += new
        k += new

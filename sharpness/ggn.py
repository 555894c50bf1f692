"""The generalised Gauss-Newton matrix ``G = J^T Lambda J``: its exact trace, its quadratic forms, and when
``Tr H = Tr G`` holds exactly.

With outputs ``f_i(theta)`` of sample ``i`` and the loss ``L = sum_i l_i(f_i)``, the Hessian splits as
``H = J^T Lambda J + sum_i sum_k (dl_i/df_ik) nabla^2 f_ik`` with ``J_i = df_i/dtheta`` (C x d) and
``Lambda_i = d^2 l_i / df_i^2`` (C x C). Factor ``Lambda_i = S_i S_i^T``; then

    Tr G = sum_i ||J_i^T S_i||_F^2 = sum_i sum_k ||J_i^T s_ik||^2,

a sum of squared per-sample vector-Jacobian products, computed with ``torch.func`` (``vmap`` over samples
of a ``vjp`` of one sample's output, ``vmap`` over the ``K`` columns of ``S_i``) through the same
``functional_call`` core as every HVP. Cost: ``K`` (= C) per-sample backward passes for every sample,
about ``C`` gradients of the whole batch; memory: a block of ``chunk x K x d`` numbers.
Factors: cross-entropy ``Lambda_i = c (diag p - p p^T)`` with ``S_i = sqrt(c) (diag sqrt p - p sqrt(p)^T)``;
squared error ``Lambda_i = 2 c I``; ``c`` = the sample's weight in ``L`` (``1/n`` for a mean over ``n``
samples; ``1/(n C)`` for MSE's mean over samples and outputs).

``z^T G z = sum_i ||S_i^T J_i z||^2`` needs one Jacobian-vector product (forward mode) of the batch
outputs: about one gradient per probe.

**When Tr H = Tr G.** The diagonal of the second term vanishes when every output is piecewise linear in
each single parameter (``d^2 f_ik / d theta_j^2 = 0`` almost everywhere). :func:`piecewise_linear` decides
this from the operations the forward pass really runs, recorded with ``make_fx`` on each batch (so module
reuse, functional calls in ``forward`` and residual sums are all seen). Every operation whose inputs depend
on a parameter must be either piecewise linear jointly in its inputs (ReLU, LeakyReLU, hardtanh, max and
average pooling, sums, views, concatenation, padding, mean/sum, multiplication by a parameter-free tensor)
or bilinear (convolution, matrix products, BatchNorm with running statistics, elementwise products) with
its two factors depending on disjoint sets of parameter tensors: then each output is, in any single
parameter, a composition of affine and piecewise-linear maps, hence piecewise linear. Anything else (tanh,
GELU, softmax inside the net, BatchNorm with batch statistics, a layer applied to its own output) refuses,
naming the operation. The loss must be cross-entropy or squared error (recognised from ``loss_fn``), the
model in eval mode. The rule is sufficient, not necessary: it may refuse a network for which the equality
happens to hold, never the other way round.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from .functional import FunctionalLoss, NetworkParts, Params, SharpnessInputError, training_flags, unflatten
from .mlp_trace import ChainPass, chain_of, derivatives, loss_gradient, units_of
from .results import Result

#: Numbers a block of per-sample Jacobian-vector products may hold at once (256 MiB in float32).
CHUNK_NUMBERS = 1 << 26

LOSS_KINDS = ("ce-mean", "ce-sum", "mse-mean", "mse-sum")


def mse_loss_kind(fn: Callable[..., Any], reduction: str = "mean") -> Callable[..., Any]:
    """Mark a callable as a squared-error loss (``F.mse_loss`` on its outputs with this reduction), so the
    Gauss-Newton routines can use ``Lambda = 2c I``. The caller vouches for the formula."""
    fn.ggn_loss = f"mse-{reduction}"  # type: ignore[attr-defined]
    return fn


def loss_kind(loss_fn: Any) -> str | None:
    """``"ce-mean"``, ``"ce-sum"``, ``"mse-mean"``, ``"mse-sum"`` for the losses whose output Hessian is
    known (``F.cross_entropy``/``nn.CrossEntropyLoss`` without class weights, ``F.mse_loss``/``nn.MSELoss``,
    or a callable marked by :func:`mse_loss_kind`); ``None`` otherwise."""
    marked = getattr(loss_fn, "ggn_loss", None)
    if marked in LOSS_KINDS:
        return marked
    if loss_fn is F.cross_entropy:
        return "ce-mean"
    if loss_fn is F.mse_loss:
        return "mse-mean"
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None:
        return {"mean": "ce-mean", "sum": "ce-sum"}.get(loss_fn.reduction)
    if isinstance(loss_fn, nn.MSELoss):
        return {"mean": "mse-mean", "sum": "mse-sum"}.get(loss_fn.reduction)
    return None


def network_of(obj: Any) -> tuple[NetworkParts | None, FunctionalLoss | None]:
    """The :class:`NetworkParts` and :class:`FunctionalLoss` behind a FunctionalLoss or an operator built on
    one (``op.fl``); ``(None, None)`` when there is none. Data split across ranks (``fl.parallel``) gives no
    network: the exact paths sum over this process's batches only, so such a loss takes the HVP methods,
    whose products are summed over the ranks."""
    fl = obj if isinstance(obj, FunctionalLoss) else getattr(obj, "fl", None)
    if not isinstance(fl, FunctionalLoss):
        return None, None
    return (None if fl.parallel is not None else fl.network), fl


def outputs_per_sample(fl: FunctionalLoss) -> int:
    """Outputs of one sample (``C``): the columns of ``S_i``. Cost: one forward pass of one sample."""
    parts = fl.network
    if parts is None:
        raise SharpnessInputError("no network behind this loss")
    x = parts.batches[0][0]
    with training_flags(parts.model, False), torch.no_grad():
        return int(_forward(parts, fl.params, x[:1]).numel())


def _factor(kind: str, out: Tensor, y: Tensor, weight: float) -> Tensor:
    """``S_i`` (n, C, K) with ``S_i S_i^T = Lambda_i`` for outputs ``out`` (n, C) of one batch whose loss
    enters ``L`` with ``weight``."""
    n = out.shape[0]
    out = out.reshape(n, -1)
    C = out.shape[1]
    if kind.startswith("ce"):
        if isinstance(y, Tensor) and not y.is_floating_point() and bool((y < 0).any()):
            raise SharpnessInputError("the Gauss-Newton trace does not support ignored labels (y < 0)")
        c = weight / n if kind == "ce-mean" else weight
        p = torch.softmax(out.detach().double(), dim=1)
        sq = p.sqrt()
        S = torch.diag_embed(sq) - p.unsqueeze(2) * sq.unsqueeze(1)
        return (math.sqrt(c) * S).to(out.dtype)
    c = 2 * weight / (n * C) if kind == "mse-mean" else 2 * weight
    eye = torch.eye(C, dtype=out.dtype, device=out.device)
    return math.sqrt(c) * eye.expand(n, C, C)


def _forward(parts: NetworkParts, p: Params, x: Tensor) -> Tensor:
    return functional_call(parts.model, {**parts.frozen, **p}, (x,))


def _require(parts: NetworkParts | None, what: str) -> tuple[NetworkParts, str]:
    if parts is None:
        raise SharpnessInputError(f"{what} needs a network: pass (model, loss_fn, data) or a FunctionalLoss "
                                  "made by make_loss")  # fmt: skip
    kind = loss_kind(parts.loss_fn)
    if kind is None:
        raise SharpnessInputError(
            f"{what} needs a cross-entropy or squared-error loss (F.cross_entropy, nn.CrossEntropyLoss, "
            f"F.mse_loss, nn.MSELoss); got {getattr(parts.loss_fn, '__name__', type(parts.loss_fn).__name__)}"
        )
    if parts.train_mode:
        raise SharpnessInputError(f"{what} needs eval mode (train mode couples the samples of a batch)")
    return parts, kind


@dataclass
class GGNTrace(Result):
    """Exact ``Tr G`` and its split over parameter tensors (``per_param``, name -> ``Tr G_pp``);
    ``n_backward``: backward passes spent (one per output column and batch; 0 for the closed form of an
    MLP)."""

    value: float
    per_param: dict[str, float] = field(default_factory=dict)
    n_samples: int = 0
    n_outputs: int = 0
    n_backward: int = 0
    seconds: float = 0.0


def ggn_trace(fl: FunctionalLoss, *, chunk: int | None = None, backend: str = "auto") -> GGNTrace:
    """``Tr G = sum_b w_b sum_i ||J_i^T S_i||_F^2`` exactly (see the module docstring), in float64 sums.

    ``backend="layers"``: one batched backward of the ``K`` columns of ``S`` to every layer's output
    (``is_grads_batched``), then per-layer closed forms of the per-sample squared gradient norms from the
    layer's input ``a`` and output gradient ``g``: Linear ``||g||^2 ||a||^2``; Conv2d ``||G_i U_i^T||_F^2``
    with ``U_i`` the unfolded input (or ``sum_pq (G^T G)_pq (U^T U)_pq`` when fewer flops); BatchNorm (running
    statistics) ``(sum_p g x_hat)^2`` and ``(sum_p g)^2``. Cost: about ``K/2`` gradients plus the per-layer
    contractions (``K x`` a weight gradient's flops). It needs every trainable parameter to belong to a
    Linear, Conv2d (groups 1, zero padding) or BatchNorm module called once per forward pass.
    ``backend="vmap"``: any network; ``vmap`` over samples of a ``vjp`` of one sample's outputs, ``K``
    cotangents each; about ``C`` gradients and more on CPU, with ``chunk`` samples at a time (default: as
    many as keep ``chunk x K x d`` under :data:`CHUNK_NUMBERS`). ``backend="mlp"``: a plain ``nn.Sequential``
    of Linear layers and elementwise activations (:func:`sharpness.mlp_trace.chain_of`): the closed form of
    :mod:`sharpness.mlp_trace`, no backward pass (one forward, then ``K`` columns carried back by batched
    products). ``"auto"``: mlp, else layers, when they apply.
    """
    parts, kind = _require(fl.network, "the exact Gauss-Newton trace")
    if backend not in ("auto", "mlp", "layers", "vmap"):
        raise SharpnessInputError(f"backend must be 'auto', 'mlp', 'layers' or 'vmap', not {backend!r}")
    t0 = time.perf_counter()
    params = {k: v.detach() for k, v in fl.params.items()}
    if backend in ("auto", "mlp"):
        got = _mlp_ggn(fl, parts, kind, params)
        if got is not None:
            per_t, n_samples, n_out = got
            return GGNTrace(
                value=float(sum(per_t.values())),
                per_param={k: float(v) for k, v in per_t.items()},
                n_samples=n_samples,
                n_outputs=n_out,
                seconds=time.perf_counter() - t0,
                settings={"loss": kind, "backend": "mlp"},
                device=str(fl.device),
            )
        if backend == "mlp":
            raise SharpnessInputError(
                "backend='mlp' needs a plain nn.Sequential of Linear layers and elementwise activations "
                "on (n, features) inputs"
            )
    d = sum(v.numel() for v in params.values())
    per = {k: torch.zeros((), dtype=torch.float64, device=v.device) for k, v in params.items()}
    n_samples, n_out = 0, 0
    owners = None if backend == "vmap" else layer_owners(parts.model, params)
    if backend == "layers" and owners is None:
        raise SharpnessInputError("backend='layers' needs every parameter in a Linear, Conv2d or BatchNorm")
    used = "layers" if owners is not None else "vmap"
    with training_flags(parts.model, False):
        for w, (x, y) in zip(fl.weights or [1.0], parts.batches, strict=True):
            if owners is not None:
                got = _layers_batch(parts, kind, params, owners, x, y, float(w))
                if got is None:  # a module ran more or less than once: the closed forms do not apply
                    if backend == "layers":
                        raise SharpnessInputError(
                            "backend='layers': a parameterised module ran other than once"
                        )
                    owners, used = None, "vmap"
                else:
                    sq, n_out = got
                    for k in per:
                        per[k] += sq.get(k, 0.0)
                    n_samples += x.shape[0]
                    continue
            with torch.no_grad():
                out = _forward(parts, params, x)
            S = _factor(kind, out, y, float(w))
            n_out = S.shape[1]
            per_chunk = chunk or max(1, CHUNK_NUMBERS // max(1, S.shape[2] * d))

            def one(xi: Tensor, Si: Tensor) -> dict[str, Tensor]:
                f = lambda p: _forward(parts, p, xi.unsqueeze(0)).reshape(-1)
                _, pull = vjp(f, params)
                (g,) = vmap(pull)(Si.T.contiguous())
                return {k: (t.double() ** 2).sum() for k, t in g.items()}

            for i in range(0, x.shape[0], per_chunk):
                sq = vmap(one)(x[i : i + per_chunk], S[i : i + per_chunk])
                for k in per:
                    per[k] += sq[k].detach().sum()
            n_samples += x.shape[0]
    per_f = {k: float(v) for k, v in per.items()}
    return GGNTrace(
        value=float(sum(per.values())),
        per_param=per_f,
        n_samples=n_samples,
        n_outputs=n_out,
        n_backward=n_out * len(parts.batches),
        seconds=time.perf_counter() - t0,
        settings={"loss": kind, "backend": used},
        device=str(fl.device),
    )


def _mlp_ggn(
    fl: FunctionalLoss, parts: NetworkParts, kind: str, params: Params
) -> tuple[dict[str, Tensor], int, int] | None:
    """Per-parameter ``Tr G`` of a plain MLP by :meth:`ChainPass.ggn` (``None`` when the model is not one,
    or a Linear sees other than (n, features) inputs), samples and outputs per sample."""
    chain = chain_of(parts.model)
    if chain is None:
        return None
    p = {**parts.frozen, **params}
    per: dict[str, Tensor] = {
        k: torch.zeros((), dtype=torch.float64, device=v.device) for k, v in params.items()
    }
    n_samples, n_out = 0, 0
    for w, (x, y) in zip(fl.weights or [1.0], parts.batches, strict=True):
        run = ChainPass.run(chain, p, set(params), x)
        if run is None:
            return None
        S = _factor(kind, run.out, y, float(w))
        for k, v in run.ggn(S.transpose(1, 2)).items():
            per[k] = per[k] + v
        n_samples, n_out = n_samples + x.shape[0], S.shape[1]
    return per, n_samples, n_out


def ggn_quadratic_forms(fl: FunctionalLoss, Z: Tensor, cache: dict[int, Tensor] | None = None) -> Tensor:
    """``z^T G z = sum_b w_b sum_i u_i^T Lambda_i u_i`` with ``u_i = J_i z`` for each column of ``Z`` (d, k),
    in float64: cross-entropy ``c (sum_k p_k u_k^2 - (sum_k p_k u_k)^2)``, squared error ``2c ||u||^2``.

    Cost: one Jacobian-vector product (forward mode) of the batch outputs per column and batch, about one
    gradient each. ``cache``: a dict the caller keeps between calls at the same point; it holds the softmax
    of each batch's outputs, so they are not recomputed.
    """
    parts, kind = _require(fl.network, "the Gauss-Newton quadratic form")
    params = {k: v.detach() for k, v in fl.params.items()}
    total = torch.zeros(Z.shape[1], dtype=torch.float64, device=Z.device)
    cache = {} if cache is None else cache
    with training_flags(parts.model, False), torch.no_grad():
        for b, (w, (x, _)) in enumerate(zip(fl.weights or [1.0], parts.batches, strict=True)):
            f = lambda p, x=x: _forward(parts, p, x)
            for j in range(Z.shape[1]):
                out, Ju = jvp(f, (params,), (unflatten(Z[:, j].to(fl.dtype), params),))
                u = Ju.reshape(Ju.shape[0], -1).double()
                n, C = u.shape
                if kind.startswith("ce"):
                    if b not in cache:
                        cache[b] = torch.softmax(out.detach().reshape(n, -1).double(), dim=1)
                    p = cache[b]
                    c = float(w) / n if kind == "ce-mean" else float(w)
                    total[j] += c * ((p * u * u).sum() - ((p * u).sum(1) ** 2).sum())
                else:
                    c = 2 * float(w) / (n * C) if kind == "mse-mean" else 2 * float(w)
                    total[j] += c * (u * u).sum()
    return total


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _supported_layer(mod: nn.Module) -> bool:
    """A layer whose closed form :func:`_layer_sq_norms` knows: torch's own ``forward`` (no subclass
    override), Conv2d with groups 1 and zero padding, BatchNorm with running statistics."""
    kind = type(mod).forward
    if isinstance(mod, nn.Linear):
        return kind is nn.Linear.forward
    if isinstance(mod, nn.Conv2d):
        plain = mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
        return plain and kind is nn.Conv2d.forward
    if isinstance(mod, _BATCH_NORMS):
        stats = mod.track_running_stats and mod.running_mean is not None and mod.affine
        return stats and kind is nn.BatchNorm2d.forward
    return False


def layer_owners(model: nn.Module, params: Params) -> dict[str, nn.Module] | None:
    """``module name -> module`` for the supported layers owning the measured parameters; ``None`` when a
    parameter lives elsewhere."""
    owners: dict[str, nn.Module] = {}
    mods = dict(model.named_modules())
    for name in params:
        mod_name, _, leaf = name.rpartition(".")
        mod = mods.get(mod_name)
        if mod is None or leaf not in ("weight", "bias") or not _supported_layer(mod):
            return None
        owners[mod_name] = mod
    return owners


def _sq_norms_positions(G: Tensor, U: Tensor, UU: Tensor | None = None) -> Tensor:
    """Per-sample ``||G_i U_i^T||_F^2`` (n,) for ``G`` (n, O, P) and ``U`` (n, I, P): directly (``n O I P``
    flops) or through the Gram matrices over positions (``n P^2 (O + I)``; ``UU = U^T U`` may be given), the
    cheaper."""
    n, n_out, P = G.shape
    n_in = U.shape[1]
    if P * P * (n_out + n_in) < n_out * n_in * P:
        A = UU if UU is not None else torch.bmm(U.transpose(1, 2), U)
        B = torch.bmm(G.transpose(1, 2), G)
        return torch.linalg.vecdot(A.flatten(1), B.flatten(1)).double()
    step = max(1, CHUNK_NUMBERS // max(1, n_out * n_in))
    parts = []
    for i in range(0, n, step):
        W = torch.bmm(G[i : i + step], U[i : i + step].transpose(1, 2))
        flat = W.flatten(1)
        parts.append(torch.linalg.vecdot(flat, flat).double())
    return torch.cat(parts)


def _layers_batch(
    parts: NetworkParts,
    kind: str,
    params: Params,
    owners: dict[str, nn.Module],
    x: Tensor,
    y: Tensor,
    w: float,
) -> tuple[dict[str, Tensor], int] | None:
    """Per-parameter ``sum_i ||J_i^T S_i||^2`` of one batch by per-layer closed forms; ``None`` when a layer
    ran other than once. One backward pass to the layers' outputs per column of ``S``."""
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    calls = dict.fromkeys(owners, 0)

    def hook(name: str) -> Callable[..., Tensor]:
        def fn(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
            calls[name] += 1
            inputs[name] = inp[0].detach()
            outputs[name] = out
            return (
                out.clone()
            )  # what runs on gets a copy: an in-place op (ReLU(inplace=True)) can't change out

        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, mod in owners.items()]
    try:
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            out = _forward(parts, p, x)
    finally:
        for h in handles:
            h.remove()
    if any(c != 1 for c in calls.values()):
        return None
    S = _factor(kind, out.detach(), y, w)
    names = list(owners)
    targets = [outputs[m] for m in names]
    prep = {m: _layer_inputs(owners[m], inputs[m]) for m in names}
    sq: dict[str, Tensor] = {}
    K = S.shape[2]
    ghost = {m: _gram_summed(owners[m], prep[m], outputs[m], K) for m in names}
    grams: dict[str, Tensor] = {}
    cots = S.permute(2, 0, 1).reshape(K, *out.shape)
    for grads in column_grads(out, targets, cots, _mlp_like(owners)):
        for m, g in zip(names, grads, strict=True):
            if g is None:
                continue
            values = _layer_sq_norms(owners[m], prep[m], g.detach(), skip_weight=ghost[m])
            if ghost[m]:  # sum_k G_k^T G_k over the columns, contracted with U^T U once at the end
                G = g.detach()
                if isinstance(owners[m], nn.Conv2d):
                    G = G.reshape(G.shape[0], G.shape[1], -1)
                else:
                    G = G.reshape(G.shape[0], -1, G.shape[-1]).transpose(1, 2)
                gram = torch.bmm(G.transpose(1, 2), G)
                grams[m] = grams[m] + gram if m in grams else gram
            for leaf, value in values.items():
                name = f"{m}.{leaf}"
                if name in params:
                    sq[name] = sq[name] + value.sum() if name in sq else value.sum()
    for m, gram in grams.items():
        if f"{m}.weight" in params:
            UU = prep[m].get("UU")
            if UU is None:
                U = prep[m]["U"]
                UU = torch.bmm(U.transpose(1, 2), U)
            value = torch.linalg.vecdot(UU.flatten(1), gram.flatten(1)).sum().double()
            sq[f"{m}.weight"] = sq[f"{m}.weight"] + value if f"{m}.weight" in sq else value
    return sq, S.shape[1]


def _gram_summed(mod: nn.Module, prep: dict[str, Tensor], out: Tensor, K: int) -> bool:
    """Whether ``sum_k ||G_k U^T||^2 = <sum_k G_k^T G_k, U^T U>`` (Gram matrices over the ``P`` positions,
    ``K P^2 O + P^2 I`` flops per sample) is cheaper than ``K`` direct products (``K O I P``)."""
    if "U" not in prep:
        return False
    n_in, P = prep["U"].shape[1], prep["U"].shape[2]
    n_out = out.shape[1] if isinstance(mod, nn.Conv2d) else out.shape[-1]
    return K * P * P * n_out + P * P * n_in < K * n_out * n_in * P and P * P * out.shape[0] <= CHUNK_NUMBERS


def _mlp_like(owners: dict[str, nn.Module]) -> bool:
    """Only Linear and BatchNorm1d layers: there one vectorised backward over many columns
    (``is_grads_batched``) measured faster than a loop; with convolutions and max-pooling it was slower."""
    return all(isinstance(m, (nn.Linear, nn.BatchNorm1d)) for m in owners.values())


def column_grads(root: Tensor, targets: list[Tensor], cots: Tensor, batched: bool) -> Any:
    """For each cotangent ``cots[k]`` (shaped like ``root``), the gradients of ``<cots[k], root>`` at
    ``targets`` (``None`` where unused): a loop of backward passes, or with ``batched`` blocks of columns in
    one vectorised backward (at most :data:`CHUNK_NUMBERS` numbers of cotangent at once). Keeps the graph."""
    K = cots.shape[0]
    step = max(1, CHUNK_NUMBERS // max(1, root.numel())) if batched else 1
    for k0 in range(0, K, step):
        block = cots[k0 : k0 + step]
        if batched and block.shape[0] > 1:
            g = torch.autograd.grad(
                root, targets, grad_outputs=block, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
            for j in range(block.shape[0]):
                yield [None if t is None else t[j].detach() for t in g]
        else:
            g = torch.autograd.grad(
                root, targets, grad_outputs=block[0], retain_graph=True, allow_unused=True
            )
            yield [None if t is None else t.detach() for t in g]


def _layer_inputs(mod: nn.Module, a: Tensor) -> dict[str, Tensor]:
    """What the closed form of ``mod`` needs from its input ``a``, computed once per batch."""
    n = a.shape[0]
    if isinstance(mod, nn.Linear):
        if a.dim() == 2:
            return {"a2": (a * a).sum(-1)}
        U = a.reshape(n, -1, a.shape[-1]).transpose(1, 2)
        return {"U": U, "UU": torch.bmm(U.transpose(1, 2), U)}
    if isinstance(mod, nn.Conv2d):
        U = F.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        return {"U": U}
    shape = [1, -1] + [1] * (a.dim() - 2)
    xhat = (a - mod.running_mean.reshape(shape)) / torch.sqrt(mod.running_var.reshape(shape) + mod.eps)
    return {"xhat": xhat}


def _layer_sq_norms(
    mod: nn.Module, prep: dict[str, Tensor], g: Tensor, skip_weight: bool = False
) -> dict[str, Tensor]:
    """Per-sample squared gradient norms (n,) of ``mod``'s parameters for one cotangent: ``g`` (n, ...) is the
    gradient at the layer's output, ``prep`` from :func:`_layer_inputs`. ``skip_weight``: the caller sums the
    weight's term over columns itself (see :func:`_gram_summed`)."""
    n = g.shape[0]
    if isinstance(mod, nn.Linear):
        if "a2" in prep:
            gg = (g * g).sum(-1)
            return {"weight": (gg * prep["a2"]).double(), "bias": gg.double()}
        G = g.reshape(n, -1, g.shape[-1]).transpose(1, 2)
        gb = G.sum(-1)
        out = {"bias": (gb * gb).sum(1).double()}
        if not skip_weight:
            out["weight"] = _sq_norms_positions(G, prep["U"], prep["UU"])
        return out
    if isinstance(mod, nn.Conv2d):
        G = g.reshape(n, g.shape[1], -1)
        gb = G.sum(-1)
        out = {"bias": (gb * gb).sum(1).double()}
        if not skip_weight:
            out["weight"] = _sq_norms_positions(G, prep["U"])
        return out
    dims = tuple(range(2, g.dim()))
    gw = (g * prep["xhat"]).sum(dims) if dims else g * prep["xhat"]
    gb = g.sum(dims) if dims else g
    return {"weight": (gw * gw).sum(1).double(), "bias": (gb * gb).sum(1).double()}


# ----------------------------------------------------------------------------------- applicability
_LINEAR_OPS = {
    "aten.relu.default", "aten.leaky_relu.default", "aten.hardtanh.default", "aten.threshold.default",
    "aten.max_pool1d_with_indices.default", "aten.max_pool2d_with_indices.default",
    "aten.max_pool3d_with_indices.default", "aten.max_pool2d.default", "aten.avg_pool1d.default",
    "aten.avg_pool2d.default", "aten.avg_pool3d.default", "aten._adaptive_avg_pool2d.default",
    "aten.adaptive_avg_pool1d.default", "aten._adaptive_avg_pool3d.default",
    "aten.adaptive_max_pool2d.default",
    "aten.add.Tensor", "aten.sub.Tensor", "aten.neg.default", "aten.view.default", "aten.reshape.default",
    "aten._unsafe_view.default", "aten.permute.default", "aten.transpose.int", "aten.t.default",
    "aten.expand.default", "aten.clone.default", "aten.contiguous.default", "aten.squeeze.dim",
    "aten.squeeze.default", "aten.squeeze.dims", "aten.unsqueeze.default", "aten.flatten.using_ints",
    "aten.cat.default", "aten.stack.default", "aten.slice.Tensor", "aten.select.int", "aten.split.Tensor",
    "aten.split_with_sizes.default", "aten.constant_pad_nd.default", "aten.mean.dim", "aten.mean.default",
    "aten.sum.dim_IntList", "aten.sum.default", "aten.max.dim", "aten.amax.default", "aten.abs.default",
    "aten.alias.default", "aten.detach.default", "aten._to_copy.default", "aten.index.Tensor",
    "aten.lift_fresh_copy.default", "aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default",
    "aten.maximum.default", "aten.minimum.default", "aten.where.self", "aten.unbind.int",
    "<built-in function getitem>", "aten.relu_.default", "aten.leaky_relu_.default", "aten.hardtanh_.default",
    "aten.add_.Tensor", "aten.clamp_min_.default", "aten.clamp_.default",
}  # fmt: skip
#: op -> positions of the two factors of a bilinear op (other tensor arguments enter linearly, or must not
#: depend on parameters: see _FIXED).
_BILINEAR_OPS = {
    "aten.convolution.default": (0, 1),
    "aten.mm.default": (0, 1),
    "aten.bmm.default": (0, 1),
    "aten.matmul.default": (0, 1),
    "aten.addmm.default": (1, 2),
    "aten.mul.Tensor": (0, 1),
    "aten._native_batch_norm_legit_no_training.default": (0, 1),
    "aten.native_batch_norm.default": (0, 1),
    "aten.cudnn_batch_norm.default": (0, 1),
    "aten.div.Tensor": (0, 0),
}
#: argument positions that must not depend on any parameter (running statistics, divisors).
_FIXED = {
    "aten._native_batch_norm_legit_no_training.default": (3, 4),
    "aten.native_batch_norm.default": (3, 4),
    "aten.cudnn_batch_norm.default": (3, 4),
    "aten.div.Tensor": (1,),
}
_BATCH_NORM_TRAINING_ARG = {"aten.native_batch_norm.default": 5, "aten.cudnn_batch_norm.default": 5}


@dataclass
class Applicability:
    """Whether ``Tr H = Tr G`` exactly (or, with smooth activations allowed, ``Tr H = Tr G + activation
    term``), and why (``reason``: one line). ``sites``: smooth activation op -> calls on parameter-dependent
    tensors, over all batches; ``units``: their outputs per sample, summed (the backward passes of
    :func:`activation_trace` per batch)."""

    exact: bool
    reason: str
    sites: dict[str, int] = field(default_factory=dict)
    units: int = 0


def _deps(arg: Any, deps: dict[Any, frozenset[int]]) -> frozenset[int]:
    if isinstance(arg, torch.fx.Node):
        return deps.get(arg, frozenset())
    if isinstance(arg, (list, tuple)):
        out: frozenset[int] = frozenset()
        for a in arg:
            out |= _deps(a, deps)
        return out
    return frozenset()


#: elementwise smooth activations whose second-order term :func:`activation_trace` computes: aten op -> module
_SMOOTH_OPS: dict[str, type[nn.Module]] = {
    "aten.tanh.default": nn.Tanh,
    "aten.sigmoid.default": nn.Sigmoid,
    "aten.gelu.default": nn.GELU,
    "aten.softplus.default": nn.Softplus,
}


def _graph_is_piecewise_linear(
    gm: torch.fx.GraphModule, n_params: int, sites: dict[str, int] | None = None
) -> tuple[bool, str, int]:
    """The rule of the module docstring on one recorded graph; with ``sites``, elementwise smooth activations
    are allowed and counted (returned: units per sample)."""
    units = 0
    deps: dict[Any, frozenset[int]] = {}
    k = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            deps[node] = frozenset([k]) if k < n_params else frozenset()
            k += 1
            continue
        if node.op != "call_function":
            continue
        args = list(node.args) + list(node.kwargs.values())
        mine = _deps(args, deps)
        deps[node] = mine
        if not mine:
            continue
        name = "<built-in function getitem>" if node.target is operator.getitem else str(node.target)
        if name in _LINEAR_OPS:
            continue
        if sites is not None and name in _SMOOTH_OPS and not node.kwargs.get("approximate"):
            sites[name] = sites.get(name, 0) + 1
            val = node.meta.get("val")
            units += int(val.numel() // max(1, val.shape[0])) if val is not None and val.dim() else 1
            continue
        if name not in _BILINEAR_OPS:
            return False, f"the forward pass applies {name} to a parameter-dependent tensor", units
        if name in _BATCH_NORM_TRAINING_ARG and bool(node.args[_BATCH_NORM_TRAINING_ARG[name]]):
            return False, "BatchNorm uses batch statistics (train mode)", units
        for pos in _FIXED.get(name, ()):
            if pos < len(node.args) and _deps(node.args[pos], deps):
                return False, f"{name} divides by (or normalises with) a parameter-dependent tensor", units
        a, b = _BILINEAR_OPS[name]
        if a != b and a < len(node.args) and b < len(node.args):
            if _deps(node.args[a], deps) & _deps(node.args[b], deps):
                return False, f"{name} multiplies two tensors that depend on the same parameter", units
    return (
        True,
        "every parameter-dependent operation is piecewise linear or bilinear in disjoint parameters",
        units,
    )


def piecewise_linear(fl: FunctionalLoss, smooth: bool = False, *, record: bool = False) -> Applicability:
    """Whether ``Tr H = Tr G`` holds exactly for this loss (the rule is in the module docstring).

    ``smooth=True``: also allow elementwise Tanh, Sigmoid, GELU (exact form) and Softplus on
    parameter-dependent tensors; ``exact`` then means ``Tr H = Tr G + activation_trace`` (``sites`` counts
    them). Cost: one recorded forward pass (``make_fx``) of the first two samples of each batch; the
    operations recorded are those of the whole batch unless ``forward`` branches on the batch size.
    A plain ``nn.Sequential`` of Linear layers and elementwise activations
    (:func:`sharpness.mlp_trace.chain_of`: exact module types, each used once, no hooks) is certified from
    its modules instead, without recording (the operations of those modules are fixed by torch: addmm,
    elementwise maps, flatten); ``record=True`` records it anyway. Cost then: one forward pass of two samples.
    """
    parts = fl.network
    if parts is None:
        return Applicability(False, "no network behind this loss (a bare function of the parameters)")
    kind = loss_kind(parts.loss_fn)
    if kind is None:
        return Applicability(False, "the loss is not recognised as cross-entropy or squared error")
    if parts.train_mode:
        return Applicability(False, "train mode: BatchNorm batch statistics couple the samples")
    params = {k: v.detach() for k, v in fl.params.items()}
    if not record:
        got = _chain_certificate(parts, params, kind, smooth)
        if got is not None:
            return got
    from torch.fx.experimental.proxy_tensor import make_fx

    sites: dict[str, int] | None = {} if smooth else None
    units = 0
    with training_flags(parts.model, False), torch.no_grad():
        for i, (x, _) in enumerate(parts.batches):
            try:
                gm = make_fx(lambda p, x: _forward(parts, p, x))(params, x[:2])
            except Exception as exc:  # noqa: BLE001 - a forward we cannot record is not certified
                return Applicability(False, f"could not record the forward pass on batch {i}: {exc!s:.120}")
            ok, why, units = _graph_is_piecewise_linear(gm, len(params), sites)
            if not ok:
                return Applicability(False, why)
    if sites:
        names = ", ".join(f"{k.split('.')[1]} x{v}" for k, v in sites.items())
        why = f"piecewise linear or bilinear except elementwise {names} ({units} units per sample)"
    return Applicability(True, f"{kind} loss; {why}", sites or {}, units)


def _chain_certificate(parts: NetworkParts, params: Params, kind: str, smooth: bool) -> Applicability | None:
    """The certificate of a plain MLP from its modules (``None``: not one, or it does not run as one on every
    batch). Sites and units as :func:`piecewise_linear` records them: the smooth activations behind the first
    measured Linear."""
    chain = chain_of(parts.model)
    if chain is None:
        return None
    p = {**parts.frozen, **params}
    sites: dict[str, int] = {}
    units = 0
    for x, _ in parts.batches:
        got = units_of(chain, p, set(params), x)
        if got is None:
            return None
        batch_sites, units = got
        for k, v in batch_sites.items():
            sites[k] = sites.get(k, 0) + v
    how = "a plain nn.Sequential of Linear layers and elementwise activations (certified from its modules)"
    if sites and not smooth:
        return Applicability(
            False, f"the forward pass applies {next(iter(sites))} to a parameter-dependent tensor"
        )
    if not sites:
        return Applicability(True, f"{kind} loss; {how}: every parameter-dependent operation is piecewise "
                             "linear or bilinear in disjoint parameters")  # fmt: skip
    names = ", ".join(f"{k.split('.')[1]} x{v}" for k, v in sites.items())
    why = f"{how}: piecewise linear or bilinear except elementwise {names} ({units} units per sample)"
    return Applicability(True, f"{kind} loss; {why}", sites, units)


def _mlp_activation(
    fl: FunctionalLoss, parts: NetworkParts, params: Params
) -> tuple[Tensor, dict[str, int]] | None:
    """The activation term of a plain MLP by :meth:`ChainPass.activation_term`, and the smooth sites run;
    ``None`` when the model is not one (or does not run as one on a batch)."""
    chain = chain_of(parts.model)
    if chain is None:
        return None
    p = {**parts.frozen, **params}
    total = torch.zeros((), dtype=torch.float64, device=fl.device)
    seen: dict[str, int] = {}
    for w, (x, y) in zip(fl.weights or [1.0], parts.batches, strict=True):
        run = ChainPass.run(chain, p, set(params), x)
        if run is None:
            return None
        term, sites = run.activation_term(loss_gradient(parts.loss_fn, run.out, y, float(w)))
        total = total + term
        for k, v in sites.items():
            seen[k] = seen.get(k, 0) + v
    return total, seen


def activation_trace(fl: FunctionalLoss, cert: Applicability) -> tuple[float, int]:
    """The diagonal's second-order term of the elementwise activations ``h = sigma(z)``:

        Tr H - Tr G = sum_sites sum_{i,a} (dL/dh_ia) sigma''(z_ia) ||d z_ia / d theta||^2

    (the only nonzero second derivatives on the diagonal when every other parameter-dependent operation is
    piecewise linear or bilinear in disjoint parameters, as ``cert = piecewise_linear(fl, smooth=True)``
    says). ``||d z_ia / d theta||^2`` per sample by the per-layer closed forms, one backward pass from unit
    ``a`` of the site (all samples at once, weighted by ``sqrt|c_ia|``). Cost: ``cert.units`` backward passes
    per batch plus one gradient. A plain ``nn.Sequential`` MLP takes the closed form of
    :mod:`sharpness.mlp_trace` instead (no backward pass per unit: 0 spent). Returns the term and the
    backward passes spent.
    """
    parts, _ = _require(fl.network, "the activation term")
    params = {k: v.detach() for k, v in fl.params.items()}
    got = _mlp_activation(fl, parts, params)
    if got is not None:
        total_mlp, seen_mlp = got
        if seen_mlp != cert.sites:
            raise SharpnessInputError(
                f"the MLP's smooth activations ran {seen_mlp} times but the certificate has {cert.sites}"
            )
        return float(total_mlp), 0
    owners = layer_owners(parts.model, params)
    if owners is None:
        raise SharpnessInputError(
            "the activation term needs every parameter in a Linear, Conv2d or BatchNorm"
        )
    acts = [m for m in parts.model.modules() if type(m) in _SMOOTH_OPS.values()]
    total = torch.zeros((), dtype=torch.float64, device=fl.device)
    passes = 0
    seen: dict[str, int] = {}
    op_of = {v: k for k, v in _SMOOTH_OPS.items()}
    with training_flags(parts.model, False):
        for w, (x, y) in zip(fl.weights or [1.0], parts.batches, strict=True):
            inputs: dict[str, Tensor] = {}
            outputs: dict[str, Tensor] = {}
            calls: list[tuple[nn.Module, Tensor, Tensor]] = []

            def layer_hook(name: str) -> Callable[..., Tensor]:
                def fn(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
                    inputs[name], outputs[name] = inp[0].detach(), out
                    return out.clone()  # kept safe from in-place ops downstream (as in _layers_batch)

                return fn

            def act_hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
                if inp[0].requires_grad:
                    calls.append((mod, inp[0], out))
                return out.clone()

            handles = [m.register_forward_hook(layer_hook(n)) for n, m in owners.items()]
            handles += [m.register_forward_hook(act_hook) for m in acts]
            try:
                p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                with torch.enable_grad():
                    out = _forward(parts, p, x)
                    loss = float(w) * parts.loss_fn(out, y)
            finally:
                for h in handles:
                    h.remove()
            for mod, _, _ in calls:
                key = op_of[type(mod)]
                seen[key] = seen.get(key, 0) + 1
            if not calls:
                continue
            deltas = torch.autograd.grad(loss, [h for _, _, h in calls], retain_graph=True)
            names = list(owners)
            targets = [outputs[m] for m in names]
            prep = {m: _layer_inputs(owners[m], inputs[m]) for m in names}
            for (mod, z, _), delta in zip(calls, deltas, strict=True):
                c = (delta * derivatives(mod, z.detach(), True)[1]).detach().reshape(z.shape[0], -1)
                root, sign = c.abs().sqrt(), torch.sign(c).double()
                live = [a for a in range(c.shape[1]) if bool((c[:, a] != 0).any())]
                cots = torch.zeros(len(live), *c.shape, dtype=c.dtype, device=c.device)
                for j, a in enumerate(live):
                    cots[j, :, a] = root[:, a]
                cots = cots.reshape(len(live), *z.shape)
                for a, grads in zip(live, column_grads(z, targets, cots, _mlp_like(owners)), strict=True):
                    passes += 1
                    for m, g in zip(names, grads, strict=True):
                        if g is None:
                            continue
                        for leaf, value in _layer_sq_norms(owners[m], prep[m], g).items():
                            if f"{m}.{leaf}" in params:
                                total += (sign[:, a] * value).sum()
    if seen != cert.sites:
        raise SharpnessInputError(
            f"the activation modules ran {seen} times but the recorded forward pass has {cert.sites}: an "
            "activation is applied as a function, not a module"
        )
    return float(total), passes

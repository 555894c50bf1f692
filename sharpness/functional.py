"""The door of the toolkit: a model and a loss become a pure function of a parameter dict.

Everything downstream (HVPs, Lanczos, SAM, stacked workers) sees only a :class:`FunctionalLoss`:
a dict of parameter tensors ``params`` and a callable ``loss(params) -> scalar``. The model itself is
never mutated: buffers are passed as copies and the train/eval flags are restored after every call.

Data is an ``(inputs, targets)`` pair or an iterable of such batches. Over several batches the loss is
the exact sample-weighted mean ``L = sum_b n_b L_b / sum_b n_b``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .parallel import DataParallel, resolve
from .sequence import logits_of, math_attention

Batch = tuple[Tensor, Tensor]
Params = dict[str, Tensor]


class SharpnessInputError(ValueError):
    """Bad input to a measurement; the message is one line naming the problem."""


class NonFiniteError(SharpnessInputError):
    """A loss, gradient or Hessian-vector product came out NaN/inf; the message names which and where."""


def require_finite(value: Tensor, what: str, like: Params | None = None, hint: str = "") -> Tensor:
    """``value`` unchanged if every entry is finite, else :class:`NonFiniteError`: ``what`` is not finite,
    with the count of NaN and inf entries and, when the first axis runs over the flat parameters of ``like``,
    the parameter tensors that hold them; ``hint`` is appended. Cost: one pass over ``value``."""
    bad = ~torch.isfinite(value.detach())
    if not bool(bad.any()):
        return value
    if value.numel() == 1:
        raise NonFiniteError(f"{what} is {float(value)}, not finite{hint}")
    n_nan = int(torch.isnan(value.detach()).sum())
    counts = " and ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (int(bad.sum()) - n_nan, "inf")) if n)
    where = f" of {value.numel()} values"  # without a parameter layout: "3 inf of 32 values"
    sizes = [p.numel() for p in like.values()] if like is not None else []
    if like is not None and value.dim() >= 1 and value.shape[0] == sum(sizes):
        rows = bad.reshape(value.shape[0], -1).any(1).split(sizes)
        names = [n for n, part in zip(like, rows, strict=True) if bool(part.any())]
        more = f" and {len(names) - 3} more tensors" if len(names) > 3 else ""
        where = f" entries in {', '.join(names[:3])}{more}"
    raise NonFiniteError(f"{what} is not finite ({counts}{where}){hint}")


#: Why a gradient can be non-finite where the loss is finite; appended to that error.
GRADIENT_HINT = (
    "; the loss there is finite but its derivative is not (e.g. an inf input under a saturating tanh)"
)


def require_finite_gradient(g: Tensor, like: Params, where: str = "the measured weights") -> Tensor:
    """:func:`require_finite` for a flat gradient laid out like ``like``, naming the tensors."""
    return require_finite(g, f"the gradient of the loss at {where}", like, GRADIENT_HINT)


def check_seed(seed: object) -> int:
    """``seed`` as an int in ``[-2**63, 2**64)`` (what torch's generators accept), else one line."""
    try:
        value = operator.index(seed)  # type: ignore[arg-type]
    except TypeError:
        value = None
    if isinstance(seed, bool) or value is None or not -(2**63) <= value < 2**64:
        raise SharpnessInputError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    return value


@contextlib.contextmanager
def private_rng(seed: int | None) -> Iterator[None]:
    """Run the block on torch's global random generators seeded with ``seed`` (``None``: 0), then put the
    caller's generator states back exactly.

    Dropout in train mode draws its masks from the global generators: inside this block they are a function of
    ``seed``, and the caller's random stream is left where it was. The CPU generator always; every CUDA
    device's too once CUDA is initialised (a model on a GPU has initialised it)."""
    value = 0 if seed is None else check_seed(seed)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        torch.random.default_generator.manual_seed(value)
        if cuda:
            torch.cuda.manual_seed_all(value)
        yield


def seeded(fn: Callable) -> Callable:
    """Decorator: run a measurement under :func:`private_rng` with its own ``seed`` argument."""
    default = inspect.signature(fn).parameters["seed"].default

    @functools.wraps(fn)
    def measured(*args, **kwargs):
        with private_rng(kwargs.get("seed", default)):
            return fn(*args, **kwargs)

    return measured


def as_batches(data: Batch | Iterable[Batch]) -> list[Batch]:
    """Normalise ``data`` to a non-empty list of ``(inputs, targets)`` batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        batches = [(data[0], data[1])]
    else:
        try:
            batches = [tuple(b) for b in data]  # type: ignore[union-attr]
        except TypeError as exc:
            raise SharpnessInputError(
                "data must be an (inputs, targets) pair or an iterable of such pairs"
            ) from exc
    if not batches:
        raise SharpnessInputError("data is empty: no batches to evaluate the loss on")
    for i, b in enumerate(batches):
        if len(b) != 2 or not all(isinstance(t, Tensor) for t in b):
            raise SharpnessInputError(f"batch {i} is not an (inputs, targets) pair of tensors")
        x, y = b
        if x.shape[0] == 0:
            raise SharpnessInputError(f"batch {i} is empty")
        if y.shape[0] != x.shape[0]:
            raise SharpnessInputError(
                f"batch {i}: targets have {y.shape[0]} rows but inputs have {x.shape[0]}"
            )
    return batches  # type: ignore[return-value]


@contextlib.contextmanager
def training_flags(model: nn.Module, train: bool) -> Iterator[None]:
    """Set every submodule's train/eval flag for the duration, then restore each exactly."""
    saved = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """``None`` -> the model's device; ``"auto"`` -> CUDA when present; CUDA without CUDA is an error."""
    if device is None:
        return model_device(model) if model is not None else torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise SharpnessInputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SharpnessInputError("CUDA was requested but this machine has no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SharpnessInputError(
            f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)"
        )
    return dev


def select_params(model: nn.Module, params: Sequence[str] | str | None) -> list[str]:
    """Names of the trainable parameters to differentiate: all, or those starting with a given prefix."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return names
    prefixes = [params] if isinstance(params, str) else list(params)
    chosen = [n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)]
    if not chosen:
        raise SharpnessInputError(
            f"params={prefixes!r} matches no parameter; names start with e.g. {names[:5]}"
        )
    return chosen


@dataclass
class NetworkParts:
    """How a loss is made of a network, for curvature that needs the outputs (the Gauss-Newton matrix):
    batch ``b``'s term is ``loss_fn(functional_call(model, {**frozen, **p}, (x_b,)), y_b)``."""

    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batches: list[Batch]
    frozen: Params
    train_mode: bool = False


@dataclass
class FunctionalLoss:
    """A scalar function of a parameter dict, with the point ``params`` where it is measured.

    ``loss(params)`` is pure: it does not change any tensor it is given. ``network``: how the loss is made
    of a model's outputs (set by :func:`make_loss`; ``None`` for a bare function).

    ``parallel``: when the data is split across ranks (:mod:`sharpness.parallel`), ``loss`` and the terms are
    this rank's weighted part of ``L``; :meth:`allsum` adds the parts of all ranks (identity otherwise).
    """

    loss: Callable[[Params], Tensor]
    params: Params
    batch_losses: list[Callable[[Params], Tensor]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    network: NetworkParts | None = None
    parallel: DataParallel | None = None

    def allsum(self, x: Tensor, what: str = "the sum over ranks") -> Tensor:
        """``x`` summed over the ranks holding the data (one ``all_reduce``); ``x`` itself in one process."""
        return x if self.parallel is None else self.parallel.sum(x, what)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def flat_params(self) -> Tensor:
        return flatten(self.params)

    def unflatten(self, vec: Tensor) -> Params:
        return unflatten(vec, self.params)

    def terms(self) -> list[tuple[float, Callable[[Params], Tensor]]]:
        """The loss as ``sum_b w_b L_b`` (one term when there is a single batch)."""
        if self.batch_losses:
            return list(zip(self.weights, self.batch_losses, strict=True))
        return [(1.0, self.loss)]


def flatten(params: Params) -> Tensor:
    """Concatenate a parameter dict into one vector (dict order)."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(vec: Tensor, like: Params) -> Params:
    """Split a vector (or a batch of vectors, leading dims kept) into a dict shaped like ``like``.

    Views through ``split`` (no copies): under autograd the backward of ``split`` writes each piece in place
    instead of zero-filling and adding one full-size vector per parameter tensor.
    """
    lead = vec.shape[:-1]
    parts = vec.split([p.numel() for p in like.values()], dim=-1)
    return {n: t.reshape(*lead, *p.shape) for (n, p), t in zip(like.items(), parts, strict=True)}


def make_loss(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    data: Batch | Iterable[Batch],
    *,
    params: Sequence[str] | str | None = None,
    train_mode: bool = False,
    device: str | torch.device | None = None,
    check: bool = True,
    group: Any = None,
) -> FunctionalLoss:
    """Turn ``(model, loss_fn, data)`` into a :class:`FunctionalLoss` at the model's current weights.

    ``L(theta) = sum_b n_b loss_fn(f(theta; x_b), y_b) / sum_b n_b``. Parameters outside ``params`` and all
    buffers are frozen at their current values. In eval mode (default) BatchNorm uses running statistics and
    dropout is off; in train mode BatchNorm uses batch statistics (its running buffers are updated on
    throw-away copies, never on the model). Cost of construction: one forward pass per batch (``check``).
    Forward passes run with the math attention kernel (:func:`~sharpness.sequence.math_attention`: the only
    one with a double backward), and ``loss_fn`` gets :func:`~sharpness.sequence.logits_of` the output (a
    tuple, a dict or an object with ``logits`` are accepted).

    ``group``: a ``torch.distributed`` process group (or a :class:`~sharpness.parallel.DataParallel`) whose
    ranks each pass their own share of the data; ``N = sum_b n_b`` is then summed over the ranks, and every
    measurement adds the ranks' parts (see :mod:`sharpness.parallel`). ``None``: the group made active by
    :func:`~sharpness.parallel.data_parallel`, or a single process.
    """
    dev = resolve_device(device, model)
    batches = [(x.to(dev), y.to(dev)) for x, y in as_batches(data)]
    names = select_params(model, params)
    state = {n: t.detach() for n, t in model.named_parameters()}
    state.update({n: t.detach() for n, t in model.named_buffers()})
    state = {n: t.to(dev) for n, t in state.items()}
    theta = {n: state[n] for n in names}
    frozen = {n: t for n, t in state.items() if n not in theta}
    buffer_names = {n for n, _ in model.named_buffers()}
    sizes = [x.shape[0] for x, _ in batches]
    dp = resolve(group)
    total = float(sum(sizes)) if dp is None else dp.sum_float(sum(sizes), "the count of samples")

    def batch_loss(batch: Batch) -> Callable[[Params], Tensor]:
        x, y = batch

        def f(p: Params) -> Tensor:
            if train_mode:  # BN would write running stats in place: give it copies
                fz = {n: (t.clone() if n in buffer_names else t) for n, t in frozen.items()}
            else:
                fz = frozen
            with training_flags(model, train_mode), math_attention():
                out = functional_call(model, {**fz, **p}, (x,))
            return loss_fn(logits_of(out), y)

        return f

    terms = [batch_loss(b) for b in batches]
    weights = [n / total for n in sizes]

    def loss(p: Params) -> Tensor:
        return sum(w * f(p) for w, f in zip(weights, terms, strict=True))  # type: ignore[return-value]

    parts = NetworkParts(model, loss_fn, batches, frozen, train_mode)
    fl = FunctionalLoss(
        loss=loss, params=theta, batch_losses=terms, weights=weights, network=parts, parallel=dp
    )
    if check:
        with private_rng(0):  # dropout in train mode: a fixed mask, and the caller's RNG is not advanced
            check_loss(fl)
    return fl


def check_loss(fl: FunctionalLoss, where: str = "these parameters") -> float:
    """Evaluate the loss once and turn the usual failures into one-line :class:`SharpnessInputError` (a
    non-finite value: :class:`NonFiniteError`); ``where`` names the point in the messages. One forward pass
    per batch."""
    for i, f in enumerate(fl.terms()):
        try:
            with torch.no_grad():
                value = f[1](fl.params)
        except SharpnessInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised as one clear line
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SharpnessInputError(f"the loss failed on batch {i} at {where}: {msg}") from exc
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise SharpnessInputError(
                f"loss_fn must return a scalar, got shape {shape} (use reduction='mean')"
            )
    with torch.no_grad():
        total = float(fl.allsum(fl.loss(fl.params).reshape(1), "the loss")[0])
    if not math.isfinite(total):
        raise NonFiniteError(
            f"the loss is {total} at {where} (NaN/inf): the weights, the data or the model's outputs are not "
            "finite"
        )
    return total

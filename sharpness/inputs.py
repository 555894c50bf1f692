"""Does this data fit this model? Loss functions by name, predictions and accuracy; the model is untouched.

Used by the ``sharpness`` command before any measurement, so that a mismatch becomes one line naming the
problem (input shape, label range, target shape, NaN/inf loss) instead of a traceback deep inside autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .functional import SharpnessInputError, training_flags

LossFn = Callable[[Tensor, Tensor], Tensor]
LOSSES = {
    "ce": "cross-entropy of the logits, mean over samples",
    "mse": "squared error, mean over samples and outputs (class labels become one-hot targets)",
}


def forward(model: nn.Module, x: Tensor, *, train_mode: bool = False) -> Tensor:
    """``f(x; w)`` under ``no_grad``, in eval (default) or train mode. Buffers are copied, so BatchNorm in
    train mode does not update the model's running statistics; train/eval flags are restored. One forward."""
    state = {n: t.detach() for n, t in model.named_parameters()}
    state.update({n: t.detach().clone() for n, t in model.named_buffers()})
    with torch.no_grad(), training_flags(model, train_mode):
        return functional_call(model, state, (x,))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_fit(
    model: nn.Module, x: Tensor, y: Tensor, loss: str, *, name: str = "data", train_mode: bool = False
) -> int:
    """Raise a one-line :class:`SharpnessInputError` unless ``(x, y)`` fits ``model`` under ``loss``.

    Checks, on the first 8 samples and on all labels: the inputs go through the model; the outputs are
    ``(N, C)``; integer labels lie in ``[0, C)``; float targets have the outputs' shape (or, for ``ce``,
    are class probabilities of that shape). Returns ``C``. Cost: one forward pass on 8 samples.
    """
    if loss not in LOSSES:
        raise SharpnessInputError(f"unknown loss {loss!r}: choose from {', '.join(LOSSES)}")
    probe = x[: min(8, x.shape[0])]
    try:
        out = forward(model, probe, train_mode=train_mode)
    except Exception as exc:  # noqa: BLE001 - any failure here is a mismatch of data and model
        raise SharpnessInputError(
            f"{name}: inputs of shape {tuple(x.shape[1:])} do not fit the model: {_first_line(exc)}"
        ) from exc
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != probe.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise SharpnessInputError(
            f"the model maps {name} inputs {tuple(probe.shape)} to {shape}; expected (N, outputs)"
        )
    c = int(out.shape[1])
    if not y.is_floating_point() and y.dim() != 1:
        raise SharpnessInputError(
            f"{name}: integer labels must be one class index per sample, got shape {tuple(y.shape)}"
        )
    if not y.is_floating_point():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= c:
            raise SharpnessInputError(
                f"{name}: labels range over {lo}..{hi} but the model has {c} outputs "
                f"(labels must be 0..{c - 1})"
            )
    elif tuple(y.shape[1:]) != (c,):
        what = "class probabilities" if loss == "ce" else "targets"
        raise SharpnessInputError(
            f"{name}: float {what} of shape {tuple(y.shape[1:])} per sample do not match the model's "
            f"{c} outputs"
        )
    return c


def loss_function(loss: str, num_outputs: int) -> LossFn:
    """``ce``: ``F.cross_entropy(out, y)`` (labels or probabilities); ``mse``: ``F.mse_loss(out, t)`` with
    ``t = one_hot(y)`` for labels, else ``y`` (mean over samples and outputs)."""
    if loss == "ce":
        return F.cross_entropy
    if loss == "mse":

        def mse(out: Tensor, y: Tensor) -> Tensor:
            t = F.one_hot(y, num_outputs).to(out.dtype) if not y.is_floating_point() else y
            return F.mse_loss(out, t)

        return mse
    raise SharpnessInputError(f"unknown loss {loss!r}: choose from {', '.join(LOSSES)}")


def accuracy(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], *, train_mode: bool = False
) -> tuple[int, int] | None:
    """``(correct, total)`` with ``argmax_c f(x)_c == y``; ``None`` when targets are not integer labels.
    Cost: one forward pass per batch."""
    if any(y.is_floating_point() for _, y in batches):
        return None
    correct = total = 0
    for x, y in batches:
        pred = forward(model, x, train_mode=train_mode).argmax(dim=1)
        correct += int((pred == y).sum())
        total += int(y.shape[0])
    return correct, total

"""Does this data fit this model? Loss functions by name, predictions and accuracy; the model is untouched.

Used by the ``sharpness`` command before any measurement, so that a mismatch becomes one line naming the
problem (input shape, label range, target shape, NaN/inf loss) instead of a traceback deep inside autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .functional import SharpnessInputError, training_flags
from .importing import import_callable
from .parallel import active
from .sequence import IGNORE_INDEX, lm_loss, logits_of, math_attention

LossFn = Callable[[Tensor, Tensor], Tensor]
LOSSES = {
    "ce": "cross-entropy of the logits, mean over samples",
    "mse": "squared error, mean over samples and outputs (class labels become one-hot targets)",
    "lm": "next-token cross-entropy of (N, T, V) logits against (N, T) token ids, shifted by one, mean over "
    f"positions whose target is not {IGNORE_INDEX} (padding)",
}


def is_user_loss(loss: str) -> bool:
    """Whether ``--loss`` names a user's ``MODULE:CALLABLE`` rather than a built-in loss."""
    return loss not in LOSSES and ":" in loss


def loss_description(loss: str) -> str:
    """A few words on the loss, for the report's header."""
    short = {"ce": "cross-entropy, mean over samples", "mse": "squared error, mean over samples",
             "lm": f"next-token cross-entropy, mean over tokens, ignore index {IGNORE_INDEX}"}  # fmt: skip
    return f"{loss} ({short.get(loss, 'user loss loss_fn(outputs, targets), given on the command line')})"


def forward(model: nn.Module, x: Tensor, *, train_mode: bool = False) -> Tensor:
    """``f(x; w)`` under ``no_grad``, in eval (default) or train mode. Buffers are copied, so BatchNorm in
    train mode does not update the model's running statistics; train/eval flags are restored. One forward."""
    state = {n: t.detach() for n, t in model.named_parameters()}
    state.update({n: t.detach().clone() for n, t in model.named_buffers()})
    with torch.no_grad(), training_flags(model, train_mode), math_attention():
        return logits_of(functional_call(model, state, (x,)))


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
    if loss not in LOSSES and not is_user_loss(loss):
        raise SharpnessInputError(
            f"unknown loss {loss!r}: choose from {', '.join(LOSSES)} or MODULE:CALLABLE"
        )
    probe = x[: min(8, x.shape[0])]
    try:
        out = forward(model, probe, train_mode=train_mode)
    except Exception as exc:  # noqa: BLE001 - any failure here is a mismatch of data and model
        raise SharpnessInputError(
            f"{name}: inputs of shape {tuple(x.shape[1:])} do not fit the model: {_first_line(exc)}"
        ) from exc
    if loss == "lm" or is_user_loss(loss):
        return _check_sequence_fit(out, y, probe.shape[0], loss, name)
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


def _check_sequence_fit(out: Any, y: Tensor, n: int, loss: str, name: str) -> int:
    """``lm``: outputs (N, T, V) and integer targets (N, T) with ids in [0, V) or the ignore index. A user
    loss is checked only by the finite-loss check that follows. Returns V (the last output dimension)."""
    if not isinstance(out, Tensor) or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise SharpnessInputError(f"the model maps {name} inputs to {shape}; expected a tensor with N rows")
    if loss != "lm":
        return int(out.shape[-1]) if out.dim() > 1 else 1
    if out.dim() != 3 or y.is_floating_point() or y.dim() != 2 or y.shape[1] != out.shape[1]:
        raise SharpnessInputError(
            f"--loss lm needs logits (N, T, V) and integer token targets (N, T); the model gives "
            f"{tuple(out.shape)} for {name} targets of shape {tuple(y.shape)} and dtype {y.dtype}"
        )
    v = int(out.shape[2])
    ids = y[y != IGNORE_INDEX]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise SharpnessInputError(
            f"{name}: token ids range over {int(ids.min())}..{int(ids.max())} but the model has {v} logits"
        )
    return v


def loss_function(loss: str, num_outputs: int) -> LossFn:
    """``ce``: ``F.cross_entropy(out, y)`` (labels or probabilities); ``mse``: ``F.mse_loss(out, t)`` with
    ``t = one_hot(y)`` for labels, else ``y`` (mean over samples and outputs); ``lm``:
    :func:`~sharpness.sequence.lm_loss`; ``MODULE:CALLABLE``: that function, called as
    ``fn(outputs, targets)`` and expected to return a scalar mean."""
    if loss == "ce":
        return F.cross_entropy
    if loss == "lm":
        return lm_loss
    if is_user_loss(loss):  # named on the command line by the user: importing it is theirs to ask
        return import_callable(loss, what="--loss")
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
        out = forward(model, x, train_mode=train_mode)
        if out.dim() != 2 or y.dim() != 1:  # sequences, or targets that are not one label per sample
            return None
        pred = out.argmax(dim=1)
        correct += int((pred == y).sum())
        total += int(y.shape[0])
    dp = active()
    if dp is not None:  # data split across ranks: the counts of all of them
        correct, total = (int(dp.sum_float(v, "the accuracy counts")) for v in (correct, total))
    return correct, total


def batch_statistics_note(model: nn.Module, train_mode: bool, n_batches: int) -> str | None:
    """A warning when the measured function depends on how the data is batched: BatchNorm in train mode over
    several batches normalises each batch by its own statistics, so ``L = sum_b w_b L_b`` (and its Hessian)
    changes with the batch size. ``None`` when it does not apply."""
    if not train_mode or n_batches < 2:
        return None
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    return (
        f"BatchNorm in train mode over {n_batches} batches: each batch is normalised by its own statistics, "
        "so L and H are those of this batch size (change --batch-size, change the function)"
    )

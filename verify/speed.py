"""The speed options of a run: ``precision`` (fp32 | tf32 | bf16), ``channels_last`` and ``compile``.

They change only the m local *training* gradients of each step (the engine's grads function, built once by
:func:`training_grads` around :func:`verify.stacked.local_grads`). Everything measured (w_a's loss and
accuracy, Tr Xi, Tr(H Xi), drift, Tr H, lambda_max) and every checkpoint stays in the run's dtype; only
``batch_loss``, the mean of the training losses of the update, is computed under them.

- ``fp32``: CUDA's TF32 off during the gradient call (``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32`` False; torch's own default lets cuDNN convolutions use TF32), restored
  after it. On the CPU nothing is touched.
- ``tf32``: both flags on during the call, restored after it: float32 matmuls and convolutions on tensor cores
  with 10-bit mantissas (unit roundoff 2^-11), accumulated in float32. CUDA only: on the CPU the flags govern
  nothing, a stated no-op.
- ``bf16``: ``torch.autocast(device, torch.bfloat16)`` around the forward and backward of the gradients:
  matmuls and convolutions take bfloat16 operands (8 significant bits, unit roundoff u = 2^-8) and accumulate
  in float32; parameters, gradients, momentum and the gossip stay float32. float32 runs only (autocast leaves
  float64 alone); no effect on the closed-form (``analytic``) gradients.
- ``channels_last``: 4-d inputs (N, C, H, W) and 4-d (convolution) weights in the channels-last memory
  format, the layout tensor cores prefer; the same numbers up to the kernels' summation order. Applies when
  the model has 4-d weights, the data 4-d inputs and the execution is ``loop`` (BatchNorm models always are;
  torch cannot lay out weights channels-last inside ``vmap``); a stated no-op otherwise. Cost: one copy of
  the inputs and of the conv weights per step.
- ``compile``: ``torch.compile`` of the gradient function (inductor). The toolchain is checked first: no C++
  compiler on the CPU, no triton on CUDA, or a Python torch.compile does not support is one line and
  :class:`SpeedError` (exit 2 from the command line), never a silent fallback to eager; a compilation that
  fails on the first call is the same one line. The same numbers up to fusion's rounding.

Settings a resumed run may change: ``channels_last`` and ``compile`` (:data:`RESUMABLE`: rounding only, like
the device); ``precision`` may not (a bf16 continuation of an fp32 run would be neither).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sharpness.functional import Params

from .problem import Batch, Problem
from .stacked import GradsFn, local_grads

PRECISIONS = ("fp32", "tf32", "bf16")
#: The speed settings a resumed run may change (rounding only).
RESUMABLE = ("channels_last", "compile")


class SpeedError(ValueError):
    """A speed option that cannot apply here (a bad value, no compiler, a failed compilation); one line."""


@dataclass(frozen=True)
class Speed:
    """The three options; :meth:`of` reads them from anything that has them (a RunConfig)."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def of(cls, options: Any) -> Speed:
        if isinstance(options, Speed):
            return options
        return cls(
            getattr(options, "precision", "fp32"),
            bool(getattr(options, "channels_last", False)),
            bool(getattr(options, "compile", False)),
        )

    @property
    def label(self) -> str:
        """``bf16+channels_last+compile`` style name of the combination."""
        return "+".join(
            [self.precision] + ["channels_last"] * self.channels_last + ["compile"] * self.compile
        )


def precision_error(precision: Any, dtype: str) -> str | None:
    """Why ``precision`` cannot apply to a run of ``dtype`` (a line), or None."""
    if precision not in PRECISIONS:
        return f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}"
    if precision != "fp32" and dtype != "float32":
        return f"precision {precision} applies to float32 runs; this run has dtype {dtype} (use fp32)"
    return None


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """CUDA's TF32 flags (matmul and cuDNN) set to ``enabled`` inside the block, restored after it."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def compile_blocker(device: torch.device) -> str | None:
    """Why ``torch.compile`` (inductor) cannot work on ``device`` here, or None: a Python it does not
    support, no C++ compiler (``$CXX``, default ``g++``, as inductor looks for it) on the CPU, no triton on
    CUDA. Cost: a file-system lookup."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]} in torch {torch.__version__}"
    if device.type == "cpu":
        cxx = os.environ.get("CXX", "g++")
        if shutil.which(cxx) is None:
            return (
                f"torch.compile on the CPU needs a C++ compiler and {cxx!r} (from $CXX or g++) was not found"
            )
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton, which is not installed"
    return None


def notes(problem: Problem, speed: Speed, execution: str) -> list[str]:
    """The options that are no-ops for this problem and device, one line each."""
    out = []
    if speed.precision == "tf32" and problem.device.type != "cuda":
        out.append(f"precision tf32 has no effect on {problem.device.type} (TF32 is a CUDA tensor-core mode)")
    if speed.precision == "bf16" and execution == "analytic":
        out.append("precision bf16 has no effect on the closed-form (analytic) gradients")
    if speed.channels_last:
        why = channels_last_blocker(problem, execution)
        if why:
            out.append(f"channels_last has no effect: {why}")
    return out


def channels_last_blocker(problem: Problem, execution: str) -> str | None:
    """Why channels-last does not apply to ``problem`` under ``execution`` (no 4-d inputs, no 4-d weights,
    vmap), or None."""
    if execution == "analytic":
        return "closed-form (analytic) gradients have no inputs or weights to lay out"
    x = getattr(problem, "x", None)
    if not isinstance(x, Tensor) or x.dim() != 4:
        return "the inputs are not 4-d images (N, C, H, W)"
    if not any(v.dim() == 4 for v in problem.params.values()):
        return "the model has no 4-d (convolution) weights"
    if execution == "vmap":
        return "torch cannot lay out weights channels-last inside vmap; use --execution loop"
    return None


class ChannelsLast:
    """``problem`` whose parameter dicts hold the 4-d weights in the channels-last memory format (a copy per
    call, differentiable); every other attribute is the problem's own (delegated, so nothing of the base
    class :class:`~verify.problem.Problem` shadows it)."""

    def __init__(self, problem: Problem) -> None:
        self.inner = problem
        self.conv = {k for k, v in problem.params.items() if v.dim() == 4}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def unflatten(self, w: Tensor) -> Params:
        p = self.inner.unflatten(w)
        return {
            k: v.contiguous(memory_format=torch.channels_last) if k in self.conv else v for k, v in p.items()
        }


def channels_last_inputs(batches: Batch) -> Batch:
    """The stacked inputs (m, b, C, H, W) laid out so that every worker's (b, C, H, W) slice is
    channels-last; targets unchanged."""
    x, *rest = batches
    return (x.movedim(-3, -1).contiguous().movedim(-1, -3), *rest)


def check(problem: Problem, options: Any) -> Speed:
    """The :class:`Speed` of ``options``, or :class:`SpeedError` (one line) when an option cannot apply to
    ``problem`` here (precision vs dtype, bf16 on the GPU, no compiler). The engine calls it before it touches
    the run folder. Cost: a file-system lookup."""
    speed = Speed.of(options)
    why = precision_error(speed.precision, str(problem.dtype).replace("torch.", ""))
    if why:
        raise SpeedError(why)
    device = problem.device
    if speed.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SpeedError(f"precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    if speed.compile:
        blocker = compile_blocker(device)
        if blocker:
            raise SpeedError(f"{blocker}; run without --compile")
    return speed


def training_grads(
    problem: Problem, execution: str, options: Any, say: Callable[[str], None] | None = None
) -> GradsFn:
    """The grads function of ``execution`` (:func:`verify.stacked.local_grads`) with the speed options of
    ``options`` (a :class:`Speed` or a RunConfig); ``say`` gets the notes of :func:`notes` (default: stderr).
    Raises :class:`SpeedError` (one line) when an option cannot apply (:func:`check`). Cost per call: the
    gradients, plus the options' own (module docstring)."""
    speed, device = check(problem, options), problem.device
    for line in notes(problem, speed, execution):
        (say or _stderr)(line)
    layout = speed.channels_last and channels_last_blocker(problem, execution) is None
    base = local_grads(ChannelsLast(problem) if layout else problem, execution)  # type: ignore[arg-type]
    autocast = speed.precision == "bf16" and execution != "analytic"

    def grads(W: Tensor, buffers: Params, batches: Batch) -> tuple[Tensor, Tensor, Params]:
        if layout:
            batches = channels_last_inputs(batches)
        if not autocast:
            return base(W, buffers, batches)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return base(W, buffers, batches)

    fn = first_call_checked(torch.compile(grads)) if speed.compile else grads
    if device.type != "cuda":
        return fn

    def on_cuda(W: Tensor, buffers: Params, batches: Batch) -> tuple[Tensor, Tensor, Params]:
        with tf32(speed.precision == "tf32"):
            return fn(W, buffers, batches)

    return on_cuda


def first_call_checked(fn: GradsFn) -> GradsFn:
    """``fn`` (compiled), whose first call turns any failure (compilation happens there) into one line."""
    done = [False]

    def grads(W: Tensor, buffers: Params, batches: Batch) -> tuple[Tensor, Tensor, Params]:
        if done[0]:
            return fn(W, buffers, batches)
        try:
            out = fn(W, buffers, batches)
        except Exception as exc:  # noqa: BLE001 - compilation failed: one line, not a traceback
            text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise SpeedError(
                f"torch.compile of the gradients failed: {type(exc).__name__}: {text}; run without --compile"
            ) from None
        done[0] = True
        return out

    return grads


def _stderr(line: str) -> None:
    print(f"note: {line}", file=sys.stderr)

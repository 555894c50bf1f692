"""What transformers need to be measured: their outputs, their attention kernel and the language-model loss.

- :func:`logits_of`: a forward output as one tensor: a tensor itself; an object or dict with ``logits``
  (HuggingFace ``ModelOutput``); otherwise the first tensor of a tuple/list/dict.
- :func:`math_attention`: ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` for the block. The flash and
  memory-efficient kernels of ``scaled_dot_product_attention`` have no double backward (PyTorch raises
  ``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``), and an
  HVP differentiates the gradient again; the math kernel is plain matmul/softmax, differentiable any number
  of times, and gives the same attention to rounding. The context manager restores the caller's choice.
- :func:`lm_loss`: next-token cross-entropy
  ``mean_{(i,t): y_{i,t+1} != IGNORE} -log softmax(z_{i,t})[y_{i,t+1}]`` of logits ``z`` (N, T, V)
  against token ids ``y`` (N, T), shifted by one; positions whose target is
  :data:`IGNORE_INDEX` (padding) are left out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.nn.functional as F
from torch import Tensor

#: Target id of padding positions, left out of the language-model loss (PyTorch's default ignore index).
IGNORE_INDEX = -100
#: What the report records as the attention kernel used for every forward pass of a measurement.
ATTENTION_KERNEL = "math (torch.nn.attention.SDPBackend.MATH: flash/memory-efficient have no double backward)"


def logits_of(out: Any) -> Any:
    """The tensor a loss applies to: ``out`` if a tensor, else ``out.logits`` / ``out["logits"]``, else the
    first tensor in a tuple, list or dict (anything else is returned unchanged, for the loss to refuse)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, dict):
        if isinstance(out.get("logits"), Tensor):
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, Tensor):
                return item
    return out


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` uses its math kernel inside the block (see the module docstring)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3 has no kernel choice to make
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Next-token cross-entropy (see the module docstring): ``logits[:, :-1]`` against ``y[:, 1:]``, mean over
    the positions whose target is not :data:`IGNORE_INDEX`. Cost: one log-softmax over (N, T-1, V)."""
    v = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, v), y[:, 1:].reshape(-1).long(), ignore_index=IGNORE_INDEX
    )

"""A tiny causal transformer language model for the tests (importable as ``tests.sharpness.tiny_lm:make_lm``).

Embedding + learned positions -> one ``nn.TransformerEncoderLayer`` (causal mask, no dropout) -> linear head;
its forward returns the logits in the form ``output`` asks for: a tensor, a tuple, a dict, or an object with
``.logits`` (like HuggingFace's ``ModelOutput``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Output:
    logits: Tensor
    hidden: Tensor


class TinyLM(nn.Module):
    def __init__(
        self, vocab: int = 7, dim: int = 4, heads: int = 2, ff: int = 8, seq: int = 5, output: str = "obj"
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, dim))
        self.block = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, vocab)
        self.output = output

    def forward(self, ids: Tensor):
        t = ids.shape[1]
        h = self.embed(ids) + self.pos[:t]
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=h.dtype, device=h.device)
        h = self.block(h, src_mask=mask, is_causal=True)
        z = self.head(h)
        if self.output == "tensor":
            return z
        if self.output == "tuple":
            return (z, h)
        if self.output == "dict":
            return {"hidden": h, "logits": z}
        return Output(logits=z, hidden=h)


def make_lm(**kwargs) -> TinyLM:
    """The test LM, seeded, eval mode."""
    torch.manual_seed(kwargs.pop("seed", 0))
    return TinyLM(**kwargs).eval()


def lm_loss_sum_form(logits: Tensor, y: Tensor) -> Tensor:
    """The next-token loss written out by hand (a user loss for ``--loss MODULE:CALLABLE``)."""
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    tgt = y[:, 1:]
    keep = tgt != -100
    picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()

"""HuggingFace causal LMs for the optional test (needs the ``transformers`` package; nothing is downloaded).

``--arch tests.sharpness.hf_lm:from_folder --arch-kwargs '{"folder": DIR}'`` builds the architecture from
``DIR/config.json`` with random weights; the command then loads ``DIR/model.safetensors`` into it.
"""

from __future__ import annotations


def tiny_llama(seed: int = 0):
    """A 2-layer Llama (vocabulary 256, width 16) with random weights, in float64, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).double().eval()


def from_folder(folder: str):
    """The architecture of a ``save_pretrained`` folder, from its config alone (weights loaded afterwards)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).eval()

"""Weight-name maps: each source format's tensor names to ours, and back.

Our names are MobileLLM's parameter paths (see mlx_mobilellm/models/mobilellm.py). A table
maps module paths, with {n} for the layer index; the leaf (weight, or the scales / biases of a
quantized layer) carries over unchanged. Both directions read the same table, so they cannot
drift apart.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

_HF_BLOCK = [
    ("self_attn.q_proj", "attention.q_proj"),
    ("self_attn.k_proj", "attention.k_proj"),
    ("self_attn.v_proj", "attention.v_proj"),
    ("self_attn.o_proj", "attention.o_proj"),
    ("self_attn.q_norm", "attention.q_norm"),
    ("self_attn.k_norm", "attention.k_norm"),
    ("input_layernorm", "attention_norm"),
    ("post_attention_layernorm", "ffn_norm"),
]
_FFN = ("gate_proj", "up_proj", "down_proj")


def _hf_table(ffn_module: str) -> list:
    block = _HF_BLOCK + [(f"{ffn_module}.{w}", f"ffn.{w}") for w in _FFN]
    return [
        ("model.embed_tokens", "embed_tokens"),
        ("model.norm", "decoder.norm"),
        ("lm_head", "lm_head"),
    ] + [(f"model.layers.{{n}}.{src}", f"decoder.layers.{{n}}.{ours}") for src, ours in block]


_GGUF_TABLE = [
    ("token_embd", "embed_tokens"),
    ("output_norm", "decoder.norm"),
    ("output", "lm_head"),
] + [(f"blk.{{n}}.{src}", f"decoder.layers.{{n}}.{ours}") for src, ours in [
    ("attn_q", "attention.q_proj"), ("attn_k", "attention.k_proj"),
    ("attn_v", "attention.v_proj"), ("attn_output", "attention.o_proj"),
    ("attn_q_norm", "attention.q_norm"), ("attn_k_norm", "attention.k_norm"),
    ("attn_norm", "attention_norm"), ("ffn_norm", "ffn_norm"),
    ("ffn_gate", "ffn.gate_proj"), ("ffn_up", "ffn.up_proj"), ("ffn_down", "ffn.down_proj"),
]]

NAME_TABLES = {
    "llama4_text": _hf_table("feed_forward"),  # Hugging Face MobileLLM-R1
    "llama": _hf_table("mlp"),
    "mobilellm": _hf_table("mlp"),  # original MobileLLM: Llama names
    "gguf": _GGUF_TABLE,
    # Folders written by mlx-lm (mlx_lm.convert, mlx-community): Hugging Face names, but for
    # llama4_text mlx-lm calls the untied head `output` (its Model attribute).
    "mlx_lm.llama": _hf_table("mlp"),
    "mlx_lm.llama4_text": [(("output", ours) if ours == "lm_head" else (src, ours))
                           for src, ours in _hf_table("feed_forward")],
}

LEAVES = ("weight", "scales", "biases")

# Tensors some exporters add that carry nothing the model needs (RoPE tables are recomputed).
IGNORED_SOURCE_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")


@lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{n\}", r"(\d+)") + "$")


def _translate(name: str, pairs: list) -> Optional[str]:
    module, _, leaf = name.rpartition(".")
    if leaf not in LEAVES:
        return None
    for src, dst in pairs:
        match = _compile(src).match(module)
        if match:
            path = dst.replace("{n}", match.group(1)) if match.groups() else dst
            return f"{path}.{leaf}"
    return None


def to_ours(name: str, source: str) -> Optional[str]:
    """Our name for a source tensor name, or None when the source format has no such tensor."""
    return _translate(name, NAME_TABLES[source])


def from_ours(name: str, source: str) -> Optional[str]:
    """The source format's name for one of our parameter names."""
    return _translate(name, [(dst, src) for src, dst in NAME_TABLES[source]])

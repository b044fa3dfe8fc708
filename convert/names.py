"""Weight-name maps: each source format's tensor names to ours, and back.

Our names are MobileLLM's parameter paths (see mlx_mobilellm/models/mobilellm.py). A map is a
list of (source pattern, our pattern) pairs where {n} stands for the layer index; both
directions read the same table, so the maps cannot drift apart.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

_BLOCK = [
    ("self_attn.q_proj.weight", "attention.q_proj.weight"),
    ("self_attn.k_proj.weight", "attention.k_proj.weight"),
    ("self_attn.v_proj.weight", "attention.v_proj.weight"),
    ("self_attn.o_proj.weight", "attention.o_proj.weight"),
    ("self_attn.q_norm.weight", "attention.q_norm.weight"),
    ("self_attn.k_norm.weight", "attention.k_norm.weight"),
    ("input_layernorm.weight", "attention_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
]
_FFN = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]


def _hf_table(ffn_module: str) -> list:
    block = _BLOCK + [(f"{ffn_module}.{w}", f"ffn.{w}") for w in _FFN]
    return [
        ("model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.norm.weight", "decoder.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
    ] + [(f"model.layers.{{n}}.{src}", f"decoder.layers.{{n}}.{ours}") for src, ours in block]


NAME_TABLES = {
    "llama4_text": _hf_table("feed_forward"),  # Hugging Face MobileLLM-R1
    "llama": _hf_table("mlp"),
}

# Tensors some exporters add that carry nothing the model needs (RoPE tables are recomputed).
IGNORED_SOURCE_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")


@lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{n\}", r"(\d+)") + "$")


def _translate(name: str, pairs: list) -> Optional[str]:
    for src, dst in pairs:
        match = _compile(src).match(name)
        if match:
            return dst.replace("{n}", match.group(1)) if match.groups() else dst
    return None


def to_ours(name: str, source: str) -> Optional[str]:
    """Our name for a source tensor name, or None when the source format has no such tensor."""
    return _translate(name, NAME_TABLES[source])


def from_ours(name: str, source: str) -> Optional[str]:
    """The source format's name for one of our parameter names."""
    return _translate(name, [(dst, src) for src, dst in NAME_TABLES[source]])

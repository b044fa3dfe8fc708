"""The layers inside a block: RMSNorm, grouped-query attention, and the SwiGLU feed-forward."""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .rope import RoPE

Mask = Union[None, str, mx.array]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with grouped-query K/V, optional QK-norm and RoPE.

    K/V heads are never repeated in memory: mx.fast.scaled_dot_product_attention shares each
    K/V head among num_heads // num_kv_heads query heads itself.

    attention_mask: None attends everywhere; "causal"; a boolean array (True = may attend) or
    an additive float array, broadcastable to (batch, heads, queries, keys). With a cache,
    keys are the cached ones followed by the new ones.

    max_seq_len is accepted for the seed's signature; RoPE is computed on the fly by
    mx.fast.rope, so no table of that length is built.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        use_qk_norm: bool = True,
        rope_base: float = 500000.0,
        max_seq_len: int = 32768,
        *,
        head_dim: Optional[int] = None,
        use_rope: bool = True,
        rope_traditional: bool = True,
        rope_scaling: Optional[dict] = None,
        qk_norm_weight: bool = False,
        norm_eps: float = 1e-5,
        attn_temperature_tuning: bool = False,
        attn_scale: float = 0.1,
        floor_scale: float = 8192.0,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim or embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=False)

        # Llama 4 puts QK-norm and RoPE on the same layers; NoPE layers get neither.
        self.use_qk_norm = use_qk_norm and use_rope
        self.norm_eps = norm_eps
        if self.use_qk_norm and qk_norm_weight:
            self.q_norm = RMSNorm(self.head_dim, norm_eps)
            self.k_norm = RMSNorm(self.head_dim, norm_eps)
        self.rope = RoPE(self.head_dim, rope_base, rope_traditional, rope_scaling) if use_rope else None
        self.temperature = (attn_scale, floor_scale) if attn_temperature_tuning and not use_rope else None

    def _qk_norm(self, x: mx.array, name: str) -> mx.array:
        norm = getattr(self, name, None)
        # Weightless norm commutes with RoPE (a rotation keeps the norm), so its place is free;
        # a weighted one must come first, as in the models that have it.
        return norm(x) if norm is not None else mx.fast.rms_norm(x, None, self.norm_eps)

    def __call__(self, x: mx.array, attention_mask: Mask = None, cache=None) -> mx.array:
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, -1).transpose(0, 2, 1, 3)

        if self.use_qk_norm:
            q, k = self._qk_norm(q, "q_norm"), self._qk_norm(k, "k_norm")
        offset = cache.rope_offset if cache is not None else 0  # an int, or one per row
        if self.rope is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        if self.temperature is not None:
            attn_scale, floor_scale = self.temperature
            positions = mx.arange(length, dtype=mx.float32) + mx.array(offset).reshape(-1, 1)
            # Left padding sits at negative positions; its factor would be log1p(-1) = -inf,
            # and the NaN it makes would reach real rows through the next layer's keys.
            positions = mx.maximum(positions, 0)
            factor = 1 + attn_scale * mx.log1p(mx.floor((positions + 1) / floor_scale))
            q = q * factor[:, None, :, None].astype(q.dtype)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)

        if isinstance(attention_mask, mx.array) and attention_mask.dtype != mx.bool_:
            attention_mask = attention_mask.astype(q.dtype)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=attention_mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(embed_dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(embed_dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, embed_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))

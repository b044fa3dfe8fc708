"""The decoder stack: pre-norm residual blocks and the final norm."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import checkpoint

from .attention import FeedForward, Mask, MultiHeadAttention, RMSNorm
from .config import MobileLLMConfig
from .masks import causal_mask


class TransformerBlock(nn.Module):
    """x + attention(norm(x)), then x + ffn(norm(x)); dropout on each branch in training."""

    def __init__(self, config: MobileLLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.uses_rope = layer_idx not in config.nope_layers
        self.attention_norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.attention = MultiHeadAttention(
            config.embed_dim, config.num_heads, config.num_kv_heads,
            use_qk_norm=config.use_qk_norm, rope_base=config.rope_base,
            max_seq_len=config.max_seq_len, head_dim=config.dim_per_head,
            use_rope=self.uses_rope, rope_traditional=config.rope_traditional,
            rope_scaling=config.rope_scaling, qk_norm_weight=config.qk_norm_weight,
            norm_eps=config.norm_eps, attn_temperature_tuning=config.attn_temperature_tuning,
            attn_scale=config.attn_scale, floor_scale=config.floor_scale,
        )
        self.ffn_norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.ffn = FeedForward(config.embed_dim, config.hidden_dim)
        self.dropout_p = config.dropout

    def _dropout(self, x: mx.array, key: Optional[mx.array]) -> mx.array:
        if not self.training or self.dropout_p == 0:
            return x
        # No gradient flows into a key; saying so spares autodiff the random primitive.
        key = None if key is None else mx.stop_gradient(key)
        keep = mx.random.bernoulli(1 - self.dropout_p, x.shape, key=key)
        return mx.where(keep, x / (1 - self.dropout_p), 0).astype(x.dtype)

    def __call__(self, x: mx.array, attention_mask: Mask = "causal", cache=None,
                 dropout_key: Optional[mx.array] = None) -> mx.array:
        """dropout_key fixes the dropout masks (the checkpointed backward pass recomputes the
        block and must draw the same ones); None draws from MLX's global generator."""
        attn_key, ffn_key = mx.random.split(dropout_key) if dropout_key is not None else (None, None)
        h = x + self._dropout(self.attention(self.attention_norm(x), attention_mask, cache), attn_key)
        return h + self._dropout(self.ffn(self.ffn_norm(h)), ffn_key)


class TransformerDecoder(nn.Module):
    """The blocks and the final RMSNorm; causal by construction.

    attention_mask is a (batch, seq) padding mask (1 = real token, 0 = padding) covering the
    cached positions too, or None; the causal (and, for Llama 4 RoPE layers, chunked) masks
    are built here. cache is a list from MobileLLM.make_cache(), one entry per block call.
    """

    def __init__(self, config: MobileLLMConfig):
        super().__init__()
        self.config = config
        self.layers = [TransformerBlock(config, i) for i in range(config.num_layers)]
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.gradient_checkpointing = False
        self.stage = None
        """This rank's PipelineStage when the blocks are split over processes (pipeline.py)."""

    @property
    def calls_per_block(self) -> int:
        # Original MobileLLM's layer sharing runs each block twice in a row; each run is a
        # separate position in the depth, with its own KV cache.
        return 2 if self.config.layer_sharing else 1

    def __call__(self, hidden_states: mx.array, attention_mask: Optional[mx.array] = None,
                 cache: Optional[list] = None) -> mx.array:
        length = hidden_states.shape[1]
        offset = cache[0].offset if cache else 0
        full = causal_mask(length, offset, attention_mask)
        chunk = self.config.attention_chunk_size
        chunked = full
        if chunk:
            # A rotated (ring) cache hands its keys back out of position order.
            keys = cache[0].key_positions(length) if cache else None
            chunked = causal_mask(length, offset, attention_mask, chunk, keys)

        # Checkpointing recomputes each block in the backward pass; a cache would be written
        # twice, and inference has no backward pass anyway.
        checkpointing = self.gradient_checkpointing and cache is None
        h = hidden_states if self.stage is None else self.stage.receive(hidden_states)
        for i, block in enumerate(self.layers):
            mask = chunked if block.uses_rope else full
            run = checkpoint(block) if checkpointing else block
            for repeat in range(self.calls_per_block):
                layer_cache = cache[i * self.calls_per_block + repeat] if cache else None
                h = run(h, mask, layer_cache, self._dropout_key())
        if self.stage is not None:
            h = self.stage.pass_on(h)
        return self.norm(h)

    def _dropout_key(self) -> Optional[mx.array]:
        # Drawn outside the (possibly checkpointed) block call, so that its recomputation in
        # the backward pass reuses the same dropout masks.
        if self.training and self.config.dropout > 0:
            return mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
        return None

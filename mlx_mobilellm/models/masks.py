"""Attention masks for a causal decoder: causality, padding, and Llama 4's attention chunks."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


def causal_mask(length: int, offset: int = 0, padding_mask: Optional[mx.array] = None,
                chunk_size: Optional[int] = None, key_positions: Optional[mx.array] = None):
    """The mask for `length` new queries after `offset` cached positions.

    padding_mask: (batch, offset + length), 1 for real tokens and 0 for padding.
    key_positions: the position of each key, when the keys are not positions 0, 1, ... in
    order (a rotated cache: RotatingKVCache.key_positions); rows of one batch share them.
    Returns what mx.fast.scaled_dot_product_attention takes: None or "causal" when no explicit
    mask is needed (the fused kernel then skips building one), else a boolean array
    (True = may attend) of shape (length, keys) or (batch, 1, length, keys).
    """
    total = offset + length
    chunked = chunk_size is not None and total > chunk_size
    if key_positions is not None:
        if padding_mask is not None:
            raise ValueError("a rotated KV cache takes no padding mask (one row at a time)")
        queries = mx.arange(offset, total)[:, None]
        allowed = key_positions[None, :] <= queries
        if chunked:
            allowed = allowed & (key_positions[None, :] // chunk_size == queries // chunk_size)
        return allowed
    if padding_mask is None and not chunked:
        return "causal" if length > 1 else None

    queries = mx.arange(offset, total)[:, None]
    keys = mx.arange(total)[None, :]
    allowed = keys <= queries
    if padding_mask is None:
        if chunked:
            allowed = allowed & (keys // chunk_size == queries // chunk_size)
        return allowed
    allowed = allowed[None] & padding_mask.astype(mx.bool_)[:, None, :]
    if chunked:
        # Chunks count from each row's first real token (as transformers does), not from the
        # first padding slot: a left-padded row must attend exactly as it would unpadded.
        position = mx.cumsum(padding_mask.astype(mx.int32), axis=1) - 1
        chunk = position // chunk_size
        allowed = allowed & (chunk[:, None, :] == chunk[:, offset:, None])
    # A padding query would see no key at all and its softmax would be NaN; letting it see
    # itself keeps every row finite. Real queries always see themselves, so nothing changes.
    allowed = allowed | (keys == queries)[None]
    return allowed[:, None]

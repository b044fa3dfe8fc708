"""Turning next-token logits into token ids."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


def top_p_filter(logits: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches top_p; the rest
    get -inf. The most likely token always survives."""
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits.astype(mx.float32), axis=-1)
    mass_before = mx.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    keep[..., 0] = True
    sorted_kept = mx.where(keep, sorted_logits, -mx.inf)
    # Scatter back to vocabulary order: the inverse permutation of `order`.
    return mx.take_along_axis(sorted_kept, mx.argsort(order, axis=-1), axis=-1)


def sample(logits: mx.array, temperature: float = 1.0, top_p: float = 1.0,
           key: Optional[mx.array] = None) -> mx.array:
    """One token per row of (batch, vocab) logits. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return mx.random.categorical(logits, axis=-1, key=key)

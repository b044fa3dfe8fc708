"""Turning next-token logits into token ids: filters (top-p, top-k, min-p), temperature,
logits processors such as the repetition penalty, and the seeds of the random generator."""

from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional

import mlx.core as mx

Sampler = Callable[[mx.array, Optional[mx.array]], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
"""(tokens so far, (batch, vocab) logits) -> logits."""


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


def top_k_filter(logits: mx.array, top_k: int) -> mx.array:
    """Keep the top_k largest logits (ties at the boundary may keep a few more)."""
    if top_k >= logits.shape[-1]:
        return logits
    kth = mx.sort(logits, axis=-1)[..., -top_k][..., None]
    return mx.where(logits >= kth, logits, -mx.inf)


def min_p_filter(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens at least min_p times as likely as the most likely one."""
    threshold = logits.max(axis=-1, keepdims=True) + mx.log(mx.array(min_p, logits.dtype))
    return mx.where(logits >= threshold, logits, -mx.inf)


def sample(logits: mx.array, temperature: float = 1.0, top_p: float = 1.0,
           key: Optional[mx.array] = None, top_k: int = 0, min_p: float = 0.0) -> mx.array:
    """One token per row of (batch, vocab) logits. temperature 0 is greedy (argmax); the
    filters apply to the temperature-scaled distribution."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temperature
    if top_k > 0:
        logits = top_k_filter(logits, top_k)
    if 0.0 < min_p < 1.0:
        logits = min_p_filter(logits, min_p)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return mx.random.categorical(logits, axis=-1, key=key)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0) -> Sampler:
    """sampler(logits, key) with these settings fixed."""
    # Written so that NaN, which compares false with everything, is refused too.
    for name, value, allowed, interval in (
            ("temperature", temperature, 0.0 <= temperature, "[0.0, inf]"),
            ("top_p", top_p, 0.0 < top_p <= 1.0, "(0.0, 1.0]"),
            ("min_p", min_p, 0.0 <= min_p <= 1.0, "[0.0, 1.0]")):
        if not allowed:
            raise ValueError(f"{name} must be in {interval}, got {value}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")

    def sampler(logits: mx.array, key: Optional[mx.array] = None) -> mx.array:
        return sample(logits, temperature, top_p, key, top_k, min_p)

    return sampler


def repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """CTRL's penalty over the last context_size tokens: a seen token's logit is divided by
    the penalty when positive and multiplied by it when negative."""
    if not 0 < penalty < math.inf:
        raise ValueError(f"repetition_penalty must be a positive number, got {penalty}")
    if context_size < 1:
        raise ValueError(f"repetition_context_size must be at least 1, got {context_size}")

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[..., -context_size:].reshape(logits.shape[0], -1)
        seen = mx.take_along_axis(logits, recent, axis=-1)
        penalised = mx.where(seen > 0, seen / penalty, seen * penalty)
        rows = mx.arange(logits.shape[0])[:, None]
        logits[rows, recent] = penalised
        return logits

    return process


def make_logits_processors(repetition_penalty_value: Optional[float] = None,
                           repetition_context_size: int = 20) -> List[LogitsProcessor]:
    penalty = 1.0 if repetition_penalty_value is None else repetition_penalty_value
    processor = repetition_penalty(penalty, repetition_context_size)  # checks both values
    return [] if penalty == 1.0 else [processor]


SEED_LIMIT = 2**64


def check_seed(seed) -> int:
    """A seed as MLX's generator takes it: a whole number in [0, 2**64). (mx.random.seed
    refuses others with a TypeError that does not say which values it takes.)"""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or \
            not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be a whole number in [0, 2**64), got {seed!r}")
    return int(seed)

"""Rotary position embedding on mx.fast.rope, with the scalings real checkpoints use."""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _llama3_periods(head_dim: int, base: float, scaling: dict) -> mx.array:
    """Llama 3.1's frequency-dependent stretch: long wavelengths slow down by `factor`,
    short ones stay, and the band between is blended."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    original_context = scaling.get("original_max_position_embeddings", 8192)
    inv_freq = 1.0 / (base ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
    wavelength = 2 * math.pi / inv_freq
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = mx.where(wavelength > original_context / low_freq_factor, inv_freq / factor, blended)
    scaled = mx.where(wavelength < original_context / high_freq_factor, inv_freq, scaled)
    return 1.0 / scaled  # mx.fast.rope takes periods, not frequencies


class RoPE(nn.Module):
    """Rotates (batch, heads, seq, head_dim) queries or keys by their absolute positions."""

    def __init__(self, head_dim: int, base: float, traditional: bool,
                 scaling: Optional[dict] = None):
        super().__init__()
        self.head_dim = head_dim
        self.traditional = traditional
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        self.base = base
        self.position_scale = 1.0 / scaling["factor"] if rope_type == "linear" else 1.0
        # A leading underscore keeps the periods out of parameters(): they are derived, not learnt.
        self._periods = _llama3_periods(head_dim, base, scaling) if rope_type == "llama3" else None

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return mx.fast.rope(
            x, self.head_dim, traditional=self.traditional,
            base=None if self._periods is not None else self.base,
            scale=self.position_scale, offset=offset, freqs=self._periods,
        )

"""Key/value caches for incremental decoding."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one attention layer, (batch, kv_heads, seq, head_dim).

    Storage is preallocated and grows in steps of `step` positions, so a decode step writes into
    existing memory instead of concatenating (which would copy the whole cache every token).
    """

    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append this step's keys/values; return everything cached so far."""
        new = keys.shape[2]
        end = self.offset + new
        if self.keys is None or end > self.keys.shape[2]:
            capacity = ((end + self.step - 1) // self.step) * self.step
            grown_k = mx.zeros((*keys.shape[:2], capacity, keys.shape[3]), keys.dtype)
            grown_v = mx.zeros((*values.shape[:2], capacity, values.shape[3]), values.dtype)
            if self.keys is not None:
                grown_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
                grown_v[..., : self.offset, :] = self.values[..., : self.offset, :]
            self.keys, self.values = grown_k, grown_v
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

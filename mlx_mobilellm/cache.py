"""Key/value caches for incremental decoding, and saving them to a file."""

from __future__ import annotations

import json
from typing import List

import mlx.core as mx

from .errors import CheckpointError
from .input_checks import is_whole_number


class KVCache:
    """Keys and values of one attention layer, (batch, kv_heads, seq, head_dim).

    Storage is preallocated and grows in steps of `step` positions, so a decode step writes into
    existing memory instead of concatenating (which would copy the whole cache every token).
    `offset` is both the number of cached positions and the next token's position.
    """

    step = 256

    def __init__(self):
        self.reset()

    def reset(self) -> None:
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

    @property
    def trimmable(self) -> bool:
        return True

    def trim(self, count: int) -> int:
        """Forget the last `count` positions (rejected draft tokens, a changed chat turn)."""
        count = min(count, self.offset)
        self.offset -= count
        return count

    @property
    def state(self):
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value):
        self.keys, self.values = value
        self.offset = self.keys.shape[2]


class RotatingKVCache(KVCache):
    """A bounded cache for long chats: it keeps the first `keep` positions (the system prompt
    and attention sinks) and the most recent ones, at most `max_size` in all. Positions keep
    counting, so RoPE still sees each token at its true place."""

    def __init__(self, max_size: int, keep: int = 4):
        super().__init__()
        if max_size <= keep:
            raise ValueError(f"max_kv_size ({max_size}) must exceed the {keep} kept positions")
        self.max_size = max_size
        self.keep = keep

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        # Attention sees the window plus the new tokens; storage is trimmed afterwards, so a
        # long prompt chunk still attends causally within itself.
        if self.keys is None:
            all_k, all_v = keys, values
        else:
            all_k = mx.concatenate([self.keys, keys], axis=2)
            all_v = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        if all_k.shape[2] > self.max_size:
            recent = self.max_size - self.keep
            self.keys = mx.concatenate([all_k[..., : self.keep, :], all_k[..., -recent:, :]], axis=2)
            self.values = mx.concatenate([all_v[..., : self.keep, :], all_v[..., -recent:, :]], axis=2)
        else:
            self.keys, self.values = all_k, all_v
        return all_k, all_v

    @property
    def trimmable(self) -> bool:
        return self.offset == self.keys.shape[2] if self.keys is not None else True

    def trim(self, count: int) -> int:
        if not self.trimmable or self.keys is None:  # rotated, or nothing cached yet
            return 0
        count = min(count, self.offset)
        self.offset -= count
        self.keys = self.keys[..., : self.offset, :]
        self.values = self.values[..., : self.offset, :]
        return count

    @property
    def state(self):
        return self.keys, self.values

    @state.setter
    def state(self, value):
        self.keys, self.values = value


def save_prompt_cache(path, cache: List[KVCache], tokens: List[int]) -> None:
    """Save a prompt cache and the token ids it holds, so a later run can skip that prefill."""
    arrays = {}
    for i, layer in enumerate(cache):
        arrays[f"{i}.keys"], arrays[f"{i}.values"] = layer.state
    kinds = [{"max_size": c.max_size, "keep": c.keep, "offset": c.offset}
             if isinstance(c, RotatingKVCache) else {} for c in cache]
    mx.save_safetensors(str(path), arrays, metadata={"tokens": json.dumps(list(tokens)),
                                                     "layers": json.dumps(kinds)})


def load_prompt_cache(path):
    """(cache, tokens) saved by save_prompt_cache. A file it did not write is a CheckpointError
    that names it, before anything attends to its arrays."""
    try:
        # As safetensors whatever the name: MLX's GGUF reader trusts the file's header.
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError) as error:  # what MLX raises for missing or bad files
        message = " ".join(str(error).split())
        raise _not_a_prompt_cache(path, f"cannot read it ({message})") from None
    kinds, tokens = (_metadata_list(path, metadata, name) for name in ("layers", "tokens"))
    if not all(is_whole_number(t) and t >= 0 for t in tokens):
        raise _not_a_prompt_cache(path, "its 'tokens' are not all token ids")
    if set(arrays) != {f"{i}.{part}" for i in range(len(kinds)) for part in ("keys", "values")}:
        raise _not_a_prompt_cache(path, f"its tensors are not the keys and values of the "
                                  f"{len(kinds)} layers it lists")
    cache = [_layer(path, i, kind, arrays[f"{i}.keys"], arrays[f"{i}.values"])
             for i, kind in enumerate(kinds)]
    if any(layer.offset != len(tokens) for layer in cache):
        raise _not_a_prompt_cache(path, f"its layers do not all hold the {len(tokens)} "
                                  "positions of its tokens")
    return cache, tokens


def _not_a_prompt_cache(path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; is it a file written by save_prompt_cache?")


def _metadata_list(path, metadata: dict, name: str) -> list:
    try:
        value = json.loads(metadata.get(name, ""))
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, list):
        raise _not_a_prompt_cache(path, f"its metadata has no JSON list '{name}'")
    return value


def _layer(path, index: int, kind, keys: mx.array, values: mx.array) -> KVCache:
    """One layer's cache from its saved kind ({}, or a RotatingKVCache's sizes) and arrays."""
    if keys.ndim != 4 or keys.shape != values.shape:
        raise _not_a_prompt_cache(path, f"layer {index}'s keys {keys.shape} and values "
                                  f"{values.shape} are not (batch, heads, positions, head_dim) "
                                  "arrays of one shape")
    if kind == {}:
        layer = KVCache()
        layer.state = (keys, values)
        return layer
    sizes = ("max_size", "keep", "offset")
    if not (isinstance(kind, dict) and set(kind) == set(sizes)
            and all(is_whole_number(kind[name]) for name in sizes)
            and 0 <= kind["keep"] < kind["max_size"]
            and keys.shape[2] <= min(kind["max_size"], kind["offset"])):
        raise _not_a_prompt_cache(path, f"layer {index}'s kind is neither {{}} nor the sizes of "
                                  f"a rotating cache holding its {keys.shape[2]} positions")
    layer = RotatingKVCache(kind["max_size"], kind["keep"])
    layer.state = (keys, values)
    layer.offset = kind["offset"]
    return layer

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
    `offset` is the number of cached positions and, but for rows padded on the left after
    their positions were set (left_padding, see pad_left), the next token's position.
    """

    step = 256

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.keys = None
        self.values = None
        self.offset = 0
        self.left_padding = None
        """None, or (rows,) int32: slots put before each row's positions by pad_left."""

    @property
    def rope_offset(self):
        """The next token's position: an int, or one per row (rows,) once rows were padded."""
        return self.offset if self.left_padding is None else self.offset - self.left_padding

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append this step's keys/values; return everything cached so far."""
        end = self.offset + keys.shape[2]
        self._reserve(end, keys, values)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def _capacity_for(self, end: int) -> int:
        return -(-end // self.step) * self.step

    def _reserve(self, end: int, keys: mx.array, values: mx.array) -> None:
        """Make room for positions [0, end), keeping the first `offset` ones."""
        if self.keys is not None and end <= self.keys.shape[2]:
            return
        capacity = self._capacity_for(end)
        grown_k = mx.zeros((*keys.shape[:2], capacity, keys.shape[3]), keys.dtype)
        grown_v = mx.zeros((*values.shape[:2], capacity, values.shape[3]), values.dtype)
        if self.keys is not None:
            grown_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            grown_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = grown_k, grown_v

    @property
    def trimmable(self) -> bool:
        return True

    def key_positions(self, new: int):
        """The position of each key update_and_fetch returns for `new` tokens, when they are
        not 0, 1, ... in order; None: they are."""
        return None

    def trim(self, count: int) -> int:
        """Forget the last `count` positions (rejected draft tokens, a changed chat turn)."""
        count = min(count, self.offset) if self.trimmable else 0
        self.offset -= count
        return count

    @property
    def state(self):
        """(keys, values) of the cached positions, in order."""
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, value):
        self.keys, self.values = value
        self.offset = self.keys.shape[2]

    # Rows joining and leaving a decoding batch (decode.DecodeBatch): every row ends at `offset`.

    def _padding(self) -> mx.array:
        rows = self.keys.shape[0]
        return mx.zeros((rows,), mx.int32) if self.left_padding is None else self.left_padding

    def _lay_out(self, rows: int, length: int, pieces) -> None:
        """New storage for `rows` x `length` positions, with room to grow (one copy now, none
        at the next token), holding each (row slice, slot slice, keys, values) of `pieces`."""
        like_k, like_v = self.state
        capacity = self._capacity_for(length + 1)
        keys = mx.zeros((rows, like_k.shape[1], capacity, like_k.shape[3]), like_k.dtype)
        values = mx.zeros((rows, like_v.shape[1], capacity, like_v.shape[3]), like_v.dtype)
        for row_slice, slot_slice, piece_k, piece_v in pieces:
            keys[row_slice, :, slot_slice, :] = piece_k
            values[row_slice, :, slot_slice, :] = piece_v
        self.keys, self.values, self.offset = keys, values, length

    def pad_left(self, count: int) -> None:
        """Put `count` empty slots before every row, keeping each row's positions."""
        padding = self._padding() + count
        rows, length = self.keys.shape[0], self.offset
        self._lay_out(rows, length + count,
                      [(slice(None), slice(count, count + length), *self.state)])
        self.left_padding = padding

    def stack(self, other: "KVCache") -> None:
        """Append the rows of `other`, which ends at the same offset."""
        padding = mx.concatenate([self._padding(), other._padding()])
        mine, theirs = self.keys.shape[0], other.keys.shape[0]
        self._lay_out(mine + theirs, self.offset,
                      [(slice(0, mine), slice(0, self.offset), *self.state),
                       (slice(mine, None), slice(0, self.offset), *other.state)])
        self.left_padding = padding

    def take_rows(self, rows: mx.array) -> None:
        padding = self._padding()[rows]
        self.keys, self.values = self.keys[rows], self.values[rows]  # capacity kept
        self.left_padding = padding

    def drop_leading(self, count: int) -> None:
        """Forget the first `count` slots (padding in every row), keeping each row's positions."""
        padding = self._padding() - count
        self.keys, self.values = self.keys[..., count:, :], self.values[..., count:, :]
        self.offset -= count
        self.left_padding = padding


class RotatingKVCache(KVCache):
    """A bounded cache for long chats: it keeps the first `keep` positions (the system prompt
    and attention sinks) and the most recent ones, `max_size` in all. Positions keep counting,
    so RoPE still sees each token at its true place.

    A new token attends to the `max_size` kept positions and itself. The storage is a ring of
    max_size + 1 slots: position p lives in slot p while it fits, later in slot
    keep + (p - keep) % (max_size + 1 - keep), so a decode step overwrites the one position that
    leaves the window, in place. Attention does not depend on the order of its keys (they
    carry their RoPE positions), so a one-token query reads the ring as it lies. A prompt chunk
    of several tokens attends causally to the window followed by itself, and then the ring is
    refilled from their end.
    """

    def __init__(self, max_size: int, keep: int = 4):
        super().__init__()
        if max_size <= keep:
            raise ValueError(f"max_kv_size ({max_size}) must exceed the {keep} kept positions")
        self.max_size = max_size
        self.keep = keep
        self.slots = max_size + 1

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        new = keys.shape[2]
        if self.offset + new <= self.slots:  # nothing leaves the window yet
            return super().update_and_fetch(keys, values)
        if new == 1:
            return self._overwrite_oldest(keys, values)
        window_k, window_v = keys, values
        if self.keys is not None:
            cached_k, cached_v = self.state
            window_k = mx.concatenate([cached_k, keys], axis=2)
            window_v = mx.concatenate([cached_v, values], axis=2)
        self.offset += new
        self._store(self._kept(window_k), self._kept(window_v))
        return window_k, window_v

    def _capacity_for(self, end: int) -> int:
        return min(super()._capacity_for(end), self.slots)

    def key_positions(self, new: int):
        if self.offset + new <= self.slots:  # not rotated: slot p holds position p
            return None
        if new == 1:  # the ring as it lies once position `offset` is written
            ring = self.slots - self.keep
            newest = self._slot(self.offset)
            recent = [self.offset - (newest - slot) % ring for slot in range(self.keep, self.slots)]
            return mx.array(list(range(self.keep)) + recent)
        # the window in order (state), then the new tokens
        if self.offset <= self.max_size:
            window = list(range(self.offset))
        else:
            window = [*range(self.keep), *range(self.offset - (self.max_size - self.keep), self.offset)]
        return mx.array(window + list(range(self.offset, self.offset + new)))

    def _slot(self, position: int) -> int:
        if position < self.keep:
            return position
        return self.keep + (position - self.keep) % (self.slots - self.keep)

    def _recent_slots(self, count: int) -> list:
        """The slot ranges of the last `count` positions, oldest first (the ring wraps at most
        once)."""
        first = self._slot(self.offset - count)
        head = min(count, self.slots - first)
        ranges = [(first, first + head)]
        if count > head:
            ranges.append((self.keep, self.keep + count - head))
        return ranges

    def _overwrite_oldest(self, keys: mx.array, values: mx.array):
        slot = self._slot(self.offset)
        self.keys[..., slot : slot + 1, :] = keys
        self.values[..., slot : slot + 1, :] = values
        self.offset += 1
        return self.keys, self.values

    def _kept(self, window: mx.array) -> mx.array:
        """The first `keep` and the last max_size - keep positions of a longer window."""
        return mx.concatenate([window[..., : self.keep, :],
                               window[..., window.shape[2] - (self.max_size - self.keep) :, :]],
                              axis=2)

    def _store(self, keys: mx.array, values: mx.array) -> None:
        """Lay out the kept positions (in order, min(offset, max_size) of them) in the ring."""
        if keys.shape[2] == self.offset:  # nothing was dropped: slot p holds position p
            self.keys = self.values = None
            self._reserve(self.offset, keys, values)
            self.keys[..., : self.offset, :] = keys
            self.values[..., : self.offset, :] = values
            return
        shape = (*keys.shape[:2], self.slots, keys.shape[3])
        self.keys, self.values = mx.zeros(shape, keys.dtype), mx.zeros(shape, values.dtype)
        self.keys[..., : self.keep, :] = keys[..., : self.keep, :]
        self.values[..., : self.keep, :] = values[..., : self.keep, :]
        read = self.keep
        for start, stop in self._recent_slots(self.max_size - self.keep):
            self.keys[..., start:stop, :] = keys[..., read : read + stop - start, :]
            self.values[..., start:stop, :] = values[..., read : read + stop - start, :]
            read += stop - start

    @property
    def trimmable(self) -> bool:
        # Until a position has left the window the slots are a plain cache; after that, the
        # positions before the last ones are gone and trimming cannot bring them back.
        return self.offset <= self.max_size

    @property
    def state(self):
        """(keys, values) of the kept positions, in order: at most max_size of them."""
        if self.offset <= self.max_size:
            return super().state
        recent = self._recent_slots(self.max_size - self.keep)
        return tuple(mx.concatenate([array[..., : self.keep, :]] +
                                    [array[..., start:stop, :] for start, stop in recent], axis=2)
                     for array in (self.keys, self.values))

    def restore(self, keys: mx.array, values: mx.array, offset: int) -> None:
        """Set what `state` returned, with the offset it had."""
        self.offset = offset
        self._store(keys, values)


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
            and keys.shape[2] == min(kind["max_size"], kind["offset"])):
        raise _not_a_prompt_cache(path, f"layer {index}'s kind is neither {{}} nor the sizes of "
                                  f"a rotating cache holding its {keys.shape[2]} positions")
    layer = RotatingKVCache(kind["max_size"], kind["keep"])
    layer.restore(keys, values, kind["offset"])
    return layer

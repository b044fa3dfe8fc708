"""Reading llama.cpp GGUF files: header checks, config from metadata, tensors (kept quantized)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Tuple

import mlx.core as mx

from mlx_mobilellm.errors import CheckpointError
from mlx_mobilellm.models.config import MobileLLMConfig

from .names import to_ours

SUPPORTED_ARCHITECTURES = ("llama",)
# Tensor types MLX loads: floats as floats, the three block quantizations as its own affine
# quantized triplets (weight, scales, biases) with groups of 32.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
GGUF_GROUP_SIZE = 32
# GGUF value types: fixed-size scalars by type id, 8 = string, 9 = array.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
# ggml tensor type ids → names, for the types we accept and the common ones we refuse.
_TENSOR_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
                 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
# Smallest encodings: a metadata entry is a key length, a key byte and a value type; a
# tensor record a name length, a name byte, a rank, one dimension, a type and an offset.
_MIN_KV_BYTES = 8 + 1 + 4
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8
# (bytes per block, values per block) of the accepted types, to find where each tensor ends.
_BLOCK = {"F32": (4, 1), "F16": (2, 1), "BF16": (2, 1), "Q4_0": (18, 32), "Q4_1": (20, 32),
          "Q8_0": (34, 32)}


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes."""

    def __init__(self, data: memoryview, where: str):
        self.data, self.at, self.where = data, 0, where

    def take(self, count: int) -> memoryview:
        if count < 0 or self.at + count > len(self.data):
            raise CheckpointError(f"{self.where}: the header runs past the end of the file "
                                  f"(at byte {self.at}): the file is truncated or corrupt")
        chunk = self.data[self.at : self.at + count]
        self.at += count
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("<Q"))).decode("utf-8", errors="replace")

    def skip_value(self, kind: int) -> None:
        if kind in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[kind])
        elif kind == _STRING:
            self.take(self.unpack("<Q"))
        elif kind == _ARRAY:
            element, count = self.unpack("<I"), self.unpack("<Q")
            if element in _SCALAR_BYTES:
                self.take(_SCALAR_BYTES[element] * count)
            else:
                for _ in range(count):
                    self.skip_value(element)
        else:
            raise CheckpointError(f"{self.where}: unknown metadata value type {kind} "
                                  f"(at byte {self.at}): the file is corrupt")


def _tensor_end(dims: list, kind: str) -> int:
    block_bytes, block_values = _BLOCK[kind]
    count = 1
    for d in dims:
        count *= d
    return count // block_values * block_bytes


def _walk(cursor: _Cursor, file_size: int) -> dict:
    where = cursor.where
    if bytes(cursor.take(4)) != b"GGUF":
        raise CheckpointError(f"{where}: not a GGUF file (bad magic)")
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{where}: GGUF version {version} is not supported (2 and 3 are)")
    tensors, entries = cursor.unpack("<Q"), cursor.unpack("<Q")
    if tensors * _MIN_TENSOR_BYTES + entries * _MIN_KV_BYTES > file_size:
        raise CheckpointError(
            f"{where}: header claims {tensors} tensors and {entries} metadata entries, more than "
            f"its {file_size} bytes can hold: the file is truncated or corrupt")
    alignment = 32
    for _ in range(entries):
        key, kind = cursor.string(), cursor.unpack("<I")
        if key == "general.alignment" and kind == 4:
            alignment = cursor.unpack("<I")
        else:
            cursor.skip_value(kind)
    records = []
    for _ in range(tensors):
        name, rank = cursor.string(), cursor.unpack("<I")
        if rank > 4:
            raise CheckpointError(f"{where}: tensor '{name}' claims {rank} dimensions: corrupt")
        dims = [cursor.unpack("<Q") for _ in range(rank)]
        kind, offset = cursor.unpack("<I"), cursor.unpack("<Q")
        records.append((name, dims, _TENSOR_TYPES.get(kind, f"type {kind}"), offset))
    data_start = -(-cursor.at // alignment) * alignment
    for name, dims, kind, offset in records:
        end = data_start + offset + _tensor_end(dims, kind) if kind in _BLOCK else 0
        if end > file_size:
            raise CheckpointError(f"{where}: tensor '{name}' ends at byte {end}, past the end of "
                                  f"the {file_size}-byte file: the file is truncated")
    return {name: kind for name, _, kind, _ in records}


def check_gguf_structure(path: Path) -> dict:
    """Walk the whole header — every metadata entry and tensor record, each read checked
    against the file's size — and return {tensor name: type name}. MLX's own GGUF reader
    crashes the process on a malformed header, so nothing reaches it unchecked."""
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: not a GGUF file (empty)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _walk(_Cursor(view, str(path)), len(mapped))
            finally:
                view.release()


def _plain(value):
    """MLX returns numeric metadata as arrays; the rest of the code wants Python values."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def read_metadata(path: Path) -> Tuple[dict, dict]:
    """({metadata key: Python value}, {tensor name: type name}), the structure checked first."""
    types = check_gguf_structure(path)
    try:
        _, metadata = mx.load(str(path), return_metadata=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read GGUF ({error})") from None
    return {key: _plain(value) for key, value in metadata.items()}, types


def config_from_gguf(meta: dict, has_output: bool, where: str) -> MobileLLMConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{where}: GGUF architecture {arch!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def field(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{where}: metadata field '{arch}.{key}' is missing")
        return value

    heads = field("attention.head_count")
    embed = field("embedding_length")
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type", "none") == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
    try:
        return MobileLLMConfig(
            num_layers=field("block_count"), num_heads=heads,
            num_kv_heads=field("attention.head_count_kv", heads), embed_dim=embed,
            hidden_dim=field("feed_forward_length"),
            vocab_size=vocab if vocab else field("vocab_size"),
            max_seq_len=field("context_length", 4096),
            rope_base=float(field("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            norm_eps=float(field("attention.layer_norm_rms_epsilon", 1e-5)),
            head_dim=meta.get(f"{arch}.rope.dimension_count"),
            # llama.cpp stores Q/K rows for interleaved-pair RoPE.
            rope_traditional=True, use_qk_norm=False,
            tie_word_embeddings=not has_output,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None


def read_gguf(path: Path):
    """(config, weights under our names, quantization block or None, metadata)."""
    where = str(path)
    meta, types = read_metadata(path)
    for name, kind in types.items():
        if kind not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{where}: tensor '{name}' is {kind}; supported types: {', '.join(SUPPORTED_TYPES)} "
                "(re-quantize the source with one of them, e.g. llama-quantize ... Q8_0)")
    config = config_from_gguf(meta, "output.weight" in types, where)
    try:
        tensors = mx.load(where)
    except Exception as error:
        raise CheckpointError(f"{where}: cannot read GGUF tensors ({error})") from None
    weights = {}
    for name, array in tensors.items():
        ours = to_ours(name, "gguf")
        if ours is None:
            raise CheckpointError(f"{where}: unexpected tensor '{name}' for a llama GGUF")
        weights[ours] = array
    return config, weights, quantization_of(weights), meta


def quantization_of(weights: dict):
    """The quantization block describing GGUF-quantized weights: groups of 32, and the bits
    each quantized module packs (Q4_* = 4, Q8_0 = 8), the most common as the default."""
    bits = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            in_features = scales.shape[-1] * GGUF_GROUP_SIZE
            bits[module] = weights[f"{module}.weight"].shape[-1] * 32 // in_features
    if not bits:
        return None
    values = list(bits.values())
    default = max(set(values), key=values.count)
    block = {"group_size": GGUF_GROUP_SIZE, "bits": default, "mode": "affine"}
    block.update({m: {"group_size": GGUF_GROUP_SIZE, "bits": b} for m, b in bits.items() if b != default})
    return block

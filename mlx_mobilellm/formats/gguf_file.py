"""Reading llama.cpp GGUF files: header checks, config from metadata, tensors (kept quantized
where MLX has kernels for their type, dequantized to float16 by the gguf package elsewhere)."""

from __future__ import annotations

import math
import mmap
import struct
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Tuple

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ..errors import CheckpointError
from ..models.config import ConfigFieldError, MobileLLMConfig
from .names import to_ours

SUPPORTED_ARCHITECTURES = ("llama", "llama4")
# Tensor types MLX loads: floats as floats, the three block quantizations as its own affine
# quantized triplets (weight, scales, biases) with groups of 32. A file holding any other type
# (K-quants, Q5_0/Q5_1, IQ*, TQ*, ...: whatever the gguf package dequantizes) is read by us
# instead, every tensor in float: MLX's reader fails on most of those types and, seen with MLX
# 0.32, decodes half of a Q4_K tensor's values unlike llama.cpp's reference (the gguf package,
# which transformers uses too); one reader per file keeps a model either in the file's
# quantization or all float, never half of each.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
GGUF_GROUP_SIZE = 32
# float16, not float32: half the memory, and its rounding (2^-11 relative) is far below the
# quantization step of any of these types; MLX's own reader dequantizes K-quants to it too.
_DEQUANTIZED = np.float16
_FLOATS = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16: bits, viewed in MLX
# Dequantized a slice at a time, so that the gguf package's float32 result stays small.
_DEQUANTIZE_CHUNK_VALUES = 1 << 22
# GGUF value types: fixed-size scalars by type id (struct formats), 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_UINT32, _STRING, _ARRAY, _FLOAT64 = 4, 8, 9, 12
# (bytes per block, values per block) of every ggml type, to find where each tensor ends.
_BLOCK = {kind.name: (type_bytes, block_values)
          for kind, (block_values, type_bytes) in GGML_QUANT_SIZES.items()}
# Smallest encodings: a metadata entry is a key length, a key byte and a value type; a
# tensor record a name length, a name byte, a rank, one dimension, a type and an offset.
_MIN_KV_BYTES = 8 + 1 + 4
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8
# MLX shapes are 32-bit.
_MAX_DIMENSION = 2**31 - 1
_DEFAULT_ALIGNMENT = 32

# Our config fields as llama.cpp's metadata keys name them ({arch}: the architecture).
_GGUF_KEYS = {
    "num_layers": "{arch}.block_count", "num_heads": "{arch}.attention.head_count",
    "num_kv_heads": "{arch}.attention.head_count_kv", "embed_dim": "{arch}.embedding_length",
    "hidden_dim": "{arch}.feed_forward_length", "vocab_size": "{arch}.vocab_size",
    "max_seq_len": "{arch}.context_length", "rope_base": "{arch}.rope.freq_base",
    "rope_scaling": "{arch}.rope.scaling", "norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "head_dim": "{arch}.rope.dimension_count", "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id", "pad_token_id": "tokenizer.ggml.padding_token_id",
}


def gguf_key(ours: str, arch: str = "llama") -> str:
    """The metadata key that sets our config field `ours`."""
    return _GGUF_KEYS.get(ours, ours).format(arch=arch)


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes."""

    def __init__(self, data: memoryview, where: str):
        self.data, self.at, self.where = data, 0, where

    def corrupt(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: {problem} (at byte {self.at}): the file is corrupt")

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

    def value(self, kind: int, key: str):
        """The value of metadata entry `key` as Python values (an array as a list)."""
        if kind == _ARRAY:
            kind, count = self.unpack("<I"), self.unpack("<Q")
            if kind == _ARRAY:
                # MLX and llama.cpp read none; refusing them also bounds the nesting.
                raise self.corrupt(f"metadata '{key:.80}' is an array of arrays")
        else:
            count = None
        if kind == _FLOAT64:
            # MLX's GGUF reader crashes the process on float64 values, scalar or array.
            raise CheckpointError(f"{self.where}: metadata '{key:.80}' holds float64 values, which "
                                  "MLX cannot read; write it as float32")
        if kind in _SCALARS:
            fmt = f"<{1 if count is None else count}{_SCALARS[kind]}"
            values = list(struct.unpack(fmt, self.take(struct.calcsize(fmt))))
        elif kind == _STRING:
            values = [self.string() for _ in range(1 if count is None else count)]  # 8+ bytes each
        else:
            raise self.corrupt(f"metadata '{key:.80}' has unknown value type {kind}")
        return values[0] if count is None else values


def _tensor_bytes(dims: list, kind: str) -> int:
    block_bytes, block_values = _BLOCK[kind]
    return math.prod(dims) // block_values * block_bytes


def _alignment(cursor: _Cursor, kind: int) -> int:
    """general.alignment: a uint32 power of two, as llama.cpp requires (offsets are rounded up to it)."""
    if kind != _UINT32:
        raise cursor.corrupt(f"general.alignment has value type {kind}, not uint32")
    alignment = cursor.unpack("<I")
    if alignment == 0 or alignment & (alignment - 1):
        raise cursor.corrupt(f"general.alignment is {alignment}, not a power of two such as 32")
    return alignment


def _read_metadata(cursor: _Cursor, entries: int) -> Tuple[dict, int]:
    """The metadata entries, and the alignment they set."""
    metadata, alignment = {}, _DEFAULT_ALIGNMENT
    for _ in range(entries):
        key, kind = cursor.string(), cursor.unpack("<I")
        if key in metadata:
            raise cursor.corrupt(f"metadata key '{key:.80}' appears twice")
        if key == "general.alignment":
            alignment = metadata[key] = _alignment(cursor, kind)
        else:
            metadata[key] = cursor.value(kind, key)
    return metadata, alignment


@lru_cache(maxsize=None)
def _dequantizable(kind: str) -> bool:
    """Whether the installed gguf package dequantizes tensor type `kind` (releases differ)."""
    qtype = GGMLQuantizationType[kind]
    try:
        dequantize(np.zeros((1, _BLOCK[kind][0]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _readable(kind: str) -> bool:
    return kind in SUPPORTED_TYPES or (kind in _BLOCK and _dequantizable(kind))


def _tensor_record(cursor: _Cursor) -> tuple:
    """(name, dimensions, type name, offset) of one tensor record."""
    name, rank = cursor.string(), cursor.unpack("<I")
    if not 1 <= rank <= 4:
        raise cursor.corrupt(f"tensor '{name:.80}' claims {rank} dimensions")
    dims = [cursor.unpack("<Q") for _ in range(rank)]
    type_id, offset = cursor.unpack("<I"), cursor.unpack("<Q")
    try:
        kind = GGMLQuantizationType(type_id).name
    except ValueError:
        kind = f"ggml type {type_id}"
    if not _readable(kind):  # refused here: what it holds, or where its data ends, is unknown
        others = [k for k in _BLOCK if k not in SUPPORTED_TYPES and _readable(k)]
        raise CheckpointError(
            f"{cursor.where}: tensor '{name:.80}' is {kind}, which neither MLX reads nor the "
            f"installed gguf package dequantizes; supported types: {', '.join(SUPPORTED_TYPES)} "
            f"and, dequantized, {', '.join(others)} (re-quantize the source with one of them, "
            "e.g. llama-quantize ... Q8_0, or upgrade the gguf package)")
    if not all(1 <= d <= _MAX_DIMENSION for d in dims) or dims[0] % _BLOCK[kind][1]:
        raise cursor.corrupt(f"tensor '{name:.80}' claims dimensions {dims} for type {kind}")
    return name, dims, kind, offset


def _check_tensor_data(records: list, data_start: int, alignment: int, file_size: int,
                       where: str) -> None:
    """Each tensor starts on the alignment, ends inside the file, and overlaps no other."""
    previous, previous_end = None, 0
    for name, dims, kind, offset in sorted(records, key=lambda record: record[3]):
        if offset % alignment:
            raise CheckpointError(f"{where}: tensor '{name}' starts at offset {offset}, not a "
                                  f"multiple of the alignment {alignment}: the file is corrupt")
        start = data_start + offset
        end = start + _tensor_bytes(dims, kind)
        if end > file_size:
            raise CheckpointError(f"{where}: tensor '{name}' ends at byte {end}, past the end of "
                                  f"the {file_size}-byte file: the file is truncated")
        if start < previous_end:
            raise CheckpointError(f"{where}: tensor '{name}' overlaps the data of tensor "
                                  f"'{previous}': the file is corrupt")
        previous, previous_end = name, end


@dataclass
class GGUFHeader:
    metadata: dict
    tensors: list
    """(name, dimensions as GGUF orders them, type name, offset) of each tensor."""
    data_start: int

    @property
    def types(self) -> dict:
        return {name: kind for name, _, kind, _ in self.tensors}


def _walk(cursor: _Cursor, file_size: int) -> GGUFHeader:
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
    metadata, alignment = _read_metadata(cursor, entries)
    records = [_tensor_record(cursor) for _ in range(tensors)]
    names = set()
    for name, _, _, _ in records:
        if name in names:
            raise CheckpointError(f"{where}: tensor '{name}' is listed twice: the file is corrupt")
        names.add(name)
    data_start = -(-cursor.at // alignment) * alignment
    _check_tensor_data(records, data_start, alignment, file_size, where)
    return GGUFHeader(metadata, records, data_start)


def read_header(path: Path) -> GGUFHeader:
    """Walk the whole header — every metadata entry and tensor record, each read checked
    against the file's size — before any tensor is read. MLX's own GGUF reader crashes the
    process on a malformed header, so nothing reaches it unchecked."""
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                raise CheckpointError(f"{path}: not a GGUF file (empty)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    return _walk(_Cursor(view, str(path)), len(mapped))
                finally:
                    view.release()
    except OSError as error:  # permissions, a folder of that name, a failing disk
        raise CheckpointError(f"{path}: cannot read it ({error.strerror})") from None


def read_metadata(path: Path) -> Tuple[dict, dict]:
    """({metadata key: Python value}, {tensor name: type name}), the structure checked first."""
    header = read_header(path)
    return header.metadata, header.types


def _rope_scaling(meta: dict, arch: str, where: str):
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": meta.get(f"{arch}.rope.scaling.factor")}
    raise CheckpointError(f"{where}: metadata '{arch}.rope.scaling.type' is {kind!r:.40}; "
                          "supported: none, linear")


def config_from_gguf(meta: dict, has_output: bool, where: str) -> MobileLLMConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{where}: GGUF architecture {arch!r:.40} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def field(ours, default=None):
        value = meta.get(gguf_key(ours, arch), default)
        if value is None:
            raise CheckpointError(f"{where}: metadata field '{gguf_key(ours, arch)}' is missing")
        return value

    heads = field("num_heads")
    tokens = meta.get("tokenizer.ggml.tokens")
    if arch == "llama4":
        _check_dense_full_attention(meta, where)
    try:
        return MobileLLMConfig(
            num_layers=field("num_layers"), num_heads=heads,
            num_kv_heads=field("num_kv_heads", heads), embed_dim=field("embed_dim"),
            hidden_dim=field("hidden_dim"),
            vocab_size=field("vocab_size", len(tokens) if isinstance(tokens, list) and tokens else None),
            max_seq_len=field("max_seq_len", 4096),
            rope_base=field("rope_base", 10000.0),
            rope_scaling=_rope_scaling(meta, arch, where),
            norm_eps=field("norm_eps", 1e-5),
            head_dim=meta.get(gguf_key("head_dim", arch)),
            # llama.cpp stores Q/K rows for interleaved-pair RoPE; its dense llama4 normalizes
            # Q and K (no weight) on every layer.
            rope_traditional=True, use_qk_norm=arch == "llama4",
            tie_word_embeddings=not has_output,
            **{ours: meta.get(gguf_key(ours)) for ours in ("bos_token_id", "eos_token_id", "pad_token_id")},
        )
    except ConfigFieldError as error:
        raise CheckpointError(f"{where}: metadata '{gguf_key(error.field, arch)}' {error.problem}") from None
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None


def _check_dense_full_attention(meta: dict, where: str) -> None:
    """The llama4 GGUFs that are MobileLLM-R1-like: no expert layer (a MoE step of 0) and
    full attention with RoPE on every layer (sliding_window 0). Without those keys llama.cpp
    runs Llama 4 Scout's pattern (experts, NoPE every 4th layer, chunks), which we do not."""
    for key in ("llama4.interleave_moe_layer_step", "llama4.attention.sliding_window"):
        if meta.get(key) != 0:
            raise CheckpointError(f"{where}: '{key}' is {meta.get(key)!r:.20}; only dense llama4 "
                                  "GGUFs with full attention (0, as MobileLLM-R1 exports write "
                                  "it) are supported, not Llama 4 Scout / Maverick")


def _dequantized(raw: np.ndarray, dims: list, kind: str, name: str, where: str) -> np.ndarray:
    """A block-quantized tensor's bytes as _DEQUANTIZED rows of dims[0] values."""
    qtype, width = GGMLQuantizationType[kind], dims[0]
    rows = raw.reshape(-1, width // _BLOCK[kind][1] * _BLOCK[kind][0])
    out = np.empty((len(rows), width), _DEQUANTIZED)
    step = max(1, _DEQUANTIZE_CHUNK_VALUES // width)
    for start in range(0, len(rows), step):
        with np.errstate(all="ignore"):  # what a corrupt scale gives is reported below
            out[start : start + step] = dequantize(rows[start : start + step], qtype)
        if not np.isfinite(out[start : start + step]).all():
            raise CheckpointError(f"{where}: tensor '{name}' ({kind}) dequantizes to values that "
                                  f"are not finite in {out.dtype}: the file is corrupt")
    return out


def _read_in_float(path: Path, header: GGUFHeader) -> dict:
    """Every tensor of the file from its bytes (at the offsets the header check vetted):
    floats as stored, block-quantized ones dequantized by the gguf package."""
    tensors = {}
    with path.open("rb") as f:
        for name, dims, kind, offset in header.tensors:
            size = _tensor_bytes(dims, kind)
            f.seek(header.data_start + offset)
            raw = np.frombuffer(f.read(size), np.uint8)
            if len(raw) != size:  # shortened since the header check
                raise CheckpointError(f"{path}: tensor '{name}' runs past the end of the file: "
                                      "the file is truncated")
            if kind in _FLOATS:
                array = mx.array(raw.view(_FLOATS[kind]))
                array = array.view(mx.bfloat16) if kind == "BF16" else array
            else:
                array = mx.array(_dequantized(raw, dims, kind, name, str(path)))
            tensors[name] = array.reshape(dims[::-1])  # GGUF lists the innermost dimension first
    return tensors


def read_gguf(path: Path, quiet: bool = False):
    """(config, weights under our names, quantization block or None, metadata). Unless quiet,
    one line on stderr says which tensors were dequantized, if any were."""
    where = str(path)
    header = read_header(path)
    meta, types = header.metadata, header.types
    config = config_from_gguf(meta, "output.weight" in types, where)
    if all(kind in SUPPORTED_TYPES for kind in types.values()):
        try:
            tensors = mx.load(where)
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(f"{where}: cannot read GGUF tensors ({error})") from None
    else:
        try:
            tensors = _read_in_float(path, header)
        except OSError as error:
            raise CheckpointError(f"{where}: cannot read it ({error.strerror})") from None
        quantized = [kind for kind in types.values() if kind not in _FLOATS]
        if not quiet:  # the model is several times larger than the file: say why, and the cure
            print(f"{where}: {len(quantized)} tensors in {'/'.join(sorted(set(quantized)))} "
                  f"dequantized to {np.dtype(_DEQUANTIZED).name} (MLX has no kernels for some "
                  "of these types); `mlx-mobilellm convert -q` re-quantizes them", file=sys.stderr)
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

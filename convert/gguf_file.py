"""Reading llama.cpp GGUF files: header checks, config from metadata, tensors (kept quantized)."""

from __future__ import annotations

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
# Smallest encodings: a metadata entry is a key length, a key byte and a value type; a
# tensor entry a name length, a name byte, a rank, one dimension, a type and an offset.
_MIN_KV_BYTES = 8 + 1 + 4
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8


def check_gguf_header(path: Path) -> None:
    """Refuse files whose header cannot be right before any parser trusts it: MLX's own GGUF
    reader crashes the process on absurd tensor or metadata counts."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (bad magic or shorter than its header)")
    version, tensors, entries = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    if tensors * _MIN_TENSOR_BYTES + entries * _MIN_KV_BYTES > size - 24:
        raise CheckpointError(
            f"{path}: header claims {tensors} tensors and {entries} metadata entries, more than "
            f"its {size} bytes can hold: the file is truncated or corrupt")


def read_metadata(path: Path) -> Tuple[dict, dict]:
    """({key: value}, {tensor name: type name}) through the gguf package's reader, which
    checks every offset against the file's size."""
    from gguf import GGUFReader

    check_gguf_header(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # the reader raises assorted errors on malformed files
        raise CheckpointError(f"{path}: cannot parse GGUF ({error}): the file is truncated or corrupt") from None
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return metadata, types


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

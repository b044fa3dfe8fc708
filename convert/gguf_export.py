"""An MLX model folder → one llama.cpp GGUF file.

The architecture: "llama", or "llama4" for a model with weightless QK-norm (MobileLLM-R1),
which llama.cpp's llama4 graph expresses once MoE and chunked attention are switched off
(see write_llama4_hyperparameters).

What the file holds:
  - the architecture's hyperparameters (context length, widths, heads, head width, RoPE base
    and linear scaling, RMS-norm epsilon, vocabulary size);
  - every tensor under llama.cpp's names (token_embd, blk.N.attn_q ..., output_norm, and
    output only when the embeddings are untied), Q/K rows in the interleaved-pair layout
    llama.cpp's RoPE expects;
  - tensors of one GGUF type (GGUF_TYPES: f32, f16, bf16, q8_0, q4_0), general.file_type to
    match. As llama.cpp's converter does, 1-D tensors (the norms) stay F32, and a quantized
    type falls back to F16 for a tensor whose rows are not whole blocks of 32. q4_0 keeps the
    output head (token_embd when tied) in Q8_0, as llama-quantize keeps it at a higher
    precision (Q6_K there; the gguf package cannot write K-quants). The default is the
    model's own dtype (float32 → f32, float16 → f16, bfloat16 → bf16; a quantized model →
    its scales' dtype), the dtype export_hf writes by default. Quantized layers are first
    dequantized exactly (float32), then converted once;
  - the tokenizer (gguf_vocabulary.py), when the folder has a byte-level BPE tokenizer.json.
    Without one (or with a SentencePiece tokenizer.model) only weights and hyperparameters
    are written.
Refused, with the reason: what llama.cpp's llama / llama4 graphs cannot express — QK-norm with
weights, NoPE layers, chunked attention on llama, layer sharing, Llama-3 RoPE scaling
(llama.cpp wants a rope_freqs tensor, which this exporter does not write).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from mlx_mobilellm.errors import CheckpointError, ParameterError
from mlx_mobilellm.formats.hf_config import plain_attention_gaps
from mlx_mobilellm.formats.names import from_ours
from mlx_mobilellm.formats.sources import Checkpoint
from mlx_mobilellm.models.config import MobileLLMConfig

from .destination import atomic_output
from .export import (STORES_INTERLEAVED, float_weights, open_for_export, restore_rope_layout,
                     weights_dtype)
from .gguf_vocabulary import write_tokenizer
from .progress import progress

# --gguf-type → (ggml tensor type, general.file_type), by name: the gguf package is imported
# only when a file is written.
GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"),
              "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
              "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
# What --dtype (the float dtype export_hf casts to) means for a GGUF.
DTYPE_TO_GGUF_TYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_BLOCK = 32  # values per Q8_0 / Q4_0 block, along a row


# --- what llama.cpp's llama and llama4 can say -----------------------------------------------

def rope_scaling_kind(config: MobileLLMConfig) -> str:
    return (config.rope_scaling or {}).get("rope_type", "default")


def architecture(config: MobileLLMConfig) -> str:
    """llama4 for QK-norm (llama.cpp's llama4 graph always normalizes Q and K on RoPE
    layers of dense models), else llama."""
    return "llama4" if config.use_qk_norm else "llama"


def _llama4_gaps(config: MobileLLMConfig) -> list:
    gaps = []
    if config.qk_norm_weight:
        gaps.append("its QK-norm has weights (llama.cpp's Llama 4 QK-norm is weightless)")
    if config.nope_layers:
        # llama.cpp's llama4 runs RoPE on every layer once chunked attention is off; with
        # it on, every 4th layer is NoPE and the others chunked, a fixed pattern.
        gaps.append(f"layers {config.nope_layers} are NoPE (no RoPE)")
    return gaps


def check_expressible(config: MobileLLMConfig, where: str) -> str:
    """The GGUF architecture the model is written as; CheckpointError when neither can
    express it."""
    arch = architecture(config)
    gaps = _llama4_gaps(config) if arch == "llama4" else plain_attention_gaps(config)
    if config.layer_sharing:
        gaps.append("every block runs twice in a row (layer_sharing)")
    kind = rope_scaling_kind(config)
    if kind not in ("default", "linear"):
        gaps.append(f"RoPE scaling {kind!r} is not written (only linear scaling is)")
    if gaps:
        raise CheckpointError(f"{where}: cannot export to GGUF ({arch} architecture): {gaps[0]}, "
                              f"which llama.cpp's {arch} cannot express; export to Hugging Face "
                              "safetensors instead (export --hf-path)")
    return arch


def context_length(config: MobileLLMConfig, arch: str) -> int:
    """llama4 GGUFs are written with full attention on every layer (see
    write_llama4_hyperparameters): within one chunk, chunked and full attention agree, so
    the context llama.cpp is told stops at the chunk size."""
    if arch == "llama4" and config.attention_chunk_size is not None:
        return min(config.max_seq_len, config.attention_chunk_size)
    return config.max_seq_len


def write_hyperparameters(writer, config: MobileLLMConfig, arch: str) -> None:
    import gguf

    writer.add_context_length(context_length(config, arch))
    writer.add_embedding_length(config.embed_dim)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.dim_per_head)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.dim_per_head * config.num_heads != config.embed_dim:
        # llama.cpp assumes embed_dim / heads unless told the head width.
        writer.add_key_length(config.dim_per_head)
        writer.add_value_length(config.dim_per_head)
    if rope_scaling_kind(config) == "linear":  # check_expressible refused the other kinds
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
    if arch == "llama4":
        write_llama4_hyperparameters(writer, config)


def write_llama4_hyperparameters(writer, config: MobileLLMConfig) -> None:
    """What llama.cpp's llama4 needs for a dense model: the keys its converter's Llama4Model
    writes. Its loader requires both expert keys; a MoE step of 0 makes no layer MoE
    (a layer is MoE when step > 0 and (i + 1) % step == 0), so the expert width is never
    used. sliding_window 0 turns chunked attention off and RoPE (with the weightless
    QK-norm) on for every layer; without it llama.cpp assumes Llama 4 Scout's pattern
    (every 4th layer NoPE, the rest in 8192-token chunks)."""
    writer.add_interleave_moe_layer_step(0)
    writer.add_expert_feed_forward_length(config.hidden_dim)
    writer.add_sliding_window(0)


# --- tensors ------------------------------------------------------------------------------

def tensor_type(name: str, shape: tuple, gguf_type: str, tied: bool) -> str:
    """The ggml type one tensor is written in, for the file's --gguf-type."""
    wanted = GGUF_TYPES[gguf_type][0]
    if len(shape) < 2:
        return "F32"  # norms: llama.cpp reads 1-D tensors in F32 only
    if wanted in ("Q8_0", "Q4_0"):
        if shape[-1] % _BLOCK:
            return "F16"
        head = "token_embd.weight" if tied else "output.weight"
        if wanted == "Q4_0" and name == head:
            return "Q8_0"
    return wanted


def gguf_tensors(checkpoint: Checkpoint) -> list:
    """(GGUF name, lazy float array) for every tensor, Q/K rows interleaved; quantized
    layers dequantized exactly (float32)."""
    config = checkpoint.config
    tensors = []
    for name, array in float_weights(checkpoint, exact=True):
        array = restore_rope_layout(name, array, config, STORES_INTERLEAVED["gguf"])
        tensors.append((from_ours(name, "gguf"), array))
    return sorted(tensors, key=_file_order)


def _file_order(item) -> tuple:
    """llama.cpp's order: token_embd, the blocks by index, then output_norm and output."""
    name = item[0]
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd.") else 2, 0, name)


def encode(name: str, array: mx.array, kind: str, where: str) -> np.ndarray:
    """The tensor's bytes in ggml type `kind`: F32 / F16 as numpy floats, the others as
    the gguf package's quantizers write them (uint8, byte shape)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if kind == "F16":
        # Cast in MLX: numpy cannot read bfloat16 arrays.
        values = np.array(array.astype(mx.float16))
        if not np.isfinite(values).all() and np.isfinite(np.array(array.astype(mx.float32))).all():
            raise ParameterError(lambda param: f"{where}: tensor '{name}' holds values beyond "
                                 f"float16's range (65504); use {param('gguf_type')} bf16 or f32")
        return values
    values = np.array(array.astype(mx.float32))
    if kind == "F32":
        return values
    return quantize(values, GGMLQuantizationType[kind])


def _byte_shape(shape: tuple, kind: str) -> tuple:
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    return tuple(quant_shape_to_byte_shape(shape, GGMLQuantizationType[kind]))


def add_tensor_info(writer, name: str, shape: tuple, kind: str) -> None:
    """The tensor table entry, before any data is computed."""
    from gguf import GGMLQuantizationType

    if kind in ("F32", "F16"):
        dtype = np.dtype(np.float32 if kind == "F32" else np.float16)
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize,
                               raw_dtype=GGMLQuantizationType[kind])
    else:
        byte_shape = _byte_shape(shape, kind)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               raw_dtype=GGMLQuantizationType[kind])


# --- the file -----------------------------------------------------------------------------

def resolve_gguf_type(gguf_type: Optional[str], dtype: Optional[str]) -> Optional[str]:
    """The --gguf-type a call asks for: gguf_type, else the one --dtype names (float32 →
    f32, float16 → f16, bfloat16 → bf16); None: the model's own dtype. Both given must
    agree (dtype cannot name a quantized type, and two answers to one question is a
    mistake worth hearing about)."""
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ParameterError(lambda name: f"{name('gguf_type')} {gguf_type!r} is not one of "
                                          f"{', '.join(GGUF_TYPES)}")
    if dtype is not None and dtype not in DTYPE_TO_GGUF_TYPE:
        raise ParameterError(lambda name: f"{name('dtype')} {dtype!r} is not one of "
                                          f"{', '.join(DTYPE_TO_GGUF_TYPE)}")
    implied = DTYPE_TO_GGUF_TYPE.get(dtype)
    if gguf_type is not None and implied is not None and implied != gguf_type:
        raise ParameterError(lambda name: f"{name('dtype')} {dtype} means "
                                          f"{name('gguf_type')} {implied}, not {gguf_type}: "
                                          f"give {name('gguf_type')} alone")
    return gguf_type or implied


def _write(path: Path, checkpoint: Checkpoint, arch: str, gguf_type: str, name: str,
           quiet: bool) -> bool:
    """Header, metadata and tensor table first (shapes and types are known without reading
    a weight), then the tensor data one tensor at a time: one tensor in memory at once.
    Returns whether tokenizer metadata was written."""
    from gguf import GGUFWriter, LlamaFileType

    tensors = gguf_tensors(checkpoint)
    tied = not any(tensor_name == "output.weight" for tensor_name, _ in tensors)
    kinds = [tensor_type(tensor_name, tuple(array.shape), gguf_type, tied)
             for tensor_name, array in tensors]
    writer = GGUFWriter(str(path), arch)
    try:
        writer.add_name(name)
        writer.add_file_type(LlamaFileType[GGUF_TYPES[gguf_type][1]])
        write_hyperparameters(writer, checkpoint.config, arch)
        has_tokenizer = write_tokenizer(writer, checkpoint)
        for (tensor_name, array), kind in zip(tensors, kinds):
            add_tensor_info(writer, tensor_name, tuple(array.shape), kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (tensor_name, array), kind in progress(zip(tensors, kinds), len(tensors),
                                                    "exporting", quiet):
            data = encode(tensor_name, array, kind, checkpoint.origin)
            writer.write_tensor_data(np.ascontiguousarray(data))
    finally:
        writer.close()
    return has_tokenizer


def export_gguf(mlx_path, out_file, *, gguf_type: Optional[str] = None,
                dtype: Optional[str] = None, force: bool = False, quiet: bool = False) -> Path:
    """Write the model in `mlx_path` (an MLX model folder; any checkpoint convert reads also
    works) as the GGUF file `out_file` — llama architecture, or llama4 for weightless
    QK-norm (MobileLLM-R1) — with tokenizer metadata when the folder has a byte-level BPE
    tokenizer.json (otherwise weights and hyperparameters only).

    gguf_type ("f32", "f16", "bf16", "q8_0", "q4_0") is the tensors' type; dtype
    ("float32", "float16", "bfloat16"), as export_hf takes it, means f32 / f16 / bf16;
    neither: the model's own dtype (a quantized model's scales' dtype). Norms stay F32. See
    the module docstring for what is written and what is refused. The file is written
    beside `out_file` under a temporary name and renamed when complete; an existing file is
    replaced only with force, and only when it is a GGUF file (see
    destination.check_destination).
    """
    gguf_type = resolve_gguf_type(gguf_type, dtype)
    out_file = Path(out_file)
    checkpoint = open_for_export(mlx_path, out_file, force, quiet, folder=False)
    arch = check_expressible(checkpoint.config, str(mlx_path))
    gguf_type = gguf_type or DTYPE_TO_GGUF_TYPE[weights_dtype(checkpoint, None)]

    with atomic_output(out_file, force, [mlx_path], folder=False) as temporary:
        has_tokenizer = _write(temporary, checkpoint, arch, gguf_type, Path(mlx_path).name, quiet)
    if not has_tokenizer and not quiet:
        print(f"{out_file}: no byte-level BPE tokenizer.json in {mlx_path}; the GGUF holds "
              "weights and hyperparameters only", file=sys.stderr)
    return out_file

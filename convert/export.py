"""An MLX model folder → a Hugging Face safetensors folder, in the checkpoint's own format.

What export gives back:
  - tensors under the format's names (mlx_mobilellm.formats.names), in the stored dtype or `dtype`;
    quantized layers dequantized into the float weights our quantized model computes with
    (exactly in float32; by default cast to the model's dtype), so the result runs in
    transformers, vLLM, llama.cpp's converter;
  - Q/K rows in the layout the format stores (see `restore_rope_layout`);
  - config.json in the format's own spelling (mlx_mobilellm.formats.hf_config.config_to_hf);
  - the tokenizer files the folder holds (or, for a GGUF, rebuilt from its metadata).
Formats: llama4_text (MobileLLM-R1, Llama4ForCausalLM), llama (LlamaForCausalLM), mobilellm
(original MobileLLM; its modeling code is not shipped), cheapertraining (our names beside a
MobileLLMConfig config.json, as CheaperTraining saves them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Tuple

import mlx.core as mx

from mlx_mobilellm.errors import ParameterError
from mlx_mobilellm.formats.hf_config import SUPPORTED_MODEL_TYPES, config_to_hf
from mlx_mobilellm.formats.model_folder import CONFIG_FILE, write_json
from mlx_mobilellm.formats.names import from_ours
from mlx_mobilellm.formats.sources import Checkpoint, open_checkpoint
from mlx_mobilellm.loading import DTYPES
from mlx_mobilellm.models.config import MobileLLMConfig
from mlx_mobilellm.quantization import dequantize

from .destination import atomic_output, check_destination
from .progress import progress
from .writer import MAX_SHARD_BYTES, ShardWriter, copy_tokenizer_files

EXPORT_FORMATS = SUPPORTED_MODEL_TYPES + ("cheapertraining",)
# Whether each format stores Q/K rows for interleaved-pair RoPE (True) or rotate-half (False).
# CheaperTraining's config carries rope_traditional itself, so its rows stay as they are.
STORES_INTERLEAVED = {"llama4_text": True, "llama": False, "mobilellm": False, "gguf": True}
_HF_METADATA = {"format": "pt"}  # what transformers' save_pretrained writes; it checks for it


# --- RoPE row layout ----------------------------------------------------------------------
# Within each head of q_proj / k_proj, RoPE rotates pairs of rows by one frequency each.
# Interleaved layout: pair i is rows (2i, 2i+1). Rotate-half layout: pair i is rows
# (i, i + head_dim/2). The same attention results either way, provided the rows are laid
# out as the RoPE variant expects; converting is a fixed per-head row permutation.

def interleaved_to_halves(w: mx.array, head_dim: int) -> mx.array:
    """Rows of every head from interleaved pairs to rotate-half pairs: the even rows of a
    head first, then its odd rows."""
    heads = w.shape[0] // head_dim
    x = w.reshape(heads, head_dim // 2, 2, *w.shape[1:])
    return mx.swapaxes(x, 1, 2).reshape(w.shape)


def halves_to_interleaved(w: mx.array, head_dim: int) -> mx.array:
    """The inverse: row i and row i + head_dim/2 of a head become rows 2i and 2i+1."""
    heads = w.shape[0] // head_dim
    x = w.reshape(heads, 2, head_dim // 2, *w.shape[1:])
    return mx.swapaxes(x, 1, 2).reshape(w.shape)


_ROPE_ROWS = ("attention.q_proj.weight", "attention.k_proj.weight",
              # weighted QK-norm scales each row of a head: its weight follows the rows
              "attention.q_norm.weight", "attention.k_norm.weight")


def restore_rope_layout(name: str, array: mx.array, config: MobileLLMConfig,
                        interleaved: bool) -> mx.array:
    """`array` with its Q/K rows in the target layout (`interleaved`), from ours
    (config.rope_traditional). Other tensors pass through."""
    if interleaved == config.rope_traditional or not name.endswith(_ROPE_ROWS):
        return array
    permute = halves_to_interleaved if interleaved else interleaved_to_halves
    return permute(array, config.dim_per_head)


# --- weights ------------------------------------------------------------------------------

def float_weights(checkpoint: Checkpoint, exact: bool = False) -> Iterator[Tuple[str, mx.array]]:
    """(our name, float array) for every parameter, lazily. Quantized layers come back as
    the float weight they stand for (with that layer's own bits and group size): in float32
    with exact=True, else in their scales' dtype (the model's dtype, as mlx-lm de-quantizes)."""
    weights = checkpoint.weights
    quantization = checkpoint.quantization or {}
    default = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
    for name, array in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases"):
            continue  # folded into the module's weight below
        if leaf == "weight" and f"{module}.scales" in weights:
            params = {**default, **quantization.get(module, {})}
            array = dequantize(array, weights[f"{module}.scales"], weights.get(f"{module}.biases"),
                               params["group_size"], params["bits"], params.get("mode", "affine"),
                               exact)
        yield name, array


def weights_dtype(checkpoint: Checkpoint, dtype: Optional[str]) -> str:
    """The dtype config.json names: `dtype`, else the embedding's as exported (a quantized
    embedding dequantizes to its scales' dtype), as transformers names a model's dtype."""
    if dtype is not None:
        return dtype
    weights = checkpoint.weights
    embedding = weights.get("embed_tokens.scales", weights["embed_tokens.weight"])
    return {v: k for k, v in DTYPES.items()}[embedding.dtype]


# --- formats ------------------------------------------------------------------------------

def default_format(checkpoint: Checkpoint) -> str:
    """The format recorded at conversion (Checkpoint.export_format). A folder with no record
    (a model made here) goes out as llama4_text when it uses what only Llama 4 can say
    (QK-norm, NoPE layers, chunked attention), else as llama."""
    if checkpoint.source_format == "mlx" and checkpoint.original_format is None:
        config = checkpoint.config
        llama4 = config.use_qk_norm or config.nope_layers or config.attention_chunk_size
        return "llama4_text" if llama4 else "llama"
    return checkpoint.export_format


def target_config(config: MobileLLMConfig, fmt: str, dtype: str) -> dict:
    if fmt == "cheapertraining":
        # MobileLLMConfig's own fields, without our model_type: a CheaperTraining config.
        return {k: v for k, v in config.to_dict().items() if k != "model_type"}
    return config_to_hf(config, fmt, dtype=dtype)


def target_name(name: str, fmt: str) -> str:
    return name if fmt == "cheapertraining" else from_ours(name, fmt)


def check_dtype(dtype: Optional[str]) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise ParameterError(lambda name: f"{name('dtype')} {dtype!r} is not one of "
                                          f"{', '.join(DTYPES)}")


def open_for_export(mlx_path, out_path: Path, force: bool, quiet: bool,
                    folder: bool = True) -> Checkpoint:
    """The checkpoint to export, read and checked; the destination is checked first, before
    the (long) reading."""
    check_destination(out_path, force, [mlx_path], folder=folder)
    checkpoint = open_checkpoint(mlx_path, quiet=quiet)
    checkpoint.validate()
    return checkpoint


def export_hf(mlx_path, hf_path, *, model_type: Optional[str] = None, dtype: Optional[str] = None,
              force: bool = False, quiet: bool = False,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the model in `mlx_path` (an MLX model folder; any checkpoint convert reads also
    works) to `hf_path` as safetensors (shards of at most max_shard_bytes, with an index,
    when one file would be larger) plus config.json and the tokenizer files.

    model_type picks the format ("llama4_text", "llama", "mobilellm", "cheapertraining");
    default: the one the folder was converted from. dtype ("float32", "float16",
    "bfloat16") casts the weights; default: as stored. Quantized models are dequantized,
    by default into their scales' dtype (the model's); dtype="float32" keeps the
    dequantized weights exact. The output is written to a temporary sibling
    and renamed when complete; an existing `hf_path` is replaced only with force=True, and
    only as destination.check_destination allows.
    """
    check_dtype(dtype)
    if model_type is not None and model_type not in EXPORT_FORMATS:
        raise ParameterError(lambda name: f"{name('model_type')} {model_type!r} cannot be "
                                          f"exported; supported: {', '.join(EXPORT_FORMATS)}")
    hf_path = Path(hf_path)
    checkpoint = open_for_export(mlx_path, hf_path, force, quiet)
    fmt = model_type or default_format(checkpoint)
    config = checkpoint.config
    out_dtype = weights_dtype(checkpoint, dtype)
    hf_config = target_config(config, fmt, out_dtype)  # refuses what fmt cannot express
    interleaved = STORES_INTERLEAVED.get(fmt, config.rope_traditional)

    with atomic_output(hf_path, force, [mlx_path]) as folder:
        writer = ShardWriter(folder, max_shard_bytes, metadata=_HF_METADATA, destination=hf_path)
        count = sum(1 for n in checkpoint.weights if not n.endswith((".scales", ".biases")))
        # With a dtype, dequantize exactly and cast once; without, into the scales' dtype.
        weights = float_weights(checkpoint, exact=dtype is not None)
        for name, array in progress(weights, count, "exporting", quiet):
            array = restore_rope_layout(name, array, config, interleaved)
            if dtype is not None:
                array = array.astype(DTYPES[dtype])
            # Without dtype every tensor keeps its own (a mixed-precision checkpoint stays so).
            writer.add(target_name(name, fmt), array)
        writer.close()
        write_json(folder / CONFIG_FILE, hf_config)
        copy_tokenizer_files(checkpoint, folder)
    return hf_path

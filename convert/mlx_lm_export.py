"""An MLX model folder → a folder mlx-lm loads (`mlx_lm.load`, `mlx_lm.generate`), float or
quantized (see mlx_mobilellm/formats/mlx_lm_folder.py for the format, which we also read).

What it holds:
  - config.json: the Hugging Face config of llama or llama4_text (formats.hf_config.config_to_hf,
    as export --hf-path writes it), plus, when quantized, mlx-lm's "quantization" block (and its
    copy "quantization_config") under mlx-lm's module paths;
  - the tensors under mlx-lm's names, quantized layers as the MLX triplets they are (no
    de- or re-quantizing: mlx-lm multiplies the same packed weights), Q/K rows in the Hugging
    Face layout of the format, shards marked {"format": "mlx"} as mlx-lm marks its own;
  - the tokenizer files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx

from mlx_mobilellm.errors import CheckpointError, ParameterError
from mlx_mobilellm.formats.hf_config import config_to_hf, plain_attention_gaps
from mlx_mobilellm.formats.mlx_lm_folder import MLX_LM_TYPES, names_key
from mlx_mobilellm.formats.model_folder import CONFIG_FILE, QUANTIZATION_DEFAULTS, write_json
from mlx_mobilellm.formats.names import from_ours
from mlx_mobilellm.formats.sources import Checkpoint
from mlx_mobilellm.loading import DTYPES
from mlx_mobilellm.models.config import MobileLLMConfig

from .destination import atomic_output
from .export import (STORES_INTERLEAVED, check_dtype, default_format, halves_to_interleaved,
                     interleaved_to_halves, open_for_export, weights_dtype)
from .progress import progress
from .writer import MAX_SHARD_BYTES, ShardWriter, copy_tokenizer_files

_ROPE_MODULES = ("attention.q_proj", "attention.k_proj")


def _format(checkpoint: Checkpoint, model_type: Optional[str]) -> str:
    """The model_type to write: as asked, else the checkpoint's own where mlx-lm runs it,
    else llama4_text when only Llama 4 can say what the model does (like export's default)."""
    if model_type is not None:
        if model_type not in MLX_LM_TYPES:
            raise ParameterError(lambda name: f"{name('model_type')} {model_type!r} has no mlx-lm "
                                              f"model; use {' or '.join(MLX_LM_TYPES)}")
        return model_type
    fmt = default_format(checkpoint)
    if fmt in MLX_LM_TYPES:
        return fmt
    return "llama4_text" if plain_attention_gaps(checkpoint.config) else "llama"


def _refuse_unlike_mlx_lm(config: MobileLLMConfig, fmt: str) -> None:
    """What mlx-lm's llama4_text computes differently from Llama 4 (it has no RoPE scaling,
    applies QK-norm on NoPE layers too, and has no query temperature there), so that the
    folder would load but give other logits. (config_to_hf refuses what Llama cannot say.)"""
    if fmt != "llama4_text":
        return
    problem = None
    if config.rope_scaling:
        problem = f"RoPE scaling {config.rope_scaling.get('rope_type', '?')!r}, which it ignores"
    elif config.nope_layers and config.use_qk_norm:
        problem = f"NoPE layers {config.nope_layers} with QK-norm, which it norms on those too"
    elif config.nope_layers and config.attn_temperature_tuning:
        problem = f"NoPE layers {config.nope_layers} with query temperature tuning, which it lacks"
    if problem:
        raise CheckpointError(f"cannot export for mlx-lm as llama4_text: the model has {problem}; "
                              "export it with --hf-path instead")


def _rope_rows(module: str, array: mx.array, config: MobileLLMConfig, interleaved: bool) -> mx.array:
    """Q/K rows in the format's layout. Quantization packs columns only, so the rows of a
    packed weight, its scales and its biases permute alike."""
    if interleaved == config.rope_traditional or not module.endswith(_ROPE_MODULES):
        return array
    permute = halves_to_interleaved if interleaved else interleaved_to_halves
    return permute(array, config.dim_per_head)


def _module_params(quantization: dict, module: str) -> dict:
    return {**{k: quantization[k] for k in QUANTIZATION_DEFAULTS if k in quantization},
            **quantization.get(module, {})}


def _mlx_lm_quantization(quantization: dict, modules: list) -> dict:
    """mlx-lm's block: our defaults, and each quantized module whose parameters differ, keyed
    by mlx-lm's module path (`modules`: (our path, mlx-lm path) of each quantized layer)."""
    default = _module_params(quantization, "")
    block = dict(default)
    for ours, theirs in modules:
        params = _module_params(quantization, ours)
        if params != default:
            block[theirs] = params
    return block


def export_mlx_lm(mlx_path, out_path, *, model_type: Optional[str] = None,
                  dtype: Optional[str] = None, force: bool = False, quiet: bool = False,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write the model in `mlx_path` (an MLX model folder; any checkpoint convert reads also
    works) to `out_path` as a folder mlx-lm loads. model_type: "llama" or "llama4_text";
    default: the format it came from. dtype casts the float tensors (packed weights stay
    packed). A tied head over a quantized embedding is written as an untied `output` holding
    the same packed tensors for llama4_text, whose mlx-lm model multiplies by the embedding's
    raw weight and so cannot use a quantized one. Written to a temporary sibling and renamed
    when complete; an existing `out_path` is replaced only with force=True, as
    destination.check_destination allows."""
    check_dtype(dtype)
    out_path = Path(out_path)
    checkpoint = open_for_export(mlx_path, out_path, force, quiet)
    fmt = _format(checkpoint, model_type)
    config = checkpoint.config
    weights = checkpoint.weights
    hf_config = config_to_hf(config, fmt, dtype=weights_dtype(checkpoint, dtype))
    _refuse_unlike_mlx_lm(config, fmt)
    names = names_key(fmt)
    interleaved = STORES_INTERLEAVED[fmt]  # mlx-lm keeps each format's Hugging Face row layout
    untie = fmt == "llama4_text" and config.tie_word_embeddings and "embed_tokens.scales" in weights
    if untie:
        hf_config["tie_word_embeddings"] = False

    def tensors():
        for name, array in weights.items():
            module, _, leaf = name.rpartition(".")
            array = _rope_rows(module, array, config, interleaved)
            if dtype is not None and mx.issubdtype(array.dtype, mx.floating):
                array = array.astype(DTYPES[dtype])
            yield from_ours(name, names), array
            if untie and module == "embed_tokens":
                yield from_ours(f"lm_head.{leaf}", names), array

    quantization = dict(checkpoint.quantization or {})
    quantized = [n[: -len(".scales")] for n in weights if n.endswith(".scales")]
    if untie:
        quantization["lm_head"] = _module_params(quantization, "embed_tokens")
        quantized.append("lm_head")
    if quantization:
        modules = [(m, from_ours(f"{m}.weight", names)[: -len(".weight")]) for m in quantized]
        block = _mlx_lm_quantization(quantization, modules)
        hf_config.update(quantization=block, quantization_config=block)

    with atomic_output(out_path, force, [mlx_path]) as folder:
        writer = ShardWriter(folder, max_shard_bytes, metadata={"format": "mlx"},
                             destination=out_path)
        count = len(weights) + (3 if untie else 0)
        for name, array in progress(tensors(), count, "exporting", quiet):
            writer.add(name, array)
        writer.close()
        write_json(folder / CONFIG_FILE, hf_config)
        copy_tokenizer_files(checkpoint, folder)
    return out_path

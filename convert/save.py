"""A model object in memory → an MLX model folder: what `fuse` writes after merging adapters, and
what full fine-tuning and pretraining write into their run folders (save_model_into)."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

from mlx.utils import tree_flatten

from mlx_mobilellm.formats.model_folder import CONFIG_FILE, INDEX_FILE, folder_config
from mlx_mobilellm.lora import ADAPTER_CONFIG
from mlx_mobilellm.models.mobilellm import MobileLLM
from mlx_mobilellm.quantization import QUANTIZED_LAYERS

from .progress import progress
from .writer import MAX_SHARD_BYTES, write_model_folder


def model_quantization(model: MobileLLM) -> Optional[dict]:
    """config.json's quantization block for the model's quantized layers: the most common
    (group_size, bits, mode) as the default, and an override for each layer that differs
    (see mlx_mobilellm.formats.model_folder.quantize_like, which reads it back). None if none is."""
    layers = {path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
              for path, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}
    if not layers:
        return None
    common = Counter(tuple(p.items()) for p in layers.values()).most_common(1)[0][0]
    default = dict(common)
    overrides = {path: params for path, params in sorted(layers.items()) if params != default}
    return {**default, **overrides}


def save_model(model: MobileLLM, mlx_path, source_format: Optional[str], tokenizer_source=None,
               *, readme: str = "", force: bool = False, sources: Iterable = (),
               quiet: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `model`'s parameters, config (recording `source_format`, the format export writes
    back by default) and the tokenizer files of `tokenizer_source` (a mlx_mobilellm.formats.sources.Checkpoint,
    or None) as an MLX model folder that mlx_mobilellm.load reads back. `sources`: the paths
    it came from, which even `force` never replaces (see convert.destination.check_destination)."""
    weights = tree_flatten(model.parameters())
    config = folder_config(model.config, model_quantization(model), source_format)
    readme = readme or (f"# {Path(mlx_path).name}\n\nMLX model folder written by mlx-mobilellm.\n")
    return write_model_folder(mlx_path, progress(weights, len(weights), "saving", quiet), config,
                              tokenizer_source, readme, force=force, sources=sources,
                              max_shard_bytes=max_shard_bytes)


def save_model_into(model: MobileLLM, folder: Path, source_format: Optional[str],
                    tokenizer_source, readme: str, quiet: bool = False) -> None:
    """A trained model as an MLX model folder in `folder` itself, beside a training run's
    metrics and checkpoint, so that `load(folder)` and `generate --model folder` read it.
    Staged in a hidden subfolder by save_model, then moved in file by file with config.json
    last: until then the folder is no model. A run killed meanwhile has its final checkpoint:
    resumed with the same step count, it trains no step and writes the folder again."""
    folder = Path(folder)
    staging = folder / ".model.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's
    save_model(model, staging, source_format, tokenizer_source, readme=readme, quiet=quiet)
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    # An earlier run's weights in other shards (or adapters) would be read together with
    # these, and its adapter config would send --test and --adapter-path to adapters gone.
    for old in (*folder.glob("*.safetensors"), folder / INDEX_FILE, folder / ADAPTER_CONFIG):
        old.unlink(missing_ok=True)
    names = sorted(p.name for p in staging.iterdir() if p.name != CONFIG_FILE)
    for name in (*names, CONFIG_FILE):
        (staging / name).replace(folder / name)
    staging.rmdir()

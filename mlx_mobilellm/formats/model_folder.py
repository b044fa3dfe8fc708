"""The MLX model folder: what convert writes and load reads.

    config.json                  MobileLLMConfig.to_dict(), plus
                                   "quantization": {"group_size", "bits", "mode",
                                                    <module path>: {...} overrides}  (if quantized)
                                   "source_format": the checkpoint format it came from, which
                                                    export writes back by default
    model.safetensors            our parameter names; or model-00001-of-0000N.safetensors shards
    model.safetensors.index.json   with this index when there are several
    tokenizer files, README.md   copied / written by convert
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.nn as nn

from ..errors import CheckpointError
from ..models.config import MODEL_TYPE, MobileLLMConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
                   "chat_template.json")
"""The tokenizer files a model folder may hold, copied from its source."""
# Keys of config.json that describe the folder rather than the architecture.
FOLDER_KEYS = ("quantization", "source_format")
# What a quantized folder may hold: MLX's affine quantization with these parameters (MLX
# crashes the process quantizing with some others, e.g. group size 0).
QUANTIZATION_GROUP_SIZES = (32, 64, 128)
QUANTIZATION_BITS = (2, 3, 4, 5, 6, 8)
QUANTIZATION_DEFAULTS = ("group_size", "bits", "mode")

def is_model_folder(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE


def _check_quantization_parameters(params, where: str, defaults: Optional[dict] = None) -> None:
    if not isinstance(params, dict):
        raise CheckpointError(f"{where} must be an object, got {params!r:.60}")
    params = {**(defaults or {}), **params}
    group_size, bits = params.get("group_size"), params.get("bits")
    if group_size not in QUANTIZATION_GROUP_SIZES or bits not in QUANTIZATION_BITS:
        raise CheckpointError(f"{where}: group_size {group_size!r:.20} and bits {bits!r:.20} must be "
                              f"one of {QUANTIZATION_GROUP_SIZES} and {QUANTIZATION_BITS}")
    if params.get("mode", "affine") != "affine":
        raise CheckpointError(f"{where}: mode {params['mode']!r:.20} is not supported (only affine)")


def check_quantization(quantization, where: str) -> None:
    """The folder's quantization block: defaults, and per-module overrides of them."""
    if quantization is None:
        return
    _check_quantization_parameters(quantization, f"{where}: quantization")
    defaults = {key: quantization[key] for key in QUANTIZATION_DEFAULTS if key in quantization}
    for module, override in quantization.items():
        if module not in QUANTIZATION_DEFAULTS:
            _check_quantization_parameters(override, f"{where}: quantization.{module}", defaults)


def split_folder_config(raw: dict, where: str):
    """(MobileLLMConfig, quantization or None, source_format or None) from config.json."""
    fields = {k: v for k, v in raw.items() if k not in FOLDER_KEYS}
    try:
        config = MobileLLMConfig.from_dict(fields)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: {error}") from None
    check_quantization(raw.get("quantization"), where)
    source_format = raw.get("source_format")
    if not isinstance(source_format, (str, type(None))):
        raise CheckpointError(f"{where}: source_format must be a string, got {source_format!r:.60}")
    return config, raw.get("quantization"), source_format


def folder_config(config: MobileLLMConfig, quantization: Optional[dict],
                  source_format: Optional[str]) -> dict:
    raw = config.to_dict()
    if quantization:
        raw["quantization"] = quantization
    if source_format:
        raw["source_format"] = source_format
    return raw


def quantize_like(model: nn.Module, quantization: dict, weight_names) -> None:
    """Turn into quantized layers exactly the modules whose weights come quantized (those
    with a `.scales` tensor), each with its own bits/group size when the block overrides it."""
    names = set(weight_names)
    default = {k: quantization[k] for k in QUANTIZATION_DEFAULTS if k in quantization}

    def params(path: str, module: nn.Module):
        if f"{path}.scales" not in names:
            return False
        return {**default, **quantization.get(path, {})}

    nn.quantize(model, class_predicate=params)


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")

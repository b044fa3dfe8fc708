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

from .errors import CheckpointError
from .models.config import MODEL_TYPE, MobileLLMConfig

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# Keys of config.json that describe the folder rather than the architecture.
FOLDER_KEYS = ("quantization", "source_format")


def is_model_folder(config: dict) -> bool:
    return config.get("model_type") == MODEL_TYPE


def split_folder_config(raw: dict, where: str):
    """(MobileLLMConfig, quantization or None, source_format or None) from config.json."""
    fields = {k: v for k, v in raw.items() if k not in FOLDER_KEYS}
    try:
        config = MobileLLMConfig.from_dict(fields)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: {error}") from None
    return config, raw.get("quantization"), raw.get("source_format")


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
    default = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}

    def params(path: str, module: nn.Module):
        if f"{path}.scales" not in names:
            return False
        return {**default, **quantization.get(path, {})}

    nn.quantize(model, class_predicate=params)


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")

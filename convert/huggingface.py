"""Reading a Hugging Face checkpoint folder (MobileLLM-R1, Llama) as our config and weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple


from mlx_mobilellm.errors import CheckpointError
from mlx_mobilellm.models.config import MobileLLMConfig

from .hf_config import config_from_hf
from .names import IGNORED_SOURCE_TENSORS, to_ours
from .safetensors_files import read_tensors, safetensors_files


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; a checkpoint folder needs its config.json") from None
    except ValueError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def read_hf_checkpoint(folder: Path, files: Optional[list] = None) -> Tuple[MobileLLMConfig, str, dict]:
    """(config, source model_type, weights under our names, lazily loaded) of a Hugging Face
    folder; `files` picks the safetensors files (default: the folder's)."""
    hf = read_json(folder / "config.json")
    config = config_from_hf(hf, str(folder / "config.json"))
    source = hf["model_type"]
    weights = {}
    for name, array, file in read_tensors(files or safetensors_files(folder)):
        if IGNORED_SOURCE_TENSORS.match(name):
            continue
        ours = to_ours(name, source)
        if ours is None:
            hint = (" (mixture-of-experts weights: only dense models are supported)"
                    if "experts" in name or "router" in name else "")
            raise CheckpointError(f"{file}: unexpected tensor '{name}' for a {source} checkpoint{hint}")
        if ours == "lm_head.weight" and config.tie_word_embeddings:
            continue  # some exporters write the tied head out as well; it is the embedding
        weights[ours] = array
    return config, source, weights

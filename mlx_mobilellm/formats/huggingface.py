"""Reading a Hugging Face checkpoint folder (MobileLLM-R1, Llama) as our config and weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from ..errors import CheckpointError
from ..input_checks import read_json_object
from ..models.config import MobileLLMConfig
from .hf_config import config_from_hf, hf_model_type
from .names import IGNORED_SOURCE_TENSORS, to_ours
from .safetensors_files import read_tensors, safetensors_files
from .validation import check_layer_count


def read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: not found; a checkpoint folder needs its config.json")
    return read_json_object(path)


def _weights(files: list, source: str) -> dict:
    """The tensors under our names (lazily loaded); names the format has not are refused."""
    weights = {}
    for name, array, file in read_tensors(files):
        if IGNORED_SOURCE_TENSORS.match(name):
            continue
        ours = to_ours(name, source)
        if ours is None:
            hint = (" (mixture-of-experts weights: only dense models are supported)"
                    if "experts" in name or "router" in name else "")
            raise CheckpointError(f"{file}: unexpected tensor '{name}' for a {source} checkpoint{hint}")
        weights[ours] = array
    return weights


def read_hf_checkpoint(folder: Path, files: Optional[list] = None) -> Tuple[MobileLLMConfig, str, dict]:
    """(config, source model_type, weights under our names, lazily loaded) of a Hugging Face
    folder; `files` picks the safetensors files (default: the folder's)."""
    hf = read_json(folder / "config.json")
    source = hf_model_type(hf, str(folder / "config.json"))
    config, weights = read_weights(folder, hf, files, source)
    return config, source, weights


def read_weights(folder: Path, hf: dict, files: Optional[list], names: str) -> Tuple[MobileLLMConfig, dict]:
    """(config, weights under our names) for the Hugging Face config `hf` of `folder`, its
    tensors named as names.NAME_TABLES[names] says."""
    where = str(folder / "config.json")
    weights = _weights(files or safetensors_files(folder), names)
    # Before the config is read: reading it counts to the layer count (no_rope_layers).
    check_layer_count(hf.get("num_hidden_layers"), weights, where, "num_hidden_layers")
    config = config_from_hf(hf, where)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # some exporters write the tied head too; it is the embedding
    return config, weights

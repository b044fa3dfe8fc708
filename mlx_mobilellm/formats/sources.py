"""Opening a checkpoint of any supported format as our config plus lazily loaded weights.

Formats (detected from the path, config.json and tensor names; `source_format` forces one):
  llama4_text      Hugging Face MobileLLM-R1 (Llama4ForCausalLM, dense)
  llama            Hugging Face Llama (LlamaForCausalLM; SmolLM2 and relatives)
  mobilellm        original MobileLLM (MobileLLMForCausalLM: share_embedding, layer_sharing)
  cheapertraining  a PyTorch state dict saved as safetensors with our parameter names, beside
                   a config.json of MobileLLMConfig fields (the seed's names)
  gguf             llama.cpp GGUF, Llama architecture (F32/F16/BF16/Q4_0/Q4_1/Q8_0 as they
                   are; files with K-quants and the other types the gguf package reads, in float)
  mlx              a model folder written by this project (re-convert: dtype, quantization)
  mlx_lm           a folder written by mlx-lm (mlx_lm.convert, mlx-community) of llama or
                   llama4_text, float or quantized (formats/mlx_lm_folder.py)
Inputs: a folder, a single .safetensors file (config.json beside it), a .gguf file, or a
Hugging Face hub repo id (downloaded with huggingface_hub, only the files needed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError, ParameterError
from ..models.config import MobileLLMConfig
from ..models.mobilellm import MobileLLM
from .gguf_file import gguf_key, read_gguf
from .hf_config import SUPPORTED_MODEL_TYPES, hf_field
from .huggingface import read_hf_checkpoint, read_json
from .mlx_lm_folder import is_mlx_lm_folder, names_key, read_mlx_lm_folder
from .model_folder import CONFIG_FILE, is_model_folder, quantize_like, split_folder_config
from .names import NAME_TABLES, from_ours
from .safetensors_files import read_tensors, safetensors_files
from .validation import check_sizes, check_weights

SOURCE_FORMATS = SUPPORTED_MODEL_TYPES + ("cheapertraining", "gguf", "mlx", "mlx_lm")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.tiktoken"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Checkpoint:
    config: MobileLLMConfig
    source_format: str
    """The format read: one of SOURCE_FORMATS."""
    weights: dict
    """Our parameter names → arrays, loaded lazily (reading happens when a tensor is used)."""
    quantization: Optional[dict]
    origin: str
    folder: Optional[Path]
    """The folder holding tokenizer files, if any."""
    gguf_metadata: Optional[dict] = None
    original_format: Optional[str] = None
    """For an MLX folder, the format it was converted from; for an mlx-lm folder, its
    model_type."""

    @property
    def export_format(self) -> str:
        """The format export writes back by default: the checkpoint's own Hugging Face one."""
        fmt = self.original_format or self.source_format
        return "llama" if fmt in ("gguf", "mlx") else fmt

    def source_name(self, ours: str) -> str:
        """How the checkpoint itself names one of our tensors (for error messages)."""
        if self.source_format == "mlx_lm":
            return from_ours(ours, names_key(self.original_format)) or ours
        if self.source_format in NAME_TABLES:
            return from_ours(ours, self.source_format) or ours
        return ours

    def validate(self) -> None:
        """Every tensor a model of this config has, with its shape, and nothing else (the
        sizes were checked when the checkpoint was opened, so building the model is cheap)."""
        model = MobileLLM(self.config)
        if self.quantization:
            quantize_like(model, self.quantization, self.weights)
        check_weights(model, self.weights, self.origin, self.source_name)

    def source_field(self, ours: str) -> str:
        """How the checkpoint's config names one of our config fields (for error messages)."""
        if self.source_format == "gguf":
            return gguf_key(ours)
        if self.source_format in SUPPORTED_MODEL_TYPES:
            return hf_field(ours, self.source_format)
        if self.source_format == "mlx_lm":
            return hf_field(ours, self.original_format)
        return ours


def download(repo_id: str, quiet: bool = False) -> Path:
    """A hub snapshot with only what conversion reads; HF_HUB_OFFLINE and the cache apply."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        raise CheckpointError(f"{repo_id}: not a local path, and huggingface_hub (needed to "
                              "download it) is not installed: pip install huggingface_hub") from None
    if quiet:
        disable_progress_bars()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as error:
        raise CheckpointError(f"{repo_id}: download failed ({type(error).__name__}: {error})") from None


def detect_format(config: dict, where: str) -> str:
    if is_model_folder(config):
        return "mlx"
    if config.get("model_type") in SUPPORTED_MODEL_TYPES:
        return config["model_type"]
    if "embed_dim" in config and "num_layers" in config:
        return "cheapertraining"
    raise ParameterError(lambda name: (
        f"{where}: cannot tell the checkpoint format (model_type {config.get('model_type')!r:.60}); "
        f"supported: {', '.join(SOURCE_FORMATS)} — pass {name('source_format')} if it is one "
        "of them"))


def _cheapertraining(raw: dict, files: list, where: str) -> tuple:
    try:
        config = MobileLLMConfig.from_dict(raw)
    except (TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{where}: {error}") from None
    return config, {name: array for name, array, _ in read_tensors(files)}


def open_checkpoint(spec, source_format: Optional[str] = None, quiet: bool = False) -> Checkpoint:
    """The checkpoint `spec` names, its config's sizes checked against its tensors (so that a
    model of that config can be built without building something absurd first)."""
    checkpoint = _open(spec, source_format, quiet)
    check_sizes(checkpoint.config, checkpoint.weights, checkpoint.origin, checkpoint.source_name,
                checkpoint.source_field)
    return checkpoint


def _open(spec, source_format: Optional[str], quiet: bool) -> Checkpoint:
    path = Path(spec)
    if not path.exists():
        if _REPO_ID.match(str(spec)) and not str(spec).startswith((".", "/")):
            path = download(str(spec), quiet)
        else:
            raise CheckpointError(f"{spec}: no such file or folder (nor a hub repo id like org/name)")
    if source_format is not None and source_format not in SOURCE_FORMATS:
        raise CheckpointError(f"source format {source_format!r} is not one of {', '.join(SOURCE_FORMATS)}")

    if path.suffix == ".gguf" or source_format == "gguf":
        config, weights, quantization, meta = read_gguf(path, quiet)
        return Checkpoint(config, "gguf", weights, quantization, str(spec), None, meta)
    folder, files = (path.parent, safetensors_files(path)) if path.is_file() else (path, None)
    config_path = folder / CONFIG_FILE
    raw = read_json(config_path)
    kind = source_format or detect_format(raw, str(config_path))
    files = files or safetensors_files(folder)
    if source_format is None and is_mlx_lm_folder(raw, files):
        kind = "mlx_lm"

    if kind == "mlx_lm":
        config, model_type, weights, quantization = read_mlx_lm_folder(folder, raw, files)
        return Checkpoint(config, "mlx_lm", weights, quantization, str(spec), folder,
                          original_format=model_type)
    if kind == "mlx":
        config, quantization, original = split_folder_config(raw, str(config_path))
        weights = {name: array for name, array, _ in read_tensors(files)}
        return Checkpoint(config, "mlx", weights, quantization, str(spec), folder,
                          original_format=original)
    if kind == "cheapertraining":
        config, weights = _cheapertraining(raw, files, str(config_path))
        return Checkpoint(config, kind, weights, None, str(spec), folder)
    if kind != raw.get("model_type"):
        raw_type = raw.get("model_type")
        raise ParameterError(lambda name: f"{config_path}: model_type is {raw_type!r}, not "
                                          f"{kind!r}; drop {name('source_format')} or fix config.json")
    config, source, weights = read_hf_checkpoint(folder, files)
    return Checkpoint(config, source, weights, None, str(spec), folder)

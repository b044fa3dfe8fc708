"""Model folders written by mlx-lm (`mlx_lm.convert`, and so all of mlx-community), read as our
config and weights.

Such a folder is a Hugging Face folder as mlx-lm rewrote it:
    config.json        the source's Hugging Face config, plus when quantized a "quantization"
                       block (copied to "quantization_config"): {"group_size", "bits", "mode",
                       <mlx-lm module path>: {...} | false  per-layer overrides}
    model*.safetensors Hugging Face tensor names (mlx-lm's llama4_text calls an untied head
                       `output`), metadata {"format": "mlx"}; quantized layers as MLX triplets
                       `<module>.weight` (uint32), `.scales`, `.biases`
Q/K rows stay in the Hugging Face layout (mlx-lm permutes nothing for llama or llama4_text),
so our Hugging Face config reader applies as it is.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx

from ..errors import CheckpointError
from ..models.config import MobileLLMConfig
from .huggingface import read_weights
from .model_folder import QUANTIZATION_DEFAULTS, check_quantization
from .names import from_ours, to_ours
from .safetensors_header import check_safetensors_header

MLX_LM_TYPES = ("llama", "llama4_text")
QUANTIZATION_KEYS = ("quantization", "quantization_config")


def names_key(model_type: str) -> str:
    """The names.NAME_TABLES entry of an mlx-lm folder of `model_type`."""
    return f"mlx_lm.{model_type}"


def _metadata(file: Path) -> dict:
    """A safetensors file's __metadata__, once its header is known to be whole and sound."""
    check_safetensors_header(file)
    with file.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length)).get("__metadata__") or {}


def is_mlx_lm_folder(raw: dict, files: list) -> bool:
    """A Hugging Face config with a quantization block, or weights that mlx-lm saved (it marks
    them {"format": "mlx"}; transformers writes "pt")."""
    if raw.get("model_type") not in MLX_LM_TYPES:
        return False
    return (any(key in raw for key in QUANTIZATION_KEYS)
            or bool(files) and _metadata(files[0]).get("format") == "mlx")


def _quantization_block(raw: dict, where: str) -> Optional[dict]:
    """The block mlx-lm reads: "quantization", else an MLX-style "quantization_config".
    One written by another quantizer (GPTQ, AWQ, bitsandbytes, fp8: it names its quant_method)
    holds tensors MLX cannot multiply."""
    block = raw.get("quantization")
    if block is None:
        block = raw.get("quantization_config")
        if isinstance(block, dict) and "quant_method" in block:
            raise CheckpointError(
                f"{where}: quantization_config.quant_method {block['quant_method']!r:.40} is not "
                "supported; only MLX's affine quantization is (mlx_lm.convert -q, or convert the "
                "float model with -q)")
    if block is not None and not isinstance(block, dict):
        raise CheckpointError(f"{where}: quantization must be an object, got {block!r:.60}")
    return block


def _our_quantization(block: dict, weights: dict, model_type: str, where: str) -> dict:
    """The block under our module paths: the defaults, and each override that says how a layer
    is packed. `false` / `true` entries need no record, since a layer is quantized exactly when
    its `.scales` tensor is there (quantize_like); an entry the weights contradict is refused."""
    ours = {key: block[key] for key in QUANTIZATION_DEFAULTS if key in block}
    # Checked under the folder's own module paths, which errors then name.
    check_quantization({path: value for path, value in block.items()
                        if not isinstance(value, bool)}, where)
    for path, override in block.items():
        if path in QUANTIZATION_DEFAULTS:
            continue
        name = to_ours(f"{path}.weight", names_key(model_type))
        if name is None:
            raise CheckpointError(f"{where}: quantization.{path:.80} names no layer of a "
                                  f"{model_type} model")
        module = name[: -len(".weight")]
        if override is False and f"{module}.scales" in weights:
            raise CheckpointError(f"{where}: quantization.{path} is false, but the weights hold "
                                  f"'{path}.scales'; the config does not match the weights")
        if override is not False and f"{module}.scales" not in weights:
            raise CheckpointError(f"{where}: quantization.{path} says the layer is quantized, but "
                                  f"'{path}.scales' is missing; the folder is incomplete — "
                                  "download or convert it again")
        if isinstance(override, dict):
            ours[module] = override
    return ours


def _check_triplets(weights: dict, model_type: str, quantized: bool, where: str) -> None:
    """Every packed (uint32) weight has its scales and biases (MLX affine triplets)."""
    for name, array in weights.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or array.dtype != mx.uint32:
            continue
        source = from_ours(name, names_key(model_type))[: -len(".weight")]
        if not quantized:
            raise CheckpointError(f"{where}: tensor '{source}.weight' is packed (uint32) but "
                                  "config.json has no quantization block; add the block "
                                  "mlx_lm.convert wrote, or convert the model again")
        for part in ("scales", "biases"):
            if f"{module}.{part}" not in weights:
                raise CheckpointError(f"{where}: tensor '{source}.weight' is quantized but "
                                      f"'{source}.{part}' is missing; the folder is incomplete "
                                      "— download or convert it again")


def read_mlx_lm_folder(folder: Path, raw: dict, files: list) -> Tuple[MobileLLMConfig, str, dict, Optional[dict]]:
    """(config, model_type, weights under our names, quantization under our module paths or
    None) of an mlx-lm folder whose config.json is `raw`."""
    where = str(folder / "config.json")
    model_type = raw.get("model_type")
    if model_type not in MLX_LM_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r:.60} is not supported in an "
                              f"mlx-lm folder; supported: {', '.join(MLX_LM_TYPES)}")
    block = _quantization_block(raw, where)
    hf = {k: v for k, v in raw.items() if k not in QUANTIZATION_KEYS}
    if model_type == "llama":
        # mlx-lm's llama ties the head unless the config says otherwise (transformers' does
        # not), and reads rope_traditional, which Hugging Face configs do not have.
        hf.setdefault("tie_word_embeddings", True)
    config, weights = read_weights(folder, hf, files, names_key(model_type))
    if model_type == "llama" and raw.get("rope_traditional"):
        config = dataclasses.replace(config, rope_traditional=True)
    _check_triplets(weights, model_type, block is not None, where)
    quantization = _our_quantization(block, weights, model_type, where) if block is not None else None
    return config, model_type, weights, quantization

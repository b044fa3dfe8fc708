"""load(): a model from an MLX model folder or, converted in memory, a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import CheckpointError
from .models.config import MODEL_TYPE, MobileLLMConfig
from .models.mobilellm import MobileLLM

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _same_name(name: str) -> str:
    return name


def check_weights(model: MobileLLM, weights: dict, where: str,
                  source_name: Callable[[str], str] = _same_name) -> None:
    """Every parameter present with its shape, and nothing else. Errors name the tensor as the
    user's checkpoint does (source_name maps our names to the checkpoint's)."""
    expected = dict(tree_flatten(model.parameters()))
    for name, array in weights.items():
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor '{source_name(name)}'")
        if tuple(array.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{where}: tensor '{source_name(name)}' has shape {tuple(array.shape)} but the "
                f"config needs {tuple(expected[name].shape)}; config.json does not match the weights")
    missing = [source_name(name) for name in sorted(set(expected) - set(weights))]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:3])}{more}")


def build_model(config: MobileLLMConfig, weights: dict, where: str,
                dtype: Optional[str] = None,
                source_name: Callable[[str], str] = _same_name) -> MobileLLM:
    model = MobileLLM(config)
    check_weights(model, weights, where, source_name)
    if dtype is not None:
        weights = {name: array.astype(DTYPES[dtype]) for name, array in weights.items()}
    model.load_weights(list(weights.items()))
    model.eval()
    return model


def load(path, dtype: Optional[str] = None) -> Tuple[MobileLLM, None]:
    """(model, tokenizer) from a local folder: an MLX model folder written by this project, or a
    Hugging Face MobileLLM-R1 / Llama folder (converted in memory, nothing written).

    dtype ("float32", "float16", "bfloat16") casts the weights; None keeps the checkpoint's.
    The tokenizer is None for now.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder (no such directory)")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    from convert.huggingface import read_hf_checkpoint, read_json
    from convert.names import from_ours
    from convert.safetensors_files import read_tensors, safetensors_files

    raw = read_json(folder / "config.json")
    if raw.get("model_type") == MODEL_TYPE:
        try:
            config = MobileLLMConfig.from_dict(raw)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{folder / 'config.json'}: {error}") from None
        weights = {name: array for name, array, _ in read_tensors(safetensors_files(folder))}
        return build_model(config, weights, str(folder), dtype), None
    config, source, weights = read_hf_checkpoint(folder)
    return build_model(config, weights, str(folder), dtype,
                       lambda name: from_ours(name, source) or name), None

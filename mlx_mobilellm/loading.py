"""load(): a model from an MLX model folder or, converted in memory, a Hugging Face folder."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import CheckpointError
from .model_folder import quantize_like
from .models.config import MobileLLMConfig
from .models.mobilellm import MobileLLM
from .tokenizer import Tokenizer, read_tokenizer_files, tokenizer_from_files, tokenizer_from_gguf_metadata

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
                dtype: Optional[str] = None, quantization: Optional[dict] = None,
                source_name: Callable[[str], str] = _same_name) -> MobileLLM:
    """The model with these weights; quantized layers where the weights come quantized.
    dtype casts the float weights (quantized ones stay packed; their scales are cast)."""
    model = MobileLLM(config)
    if quantization:
        quantize_like(model, quantization, weights)
    check_weights(model, weights, where, source_name)
    if dtype is not None:
        weights = {name: array.astype(DTYPES[dtype]) if mx.issubdtype(array.dtype, mx.floating)
                   else array for name, array in weights.items()}
    model.load_weights(list(weights.items()))
    model.eval()
    return model


def load(path, dtype: Optional[str] = None,
         adapter_path=None) -> Tuple[MobileLLM, Optional[Tokenizer]]:
    """(model, tokenizer) from an MLX model folder, a Hugging Face folder (MobileLLM-R1,
    Llama, original MobileLLM), a CheaperTraining-style safetensors folder, a .gguf file or a
    hub repo id. Anything but an MLX folder is converted in memory; nothing is written.

    dtype ("float32", "float16", "bfloat16") casts the float weights; None keeps the
    checkpoint's. adapter_path: a folder of fine-tuned adapters to apply (unfused; see
    `mlx-mobilellm fuse` to merge them). The tokenizer is None when the source has none.
    """
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    from convert.sources import open_checkpoint

    checkpoint = open_checkpoint(path)
    model = build_model(checkpoint.config, checkpoint.weights, checkpoint.origin, dtype,
                        checkpoint.quantization, checkpoint.source_name)
    eos = checkpoint.config.eos_token_ids
    if checkpoint.gguf_metadata is not None:
        tokenizer = tokenizer_from_gguf_metadata(checkpoint.gguf_metadata, checkpoint.origin, eos)
    else:
        tokenizer = tokenizer_from_files(read_tokenizer_files(checkpoint.folder), checkpoint.origin, eos)
    if adapter_path is not None:
        from .lora import load_adapters

        load_adapters(model, adapter_path)
    return model, tokenizer

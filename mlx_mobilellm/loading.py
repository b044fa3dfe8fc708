"""load(): a model from an MLX model folder or, converted in memory, a Hugging Face folder."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import mlx.core as mx

from .errors import ParameterError
from .compute_dtype import for_fast_compute
from .formats.model_folder import quantize_like
from .formats.validation import check_weights, same_name
from .models.config import MobileLLMConfig
from .models.mobilellm import MobileLLM
from .tokenizer import (Tokenizer, check_fits_model, read_tokenizer_files, tokenizer_from_files,
                        tokenizer_from_gguf_metadata)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
def build_model(config: MobileLLMConfig, weights: dict, where: str,
                dtype: Optional[str] = None, quantization: Optional[dict] = None,
                source_name: Callable[[str], str] = same_name) -> MobileLLM:
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
    checkpoint's (as mlx-lm's load does: a 4-bit model stays 4-bit in memory); "auto" is what
    the command line runs: the dtype that computes fastest here (compute_dtype.for_fast_compute:
    float32 on a CPU with a fast BLAS, at up to 6x the memory of a 4-bit model; else the
    checkpoint's). adapter_path: a folder of fine-tuned adapters to apply (unfused; see
    `mlx-mobilellm fuse` to merge them). The tokenizer is None when the source has none.
    """
    if dtype is not None and dtype != "auto" and dtype not in DTYPES:
        raise ParameterError(lambda name: f"{name('dtype')} {dtype!r} is not one of "
                                          f"{', '.join(DTYPES)} or auto")
    from .formats.sources import open_checkpoint

    checkpoint = open_checkpoint(path)
    eos = checkpoint.config.eos_token_ids
    if checkpoint.gguf_metadata is not None:
        tokenizer = tokenizer_from_gguf_metadata(checkpoint.gguf_metadata, checkpoint.origin, eos)
    else:
        tokenizer = tokenizer_from_files(read_tokenizer_files(checkpoint.folder), checkpoint.origin, eos)
    if tokenizer is not None:
        check_fits_model(tokenizer, checkpoint.config.vocab_size, checkpoint.origin)
    model = build_model(checkpoint.config, checkpoint.weights, checkpoint.origin,
                        None if dtype == "auto" else dtype, checkpoint.quantization,
                        checkpoint.source_name)
    if dtype == "auto":
        model = for_fast_compute(model)
    if adapter_path is not None:  # after the compute dtype: for_fast_compute rebuilds the model
        from .lora import load_adapters

        load_adapters(model, adapter_path)
    return model, tokenizer

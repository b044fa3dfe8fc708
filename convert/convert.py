"""Any supported checkpoint → an MLX model folder, streaming tensor by tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from mlx_mobilellm.errors import ParameterError
from mlx_mobilellm.formats.model_folder import folder_config
from mlx_mobilellm.formats.sources import Checkpoint, open_checkpoint
from mlx_mobilellm.loading import DTYPES
from mlx_mobilellm.models.mobilellm import MobileLLM

from .destination import check_destination
from .progress import progress
from .writer import MAX_SHARD_BYTES, write_model_folder

Q_BITS = (2, 3, 4, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)


def quantizable_weights(model: MobileLLM) -> set:
    """Names of the weights mx.quantize applies to: every linear layer and the embedding
    (with tied embeddings the head then reads the quantized embedding)."""
    return {f"{path}.weight" for path, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Embedding))}


def _check_group_size(checkpoint: Checkpoint, q_group_size: int) -> None:
    """Refuse a group size that does not divide every quantized layer's input width, rather
    than quietly leaving those layers in float."""
    names = quantizable_weights(MobileLLM(checkpoint.config))
    odd = sorted(n for n in names if checkpoint.weights[n].shape[-1] % q_group_size)
    if odd:
        width = checkpoint.weights[odd[0]].shape[-1]
        fits = [g for g in Q_GROUP_SIZES if all(checkpoint.weights[n].shape[-1] % g == 0 for n in names)]
        raise ParameterError(lambda name: (
            f"{name('q_group_size')} {q_group_size} does not divide the width {width} of "
            f"'{odd[0]}' ({len(odd)} layer(s) in all); use {name('q_group_size')} "
            f"{' or '.join(map(str, fits)) or '?'}"))


def _tensor_converter(checkpoint: Checkpoint, dtype: Optional[str], q_bits: Optional[int],
                      q_group_size: int):
    """A function from one source tensor to the output tensors it becomes: cast, and
    quantized into (weight, scales, biases) where it is a quantizable weight. All lazy: the
    data is read and transformed when the shard writer evaluates it."""
    target = DTYPES[dtype] if dtype else None
    quantize = quantizable_weights(MobileLLM(checkpoint.config)) if q_bits else set()

    def convert_tensor(name: str, array: mx.array) -> list:
        if target is not None and mx.issubdtype(array.dtype, mx.floating):
            array = array.astype(target)
        if name not in quantize:
            return [(name, array)]
        weight, scales, biases = mx.quantize(array, group_size=q_group_size, bits=q_bits)
        module = name[: -len(".weight")]
        return [(name, weight), (f"{module}.scales", scales), (f"{module}.biases", biases)]

    return convert_tensor


def _model_card(checkpoint: Checkpoint, dtype, quantization) -> str:
    quantized = (f"{quantization['bits']}-bit, group size {quantization['group_size']}"
                 if quantization else "no")
    return (f"# {Path(checkpoint.origin).name}\n\n"
            f"MLX model folder written by mlx-mobilellm's converter.\n\n"
            f"- source: `{checkpoint.origin}` ({checkpoint.source_format})\n"
            f"- dtype: {dtype or 'as the source'}\n"
            f"- quantization: {quantized}\n\n"
            "Load it with `mlx_mobilellm.load(path)`; export it back with "
            "`mlx-mobilellm export --model PATH --hf-path OUT`.\n")


def convert(source, mlx_path, *, source_format: Optional[str] = None, dtype: Optional[str] = None,
            quantize: bool = False, q_bits: int = 4, q_group_size: int = 64, force: bool = False,
            quiet: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Convert `source` (see mlx_mobilellm.formats.sources) into the MLX model folder `mlx_path`."""
    if dtype is not None and dtype not in DTYPES:
        raise ParameterError(lambda name: f"{name('dtype')} {dtype!r} is not one of "
                                          f"{', '.join(DTYPES)}")
    if quantize and (q_bits not in Q_BITS or q_group_size not in Q_GROUP_SIZES):
        raise ParameterError(lambda name: (
            f"{name('q_bits')} must be one of {Q_BITS} and {name('q_group_size')} one of "
            f"{Q_GROUP_SIZES}; got {q_bits} and {q_group_size}"))
    check_destination(mlx_path, force, [source])  # before the (long) reading
    checkpoint = open_checkpoint(source, source_format, quiet)
    if quantize and checkpoint.quantization:
        raise ParameterError(lambda name: f"{checkpoint.origin}: is already quantized; convert it "
                                          f"without {name('quantize')} (or from a float checkpoint)")
    checkpoint.validate()
    if quantize:
        _check_group_size(checkpoint, q_group_size)

    quantization = checkpoint.quantization
    if quantize:
        quantization = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
    convert_tensor = _tensor_converter(checkpoint, dtype, q_bits if quantize else None,
                                       q_group_size)

    def converted():
        names = list(checkpoint.weights)
        for name in progress(names, len(names), "converting", quiet):
            # Popped, so that each source tensor is freed once converted.
            yield from convert_tensor(name, checkpoint.weights.pop(name))

    return write_model_folder(
        mlx_path, converted(), folder_config(checkpoint.config, quantization, checkpoint.export_format),
        checkpoint, _model_card(checkpoint, dtype, quantization), force=force, sources=[source],
        max_shard_bytes=max_shard_bytes)

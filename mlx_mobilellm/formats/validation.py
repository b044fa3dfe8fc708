"""A checkpoint's tensors against its config: the sizes before a model is built (a config that
claims a million layers would otherwise build for hours), then every parameter of the built
model with its shape and dtype."""

from __future__ import annotations

import re
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import CheckpointError
from ..models.config import MobileLLMConfig

_LAYER_INDEX = re.compile(r"decoder\.layers\.(\d+)\.")


def same_name(name: str) -> str:
    return name


def _refuse_missing(missing: list, where: str) -> None:
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:3])}{more}")


def check_layer_count(count, weights: dict, where: str, field: str) -> None:
    """A config may not claim more layers than the tensors hold. The model is built before
    its weights are compared with it, and a claim of a million layers would build for hours."""
    held = len({match[1] for match in map(_LAYER_INDEX.match, weights) if match})
    if isinstance(count, int) and count > held:
        raise CheckpointError(f"{where}: {field} is {count}, but the weights hold {held} "
                              "layer(s); the config does not match the weights")


def check_sizes(config: MobileLLMConfig, weights: dict, where: str,
                source_name: Callable[[str], str] = same_name,
                source_field: Callable[[str], str] = same_name) -> None:
    """The config's sizes against the tensors', before a model of that config is built: the
    layer count, and each width a layer is built with, by the rows of a tensor of that width
    (rows, because quantization packs a weight's columns but never its rows). Errors name
    tensors and fields as the checkpoint does (source_name, source_field map our names)."""
    check_layer_count(config.num_layers, weights, where, source_field("num_layers"))
    head = config.dim_per_head
    sizes = [
        (source_field("vocab_size"), config.vocab_size, "embed_tokens.weight"),
        (source_field("embed_dim"), config.embed_dim, "decoder.norm.weight"),
        (source_field("hidden_dim"), config.hidden_dim, "decoder.layers.0.ffn.up_proj.weight"),
        (f"{source_field('num_heads')} ({config.num_heads}) x head width ({head})",
         config.num_heads * head, "decoder.layers.0.attention.q_proj.weight"),
        (f"{source_field('num_kv_heads')} ({config.num_kv_heads}) x head width ({head})",
         config.num_kv_heads * head, "decoder.layers.0.attention.k_proj.weight"),
    ]
    _refuse_missing([source_name(tensor) for _, _, tensor in sizes if tensor not in weights], where)
    for described, size, tensor in sizes:
        shape = tuple(weights[tensor].shape)
        if shape[:1] != (size,):
            raise CheckpointError(f"{where}: {described} = {size}, but tensor '{source_name(tensor)}' "
                                  f"has shape {shape}; the config does not match the weights")


def _dtype_name(dtype) -> str:
    return str(dtype).rpartition(".")[2]  # "float32", not "mlx.core.float32"


def _dtype_fits(array: mx.array, parameter: mx.array) -> bool:
    """Float parameters may come in any float dtype (they are cast); packed quantized weights
    only in theirs (uint32): the quantized matmul reads nothing else."""
    if mx.issubdtype(parameter.dtype, mx.floating):
        return mx.issubdtype(array.dtype, mx.floating)
    return array.dtype == parameter.dtype


def check_weights(model: nn.Module, weights: dict, where: str,
                  source_name: Callable[[str], str] = same_name) -> None:
    """Every parameter present with its shape and a dtype it can take, and nothing else.
    Errors name the tensor as the user's checkpoint does (source_name maps our names to the
    checkpoint's)."""
    expected = dict(tree_flatten(model.parameters()))
    for name, array in weights.items():
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor '{source_name(name)}'")
        if tuple(array.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{where}: tensor '{source_name(name)}' has shape {tuple(array.shape)} but the "
                f"config needs {tuple(expected[name].shape)}; config.json does not match the weights")
        if not _dtype_fits(array, expected[name]):
            wanted = ("a float dtype" if mx.issubdtype(expected[name].dtype, mx.floating)
                      else _dtype_name(expected[name].dtype))
            raise CheckpointError(f"{where}: tensor '{source_name(name)}' has dtype "
                                  f"{_dtype_name(array.dtype)} but must have {wanted}: the file "
                                  "is corrupt")
    _refuse_missing([source_name(name) for name in sorted(set(expected) - set(weights))], where)

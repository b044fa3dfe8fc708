"""Choosing the dtype to compute in when the user did not ask for one.

On Apple GPUs (Metal) quantized and half-precision matmuls are fast: keep the checkpoint's.
MLX's CPU backend has no fast path for them — bfloat16/float16 and quantized matmuls run in
plain loops, while float32 goes through BLAS — so there float32 is faster (see
benchmarks/generate.py for the figures), at the cost of memory.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models.mobilellm import MobileLLM


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def dequantized(model: MobileLLM) -> MobileLLM:
    """A float32 copy of `model` with every quantized layer dequantized."""
    weights = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights[f"{path}.weight"] = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits,
                mode=module.mode)
    for name, array in tree_flatten(model.parameters()):
        module_path, leaf = name.rsplit(".", 1)
        if f"{module_path}.weight" in weights and leaf in ("weight", "scales", "biases"):
            continue
        weights[name] = array
    result = MobileLLM(model.config)
    result.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()])
    result.train(model.training)
    return result


def for_fast_compute(model: MobileLLM) -> MobileLLM:
    """The model as it computes fastest on the current device (see the module docstring)."""
    if not on_cpu():
        return model
    params = tree_flatten(model.parameters())
    if all(p.dtype == mx.float32 for _, p in params):
        return model
    return dequantized(model)

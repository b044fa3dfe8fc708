"""The float weights that quantized layers stand for."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

QUANTIZED_LAYERS = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def dequantize(weight: mx.array, scales: mx.array, biases, group_size: int, bits: int,
               mode: str = "affine", exact: bool = False) -> mx.array:
    """The float weight packed in (weight, scales, biases), in the scales' dtype; with exact, in
    float32 and without rounding: a b-bit integer times a 16-bit scale plus a 16-bit bias fits
    float32's 24-bit mantissa (in float16 or bfloat16 the product would be rounded)."""
    if exact:
        scales = scales.astype(mx.float32)
        biases = None if biases is None else biases.astype(mx.float32)
    return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode=mode)


def layer_weight(layer: nn.Module) -> mx.array:
    """The weight a linear or embedding layer computes with: dequantized when it is quantized."""
    if isinstance(layer, QUANTIZED_LAYERS):
        return dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits,
                          layer.mode)
    return layer.weight

"""Choosing the dtype to compute in when the user did not ask for one.

On Apple GPUs (Metal) quantized and half-precision matmuls are fast: keep the checkpoint's.
MLX's CPU backend has no fast path for them — bfloat16/float16 and quantized matmuls run in
plain loops, while float32 goes through BLAS — so there float32 is faster *when the BLAS is*:
with OpenBLAS preloaded, prefill ran 4.6-15x and decode 1.3-1.6x faster in float32 (see
benchmarks/generate.py), but the reference BLAS bundled in Linux's mlx-cpu wheel (~6 GFLOP/s)
made the demo model slower in float32 than in 4-bit. So the choice is measured: a small
float32 matmul, timed once per process. mlx_mobilellm loads a system OpenBLAS by itself when
there is one (mlx_mobilellm/blas.py); when there is none, slow_blas_note() says how to get it.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .blas import INSTALL_HINT
from .models.mobilellm import MobileLLM
from .quantization import QUANTIZED_LAYERS, layer_weight


# A float32 GEMM faster than this means an optimised BLAS (OpenBLAS, Accelerate: 100+);
# MLX's bundled reference BLAS manages about 6 on the same machine.
FAST_BLAS_GFLOPS = 30.0


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


@lru_cache(maxsize=1)
def float32_gflops() -> float:
    """Measured float32 matmul speed on the default device (a few milliseconds, once)."""
    size = 384
    a = mx.random.normal((size, size))
    mx.eval(a @ a)  # warm-up: allocation, threads
    start = time.perf_counter()
    for _ in range(3):
        mx.eval(a @ a)
    return 3 * 2 * size**3 / (time.perf_counter() - start) / 1e9


def dequantized(model: MobileLLM) -> MobileLLM:
    """A float32 copy of `model` with every quantized layer dequantized."""
    weights = {f"{path}.weight": layer_weight(module) for path, module in model.named_modules()
               if isinstance(module, QUANTIZED_LAYERS)}
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
    """The model as it computes fastest on the current device (see the module docstring):
    float32 on a CPU with a fast BLAS, else as loaded."""
    if not on_cpu() or float32_gflops() < FAST_BLAS_GFLOPS:
        return model
    params = tree_flatten(model.parameters())
    if all(p.dtype == mx.float32 for _, p in params):
        return model
    return dequantized(model)


def slow_blas_note() -> Optional[str]:
    """One line for the user when MLX computes on the CPU with a slow reference BLAS (Linux's
    mlx[cpu] wheel, with no system OpenBLAS found), else None."""
    if not on_cpu() or float32_gflops() >= FAST_BLAS_GFLOPS:
        return None
    return (f"note: MLX's CPU backend runs on a slow reference BLAS here ({float32_gflops():.0f} "
            f"GFLOP/s); `{INSTALL_HINT}` makes it tens of times faster, and mlx-mobilellm loads "
            "it by itself")

"""Forward and training-step throughput, and what gradient checkpointing saves: ours vs mlx-lm.

Prints one JSON document to stdout (progress goes to stderr). mlx-lm runs the same weights:
its llama4_text model (what MobileLLM-R1 is on Hugging Face) loaded from ours by name, and the
script checks both give the same logits (fp32) before timing anything.

    python benchmarks/forward.py  # ~4 min
    python benchmarks/forward.py --shapes ckpt-8x256 --tokens 256 --repeats 1  # bundled BLAS: ~3 min

Each figure is the median of --repeats timed runs (default 2, to keep the default run short on
two cores) after one warm-up run. Peak memory is MLX's own counter, weights included.

On Linux, MLX's CPU wheel bundles a reference BLAS; preloading OpenBLAS makes fp32 GEMM ~30x
faster. bf16/fp16 matmuls on the CPU backend use no BLAS either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import mlx_mobilellm  # noqa: F401 - before mlx.core: it loads a fast BLAS (mlx_mobilellm/blas.py)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from common import Runner, attempt, log, machine, mlx_lm_runner, share_weights
from mlx_mobilellm.models import MobileLLM, MobileLLMConfig, get_mobilellm_config

# name: (config, batch, tokens per row)
SHAPES = {
    "ckpt-8x256": (lambda: MobileLLMConfig(num_layers=8, num_heads=8, num_kv_heads=2, embed_dim=256,
                                           hidden_dim=1024, vocab_size=4096), 2, 1024),
    "r1-140m": (lambda: get_mobilellm_config("140m"), 1, 256),
}
LOGITS_TOLERANCE = 1e-3  # max abs difference between our and mlx-lm's fp32 logits


def ours_runner(model: MobileLLM) -> Runner:
    def set_checkpointing(on):
        model.enable_gradient_checkpointing() if on else model.disable_gradient_checkpointing()
    return Runner(model, lambda ids: model(ids).logits, lambda ids: model(ids, labels=ids).loss,
                  set_checkpointing)


def timed(fn: Callable, tokens: int, repeats: int) -> dict:
    """Median tokens/s and peak memory of fn() over repeats (warm up before calling), and the
    memory held before the runs (weights, inputs). fn()'s result is dropped at once, so one
    run's outputs are freed before the next starts."""
    resident = mx.get_active_memory()
    times, peak = [], 0
    for _ in range(repeats):
        mx.reset_peak_memory()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        peak = max(peak, mx.get_peak_memory())
    return {"tokens_per_s": round(tokens / statistics.median(times), 1),
            "peak_memory_mb": round(peak / 2**20, 1), "resident_memory_mb": round(resident / 2**20, 1)}


def forward(runner: Runner, ids: mx.array, repeats: int) -> dict:
    run = lambda: mx.eval(runner.logits(ids))  # noqa: E731
    run()  # warm-up
    return timed(run, ids.size, repeats)


def train_step(runner: Runner, ids: mx.array):
    """(loss, grads) of one training step, evaluated."""
    loss, grads = nn.value_and_grad(runner.model, runner.loss)(ids)
    mx.eval(loss, grads)
    return loss, grads


def train(runner: Runner, ids: mx.array, repeats: int, checkpointing: bool) -> dict:
    """Training-step figures. The warm-up step's loss and gradients come back too, under
    "_step", to compare plain and checkpointed steps; the gradients are NumPy copies, outside
    MLX's memory counters, so keeping them does not move the peaks measured after them."""
    runner.set_checkpointing(checkpointing)
    try:
        loss, grads = train_step(runner, ids)
        step = {"loss": loss.item(),
                "grads": [np.array(g.astype(mx.float32)) for _, g in tree_flatten(grads)]}
        del loss, grads
        return {**timed(lambda: train_step(runner, ids), ids.size, repeats), "_step": step}
    finally:
        runner.set_checkpointing(False)


def checkpointing_effect(plain: dict, ckpt: dict, plain_step: dict, ckpt_step: dict) -> dict:
    return {
        "peak_memory_saving_percent": round(100 * (1 - ckpt["peak_memory_mb"] / plain["peak_memory_mb"]), 1),
        "loss": plain_step["loss"],
        "loss_abs_diff": abs(ckpt_step["loss"] - plain_step["loss"]),
        "grad_max_abs_diff": max(float(np.abs(a - b).max())
                                 for a, b in zip(plain_step["grads"], ckpt_step["grads"])),
    }


def bench(runner: Runner, ids: mx.array, repeats: int) -> dict:
    out = {"forward": attempt(lambda: forward(runner, ids, repeats))}
    for key, checkpointing in (("train", False), ("train_checkpointed", True)):
        log(f"  {key}")
        out[key] = attempt(lambda: train(runner, ids, repeats, checkpointing))
    steps = [out[key].pop("_step", None) for key in ("train", "train_checkpointed")]
    if None not in steps:
        out["checkpointing"] = checkpointing_effect(out["train"], out["train_checkpointed"], *steps)
    return out


def max_logit_diff(a: Runner, b: Runner, ids: mx.array) -> float:
    return mx.abs(a.logits(ids).astype(mx.float32) - b.logits(ids).astype(mx.float32)).max().item()


def bench_shape(name: str, batch: int, tokens: int, dtype, repeats: int) -> dict:
    make_config, default_batch, default_tokens = SHAPES[name]
    config = make_config()
    batch, tokens = batch or default_batch, tokens or default_tokens
    mx.random.seed(0)
    ours = ours_runner(MobileLLM(config))
    mx.eval(ours.model.parameters())
    ids = mx.random.randint(0, config.vocab_size, (batch, tokens))
    result = {"batch": batch, "tokens": tokens, "parameters": ours.model.num_parameters(),
              "config": config.to_dict()}

    theirs = attempt(lambda: mlx_lm_runner(config))
    if isinstance(theirs, Runner):
        share_weights(ours.model, theirs.model)
        fp32_diff = attempt(lambda: max_logit_diff(ours, theirs, ids))
        if isinstance(fp32_diff, dict):  # mlx-lm could not run a forward pass
            theirs, result["mlx_lm"] = None, fp32_diff
        else:
            result["logits_max_abs_diff_fp32"] = fp32_diff
            assert fp32_diff <= LOGITS_TOLERANCE, f"{name}: ours and mlx-lm disagree ({fp32_diff})"
    else:
        theirs, result["mlx_lm"] = None, theirs

    if dtype != mx.float32:
        ours.model.set_dtype(dtype)
        if theirs is not None:
            share_weights(ours.model, theirs.model)
            result[f"logits_max_abs_diff_{dtype_name(dtype)}"] = max_logit_diff(ours, theirs, ids)
    for impl, runner in (("ours", ours), ("mlx_lm", theirs)):
        if runner is not None:
            log(f"{name}: {impl} ({batch} x {tokens} tokens)")
            result[impl] = bench(runner, ids, repeats)
    return result


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up")
    parser.add_argument("--batch", type=int, help="rows per batch (default: per shape)")
    parser.add_argument("--tokens", type=int, help="tokens per row (default: per shape)")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    try:
        import mlx_lm
        mlx_lm_version = mlx_lm.__version__
    except Exception as error:  # noqa: BLE001
        mlx_lm_version = f"not importable: {error}"
    report = {"machine": machine(dtype=dtype_name(dtype), mlx_lm=mlx_lm_version), "repeats": args.repeats,
              "shapes": {name: bench_shape(name, args.batch, args.tokens, dtype, args.repeats)
                         for name in args.shapes}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

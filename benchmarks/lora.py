"""LoRA fine-tuning step time and peak memory, with and without gradient checkpointing: ours
vs mlx-lm, on the same weights and the same batches.

Prints one JSON document to stdout (progress goes to stderr). Our MobileLLM (random weights,
R1-shaped) gets adapters from mlx_mobilellm.lora.apply_adapters; mlx-lm's llama4_text model is
loaded with the same weights by name (common.share_weights) and gets its own LoRA layers
(mlx_lm.tuner.utils.linear_to_lora_layers), whose A matrices are then set to ours, so both
sides start from identical adapters too. Both: rank 8, scale 20, dropout 0 on q/k/v/o and
gate/up/down of every layer, Adam at lr 1e-5. Each run restores the initial adapters and
starts a fresh optimizer, so every run's first loss is the model's initial loss; the script
asserts ours and mlx-lm's agree (< 1e-3) before timing anything.

    python benchmarks/lora.py  # ~4 min

Ours is stepped as our trainer steps it (its TrainingStep: loss and gradients of
model(inputs, labels=labels).loss, then the optimizer update, each compiled with the model,
optimizer and random state), and also with MLX's compilation switched off around that step.
mlx-lm is stepped as its trainer steps it (mlx_lm.tuner.trainer.default_loss inside mx.compile
with model/optimizer/random state), and also without compile. The uncompiled sides separate
compilation from the model code.
Checkpointing: model.enable_gradient_checkpointing() vs mlx_lm.tuner.trainer.grad_checkpoint
(which patches the block class; restored after each run).

A batch is (batch, tokens + 1) random ids: mlx-lm's default_loss feeds the first `tokens` and
predicts the last `tokens`; ours takes all tokens + 1 as inputs and labels (it shifts inside),
so both score the same batch x tokens targets (ours computes one extra position per row).
Figures: median seconds per step over --steps timed steps after --warmup steps, tokens/s
(targets per step / median), and peak memory (mx.get_peak_memory, reset before each timed
step; the max over them), weights included. The four sides' steps interleave (order rotating
every step), so load from other work on the machine weighs on all alike; all four models share
one copy of the base weights, so every peak includes the same resident memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import mlx_mobilellm  # noqa: F401 - before mlx.core: it loads a fast BLAS (mlx_mobilellm/blas.py)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from common import attempt, log, machine, mlx_lm_runner, share_weights
from mlx_mobilellm.formats.names import from_ours
from mlx_mobilellm.lora import DEFAULT_TARGETS, LoRALinear, apply_adapters
from mlx_mobilellm.models import MobileLLM, get_mobilellm_config
from mlx_mobilellm.training.distributed import world
from mlx_mobilellm.training.trainer import TrainingArgs, TrainingStep

LORA = {"fine_tune_type": "lora", "rank": 8, "scale": 20.0, "dropout": 0.0, "keys": list(DEFAULT_TARGETS)}
LEARNING_RATE = 1e-5
LOSS_TOLERANCE = 1e-3  # |ours - mlx-lm| at step 1
MEMORY_TARGET = 0.60  # our checkpointed peak / plain peak
SHAPES = {
    # MobileLLM-R1-140M's layout (qk-norm, 9 heads / 3 KV, width 576, tied embeddings,
    # traditional RoPE), fewer layers and a smaller vocabulary to run in minutes on 2 cores.
    "r1-8x576": lambda: dataclasses.replace(get_mobilellm_config("140m"), num_layers=8,
                                            hidden_dim=1536, vocab_size=8192, bos_token_id=None,
                                            eos_token_id=None, pad_token_id=None),
    "r1-140m": lambda: get_mobilellm_config("140m"),
}


def theirs_lora(theirs: nn.Module, ours: MobileLLM) -> None:
    """mlx-lm's LoRA on the same layers as ours, with our adapter weights (theirs are
    transposed: A is (in, rank), B is (rank, out))."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    keys = {from_ours(f"decoder.layers.0.{path}.weight", "llama4_text")
            .removeprefix("model.layers.0.").removesuffix(".weight")
            for path, _ in ours.decoder.layers[0].named_modules() if path.split(".")[-1] in LORA["keys"]
            and isinstance(_, LoRALinear)}
    theirs.freeze()
    linear_to_lora_layers(theirs, len(theirs.layers),
                          {"rank": LORA["rank"], "scale": LORA["scale"], "dropout": LORA["dropout"],
                           "keys": keys})
    weights = []
    for path, module in ours.named_modules():
        if isinstance(module, LoRALinear):
            name = from_ours(f"{path}.weight", "llama4_text").removesuffix(".weight")
            weights += [(f"{name}.lora_a", module.lora_a.T), (f"{name}.lora_b", module.lora_b.T)]
    theirs.load_weights(weights, strict=False)
    ours_names = {n for n, _ in tree_flatten(ours.trainable_parameters())}
    theirs_names = {n for n, _ in tree_flatten(theirs.trainable_parameters())}
    assert len(ours_names) == len(theirs_names) == len(weights), (len(ours_names), len(theirs_names))
    assert {n for n, _ in weights} == theirs_names, "mlx-lm's adapters are not on the same layers"


@dataclass
class Side:
    """One implementation as the benchmark steps it."""
    make_step: Callable  # (model, optimizer, compiled) -> (batch -> loss)
    model: nn.Module
    initial: list  # its adapters before training, restored before each run
    set_checkpointing: Callable  # bool -> None
    compiled: bool


def ours_step(model: MobileLLM, optimizer, compiled: bool) -> Callable:
    """batch -> loss, one optimizer step, evaluated: our trainer's TrainingStep, and without
    compiled, the same step with MLX's compilation switched off around it."""
    training_step = TrainingStep(model, optimizer, TrainingArgs(), world())

    def step(batch):
        # One process: its rows are the whole batch (weight 1, as distributed.shard gives it).
        loss, grads = training_step.loss_and_gradients([(batch, batch, mx.array(1.0))])
        training_step.apply(grads)
        return loss

    def uncompiled_step(batch):
        mx.disable_compile()
        try:
            return step(batch)
        finally:
            mx.enable_compile()
    return step if compiled else uncompiled_step


def theirs_step(model: nn.Module, optimizer, compiled: bool) -> Callable:
    """batch -> loss, one optimizer step, evaluated: mlx-lm's default_loss, and with compiled,
    its trainer's mx.compile (model, optimizer and random state as inputs and outputs)."""
    from mlx_lm.tuner.trainer import default_loss

    loss_and_grad = nn.value_and_grad(model, default_loss)

    def update(batch, lengths):
        (loss, _), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        return loss

    if compiled:
        state = [model.state, optimizer.state, mx.random.state]
        update = partial(mx.compile, inputs=state, outputs=state)(update)

    def step(batch):
        lengths = mx.array([[0, batch.shape[1]]] * batch.shape[0])  # every target counts
        loss = update(batch, lengths)
        mx.eval(loss, model.state, optimizer.state)
        return loss.item()
    return step


def run(sides: dict, batches: list, warmup: int, checkpointing: bool) -> dict:
    """Fresh adapters and optimizer per side; warm-up steps, then timed steps with the sides
    interleaved (their order rotating every step), so that other load on the machine weighs
    on all of them alike. sides: name -> Side."""
    steps = {}
    for name, side in sides.items():
        side.model.load_weights(side.initial, strict=False)
        side.model.train()
        side.set_checkpointing(checkpointing)
    try:
        for name, side in sides.items():
            steps[name] = attempt(lambda: side.make_step(side.model, optimizer=optim.Adam(
                learning_rate=LEARNING_RATE), compiled=side.compiled))
        out = {name: {"losses": [], "step_s": [], "peak": 0} for name in sides}
        for number, batch in enumerate(batches):
            order = list(sides)
            order = order[number % len(order):] + order[:number % len(order)]
            for name in order:
                if isinstance(steps[name], dict):  # could not build the step
                    continue
                mx.reset_peak_memory()
                start = time.perf_counter()
                loss = attempt(lambda: steps[name](batch))
                elapsed = time.perf_counter() - start
                if isinstance(loss, dict):
                    steps[name] = loss
                    continue
                out[name]["losses"].append(loss)
                if number >= warmup:
                    out[name]["step_s"].append(elapsed)
                    out[name]["peak"] = max(out[name]["peak"], mx.get_peak_memory())
    finally:
        for side in sides.values():
            side.set_checkpointing(False)
    targets = batches[0].shape[0] * (batches[0].shape[1] - 1)
    result = {}
    for name, figures in out.items():
        if isinstance(steps[name], dict):
            result[name] = steps[name]
            continue
        median = statistics.median(figures["step_s"])
        result[name] = {"step_s_median": round(median, 4), "step_s": [round(t, 4) for t in figures["step_s"]],
                        "tokens_per_s": round(targets / median, 1),
                        "peak_memory_mb": round(figures["peak"] / 2**20, 1), "losses": figures["losses"]}
    return result


def first_losses(ours: MobileLLM, theirs: nn.Module, batch: mx.array) -> tuple:
    from mlx_lm.tuner.trainer import default_loss

    ours_loss = ours(batch, labels=batch).loss.item()
    theirs_loss = default_loss(theirs, batch, mx.array([[0, batch.shape[1]]] * batch.shape[0]))[0].item()
    return ours_loss, theirs_loss


def bench_shape(name: str, batch: int, tokens: int, warmup: int, steps: int) -> dict:
    config = SHAPES[name]()
    mx.random.seed(0)
    ours = MobileLLM(config)
    mx.eval(ours.parameters())
    # Two mlx-lm models on the same base arrays (no copy), compiled and not: each side keeps
    # its own adapters and optimizer while the steps interleave.
    theirs_runners = [mlx_lm_runner(config) for _ in range(2)]
    for runner in theirs_runners:
        share_weights(ours, runner.model)  # before the adapters: base weights only, HF names
    ours_uncompiled = MobileLLM(config)  # likewise for ours: the step compiled and not
    ours_uncompiled.load_weights(tree_flatten(ours.parameters()), strict=True)
    for model in (ours, ours_uncompiled):
        apply_adapters(model, LORA)  # the uncompiled one gets ours' A matrices in run()
    mx.eval(ours.parameters())
    for runner in theirs_runners:
        theirs_lora(runner.model, ours)
        mx.eval(runner.model.parameters())
    theirs = theirs_runners[0].model

    batches = [mx.random.randint(0, config.vocab_size, (batch, tokens + 1)) for _ in range(warmup + steps)]
    mx.eval(batches)
    result = {"batch": batch, "tokens": tokens, "targets_per_step": batch * tokens,
              "parameters": ours.num_parameters(),
              "trainable_parameters": sum(p.size for _, p in tree_flatten(ours.trainable_parameters())),
              "config": config.to_dict()}

    loss_ours, loss_theirs = first_losses(ours, theirs, batches[0])
    result["step1_loss"] = {"ours": loss_ours, "mlx_lm": loss_theirs, "abs_diff": abs(loss_ours - loss_theirs)}
    assert abs(loss_ours - loss_theirs) < LOSS_TOLERANCE, f"losses disagree: {result['step1_loss']}"

    def initial(model):
        return [(n, mx.array(p)) for n, p in tree_flatten(model.trainable_parameters())]

    def checkpointing_of(model):
        return lambda on: (model.enable_gradient_checkpointing() if on
                           else model.disable_gradient_checkpointing())

    sides = {
        "ours": Side(ours_step, ours, initial(ours), checkpointing_of(ours), True),
        "ours_uncompiled": Side(ours_step, ours_uncompiled, initial(ours),
                                checkpointing_of(ours_uncompiled), False),
        "mlx_lm": Side(theirs_step, theirs, initial(theirs), theirs_runners[0].set_checkpointing, True),
        "mlx_lm_uncompiled": Side(theirs_step, theirs_runners[1].model, initial(theirs_runners[1].model),
                                  theirs_runners[1].set_checkpointing, False),
    }
    result["resident_memory_mb"] = round(mx.get_active_memory() / 2**20, 1)
    for side in sides:
        result[side] = {}
    for key, checkpointing in (("plain", False), ("checkpointed", True)):
        log(f"{name}: {key}, {', '.join(sides)} interleaved ({batch} x {tokens} tokens, "
            f"{warmup} + {steps} steps)")
        figures = attempt(lambda: run(sides, batches, warmup, checkpointing))
        for side in sides:
            result[side][key] = figures.get(side, figures) if "error" not in figures else figures
    result["summary"] = summary(result)
    return result


def summary(result: dict) -> dict:
    out = {}
    ours = result["ours"]
    if "error" not in ours["plain"] and "error" not in ours["checkpointed"]:
        ratio = ours["checkpointed"]["peak_memory_mb"] / ours["plain"]["peak_memory_mb"]
        out["ours_peak_checkpointed_over_plain"] = round(ratio, 3)
        out["ours_peak_target_met"] = ratio <= MEMORY_TARGET
    for other in ("mlx_lm", "mlx_lm_uncompiled", "ours_uncompiled"):
        for key in ("plain", "checkpointed"):
            a, b = ours[key], result[other][key]
            if "error" in a or "error" in b:
                continue
            ratio = a["step_s_median"] / b["step_s_median"]
            out[f"ours_step_time_over_{other}_{key}"] = round(ratio, 3)
            out[f"ours_peak_over_{other}_{key}"] = round(a["peak_memory_mb"] / b["peak_memory_mb"], 3)
            # Same weights, same batches, same optimizer: the loss curves should match too.
            out[f"loss_max_abs_diff_vs_{other}_{key}"] = max(
                abs(x - y) for x, y in zip(a["losses"], b["losses"]))
    if "error" not in result["mlx_lm"]["plain"] and "error" not in result["mlx_lm"]["checkpointed"]:
        out["mlx_lm_peak_checkpointed_over_plain"] = round(
            result["mlx_lm"]["checkpointed"]["peak_memory_mb"] / result["mlx_lm"]["plain"]["peak_memory_mb"], 3)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["r1-8x576"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512, help="targets per row (inputs: tokens + 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, allocate)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    args = parser.parse_args()
    import mlx_lm

    report = {"machine": machine(dtype="float32", mlx_lm=mlx_lm.__version__),
              "lora": LORA, "optimizer": f"Adam lr {LEARNING_RATE}",
              "warmup": args.warmup, "steps": args.steps,
              "shapes": {name: bench_shape(name, args.batch, args.tokens, args.warmup, args.steps)
                         for name in args.shapes}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Data-parallel LoRA training step time and tokens/s at 1 and 2 ranks: the same model shape,
global batch and batches, launched with `mlx.launch -n N --backend ring` (TCP on 127.0.0.1).

Prints one JSON document to stdout (progress goes to stderr).

    python benchmarks/distributed.py  # ~2 min on 2 cores

For each rank count this script runs itself (`--worker`): under mlx.launch for 2 ranks or
more, as a plain process for 1 (the one-rank group every unlaunched run has; MLX 0.32's
`mlx.launch -n 1 --backend ring` fails in mx.distributed.init). Every rank
builds the same MobileLLM (random weights, seed 0; by default an 8-layer R1-140M-shaped model
with an 8192-token vocabulary, as benchmarks/lora.py) with the same LoRA adapters (rank 8,
scale 20, dropout 0, q/k/v/o and gate/up/down of every layer; rank 0's adapters are shared to
the others as the trainer does), the same Adam (lr 1e-5), and the same global batches of
random ids (batch x tokens + 1, every position a target). It steps them as our trainer does:
distributed.shard gives each rank its rows and their share of the tokens, TrainingStep
(compiled) computes the loss and gradients, sums them over the ranks (one all_sum per dtype)
and applies the update. Timed: that whole step, from shard to the evaluated update, on rank 0
(the all_sum keeps the ranks in step), for --steps steps after --warmup untimed ones (compile,
allocate). The rank counts alternate for --rounds rounds (1, 2, 1, 2), each a fresh launch,
so that other load on the machine weighs on both alike. Figures per rank count: median step
seconds over every round's timed steps (and each round's median), global tokens/s (batch x
tokens per step / median), the losses; and the speed-up of 2 ranks over 1 (1-rank median / 2-rank median),
with the largest loss difference between the runs (they train the same global batches, so it
is rounding).

On one machine the ranks share its cores, so there the speed-up mostly shows the cost of the
second process and the ring's communication; across several machines (a --hostfile to
mlx.launch) it would be the real gain. Each rank's OpenBLAS would start a thread per core, and
2 ranks x 2 threads on 2 cores measured 10.5 s a step against 1.8 s for 1 rank here, so by
default each run gets OPENBLAS_NUM_THREADS = cores // ranks (1 rank: 2 threads, 2 ranks: 1
each; an OPENBLAS_NUM_THREADS already set is kept); --oversubscribe leaves the threads alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import mlx_mobilellm  # noqa: F401 - before mlx.core: it loads a fast BLAS (mlx_mobilellm/blas.py)
import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from common import blas_threads_per_rank, log, machine, run_workers
from mlx_mobilellm.lora import DEFAULT_TARGETS, apply_adapters
from mlx_mobilellm.models import MobileLLM, get_mobilellm_config
from mlx_mobilellm.training import distributed
from mlx_mobilellm.training.trainer import TrainingArgs, TrainingStep

LORA = {"fine_tune_type": "lora", "rank": 8, "scale": 20.0, "dropout": 0.0, "keys": list(DEFAULT_TARGETS)}
LEARNING_RATE = 1e-5
SHAPES = {
    # As benchmarks/lora.py: MobileLLM-R1-140M's layout, 8 layers and a smaller vocabulary.
    "r1-8x576": lambda: dataclasses.replace(get_mobilellm_config("140m"), num_layers=8,
                                            hidden_dim=1536, vocab_size=8192, bos_token_id=None,
                                            eos_token_id=None, pad_token_id=None),
    "r1-140m": lambda: get_mobilellm_config("140m"),
}
MARKER = "DISTRIBUTED-BENCHMARK-RESULT "


def worker(settings: dict) -> None:
    """One rank: train settings["warmup"] + settings["steps"] steps, rank 0 prints the figures."""
    group = distributed.world()
    config = SHAPES[settings["shape"]]()
    mx.random.seed(0)
    model = MobileLLM(config)
    apply_adapters(model, LORA)
    mx.eval(model.parameters())
    model.train()
    args = TrainingArgs(batch_size=settings["batch"], learning_rate=LEARNING_RATE, optimizer="adam",
                        lr_schedule="constant")
    distributed.check_batch_size(args.batch_size, group)
    optimizer = optim.Adam(learning_rate=LEARNING_RATE)
    optimizer.init(model.trainable_parameters())
    distributed.share_main_state(model, optimizer, 0, group)
    step = TrainingStep(model, optimizer, args, group)

    mx.random.seed(1)  # the same global batches on every rank and at every rank count
    total = settings["warmup"] + settings["steps"]
    batches = [mx.random.randint(0, config.vocab_size, (settings["batch"], settings["tokens"] + 1))
               for _ in range(total)]
    mx.eval(batches)
    losses, times = [], []
    for number, batch in enumerate(batches):
        mx.random.seed(distributed.step_seed(0, number + 1, group))
        start = time.perf_counter()
        loss, grads = step.loss_and_gradients([distributed.shard(batch, batch, group)])
        step.apply(grads)
        elapsed = time.perf_counter() - start
        losses.append(loss)
        if number >= settings["warmup"]:
            times.append(elapsed)
        if distributed.is_main(group):
            log(f"  {group.size()} rank(s): step {number + 1}/{total} {elapsed:.3f} s, loss {loss:.4f}")
    if distributed.is_main(group):
        print(MARKER + json.dumps({
            "ranks": group.size(), "losses": losses, "step_s": times,
            "parameters": model.num_parameters(),
            "trainable_parameters": sum(p.size for _, p in tree_flatten(model.trainable_parameters())),
            "peak_memory_mb_rank0": round(mx.get_peak_memory() / 2**20, 1),
            "config": config.to_dict()}), flush=True)


def launch(ranks: int, settings: dict, timeout: float, blas_threads) -> dict:
    """Run the worker on `ranks` local ranks (common.run_workers); its figures, or the error:
    rank 0's result line is what says it worked."""
    log(f"{settings['batch']} x {settings['tokens']} tokens, {settings['warmup']} + "
        f"{settings['steps']} steps")
    run = run_workers(__file__, ranks, settings, timeout, blas_threads, MARKER)
    if "error" in run:
        return run
    if not run["records"]:
        return {"error": f"no result from rank 0 ({run['output']})"}
    figures, wall = run["records"][-1], run["wall_s"]
    median = statistics.median(figures["step_s"])
    targets = settings["batch"] * settings["tokens"]
    figures.update(launcher="plain process" if ranks == 1 else "mlx.launch --backend ring",
                   openblas_num_threads=run["openblas_num_threads"],
                   step_s_median=round(median, 4), step_s=[round(t, 4) for t in figures["step_s"]],
                   tokens_per_s=round(targets / median, 1),
                   launch_wall_s=round(wall, 1))  # start-up, model, compile and every step
    return figures


def pooled(results: list, settings: dict) -> dict:
    """One rank count's rounds: the median over all their timed steps, and each round's."""
    errors = [r for r in results if "error" in r]
    if errors:
        return errors[0]
    first = results[0]
    step_s = [t for r in results for t in r["step_s"]]
    median = statistics.median(step_s)
    return {"ranks": first["ranks"], "launcher": first["launcher"],
            "openblas_num_threads": first["openblas_num_threads"],
            "step_s_median": round(median, 4),
            "tokens_per_s": round(settings["batch"] * settings["tokens"] / median, 1),
            "step_s_median_per_round": [r["step_s_median"] for r in results],
            "step_s": step_s, "launch_wall_s": [r["launch_wall_s"] for r in results],
            "peak_memory_mb_rank0": max(r["peak_memory_mb_rank0"] for r in results),
            "parameters": first["parameters"], "trainable_parameters": first["trainable_parameters"],
            "losses": first["losses"],
            # Every round trains from the same start on the same batches.
            "losses_same_every_round": all(r["losses"] == first["losses"] for r in results),
            "config": first["config"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="r1-8x576")
    parser.add_argument("--batch", type=int, default=4, help="global batch (rows), split over the ranks")
    parser.add_argument("--tokens", type=int, default=128, help="targets per row (inputs: tokens + 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, allocate)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of every rank count, alternating (1, 2, 1, 2, ...)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launch")
    parser.add_argument("--oversubscribe", action="store_true",
                        help="leave each rank's BLAS threads alone (by default each rank gets "
                             "OPENBLAS_NUM_THREADS = cores // ranks, unless it is set already)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # set by launch()
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    settings = {"shape": args.shape, "batch": args.batch, "tokens": args.tokens,
                "warmup": args.warmup, "steps": args.steps}
    threads_note = ("each rank's BLAS threads left alone (--oversubscribe or "
                    "OPENBLAS_NUM_THREADS set)" if args.oversubscribe or "OPENBLAS_NUM_THREADS"
                    in os.environ else "OPENBLAS_NUM_THREADS = cores // ranks per rank")
    report = {"machine": machine(dtype="float32",
                                 launcher="mlx.launch --backend ring on 127.0.0.1 (1 rank: plain process)",
                                 blas_threads=threads_note),
              "note": ("All ranks ran on this one machine and shared its "
                       f"{os.cpu_count()} cores, so the speed-up shows mostly the cost of the "
                       "extra process and of the ring's all_sum over TCP on 127.0.0.1, not the "
                       "gain of data parallelism; on several machines (mlx.launch --hostfile) "
                       "each rank has its own cores and the speed-up would be real."),
              "lora": LORA, "optimizer": f"Adam lr {LEARNING_RATE}", **settings, "rounds": args.rounds,
              "targets_per_step": args.batch * args.tokens, "runs": {}}
    rounds = {ranks: [] for ranks in args.ranks}
    for number in range(args.rounds):  # 1, 2, 1, 2, ...: other load weighs on both alike
        for ranks in args.ranks:
            threads = blas_threads_per_rank(ranks, args.oversubscribe)
            log(f"round {number + 1}/{args.rounds}")
            rounds[ranks].append(launch(ranks, settings, args.timeout, threads))
    for ranks, results in rounds.items():
        report["runs"][str(ranks)] = pooled(results, settings)
    runs = report["runs"]
    one = runs.get("1")
    summary = {}
    for ranks, run in runs.items():
        if ranks == "1" or not one or "error" in one or "error" in run:
            continue
        summary[f"speedup_{ranks}_over_1"] = round(one["step_s_median"] / run["step_s_median"], 3)
        summary[f"loss_max_abs_diff_{ranks}_vs_1"] = max(
            abs(a - b) for a, b in zip(one["losses"], run["losses"]))
    report["summary"] = summary
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Pipeline-parallel generation: prefill and decode tokens/s, and the memory each rank holds,
with the model's blocks on 1 process and split over 2 (`mlx.launch -n 2 --backend ring`, TCP
on 127.0.0.1), on the same weights and prompt.

Prints one JSON document to stdout (progress goes to stderr).

    python benchmarks/pipeline.py  # ~1 min on 2 cores

Each run is this script as a worker (`--worker`): it loads the model as `mlx-mobilellm
generate` does (default: the built-in demo model, SmolLM2-135M-Instruct, in the compute dtype
`auto` picks: float32 with OpenBLAS on this CPU), splits it with
models/pipeline.split_into_stages (one process: unchanged), generates --warmup-tokens once
untimed (allocation), then greedy-generates --tokens tokens after a --prompt-tokens prompt with
stream_generate and reports its prefill and decode tokens/s (rank 0; every rank decodes alike).
Every rank reports the parameters it holds (its blocks plus the embedding) and its peak
memory, and the generated ids, which must be the same at every rank count. Rank counts
alternate for --rounds rounds; the figures are medians over the rounds.

On one machine the ranks share its cores, and a token passes every stage in turn, so a
pipeline is no faster here: what it shows is the cost of the hand-over per token (a send of
one hidden state per stage and a gather of the last) and how the memory divides. Its gain is
the model that fits only across several machines (mlx.launch --hostfile). As in
benchmarks/distributed.py each rank gets OPENBLAS_NUM_THREADS = cores // ranks by default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx_mobilellm  # noqa: F401 - before mlx.core: it loads a fast BLAS (mlx_mobilellm/blas.py)
import mlx.core as mx

from common import blas_threads_per_rank, log, machine, run_workers

MARKER = "PIPELINE-BENCHMARK-RESULT "


def worker(settings: dict) -> None:
    from mlx_mobilellm.demo import demo_model_path
    from mlx_mobilellm.generate import stream_generate
    from mlx_mobilellm.loading import load
    from mlx_mobilellm.models.pipeline import split_into_stages
    from mlx_mobilellm.training.distributed import world

    group = world()
    model, tokenizer = load(settings["model"] or demo_model_path(), "auto")
    split_into_stages(model, group)
    mx.eval(model.parameters())
    dtype = str(model.embed_tokens.weight.dtype)
    ids = [int(i) for i in mx.random.randint(0, 1000, (settings["prompt_tokens"],),
                                             key=mx.random.key(0))]
    list(stream_generate(model, tokenizer, ids, settings["warmup_tokens"]))
    mx.reset_peak_memory()
    start = time.perf_counter()
    responses = list(stream_generate(model, tokenizer, ids, settings["tokens"]))
    wall = time.perf_counter() - start
    last = responses[-1]
    print(MARKER + json.dumps({
        "rank": group.rank(), "ranks": group.size(), "dtype": dtype,
        "blocks_held": f"{model.decoder.layers[0].layer_idx}..{model.decoder.layers[-1].layer_idx}",
        "parameters_held": model.num_parameters(),
        "peak_memory_mb": round(mx.get_peak_memory() / 2**20, 1),
        "prompt_tps": last.prompt_tps, "generation_tps": last.generation_tps,
        "wall_s": wall, "generated": [r.token for r in responses]}), flush=True)


def run(ranks: int, settings: dict, timeout: float, threads) -> dict:
    """The figures of every rank of one launch (common.run_workers), or the error."""
    launch = run_workers(__file__, ranks, settings, timeout, threads, MARKER)
    if "error" in launch:
        return launch
    if len(launch["records"]) != ranks:
        return {"error": f"{len(launch['records'])} of {ranks} ranks reported ({launch['output']})"}
    return {"ranks": sorted(launch["records"], key=lambda r: r["rank"]),
            "openblas_num_threads": launch["openblas_num_threads"]}


def pooled(rounds: list) -> dict:
    errors = [r for r in rounds if "error" in r]
    if errors:
        return errors[0]
    main = [r["ranks"][0] for r in rounds]
    first = rounds[0]["ranks"]
    return {
        "prompt_tps_median": round(statistics.median(r["prompt_tps"] for r in main), 1),
        "generation_tps_median": round(statistics.median(r["generation_tps"] for r in main), 1),
        "generation_tps_per_round": [round(r["generation_tps"], 1) for r in main],
        "openblas_num_threads": rounds[0]["openblas_num_threads"], "dtype": first[0]["dtype"],
        "per_rank": [{"rank": r["rank"], "blocks_held": r["blocks_held"],
                      "parameters_held": r["parameters_held"],
                      "peak_memory_mb": max(run["ranks"][r["rank"]]["peak_memory_mb"]
                                            for run in rounds)} for r in first],
        # Greedy decoding of the same prompt: every rank, every round, one answer.
        "same_tokens_every_rank_and_round": all(
            r["generated"] == first[0]["generated"] for run in rounds for r in run["ranks"]),
        "generated": first[0]["generated"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model to load (default: the built-in demo model)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate (timed)")
    parser.add_argument("--warmup-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launch")
    parser.add_argument("--oversubscribe", action="store_true",
                        help="leave each rank's BLAS threads alone")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # set by run()
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    settings = {"model": args.model, "prompt_tokens": args.prompt_tokens, "tokens": args.tokens,
                "warmup_tokens": args.warmup_tokens}
    rounds = {ranks: [] for ranks in args.ranks}
    for number in range(args.rounds):  # 1, 2, 1, 2, ...: other load weighs on both alike
        for ranks in args.ranks:
            log(f"round {number + 1}/{args.rounds}")
            rounds[ranks].append(run(ranks, settings, args.timeout,
                                     blas_threads_per_rank(ranks, args.oversubscribe)))
    runs = {str(ranks): pooled(results) for ranks, results in rounds.items()}
    one = runs.get("1", {})
    summary = {}
    for ranks, figures in runs.items():
        if ranks == "1" or not one or "error" in one or "error" in figures:
            continue
        summary[f"decode_ratio_{ranks}_over_1"] = round(
            figures["generation_tps_median"] / one["generation_tps_median"], 3)
        summary[f"prefill_ratio_{ranks}_over_1"] = round(
            figures["prompt_tps_median"] / one["prompt_tps_median"], 3)
        summary[f"same_tokens_{ranks}_as_1"] = figures["generated"] == one["generated"]
    print(json.dumps({"machine": machine(launcher="mlx.launch --backend ring on 127.0.0.1 "
                                                  "(1 rank: plain process)"),
                      **settings, "model": args.model or "demo (SmolLM2-135M-Instruct)",
                      "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()

"""Generation speed as ratios ours / mlx-lm, measured interleaved in one process on the same
float32 weights: the demo model (SmolLM2-135M-Instruct: its Q4_1 GGUF dequantized and exported
as one Hugging Face folder that both sides load) and a random MobileLLM-R1-360M shape (a
transformers Llama4ForCausalLM folder, built as benchmarks/generate.py builds its shapes).

Two APIs each:
- seed: `MobileLLM.generate` (ids in, ids out) against mlx-lm's closest call, its
  `generate_step` consumed whole. Ours is timed from outside (it returns once): prefill is the
  call with max_new_tokens=1, decode the difference to the full call, per token; mlx-lm's from
  when its tokens arrive (prefill to the first, decode from the first to the last).
- stream: both sides' own public `stream_generate` (text and stats per token), timed from when
  each response arrives.
Every run ends with mx.synchronize(), so that work one run leaves queued (mlx-lm's
generate_step computes a step past max_tokens) does not slow the next one down.

The machine is shared: runs alternate ours/mlx-lm (ABBA order) round by round, and the JSON
holds per-round ratios and their medians; the first round is a warm-up and is not counted.
Greedy; EOS is switched off on both sides, so every run generates exactly --gen-tokens.

    python benchmarks/generation_ratios.py                     # ~8 min on 2 cores
    python benchmarks/generation_ratios.py --models demo --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_mobilellm  # noqa: F401 - first: it loads a fast BLAS before mlx.core does (blas.py)
import mlx.core as mx
import numpy as np

from common import log, machine

GENERATE_BENCHMARK = Path(__file__).with_name("generate.py")


def demo_folder(work: Path) -> Path:
    """The demo GGUF, dequantized to float32, as a Hugging Face Llama folder."""
    from convert.export import export_hf
    from mlx_mobilellm.demo import demo_model_path

    return export_hf(demo_model_path(), work / "demo-hf", model_type="llama", dtype="float32",
                     quiet=True)


def r1_folder(work: Path) -> Path:
    """A random float32 MobileLLM-R1-360M-shaped Hugging Face folder (in a child process, so
    torch stays out of the timed one)."""
    folder = work / "r1-360m-hf"
    subprocess.run([sys.executable, str(GENERATE_BENCHMARK), "--build", "360m", str(folder)],
                   check=True, stdout=subprocess.DEVNULL)
    return folder


MODELS = {"demo": demo_folder, "r1_360m": r1_folder}


def finished(figures: dict, tokens: list) -> tuple:
    mx.synchronize()
    return figures, tokens


def ours_seed(model, tokenizer, prompt: list, count: int):
    ids = mx.array([prompt])
    start = time.perf_counter()
    mx.eval(model.generate(ids, max_new_tokens=1, temperature=0.0, eos_token_id=[]))
    first = time.perf_counter()
    tokens = model.generate(ids, max_new_tokens=count, temperature=0.0, eos_token_id=[])
    tokens = tokens[0, len(prompt):].tolist()
    end = time.perf_counter()
    prefill = first - start
    return finished({"prompt_tps": len(prompt) / prefill,
                     "generation_tps": (count - 1) / (end - first - prefill)}, tokens)


def arrivals(responses, token_of) -> tuple:
    """(start, arrival times, tokens) of a stream of responses."""
    start = time.perf_counter()
    times, tokens = [], []
    for response in responses:
        times.append(time.perf_counter())
        tokens.append(token_of(response))
    return start, times, tokens


def streamed_figures(prompt: list, start: float, times: list, tokens: list) -> tuple:
    return finished({"prompt_tps": len(prompt) / (times[0] - start),
                     "generation_tps": (len(times) - 1) / (times[-1] - times[0])}, tokens)


def mlx_lm_seed(model, tokenizer, prompt: list, count: int):
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    steps = generate_step(mx.array(prompt), model, max_tokens=count, sampler=make_sampler(temp=0.0))
    return streamed_figures(prompt, *arrivals(steps, lambda step: step[0]))


def ours_stream(model, tokenizer, prompt: list, count: int):
    responses = mlx_mobilellm.stream_generate(model, tokenizer, prompt, count, eos_token_ids=[])
    return streamed_figures(prompt, *arrivals(responses, lambda r: r.token))


def mlx_lm_stream(model, tokenizer, prompt: list, count: int):
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    responses = stream_generate(model, tokenizer, prompt, count, sampler=make_sampler(temp=0.0))
    return streamed_figures(prompt, *arrivals(responses, lambda r: r.token))


RUNS = {"seed": {"ours": ours_seed, "mlx_lm": mlx_lm_seed},
        "stream": {"ours": ours_stream, "mlx_lm": mlx_lm_stream}}


def load_both(folder: Path) -> dict:
    import mlx_lm

    ours = mlx_mobilellm.load(folder)
    theirs = mlx_lm.load(str(folder))
    theirs[1].eos_token_ids = []  # generate every requested token, as ours does with []
    for model, _ in (ours, theirs):
        mx.eval(model.parameters())
    return {"ours": ours, "mlx_lm": theirs}


def summary(rounds: list) -> dict:
    """Medians over the counted rounds: each side's tokens/s and the ratios ours / mlx-lm."""
    out = {}
    for key, name in (("prompt_tps", "prefill"), ("generation_tps", "decode")):
        ratios = [r["ours"][key] / r["mlx_lm"][key] for r in rounds]
        out[name] = {"ours_tps": round(statistics.median(r["ours"][key] for r in rounds), 1),
                     "mlx_lm_tps": round(statistics.median(r["mlx_lm"][key] for r in rounds), 1),
                     "ratio": round(statistics.median(ratios), 3),
                     "ratios": [round(x, 3) for x in ratios]}
    return out


def bench_model(name: str, folder: Path, args) -> dict:
    sides = load_both(folder)
    vocab = sides["ours"][0].config.vocab_size
    prompt = np.random.RandomState(0).randint(0, vocab, args.prompt_tokens).tolist()
    count = args.gen_tokens[name]
    rounds = {api: [] for api in args.apis}
    tokens = {}
    for round_index in range(args.repeats + 1):  # round 0: warm-up
        order = ["ours", "mlx_lm"] if round_index % 2 else ["mlx_lm", "ours"]
        for api in args.apis:
            figures = {}
            for side in order:
                model, tokenizer = sides[side]
                figures[side], tokens[(api, side)] = RUNS[api][side](model, tokenizer, prompt, count)
            if round_index:
                rounds[api].append(figures)
        log(f"  {name}: round {round_index} done, load {os.getloadavg()[0]:.2f}")
    result = {api: summary(rounds[api]) for api in args.apis}
    result["same_tokens"] = len({tuple(t) for t in tokens.values()}) == 1
    result["gen_tokens"] = count
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--apis", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--demo-tokens", type=int, default=64, help="tokens to generate (demo)")
    parser.add_argument("--r1-tokens", type=int, default=32, help="tokens to generate (360M)")
    parser.add_argument("--repeats", type=int, default=5, help="counted rounds after a warm-up")
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temp dir)")
    args = parser.parse_args()
    args.gen_tokens = {"demo": args.demo_tokens, "r1_360m": args.r1_tokens}
    if min(args.gen_tokens.values()) < 2:
        parser.error("decode speed needs at least 2 generated tokens")

    from mlx_mobilellm import blas
    from mlx_mobilellm.compute_dtype import float32_gflops

    report = {"machine": machine(mlx_lm=__import__("mlx_lm").__version__, dtype="float32",
                                 blas_loaded=blas.loaded(),
                                 float32_gflops=round(float32_gflops(), 1)),
              "settings": {"prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
                           "sampling": "greedy", "order": "ABBA, per round"},
              "models": {}}
    work = Path(tempfile.mkdtemp(prefix="generation-ratios-", dir=args.workdir))
    try:
        for name in args.models:
            log(f"{name}: writing the float32 checkpoint")
            folder = MODELS[name](work)
            os.sync()  # write it back now, not during the timed runs
            report["models"][name] = bench_model(name, folder, args)
            shutil.rmtree(folder, ignore_errors=True)
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

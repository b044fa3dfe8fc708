"""Generation speed: prompt (prefill) and decode tokens/s and peak memory, ours vs mlx-lm, in
float32, bfloat16 and 4-bit; and what computing in float32 on the CPU gains.

Builds random MobileLLM-R1-shaped checkpoints with transformers (Llama4ForCausalLM, dense, tied
embeddings, QK-norm; float32, save_pretrained, in a child process so torch stays out of the
timed one) with a tiny tokenizer beside them, so each side loads the folder with its own loader
and generates with its own public `stream_generate`: what users get. bfloat16 and 4-bit
(group size 64) folders come from each side's own converter with the same options.
Prints one JSON document to stdout; progress goes to stderr.

    python benchmarks/generate.py --shapes 140m  # ~4 min
    python benchmarks/generate.py --shapes 950m --prompt-tokens 32 --gen-tokens 16 \
        --repeats 1                                   # ~8 min on 2 cores; its defaults: far longer

Timing: each figure is the median of --repeats runs after one warm-up run. `prompt_tps` is
prompt tokens / time from the call to the first token; `generation_tps` is (tokens - 1) / time
from the first token to the last; both measured here, the same way for both sides, from when
each streamed response arrives. `reported` holds what each side's responses say (mlx-lm's
generation_tps counts the first token too, over the time after it). Greedy; no EOS, so every
run generates exactly --gen-tokens. Peak memory is MLX's counter (weights included).

`cpu_compute_dtype` runs our bfloat16 and 4-bit models as loaded and after
`compute_dtype.for_fast_compute` (float32 on the CPU: MLX's CPU backend has BLAS only for
float32, while bfloat16 and quantized matmuls run in plain loops).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx_mobilellm  # before mlx.core: it loads a fast BLAS (mlx_mobilellm/blas.py)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from common import attempt, log, machine

# MobileLLM-R1's sizes (DESIGN.md); vocabulary 128256, head width 64.
SHAPES = {
    "140m": dict(num_hidden_layers=15, num_attention_heads=9, num_key_value_heads=3,
                 hidden_size=576, intermediate_size_mlp=2048),
    "360m": dict(num_hidden_layers=15, num_attention_heads=16, num_key_value_heads=4,
                 hidden_size=1024, intermediate_size_mlp=4096),
    "950m": dict(num_hidden_layers=22, num_attention_heads=24, num_key_value_heads=6,
                 hidden_size=1536, intermediate_size_mlp=6144),
}
VOCAB = 128256
# dtype setting -> converter options (the same names in ours and mlx-lm's convert); None: the
# float32 Hugging Face folder as it is.
SETTINGS = {
    "float32": None,
    "bfloat16": dict(dtype="bfloat16"),
    "4bit": dict(quantize=True, q_bits=4, q_group_size=64),
}


def build_checkpoint(shape: str, folder: Path) -> None:
    """A random float32 MobileLLM-R1-shaped Hugging Face folder with a one-token tokenizer
    (generated ids decode to ""), its config.json written the transformers-4 way too."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models

    sizes = SHAPES[shape]
    config = transformers.Llama4TextConfig(
        **sizes, vocab_size=VOCAB, head_dim=64, intermediate_size=sizes["intermediate_size_mlp"],
        moe_layers=[], no_rope_layers=[1] * sizes["num_hidden_layers"], use_qk_norm=True,
        tie_word_embeddings=True, attn_temperature_tuning=False, max_position_embeddings=32768,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        initializer_range=0.05)  # at the default 0.02 greedy decoding repeats one token at once
    torch.manual_seed(0)
    transformers.Llama4ForCausalLM(config).float().save_pretrained(folder)
    word_level = models.WordLevel({"<unk>": 0}, unk_token="<unk>")
    transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(word_level)).save_pretrained(folder)
    # mlx-lm reads rope_theta at the top level only (transformers 5 writes rope_parameters).
    config_file = folder / "config.json"
    hf = json.loads(config_file.read_text())
    hf["rope_theta"] = hf["rope_parameters"]["rope_theta"]
    config_file.write_text(json.dumps(hf, indent=2))


@dataclass
class Impl:
    """One implementation: its converter, loader and public streaming generator."""
    convert: Callable  # (hf_folder, out_folder, **SETTINGS options) -> None
    load: Callable  # folder -> (model, tokenizer)
    stream: Callable  # (model, tokenizer, prompt ids, max_tokens) -> iterator of responses


def ours() -> Impl:
    from convert.convert import convert

    return Impl(
        convert=lambda hf, out, **options: convert(hf, out, quiet=True, **options),
        load=mlx_mobilellm.load,
        stream=lambda model, tokenizer, ids, n: mlx_mobilellm.stream_generate(
            model, tokenizer, ids, max_tokens=n, temperature=0.0, eos_token_ids=[]))


def mlx_lm() -> Impl:
    from mlx_lm import load
    from mlx_lm.convert import convert
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    def quiet_convert(hf, out, **options):
        with contextlib.redirect_stdout(sys.stderr):  # it prints progress to stdout
            convert(str(hf), str(out), **options)

    greedy = make_sampler(temp=0.0)
    return Impl(
        convert=quiet_convert,
        load=lambda folder: load(str(folder)),
        stream=lambda model, tokenizer, ids, n: stream_generate(
            model, tokenizer, ids, max_tokens=n, sampler=greedy))


def generate_once(impl: Impl, model, tokenizer, prompt: list, max_tokens: int):
    """(figures, token ids) of one stream_generate call."""
    mx.reset_peak_memory()
    tokens, arrivals = [], []
    start = time.perf_counter()
    for response in impl.stream(model, tokenizer, prompt, max_tokens):
        arrivals.append(time.perf_counter())
        tokens.append(response.token)
    if len(tokens) != max_tokens:
        raise RuntimeError(f"generated {len(tokens)} tokens, not {max_tokens}")
    return {
        "prompt_tps": len(prompt) / (arrivals[0] - start),
        "generation_tps": (len(tokens) - 1) / (arrivals[-1] - arrivals[0]),
        "peak_memory_mb": mx.get_peak_memory() / 2**20,
        "reported": {"prompt_tps": response.prompt_tps,
                     "generation_tps": response.generation_tps},
    }, tokens


def median_figures(runs: list) -> dict:
    """Per key, the median over runs (the maximum for peak memory), rounded."""
    def combine(key, values):
        if isinstance(values[0], dict):
            return {k: combine(k, [v[k] for v in values]) for k in values[0]}
        return round((max if key == "peak_memory_mb" else statistics.median)(values), 1)
    return {key: combine(key, [run[key] for run in runs]) for key in runs[0]}


def bench_model(impl: Impl, model, tokenizer, prompt: list, args) -> dict:
    mx.eval(model.parameters())
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    _, tokens = generate_once(impl, model, tokenizer, prompt, args.gen_tokens)  # warm-up
    runs = [generate_once(impl, model, tokenizer, prompt, args.gen_tokens)[0]
            for _ in range(args.repeats)]
    return {**median_figures(runs), "weights_mb": round(weights / 2**20, 1), "_tokens": tokens}


def bench_setting(name: str, impl: Impl, hf: Path, setting: str, prompt: list, args,
                  work: Path) -> dict:
    """Figures for one implementation and dtype setting; for ours in bfloat16 and 4-bit also
    after for_fast_compute, under "_fast"."""
    folder = hf if SETTINGS[setting] is None else work / f"{name}-{setting}"
    try:
        if folder != hf:
            log(f"  {name}: converting to {setting}")
            impl.convert(hf, folder, **SETTINGS[setting])
            os.sync()  # write the files back now, not during the timed runs
        model, tokenizer = impl.load(folder)
        log(f"  {name}: generating ({setting})")
        result = attempt(lambda: bench_model(impl, model, tokenizer, prompt, args))
        if name == "ours" and setting != "float32":
            from mlx_mobilellm.compute_dtype import for_fast_compute

            log(f"  {name}: generating ({setting} -> for_fast_compute)")
            fast = for_fast_compute(model)
            del model
            result["_fast"] = attempt(lambda: bench_model(impl, fast, tokenizer, prompt, args))
        return result
    finally:
        if folder != hf:
            shutil.rmtree(folder, ignore_errors=True)
        gc.collect()


def ratio(a: dict, b: dict, key: str):
    return round(a[key] / b[key], 3) if key in a and key in b else None


def speedup(slow: dict, fast: dict) -> dict:
    return {"as_loaded": slow, "for_fast_compute": fast,
            "prefill_speedup": ratio(fast, slow, "prompt_tps"),
            "decode_speedup": ratio(fast, slow, "generation_tps")}


def bench_shape(shape: str, args, work: Path) -> dict:
    hf = work / f"hf-{shape}"
    log(f"{shape}: building a random float32 checkpoint in {hf}")
    subprocess.run([sys.executable, __file__, "--build", shape, str(hf)], check=True,
                   stdout=subprocess.DEVNULL)
    os.sync()  # write the checkpoint back now, not during the timed runs
    prompt = np.random.RandomState(0).randint(0, VOCAB, args.prompt_tokens).tolist()
    impls = {"ours": ours(), "mlx_lm": mlx_lm()}
    out = {"dtypes": {}, "cpu_compute_dtype": {}}
    try:
        for setting in args.dtypes:
            log(f"{shape}, {setting}:")
            figures = {name: attempt(lambda: bench_setting(name, impl, hf, setting, prompt, args, work))
                       for name, impl in impls.items()}
            tokens = {name: f.pop("_tokens", None) for name, f in figures.items()}
            if None not in tokens.values():
                figures["same_tokens"] = tokens["ours"] == tokens["mlx_lm"]
            figures["ours_over_mlx_lm"] = {
                "prefill": ratio(figures["ours"], figures["mlx_lm"], "prompt_tps"),
                "decode": ratio(figures["ours"], figures["mlx_lm"], "generation_tps")}
            fast = figures["ours"].pop("_fast", None)
            if fast is not None:
                fast.pop("_tokens", None)
                out["cpu_compute_dtype"][setting] = speedup(figures["ours"], fast)
            out["dtypes"][setting] = figures
    finally:
        shutil.rmtree(hf, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["140m", "950m"])
    parser.add_argument("--dtypes", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--build", nargs=2, metavar=("SHAPE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:  # the child process that writes a checkpoint
        build_checkpoint(args.build[0], Path(args.build[1]))
        return
    if args.gen_tokens < 2:
        parser.error("--gen-tokens must be at least 2 (decode speed needs two tokens)")

    report = {"machine": machine(mlx_lm=__import__("mlx_lm").__version__),
              "settings": {"prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                           "repeats": args.repeats, "sampling": "greedy",
                           "quantization": SETTINGS["4bit"]},
              "shapes": {}}
    work = Path(tempfile.mkdtemp(prefix="generate-bench-", dir=args.workdir))
    try:
        for shape in args.shapes:
            report["shapes"][shape] = bench_shape(shape, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

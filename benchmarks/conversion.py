"""What converting a MobileLLM-R1 checkpoint costs: seconds, peak memory, sizes on disk.

Builds a random checkpoint of MobileLLM-R1-950M's shape with transformers (Llama4ForCausalLM,
dense, tied embeddings, bfloat16, save_pretrained), then converts it with `python -m convert`
twice, each conversion in its own process so that its peak resident memory is its own:
bfloat16 -> bfloat16 (the default: the source's dtype) and -> 4-bit (group size 64).
Prints one JSON document to stdout; progress goes to stderr.

    python benchmarks/convert.py                 # 950m (about 1.8 GiB of weights)
    python benchmarks/convert.py --shape 140m    # quick check

Peak RSS is the child's ru_maxrss (os.wait4). On Linux a child's ru_maxrss starts from its
parent's RSS at fork, so this process stays lean: even the checkpoint is built in a child.
`import_rss_mib` is a process that only imports the converter; peak minus that is what the
conversion itself held.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

MIB = 2**20
# MobileLLM-R1's sizes (DESIGN.md); vocabulary 128256, head width 64, tied embeddings.
SHAPES = {
    "950m": dict(num_hidden_layers=22, num_attention_heads=24, num_key_value_heads=6,
                 hidden_size=1536, intermediate_size_mlp=6144),
    "140m": dict(num_hidden_layers=15, num_attention_heads=9, num_key_value_heads=3,
                 hidden_size=576, intermediate_size_mlp=2048),
}
PARAMETERS = {"950m": 949_685_760, "140m": 140_248_512}
CONVERSIONS = {
    "bf16_to_bf16": [],
    "bf16_to_4bit_g64": ["-q", "--q-bits", "4", "--q-group-size", "64"],
}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / MIB


def build_checkpoint(shape: str, folder: Path) -> int:
    """A random bfloat16 MobileLLM-R1-shaped checkpoint; returns its parameter count."""
    import torch
    import transformers

    sizes = SHAPES[shape]
    config = transformers.Llama4TextConfig(
        **sizes, vocab_size=128256, head_dim=64, intermediate_size=sizes["intermediate_size_mlp"],
        moe_layers=[], no_rope_layers=[1] * sizes["num_hidden_layers"], tie_word_embeddings=True,
        max_position_embeddings=32768, bos_token_id=128000, eos_token_id=128001,
        attn_temperature_tuning=False, dtype="bfloat16")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bfloat16: half the memory of float32
    try:
        model = transformers.Llama4ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    return count


def measure(argv: list, cwd: Path) -> dict:
    """Run argv as a child process in `cwd`: wall seconds, its peak RSS, its exit status."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        message = stderr.read().decode(errors="replace").strip()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {child.returncode}: {message[-2000:]}")
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss = usage.ru_maxrss / (MIB if sys.platform == "darwin" else 1024)
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(rss, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="950m")
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--build-into", help=argparse.SUPPRESS)  # internal: the child that builds
    args = parser.parse_args()
    if args.build_into:
        print(build_checkpoint(args.shape, Path(args.build_into)))
        return

    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.workdir))
    try:
        source = work / "source"
        log(f"building a random {args.shape} checkpoint in {source} ...")
        start = time.perf_counter()
        built = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--build-into",
                                str(source)], check=True, stdout=subprocess.PIPE, text=True)
        parameters = int(built.stdout)
        assert parameters == PARAMETERS[args.shape], parameters
        build_seconds = time.perf_counter() - start
        source_mib = folder_mib(source)
        weights_mib = sum(p.stat().st_size for p in source.glob("*.safetensors")) / MIB

        import_only = measure([sys.executable, "-c", "import convert.convert, mlx.core"], work)
        results = {}
        for name, flags in CONVERSIONS.items():
            out = work / name
            log(f"converting: {name} ...")
            figures = measure([sys.executable, "-m", "convert", "--hf-path", str(source),
                               "--mlx-path", str(out), "--quiet", *flags], work)
            config = json.loads((out / "config.json").read_text())
            output_mib = folder_mib(out)
            figures.update(
                output_mib=round(output_mib, 1),
                output_files=sorted(p.name for p in out.iterdir()),
                quantization=config.get("quantization"),
                peak_rss_over_source_size=round(figures["peak_rss_mib"] / source_mib, 3),
                conversion_rss_over_source_size=round(
                    (figures["peak_rss_mib"] - import_only["peak_rss_mib"]) / source_mib, 3),
                source_mib_per_second=round(source_mib / figures["seconds"], 1),
            )
            results[name] = figures
            log(f"  {figures['seconds']} s, peak RSS {figures['peak_rss_mib']} MiB")
            shutil.rmtree(out)

        print(json.dumps({
            "benchmark": "convert",
            "shape": args.shape,
            "parameters": parameters,
            "source": {"format": "llama4_text (Llama4ForCausalLM, save_pretrained)",
                       "dtype": "bfloat16", "size_mib": round(source_mib, 1),
                       "weights_mib": round(weights_mib, 1),
                       "files": sorted(p.name for p in source.iterdir()),
                       "build_seconds": round(build_seconds, 1)},
            "import_rss_mib": import_only["peak_rss_mib"],
            "conversions": results,
            "environment": {"platform": platform.platform(), "python": platform.python_version(),
                            "mlx": version("mlx"), "cpus": os.cpu_count()},
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

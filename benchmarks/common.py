"""What every benchmark script shares: logging to stderr, recording failures in the JSON
instead of crashing, the machine facts a figure is meaningless without, and mlx-lm's
llama4_text model carrying our weights (the comparison every benchmark makes)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx_mobilellm  # noqa: F401 - before mlx.core: it loads a fast BLAS (mlx_mobilellm/blas.py)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_mobilellm import blas
from mlx_mobilellm.formats.names import from_ours
from mlx_mobilellm.models import MobileLLM, MobileLLMConfig


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launched(ranks: int, command: list) -> list:
    """`command` run on `ranks` local ranks: under mlx.launch (ring backend, a free port) for
    2 or more, as a plain process for 1 (the one-rank group every unlaunched run has: MLX
    0.32's `mlx.launch -n 1 --backend ring` fails in mx.distributed.init, parsing the hostfile
    it wrote). mlx.launch exits 0 even when a rank fails: read the ranks' output."""
    if ranks == 1:
        return list(command)
    return [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(ranks), "--backend", "ring",
            "--starting-port", str(free_port()), *command]


def blas_threads_per_rank(ranks: int, oversubscribe: bool) -> Optional[int]:
    """OPENBLAS_NUM_THREADS for each of `ranks` local ranks: cores // ranks, so that they do not
    fight over the cores (2 ranks x 2 threads on 2 cores measured 10.5 s a training step
    against 1.8 s for 1 rank here); None leaves it alone (asked to, or set already)."""
    if oversubscribe or "OPENBLAS_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // ranks)


def run_workers(script: str, ranks: int, settings: dict, timeout: float, threads: Optional[int],
                marker: str) -> dict:
    """Run `script --worker SETTINGS_JSON` on `ranks` local ranks (launched), each with
    OPENBLAS_NUM_THREADS=threads (None: as it is): {"records": the JSON each rank printed after
    `marker`, "wall_s", "openblas_num_threads", "output": the output's tail, to show when
    records are missing}, or
    {"error"} on a timeout. The ranks' stderr (progress) is passed on."""
    command = launched(ranks, [sys.executable, str(Path(script).resolve()), "--worker",
                               json.dumps(settings)])
    env = dict(os.environ)
    if threads:
        env["OPENBLAS_NUM_THREADS"] = str(threads)
    log(f"{ranks} rank(s): {'plain process' if ranks == 1 else 'mlx.launch'}, "
        f"OPENBLAS_NUM_THREADS={env.get('OPENBLAS_NUM_THREADS', 'unset')}")
    start = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                                check=False)  # a failed rank is read from the output
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - start
    sys.stderr.write(result.stderr)
    records = [json.loads(line[len(marker):]) for line in result.stdout.splitlines()
               if line.startswith(marker)]
    return {"records": records, "wall_s": wall,
            "openblas_num_threads": env.get("OPENBLAS_NUM_THREADS"),
            "output": f"exit {result.returncode}: {(result.stdout + result.stderr)[-2000:]}"}


def attempt(fn: Callable):
    """fn()'s result, or the error as a string (so one failure does not lose the other figures)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - recorded in the JSON, not hidden
        log(f"  error: {error!r}")
        return {"error": f"{type(error).__name__}: {error}"}


def machine(**extra) -> dict:
    """Platform, CPU, load, MLX version and backend, and which BLAS the figures came from."""
    cpu = platform.processor()
    if not cpu and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {
        "platform": platform.platform(),
        "processor": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # other work on the CPUs
        "mlx": mx.__version__,
        "backend": str(mx.default_device()),
        "blas": blas.loaded() or "mlx bundled (reference)",
        **extra,
    }


@dataclass
class Runner:
    """One implementation, seen the same way by every measurement."""
    model: nn.Module
    logits: Callable  # ids -> (batch, seq, vocab)
    loss: Callable  # ids -> scalar mean next-token cross-entropy
    set_checkpointing: Callable  # bool -> None


def mlx_lm_runner(config: MobileLLMConfig) -> Runner:
    """mlx-lm's llama4_text model with our config; weights come from share_weights()."""
    from mlx_lm.models import llama4_text
    from mlx_lm.tuner.trainer import grad_checkpoint

    args = llama4_text.ModelArgs(
        model_type="llama4_text", hidden_size=config.embed_dim, num_attention_heads=config.num_heads,
        num_hidden_layers=config.num_layers, vocab_size=config.vocab_size,
        intermediate_size=config.hidden_dim, intermediate_size_mlp=config.hidden_dim,
        num_key_value_heads=config.num_kv_heads, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_base, head_dim=config.dim_per_head,
        tie_word_embeddings=config.tie_word_embeddings, use_qk_norm=config.use_qk_norm,
        no_rope_layers=[int(i not in config.nope_layers) for i in range(config.num_layers)],
    )
    model = llama4_text.Model(args)
    block = llama4_text.TransformerBlock
    plain_call = getattr(block, "_plain_call", block.__call__)
    block._plain_call = plain_call

    def set_checkpointing(on):
        # mlx-lm's trainer checkpoints by patching the block class itself.
        block.__call__ = plain_call
        if on:
            grad_checkpoint(model.layers[0])

    def loss(ids):
        logits = model(ids)[:, :-1].astype(mx.float32)  # fp32 loss, as ours computes it
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    return Runner(model, model, loss, set_checkpointing)


def share_weights(ours: MobileLLM, theirs: nn.Module) -> None:
    """Give mlx-lm's model our arrays (no copy), under Hugging Face names."""
    weights = [(from_ours(name, "llama4_text"), w) for name, w in tree_flatten(ours.parameters())]
    theirs.load_weights(weights, strict=True)

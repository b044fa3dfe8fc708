"""Serving speed as ratios ours / mlx-lm: `mlx-mobilellm server` and mlx-lm's `server`, both
OpenAI-compatible, load the same float32 Hugging Face folder (the demo model,
SmolLM2-135M-Instruct: its Q4_1 GGUF dequantized) and answer the same streaming chat
completions from 1, 4 and 16 concurrent clients.

Each client sends --requests-per-client requests one after another (a closed loop), greedy, with
a fixed max_tokens and a prompt no other request uses. Per request: the time to first token
(until the first SSE chunk with text) and the completion tokens (the usage chunk that
stream_options.include_usage asks for, else the chunks with text); per level: the wall time
from the first request sent to the last answer, so throughput = completion tokens / wall s.

One server runs at a time, on a free 127.0.0.1 port: started, polled on /health, warmed up with
one request (mlx-lm loads the model on the first request; ready_s counts both), loaded, stopped.
Both are restarted for every level and take turns going first from level to level (--first
picks who opens), so that other work on a shared machine does not favour one side. mlx-lm's
process gets our fast BLAS through LD_PRELOAD, as ours loads it itself (mlx_mobilellm/blas.py).
Both run with their default settings (ours batches up to 16 requests; mlx-lm decodes up to 32
and prefills up to 8 at once). The client
is http.client in threads: no client library, the same for both. same_text counts the prompts
both servers answered with the same text (greedy on the same weights: all, unless batching
changes the numerics).

    python benchmarks/server.py                     # ~3.5 min on 2 cores
    python benchmarks/server.py --concurrency 1 4 --requests-per-client 1 --max-tokens 8
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import mlx_mobilellm  # noqa: F401 - first: it loads a fast BLAS before mlx.core does (blas.py)
import numpy as np

from common import attempt, free_port, log, machine
from mlx_mobilellm import blas

HOST = "127.0.0.1"
SERVERS = {
    "ours": [sys.executable, "-m", "mlx_mobilellm.cli", "server"],
    "mlx_lm": [sys.executable, "-m", "mlx_lm", "server"],  # `-m mlx_lm.server` prints a deprecation
}
# 16 clients on 2 cores queue behind each other: a request may wait for many before its turn.
REQUEST_TIMEOUT_S = 600
STDERR_TAIL_LINES = 20


def demo_folder(work: Path) -> Path:
    """The demo GGUF, dequantized to float32, as a Hugging Face Llama folder."""
    from convert.export import export_hf
    from mlx_mobilellm.demo import demo_model_path

    return export_hf(demo_model_path(), work / "demo-hf", model_type="llama", dtype="float32",
                     quiet=True)


def server_env(name: str) -> dict:
    env = dict(os.environ)
    if name == "mlx_lm" and blas.loaded():
        # mlx-lm imports mlx.core with its bundled reference BLAS, tens of times slower than
        # the one our package loads: preload the same library so both compute alike.
        env["LD_PRELOAD"] = " ".join(filter(None, [blas.loaded(), env.get("LD_PRELOAD")]))
    return env


def stderr_tail(path: Path) -> list:
    lines = path.read_text(errors="replace").splitlines()
    return [line for line in lines if line.strip()][-STDERR_TAIL_LINES:]


def health(port: int) -> int | None:
    """/health's status code, or None while nothing answers on the port."""
    connection = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def wait_ready(process: subprocess.Popen, port: int, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while health(port) != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            tail = stderr_tail(log_path)
            what = (f"exited with code {process.returncode}" if process.poll() is not None
                    else f"not ready after {timeout:.0f} s")
            raise RuntimeError(f"server {what}; last stderr line: {tail[-1] if tail else '-'}")
        time.sleep(0.25)


@contextmanager
def running(name: str, folder: Path, work: Path, timeout: float):
    """The port of server `name` serving `folder`, stopped (terminate, then kill) on exit."""
    port = free_port(HOST)
    log_path = work / f"{name}-{port}.log"
    command = SERVERS[name] + ["--model", str(folder), "--port", str(port)]
    with open(log_path, "wb") as stderr:
        process = subprocess.Popen(command, stdout=stderr, stderr=stderr, stdin=subprocess.DEVNULL,
                                   env=server_env(name))
    try:
        wait_ready(process, port, log_path, timeout)
        yield port
    except Exception:
        log("\n    ".join(["  server stderr, last lines:", *stderr_tail(log_path)]))
        raise
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def chat_request(prompt: str, max_tokens: int) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()


def sse_chunks(response):
    """The JSON objects of an SSE stream, until `data: [DONE]` or the end of the body."""
    for line in response:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, other SSE fields
        data = line[len(b"data:"):].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


def stream_chat(port: int, prompt: str, max_tokens: int) -> dict:
    """One streaming chat completion: TTFT and end-to-end seconds, completion tokens, text."""
    start = time.perf_counter()
    connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("POST", "/v1/chat/completions", chat_request(prompt, max_tokens),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            body = response.read(300).decode(errors="replace")
            raise RuntimeError(f"HTTP {response.status}: {body}")
        first, pieces, usage = None, [], None
        for chunk in sse_chunks(response):
            if "error" in chunk:
                raise RuntimeError(f"error chunk: {chunk['error']}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first or time.perf_counter()
                    pieces.append(content)
    finally:
        connection.close()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("the stream carried no text")
    tokens = usage.get("completion_tokens") if usage else None
    return {"ttft_s": first - start, "latency_s": end - start, "text": "".join(pieces),
            "tokens": tokens if tokens is not None else len(pieces),
            "tokens_from": "usage" if tokens is not None else "chunks"}


def safe_request(port: int, prompt: str, max_tokens: int) -> dict:
    try:
        return stream_chat(port, prompt, max_tokens)
    except (OSError, http.client.HTTPException, ValueError, RuntimeError) as error:
        return {"error": f"{type(error).__name__}: {error}"}


def prompts_for(first_number: int, clients: int, per_client: int) -> list:
    """clients lists of distinct prompts, numbered from first_number: no request repeats
    another's, so that no server answers from a prompt cache what the other computes."""
    numbers = iter(range(first_number, first_number + clients * per_client))
    return [[f"In one sentence, tell me something about the number {next(numbers)}."
             for _ in range(per_client)] for _ in range(clients)]


def run_load(port: int, prompts: list, max_tokens: int) -> tuple:
    """Every client's requests in their own thread; (results in prompt order, wall seconds)."""
    def client(own):
        return [safe_request(port, prompt, max_tokens) for prompt in own]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        results = [r for own in pool.map(client, prompts) for r in own]
    return results, time.perf_counter() - start


def ms(seconds) -> float:
    return round(float(seconds) * 1000, 1)


def figures(results: list, wall: float, ready_s: float) -> dict:
    done = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r]
    out = {"requests": len(results), "failures": len(failed), "ready_s": round(ready_s, 2),
           "wall_s": round(wall, 2), "load_average_1min": round(os.getloadavg()[0], 2)}
    if failed:
        out["first_error"] = failed[0]["error"]
    if done:
        ttft = [r["ttft_s"] for r in done]
        tokens = sum(r["tokens"] for r in done)
        out.update(completion_tokens=tokens, throughput_tps=round(tokens / wall, 1),
                   ttft_p50_ms=ms(np.percentile(ttft, 50)), ttft_p95_ms=ms(np.percentile(ttft, 95)),
                   latency_mean_ms=ms(np.mean([r["latency_s"] for r in done])),
                   tokens_from=sorted({r["tokens_from"] for r in done}))
    return out


def serve_level(name: str, folder: Path, work: Path, prompts: list, args) -> tuple:
    """(figures, texts in prompt order) of server `name` under one level's load."""
    start = time.perf_counter()
    with running(name, folder, work, args.start_timeout) as port:
        try:  # loads the model (mlx-lm does it on the first request), compiles, warms up
            stream_chat(port, "Say hello.", args.max_tokens)
        except (OSError, http.client.HTTPException, ValueError, RuntimeError) as error:
            raise RuntimeError(f"the warm-up request failed: {error}") from error
        ready_s = time.perf_counter() - start
        results, wall = run_load(port, prompts, args.max_tokens)
    return figures(results, wall, ready_s), [r.get("text") for r in results]


def ratio(ours: dict, theirs: dict, key: str):
    if key in ours and key in theirs and theirs[key]:
        return round(ours[key] / theirs[key], 3)
    return None


def bench_level(index: int, clients: int, prompts: list, folder: Path, work: Path, broken: dict,
                args) -> dict:
    order = [args.first, *(name for name in SERVERS if name != args.first)]
    if index % 2:
        order.reverse()
    level, texts = {"order": order}, {}
    for name in order:
        log(f"concurrency {clients}: {name} (load {os.getloadavg()[0]:.2f})")
        if name in broken:  # failed to start at an earlier level: would fail the same way
            level[name] = broken[name]
            continue
        outcome = attempt(partial(serve_level, name, folder, work, prompts, args))
        if isinstance(outcome, dict):
            level[name] = broken[name] = outcome
            continue
        level[name], texts[name] = outcome
        log(f"  {json.dumps(level[name])}")
    level["ratios_ours_over_mlx_lm"] = {
        "throughput": ratio(level["ours"], level["mlx_lm"], "throughput_tps"),
        "ttft_p50": ratio(level["ours"], level["mlx_lm"], "ttft_p50_ms")}
    if len(texts) == 2:
        # The same prompts, in the same order.
        pairs = list(zip(texts["ours"], texts["mlx_lm"], strict=True))
        level["same_text"] = f"{sum(a == b and a is not None for a, b in pairs)} of {len(pairs)}"
    return level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a Hugging Face folder both servers load "
                                                   "(default: the demo model, float32)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--first", choices=list(SERVERS), default="mlx_lm",
                        help="the server that goes first at the first level (then they alternate)")
    parser.add_argument("--start-timeout", type=float, default=180,
                        help="seconds a server may take to answer /health")
    parser.add_argument("--workdir", help="where to write the checkpoint and the servers' logs "
                                          "(default: a temp dir)")
    args = parser.parse_args()
    if min(args.concurrency) < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        parser.error("--concurrency, --requests-per-client and --max-tokens must be positive")

    report = {"machine": machine(mlx_lm=__import__("mlx_lm").__version__,
                                 mlx_lm_blas=blas.loaded() and f"LD_PRELOAD={blas.loaded()}"),
              "settings": {"model": str(args.model or "demo (SmolLM2-135M-Instruct, float32)"),
                           "concurrency": args.concurrency,
                           "requests_per_client": args.requests_per_client,
                           "max_tokens": args.max_tokens, "sampling": "greedy",
                           "endpoint": "POST /v1/chat/completions, stream",
                           "order": f"per level, alternating; {args.first} first at the first",
                           "commands": {name: " ".join(cmd[1:]) + " --model M --port P"
                                        for name, cmd in SERVERS.items()}},
              "levels": {}}
    work = Path(tempfile.mkdtemp(prefix="server-bench-", dir=args.workdir))
    started = time.perf_counter()
    try:
        folder = args.model
        if folder is None:
            log("writing the float32 demo checkpoint")
            folder = demo_folder(work)
            os.sync()  # write it back now, not while the servers are timed
        broken, number = {}, 1000  # four-digit numbers: every prompt is as long as the others
        for index, clients in enumerate(args.concurrency):
            prompts = prompts_for(number, clients, args.requests_per_client)
            number += clients * args.requests_per_client
            report["levels"][str(clients)] = bench_level(index, clients, prompts, folder, work,
                                                         broken, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["runtime_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The process the fuzz tests hand their inputs to, one at a time (see fuzz_support.Worker).

An input that crashes (a signal) or hangs must not take the test run down with it, and must be
told apart from a clean error: here it kills only this process, which the tests restart. Each
request is a JSON line on stdin naming an operation on the library or the CLI; each reply a
line starting with REPLY: {"outcome": "ok" | "error" | "exit" | "unexpected", ...}.
  error       a CheckpointError: the library's clean refusal (its message is in "message")
  exit        the CLI's exit status with its stdout and stderr
  unexpected  any other exception, with its traceback: a defect
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import sys
import traceback

REPLY = "\x00fuzz-reply "


def _load(request: dict) -> None:
    import mlx.core as mx

    import mlx_mobilellm

    model, tokenizer = mlx_mobilellm.load(request["path"], adapter_path=request.get("adapter_path"))
    # A model that loads must also run (one token: its context may be that short).
    mx.eval(model(mx.array([[0]])).logits)
    if tokenizer is not None:
        tokenizer.decode(tokenizer.encode("hello world"))


def _tokenizer(request: dict) -> None:
    import mlx_mobilellm

    tokenizer = mlx_mobilellm.load_tokenizer(request["path"])
    tokenizer.decode(tokenizer.encode("hello world <|im_end|>"))
    if tokenizer.chat_template:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def _render(request: dict) -> None:
    from mlx_mobilellm.chat_template import render_chat_template

    render_chat_template(request["template"], request["messages"], bos_token="<s>",
                         eos_token="</s>")


def _dataset(request: dict) -> None:
    import mlx_mobilellm
    from mlx_mobilellm.training.data import iterate_batches, load_dataset

    tokenizer = mlx_mobilellm.load_tokenizer(request["tokenizer"])
    datasets = load_dataset(request["path"], tokenizer, request["max_seq_length"],
                            request["mask_prompt"])
    for examples in datasets.values():
        next(iterate_batches(examples, request["batch_size"], pad_id=0))


def _cli(request: dict) -> dict:
    from mlx_mobilellm.cli import main

    out, err = io.StringIO(), io.StringIO()
    stdin = sys.stdin
    sys.stdin = None if request.get("stdin") is None else io.StringIO(request["stdin"])
    cwd = os.getcwd()
    os.chdir(request["cwd"])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(request["argv"])
            except SystemExit as exit:  # argparse: --help, usage errors
                code = exit.code
    finally:
        os.chdir(cwd)
        sys.stdin = stdin
    return {"outcome": "exit", "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def _probe(request: dict) -> None:
    """What the harness's own test asks for: each way an input can end."""
    import signal
    import time

    from mlx_mobilellm.errors import CheckpointError

    behaviour = request["behaviour"]
    if behaviour == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif behaviour == "hang":
        time.sleep(3600)
    elif behaviour == "refuse":
        raise CheckpointError("refused")
    elif behaviour == "traceback":
        raise KeyError("a bug")


OPERATIONS = {"probe": _probe, "load": _load, "tokenizer": _tokenizer, "render": _render, "dataset": _dataset,
              "cli": _cli}


def handle(request: dict) -> dict:
    from mlx_mobilellm.errors import CheckpointError

    try:
        return OPERATIONS[request["op"]](request) or {"outcome": "ok"}
    except CheckpointError as error:
        return {"outcome": "error", "message": str(error)}
    except BaseException:  # noqa: B036 — everything else is what the fuzz tests look for
        return {"outcome": "unexpected", "traceback": traceback.format_exc()}


def main() -> None:
    faulthandler.enable()  # a crash prints where it happened, for the test's report
    replies = sys.stdout
    for line in sys.stdin:
        reply = handle(json.loads(line))
        replies.write(REPLY + json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()

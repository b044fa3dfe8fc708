"""`mlx-mobilellm evaluate`: the perplexity of a model on a text file or JSONL data, as one JSON
line on stdout."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import CheckpointError
from ..evaluation import DEFAULT_WINDOW, check_parameters, sequence_nlls, summary
from .generate import MODEL_OPTIONS, is_printing, load_for_generation
from .options import Option, add_options

EVALUATE_OPTIONS = (
    *MODEL_OPTIONS[:3],  # --model, --dtype, --adapter-path
    Option("data", None, "a .txt file (its whole text is scored) or a .jsonl file of "
           '{"text"}, {"prompt", "completion"} or {"messages"} lines, as `lora` reads them '
           "(each line scored on its own)", str, required=True),
    Option("max_seq_length", None, "tokens per scoring window; longer texts are scored in "
           f"windows that overlap by half (default: {DEFAULT_WINDOW}, or the model's context "
           "if shorter)", int),
    Option("batch_size", 4, "windows per model call", int),
)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, EVALUATE_OPTIONS)


def _read_data(path: Path) -> str:
    """The file's text, read before the model loads: a typo should not cost a load."""
    if path.suffix not in (".txt", ".jsonl"):
        raise CheckpointError(f"--data {path}: must be a .txt or a .jsonl file")
    if not path.is_file():
        raise CheckpointError(f"--data {path}: not found; give an existing .txt or .jsonl file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); "
                              "re-encode it as UTF-8") from None
    if not text.strip():
        raise CheckpointError(f"{path}: is empty; --data needs some text to score")
    return text


def _sequences(path: Path, text: str, tokenizer) -> list:
    """The token ids of each text in the file: one for a .txt file, one per JSONL line."""
    from ..training.data import load_split

    if path.suffix == ".txt":
        return [tokenizer.encode(text)]
    # Whole lines are scored, so nothing is truncated: the windows take any length.
    return [example.tokens for example in load_split(path, tokenizer, sys.maxsize, False)]


def run_evaluate(args: argparse.Namespace) -> None:
    check_parameters(args.max_seq_length, args.batch_size)  # what can be told before a load
    data = Path(args.data)
    text = _read_data(data)
    model, tokenizer = load_for_generation(args.model, args.dtype, args.adapter_path)
    start = time.perf_counter()
    nlls = sequence_nlls(model, _sequences(data, text, tokenizer), args.max_seq_length,
                         args.batch_size)
    try:
        result = summary(nlls, time.perf_counter() - start)
    except ValueError as error:  # every text shorter than two tokens
        raise CheckpointError(f"{data}: {error}") from None
    if is_printing():
        print(json.dumps({"data": str(data), **result}), flush=True)

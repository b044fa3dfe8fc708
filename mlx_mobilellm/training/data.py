"""Fine-tuning data: JSONL files of text, prompt/completion pairs or chat messages, tokenized
with a loss mask, and batched by length.

Each line is one of {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}.
With mask_prompt, the loss covers only the completion (or the last assistant message); the
prompt part of each example is labelled -100 and ignored by the loss.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

import mlx.core as mx

from ..chat_template import ChatTemplateError
from ..errors import CheckpointError, ParameterError
from ..models.mobilellm import IGNORE_INDEX
from ..input_checks import check_text

SPLITS = ("train", "valid", "test")


@dataclass
class Example:
    tokens: List[int]
    prompt_length: int
    """Leading tokens excluded from the loss when prompts are masked (0 otherwise)."""


def _chat_prompt(tokenizer, messages: list) -> list:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def encode_example(record: dict, tokenizer, mask_prompt: bool, where: str) -> Example:
    """Tokens and prompt length of one JSONL record."""
    if not isinstance(record, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(record).__name__}")
    eos = tokenizer.eos_token_ids[:1]
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise CheckpointError(f"{where}: 'messages' must be a non-empty list")
        for number, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise CheckpointError(f"{where}: messages[{number}] must be an object with "
                                      "string 'role' and 'content'")
            for field in ("role", "content"):
                check_text(message[field], f"{where}: messages[{number}].{field}")
        tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"),
                             default=None)
        if mask_prompt and last_assistant is None:
            raise ParameterError(lambda name: f"{where}: {name('mask_prompt')} needs an assistant "
                                              "message to learn")
        prompt = _chat_prompt(tokenizer, messages[:last_assistant]) if mask_prompt else []
        return Example(tokens, len(prompt))
    if "prompt" in record and "completion" in record:
        prompt_text, completion = record["prompt"], record["completion"]
        if not isinstance(prompt_text, str) or not isinstance(completion, str):
            raise CheckpointError(f"{where}: 'prompt' and 'completion' must be strings")
        check_text(prompt_text, f"{where}: 'prompt'")
        check_text(completion, f"{where}: 'completion'")
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt_text},
                        {"role": "assistant", "content": completion}]
            tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
            prompt = _chat_prompt(tokenizer, messages[:1])
        else:
            prompt = tokenizer.encode(prompt_text)
            tokens = prompt + tokenizer.encode(completion, add_special_tokens=False) + eos
        return Example(tokens, len(prompt) if mask_prompt else 0)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise CheckpointError(f"{where}: 'text' must be a string")
        check_text(record["text"], f"{where}: 'text'")
        if mask_prompt:
            raise ParameterError(lambda name: f"{where}: {name('mask_prompt')} needs "
                                              "prompt/completion or messages lines, not text")
        return Example(tokenizer.encode(record["text"]) + eos, 0)
    raise CheckpointError(f"{where}: a line needs 'text', 'prompt' and 'completion', or "
                          f"'messages'; found keys {sorted(record)}")


def load_split(path: Path, tokenizer, max_seq_length: int, mask_prompt: bool) -> List[Example]:
    """Every line of a JSONL file as an Example, truncated to max_seq_length (with a warning
    that counts them)."""
    examples, truncated = [], 0
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line.decode("utf-8"))
            except ValueError as error:  # UnicodeDecodeError is a ValueError too
                raise CheckpointError(f"{where}: not valid JSON ({error})") from None
            except RecursionError:
                raise CheckpointError(f"{where}: nested too deeply to be an example") from None
            try:
                example = encode_example(record, tokenizer, mask_prompt, where)
            except ChatTemplateError as error:  # the template's refusal, said of its line
                raise CheckpointError(f"{where}: {error}") from None
            if len(example.tokens) > max_seq_length:
                truncated += 1
                example.tokens = example.tokens[:max_seq_length]
            # Position 0 is never a target; a prompt covers its own positions.
            if max(example.prompt_length, 1) >= len(example.tokens):
                raise ParameterError(lambda name: f"{where}: nothing left to learn after the "
                                                  f"prompt within {name('max_seq_length')} "
                                                  f"{max_seq_length}")
            examples.append(example)
    if not examples:
        raise CheckpointError(f"{path}: has no examples; add some, or remove the file")
    if truncated:
        print(f"warning: {truncated} of {len(examples)} examples in {path} were longer than "
              f"--max-seq-length {max_seq_length} and were truncated", file=sys.stderr)
    return examples


def load_dataset(folder, tokenizer, max_seq_length: int = 2048, mask_prompt: bool = False) -> dict:
    """{split: [Example]} for the train/valid/test JSONL files present in `folder`."""
    folder = Path(folder)
    if not (folder / "train.jsonl").exists() and not (folder / "test.jsonl").exists():
        raise CheckpointError(f"{folder}: needs train.jsonl (and valid.jsonl; test.jsonl optional)")
    return {split: load_split(folder / f"{split}.jsonl", tokenizer, max_seq_length, mask_prompt)
            for split in SPLITS if (folder / f"{split}.jsonl").exists()}


def batch_arrays(examples: List[Example], pad_id: int):
    """(inputs, labels): right-padded token ids and labels with -100 on prompts and padding."""
    width = max(len(e.tokens) for e in examples)
    inputs, labels = [], []
    for e in examples:
        padding = width - len(e.tokens)
        inputs.append(e.tokens + [pad_id] * padding)
        labels.append([IGNORE_INDEX] * e.prompt_length + e.tokens[e.prompt_length:]
                      + [IGNORE_INDEX] * padding)
    return mx.array(inputs, dtype=mx.int32), mx.array(labels, dtype=mx.int32)


def length_grouped_batches(examples: List[Example], batch_size: int, seed: int,
                           epoch: int) -> List[List[int]]:
    """Index batches of similar lengths (little padding), in an order shuffled per epoch."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].tokens))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed * 1_000_003 + epoch).shuffle(batches)
    return batches


def iterate_batches(examples: List[Example], batch_size: int, pad_id: int, seed: int = 0,
                    start_step: int = 0, loop: bool = True) -> Iterator:
    """(inputs, labels) batches; with loop, epochs repeat forever. start_step skips that many
    batches so that a resumed run sees exactly the batches an uninterrupted one would."""
    if len(examples) < batch_size:
        raise ParameterError(lambda name: f"the dataset has {len(examples)} examples, fewer "
                                          f"than {name('batch_size')} {batch_size}")
    epoch, step = 0, 0
    while True:
        for indices in length_grouped_batches(examples, batch_size, seed, epoch):
            if step >= start_step:
                yield batch_arrays([examples[i] for i in indices], pad_id)
            step += 1
        if not loop:
            return
        epoch += 1

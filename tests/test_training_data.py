"""Fine-tuning data: each JSONL line format tokenized as expected (checked against the raw
`tokenizers` tokenizer and chat text written out by hand), prompt masks, truncation, errors
that name file:line, and length-grouped batches that a resumed run can replay."""

from __future__ import annotations

import json
import random

import mlx.core as mx
import numpy as np
import pytest

from generation_helpers import BOS, EOT, IM_END, IM_START, bpe_tokenizer, write_bpe_folder
from mlx_mobilellm.errors import CheckpointError
from mlx_mobilellm.tokenizer import load_tokenizer
from mlx_mobilellm.training.data import (Example, batch_arrays, iterate_batches, length_grouped_batches,
                                         load_dataset, load_split)

SYSTEM = "You are a tiny test model."


@pytest.fixture(scope="module")
def raw():
    """The same BPE straight from `tokenizers`: the independent reference."""
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    return load_tokenizer(write_bpe_folder(tmp_path_factory.mktemp("chat")))


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    return load_tokenizer(write_bpe_folder(tmp_path_factory.mktemp("plain"), chat_template=None))


def write_lines(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def one(tmp_path, tokenizer, record, mask_prompt=False, max_seq_length=1000):
    [example] = load_split(write_lines(tmp_path / "train.jsonl", record), tokenizer,
                           max_seq_length, mask_prompt)
    return example


def ids(raw, text, special=True):
    return raw.encode(text, add_special_tokens=special).ids


def chatml(*turns, generation_prompt=False):
    """The test template's text, written out by hand: BOS, default system message, turns."""
    text = BOS
    if turns[0][0] != "system":
        text += f"{IM_START}system\n{SYSTEM}{IM_END}\n"
    text += "".join(f"{IM_START}{role}\n{content.strip()}{IM_END}\n" for role, content in turns)
    return text + (f"{IM_START}assistant\n" if generation_prompt else "")


# --- line formats -----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["plain", "chat"])
def test_text_line_is_bos_text_eos(tmp_path, raw, which, plain_tokenizer, chat_tokenizer):
    tokenizer = plain_tokenizer if which == "plain" else chat_tokenizer
    text = "def add(a, b):\n    return a + b  # sum"
    example = one(tmp_path, tokenizer, {"text": text})
    assert example.tokens == ids(raw, text) + [raw.token_to_id(IM_END)]
    assert example.tokens[0] == raw.token_to_id(BOS)
    assert example.prompt_length == 0


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_prompt_completion_without_chat_template(tmp_path, raw, plain_tokenizer, mask_prompt):
    prompt, completion = "What is 2 + 2?", " Four, of course."
    example = one(tmp_path, plain_tokenizer, {"prompt": prompt, "completion": completion}, mask_prompt)
    assert example.tokens == ids(raw, prompt) + ids(raw, completion, False) + [raw.token_to_id(IM_END)]
    assert example.prompt_length == (len(ids(raw, prompt)) if mask_prompt else 0)


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_prompt_completion_with_chat_template(tmp_path, raw, chat_tokenizer, mask_prompt):
    prompt, completion = "Name a llama.", "Larry the llama."
    example = one(tmp_path, chat_tokenizer, {"prompt": prompt, "completion": completion}, mask_prompt)
    full = chatml(("user", prompt), ("assistant", completion))
    assert example.tokens == ids(raw, full, False)
    head = chatml(("user", prompt), generation_prompt=True)
    if mask_prompt:
        assert example.prompt_length == len(ids(raw, head, False))
        assert raw.decode(example.tokens[:example.prompt_length], skip_special_tokens=False) == head
        assert raw.decode(example.tokens[example.prompt_length:], skip_special_tokens=False) == \
            f"{completion}{IM_END}\n"
    else:
        assert example.prompt_length == 0


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("mask_prompt", [False, True])
def test_messages_line_masks_every_turn_before_the_last_answer(tmp_path, raw, chat_tokenizer,
                                                               mask_prompt, system):
    turns = ([("system", "Answer briefly.")] if system else []) + [
        ("user", "Hi there"), ("assistant", "Hello!"),
        ("user", "What is a llama?"), ("assistant", "A South American camelid.")]
    record = {"messages": [{"role": r, "content": c} for r, c in turns]}
    example = one(tmp_path, chat_tokenizer, record, mask_prompt)
    assert example.tokens == ids(raw, chatml(*turns), False)
    if mask_prompt:
        head = chatml(*turns[:-1], generation_prompt=True)
        assert example.prompt_length == len(ids(raw, head, False))
        learnt = raw.decode(example.tokens[example.prompt_length:], skip_special_tokens=False)
        assert learnt == f"A South American camelid.{IM_END}\n"
    else:
        assert example.prompt_length == 0


def test_labels_are_ignored_exactly_on_prompts_and_padding(tmp_path, raw, chat_tokenizer):
    records = [{"messages": [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "1"},
                             {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "2"}]},
               {"prompt": "A much longer question about llamas and alpacas?",
                "completion": "They are both camelids from South America."}]
    write_lines(tmp_path / "train.jsonl", *records)
    examples = load_dataset(tmp_path, chat_tokenizer, 512, mask_prompt=True)["train"]
    pad = raw.token_to_id(EOT)
    inputs, labels = batch_arrays(examples, pad)
    inputs, labels = np.array(inputs), np.array(labels)
    width = max(len(e.tokens) for e in examples)
    assert inputs.shape == labels.shape == (2, width)
    heads = [chatml(("user", "One?"), ("assistant", "1"), ("user", "Two?"), generation_prompt=True),
             chatml(("user", records[1]["prompt"]), generation_prompt=True)]
    for row, (example, head) in enumerate(zip(examples, heads)):
        n, p = len(example.tokens), len(ids(raw, head, False))
        assert inputs[row, :n].tolist() == example.tokens
        assert (inputs[row, n:] == pad).all()
        expected = [-100] * p + example.tokens[p:] + [-100] * (width - n)
        assert labels[row].tolist() == expected
        # what the loss counts decodes to the final answer and its end-of-turn marker only
        counted = [int(t) for t in labels[row, 1:] if t != -100]
        assert raw.decode(counted, skip_special_tokens=False) in ("2<|im_end|>\n",
                                                                 f"{records[1]['completion']}{IM_END}\n")


# --- truncation -------------------------------------------------------------------------------

def test_long_examples_are_truncated_with_a_count_on_stderr(tmp_path, raw, plain_tokenizer, capsys):
    texts = ["short", "a considerably longer line of text that runs past the limit " * 2,
             "another line that is also far too long for a twelve token limit"]
    path = write_lines(tmp_path / "train.jsonl", *({"text": t} for t in texts))
    examples = load_split(path, plain_tokenizer, 12, False)
    eos = raw.token_to_id(IM_END)
    assert [e.tokens for e in examples] == [(ids(raw, t) + [eos])[:12] for t in texts]
    assert len(ids(raw, texts[0])) + 1 < 12 and all(len(ids(raw, t)) > 12 for t in texts[1:])
    err = capsys.readouterr().err
    assert f"warning: 2 of 3 examples in {path} were longer than --max-seq-length 12" in err


def test_no_warning_when_nothing_is_truncated(tmp_path, plain_tokenizer, capsys):
    load_split(write_lines(tmp_path / "train.jsonl", {"text": "short"}), plain_tokenizer, 100, False)
    assert "warning" not in capsys.readouterr().err


def test_truncation_keeps_an_example_with_one_completion_token_left(tmp_path, raw, plain_tokenizer):
    prompt, completion = "A question about llamas?", " Yes indeed."
    head = len(ids(raw, prompt))
    record = {"prompt": prompt, "completion": completion}
    example = one(tmp_path, plain_tokenizer, record, True, max_seq_length=head + 1)
    assert example.prompt_length == head and len(example.tokens) == head + 1
    _, labels = batch_arrays([example], 0)
    assert (np.array(labels)[0, 1:] != -100).sum() == 1
    with pytest.raises(CheckpointError, match=r"train.jsonl:1: nothing left to learn .* max_seq_length"):
        one(tmp_path, plain_tokenizer, record, True, max_seq_length=head)


# --- bad lines --------------------------------------------------------------------------------

BAD_LINES = [
    ('{"text": "unterminated"', False, "not valid JSON"),
    ('[1, 2, 3]', False, "expected a JSON object, got list"),
    ('{"prompt": "no completion"}', False, r"needs 'text', 'prompt' and 'completion', or 'messages'; found keys \['prompt'\]"),
    ('{"input": "x", "output": "y"}', False, "found keys"),
    ('{"text": ["a", "list"]}', False, "'text' must be a string"),
    ('{"prompt": 7, "completion": "x"}', False, "'prompt' and 'completion' must be strings"),
    ('{"prompt": "x", "completion": null}', False, "'prompt' and 'completion' must be strings"),
    ('{"messages": "hello"}', False, "'messages' must be a non-empty list"),
    ('{"messages": []}', False, "'messages' must be a non-empty list"),
    ('{"messages": ["hello"]}', False, r"messages\[0\] must be an object"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}', False,
     r"messages\[1\] must be an object with string 'role' and 'content'"),
    ('{"messages": [{"content": "no role"}]}', False, r"messages\[0\]"),
    ('{"text": "fine"}', True, "mask_prompt needs prompt/completion or messages"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', True, "needs an assistant message"),
]


@pytest.mark.parametrize("line, mask_prompt, match", BAD_LINES,
                         ids=[f"bad{i}" for i in range(len(BAD_LINES))])
def test_a_bad_line_names_file_and_line(tmp_path, chat_tokenizer, line, mask_prompt, match):
    good = json.dumps({"prompt": "ok", "completion": "fine"})
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")  # the blank line 2 still counts
    with pytest.raises(CheckpointError, match=match) as error:
        load_split(path, chat_tokenizer, 256, mask_prompt)
    assert str(error.value).startswith(f"{path}:3: ")


def test_invalid_utf8_names_file_and_line(tmp_path, chat_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CheckpointError, match="not valid JSON") as error:
        load_split(path, chat_tokenizer, 256, False)
    assert str(error.value).startswith(f"{path}:2: ")


def test_load_dataset_reads_the_splits_present(tmp_path, plain_tokenizer):
    write_lines(tmp_path / "train.jsonl", {"text": "one"}, {"text": "two"})
    write_lines(tmp_path / "valid.jsonl", {"text": "three"})
    data = load_dataset(tmp_path, plain_tokenizer)
    assert sorted(data) == ["train", "valid"]
    assert (len(data["train"]), len(data["valid"])) == (2, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"{empty}: needs train.jsonl"):
        load_dataset(empty, plain_tokenizer)


# --- batches ----------------------------------------------------------------------------------

def random_examples(count=23, seed=0):
    rng = np.random.default_rng(seed)
    return [Example([int(t) for t in rng.integers(1, 50, int(n))], int(rng.integers(0, 3)))
            for n in rng.integers(3, 40, count)]


def test_batch_arrays_pads_on_the_right():
    examples = [Example([5, 6, 7], 1), Example([8, 9, 10, 11, 12], 2), Example([13, 14], 0)]
    inputs, labels = batch_arrays(examples, pad_id=99)
    assert inputs.dtype == labels.dtype == mx.int32
    assert np.array(inputs).tolist() == [[5, 6, 7, 99, 99], [8, 9, 10, 11, 12], [13, 14, 99, 99, 99]]
    assert np.array(labels).tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12],
                                         [13, 14, -100, -100, -100]]


@pytest.mark.parametrize("batch_size", [1, 4, 5])
def test_length_grouped_batches_group_similar_lengths(batch_size):
    examples = random_examples()
    lengths = [len(e.tokens) for e in examples]
    for epoch in range(3):
        batches = length_grouped_batches(examples, batch_size, seed=7, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(examples)))
        assert [len(b) for b in batches].count(batch_size) >= len(batches) - 1
        # batches are consecutive runs of the length-sorted order: no two batches interleave
        by_length = sorted(batches, key=lambda b: min(lengths[i] for i in b))
        for first, second in zip(by_length, by_length[1:]):
            assert max(lengths[i] for i in first) <= min(lengths[i] for i in second)
        assert [lengths[i] for b in by_length for i in sorted(b, key=lambda i: lengths[i])] == sorted(lengths)


def test_length_grouped_batches_are_deterministic_per_seed_and_epoch():
    examples = random_examples()

    def order(seed, epoch):
        return length_grouped_batches(examples, 3, seed, epoch)

    assert order(1, 0) == order(1, 0) and order(1, 5) == order(1, 5)
    assert order(1, 0) != order(1, 1)  # reshuffled every epoch
    assert order(1, 0) != order(2, 0)  # and per seed
    # the same groups every epoch, only their order changes
    assert sorted(map(sorted, order(1, 0))) == sorted(map(sorted, order(1, 3)))
    # independent of Python's global random state
    random.seed(123)
    first = order(4, 2)
    random.seed(456)
    assert order(4, 2) == first


def as_lists(batch):
    return tuple(np.array(a).tolist() for a in batch)


@pytest.mark.parametrize("start_step", [0, 1, 5, 6, 13, 20])
def test_iterate_batches_start_step_replays_an_uninterrupted_run(start_step):
    examples = random_examples()  # 23 examples, batch 4: 6 batches per epoch (the last holds 3)
    uninterrupted = iterate_batches(examples, 4, pad_id=0, seed=3)
    expected = [as_lists(next(uninterrupted)) for _ in range(start_step + 8)][start_step:]
    resumed = iterate_batches(examples, 4, pad_id=0, seed=3, start_step=start_step)
    assert [as_lists(next(resumed)) for _ in range(8)] == expected


def test_iterate_batches_follows_the_grouped_order():
    examples = random_examples()
    batches = list(iterate_batches(examples, 4, pad_id=0, seed=9, loop=False))
    order = length_grouped_batches(examples, 4, 9, 0)
    assert len(batches) == len(order) == 6
    for (inputs, labels), indices in zip(batches, order):
        assert as_lists((inputs, labels)) == as_lists(batch_arrays([examples[i] for i in indices], 0))


def test_fewer_examples_than_the_batch_size_is_an_error():
    with pytest.raises(CheckpointError, match="2 examples, fewer than batch_size 3"):
        next(iterate_batches(random_examples(2), 3, pad_id=0))

"""Perplexity (mlx_mobilellm.evaluation, `mlx-mobilellm evaluate`) and the lm-evaluation-harness
adapter, checked against direct computations with the model: the model's own loss, a forward
pass per window, stream_generate with the same stops; the real demo model finds English far
likelier than the same words shuffled; bad input to the command is one error line."""

from __future__ import annotations

import json
import math
import random
import re

import mlx.core as mx
import numpy as np
import pytest

from generation_helpers import CORPUS, tiny_model
from mlx_mobilellm import generate, load
from mlx_mobilellm.cli import main
from mlx_mobilellm.demo import demo_model_path
from mlx_mobilellm.evaluation import perplexity, sequence_nlls, windows
from mlx_mobilellm.models.mobilellm import IGNORE_INDEX
from mlx_mobilellm.training.data import load_split

PARAGRAPH = ("The sun rose slowly over the quiet village. Children walked to school along the "
             "river, and the baker opened his shop early to sell fresh bread. In the afternoon, "
             "the farmers returned from the fields, tired but happy after a long day of work.")
LONG_TEXT = " ".join(CORPUS[:3] * 3)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer.vocab_size, seed=3)


def logprobs_of(model, ids) -> np.ndarray:
    """(len(ids), vocab) float64 log-softmax of one full forward pass, no cache, no batch."""
    logits = np.array(model(mx.array([ids])).logits[0].astype(mx.float32)).astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# --- perplexity -----------------------------------------------------------------------------------

def test_short_text_equals_the_models_loss(model, tokenizer):
    ids = tokenizer.encode(CORPUS[0])
    loss = model(mx.array([ids]), labels=mx.array([ids])).loss.item()
    result = perplexity(model, tokenizer, [CORPUS[0]], max_seq_length=128)
    assert result["tokens"] == len(ids) - 1
    assert result["mean_nll"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.mark.parametrize("length, window", [(2, 2), (10, 4), (11, 4), (40, 7), (5, 64), (64, 64)])
def test_windows_score_every_token_once(length, window):
    scored = []
    for begin, end, first in windows(length, window):
        assert 0 <= begin < first < end <= length and end - begin <= window
        if begin:  # past the first window: at least half a window of context
            assert first - begin >= window - max(window // 2, 1)
        scored.extend(range(first, end))
    assert scored == list(range(1, length))
    assert end == length and (length <= window or end - begin == window)  # last window full


@pytest.mark.parametrize("batch_size", [1, 3])
def test_long_text_equals_a_loss_per_window(model, tokenizer, batch_size):
    """A text of many windows: the total equals the model's loss over each window's new
    tokens (labels -100 elsewhere), whatever the batching."""
    ids = tokenizer.encode(LONG_TEXT)
    window = 24
    assert len(ids) > 4 * window
    expected, count = 0.0, 0
    for begin, end, first in windows(len(ids), window):
        labels = [IGNORE_INDEX] * (first - begin) + ids[first:end]
        scored = end - first
        loss = model(mx.array([ids[begin:end]]), labels=mx.array([labels])).loss.item()
        expected += loss * scored
        count += scored
    (nll, tokens), = sequence_nlls(model, [ids], window, batch_size)
    assert tokens == count == len(ids) - 1
    assert nll == pytest.approx(expected, rel=1e-5)
    texts = [LONG_TEXT, CORPUS[1], CORPUS[4]]  # several texts at once: each its own total
    together = sequence_nlls(model, [tokenizer.encode(t) for t in texts], window, batch_size)
    alone = [sequence_nlls(model, [tokenizer.encode(t)], window, 1)[0] for t in texts]
    assert [t for _, t in together] == [t for _, t in alone]
    np.testing.assert_allclose([n for n, _ in together], [n for n, _ in alone], rtol=1e-5)


def test_library_refuses_bad_parameters(model, tokenizer):
    with pytest.raises(ValueError, match="max_seq_length must be at least 2"):
        perplexity(model, tokenizer, ["hi there"], max_seq_length=1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        perplexity(model, tokenizer, ["hi there"], max_seq_length=10_000)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        sequence_nlls(model, [[1, 2, 10_000]])


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load(demo_model_path(), "auto")  # as the command loads it
    mx.eval(model.parameters())  # loaded lazily: once here, not in each test's first call
    return model, tokenizer


def test_demo_model_finds_english_likelier_than_shuffled_words(demo):
    model, tokenizer = demo
    words = PARAGRAPH.split()
    random.Random(0).shuffle(words)
    english = perplexity(model, tokenizer, [PARAGRAPH], max_seq_length=64)
    shuffled = perplexity(model, tokenizer, [" ".join(words)], max_seq_length=64)
    assert english["perplexity"] < 100
    assert shuffled["perplexity"] > 10 * english["perplexity"]


# --- the command ----------------------------------------------------------------------------------

def cli(capsys, *argv) -> tuple:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_prints_the_librarys_figures(capsys, tmp_path, demo):
    model, tokenizer = demo
    data = tmp_path / "data.jsonl"
    lines = [{"text": PARAGRAPH}, {"prompt": "Say hi.", "completion": "Hi!"},
             {"messages": [{"role": "user", "content": "Hello"},
                           {"role": "assistant", "content": "Hello! How can I help?"}]}]
    data.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    status, out, err = cli(capsys, "evaluate", "--data", data, "--max-seq-length", 32,
                           "--batch-size", 2)
    assert status == 0, err
    result = json.loads(out)
    sequences = [e.tokens for e in load_split(data, tokenizer, 10**9, False)]
    expected = sequence_nlls(model, sequences, 32, 1)
    assert result["tokens"] == sum(count for _, count in expected)
    assert result["mean_nll"] == pytest.approx(sum(n for n, _ in expected) / result["tokens"],
                                               rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["mean_nll"]))
    assert set(result) == {"data", "tokens", "mean_nll", "perplexity", "seconds"}


def test_cli_text_file(capsys, tmp_path, demo):
    model, tokenizer = demo
    data = tmp_path / "para.txt"
    data.write_text(PARAGRAPH)
    status, out, err = cli(capsys, "evaluate", "--data", data)
    assert status == 0, err
    result = json.loads(out)
    assert result["perplexity"] == pytest.approx(
        perplexity(model, tokenizer, [PARAGRAPH])["perplexity"], rel=1e-5)


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, r"--data .*missing.txt: not found"),
    ("empty.txt", "", r"empty.txt: is empty"),
    ("blank.jsonl", "\n  \n", r"blank.jsonl: is empty"),
    ("data.csv", "a,b\n", r"--data .*data.csv: must be a .txt or a .jsonl file"),
    ("bad.jsonl", '{"text": "fine"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
    ("keys.jsonl", '{"body": "x"}\n', r"keys.jsonl:1: a line needs 'text'"),
    ("latin1.txt", b"caf\xe9", r"latin1.txt: not UTF-8 text"),
])
def test_cli_bad_data_is_one_error_line(capsys, tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    status, out, err = cli(capsys, "evaluate", "--data", path)
    assert status == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err


@pytest.mark.parametrize("flags, message", [
    (["--max-seq-length", "1"], "--max-seq-length must be at least 2"),
    (["--max-seq-length", "100000"], "--max-seq-length 100000 exceeds the model's context"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_cli_bad_flags(capsys, tmp_path, flags, message):
    data = tmp_path / "para.txt"
    data.write_text(PARAGRAPH)
    status, out, err = cli(capsys, "evaluate", "--data", data, *flags)
    assert status == 1 and out == "" and len(err.splitlines()) == 1 and message in err, err


# --- the lm-evaluation-harness adapter ------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(model, tokenizer):
    pytest.importorskip("lm_eval")
    from mlx_mobilellm.lm_eval_adapter import MobileLLMEval

    return MobileLLMEval(model=model, tokenizer=tokenizer, batch_size=3)


def requests(kind, *args_list):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, index) for index, args in enumerate(args_list)]


PAIRS = [("Hello world!", " The quick brown fox"), ("digits 1234567 and", " 3.14159"),
         ("def add(a, b):\n", "    return a + b"), ("It's, we'll,", " I'VE"),
         ("accents: café,", " naïve")]


def test_loglikelihood_equals_a_full_forward_pass(adapter, model, tokenizer):
    results = adapter.loglikelihood(requests("loglikelihood", *PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, results):
        head, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
        assert whole[: len(head)] == head  # these pairs split cleanly
        scores = logprobs_of(model, whole)[len(head) - 1 : -1]
        targets = whole[len(head):]
        assert logprob == pytest.approx(scores[np.arange(len(targets)), targets].sum(), abs=1e-4)
        assert greedy == bool((scores.argmax(-1) == targets).all())


def test_loglikelihood_is_greedy_and_empty_context(adapter, model, tokenizer):
    # A one-token continuation that is the model's argmax after the context.
    found = []
    for context in CORPUS[:8]:
        ids = tokenizer.encode(context)
        best = int(logprobs_of(model, ids)[-1].argmax())
        text = tokenizer.decode([best])
        if tokenizer.encode(context + text) == ids + [best]:
            found.append((context, text))
    assert found, "no context whose argmax token re-encodes as itself"
    results = adapter.loglikelihood(requests("loglikelihood", *found))
    assert all(greedy for _, greedy in results)
    # An empty context is conditioned on the BOS token.
    (logprob, _), = adapter.loglikelihood(requests("loglikelihood", ("", "Hello world")))
    ids = [tokenizer.bos_token_id, *tokenizer.encode("Hello world", add_special_tokens=False)]
    scores = logprobs_of(model, ids)[:-1]
    assert logprob == pytest.approx(scores[np.arange(len(ids) - 1), ids[1:]].sum(), abs=1e-4)


def test_loglikelihood_of_a_context_longer_than_max_length(adapter, model, tokenizer):
    """The oldest context tokens are dropped: the last max_length tokens are what is run."""
    short = type(adapter)(model=model, tokenizer=tokenizer, max_length=16)
    context, continuation = " ".join(CORPUS[:2]), " The quick"
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    assert whole[: len(head)] == head and len(head) > 16
    count = len(whole) - len(head)
    (logprob, _), = short.loglikelihood(requests("loglikelihood", (context, continuation)))
    kept = whole[-17:]
    assert count < 16
    scores = logprobs_of(model, kept)[-count - 1 : -1]
    assert logprob == pytest.approx(scores[np.arange(count), kept[-count:]].sum(), abs=1e-4)
    with pytest.raises(ValueError, match="max_length must be in"):
        type(adapter)(model=model, tokenizer=tokenizer, max_length=10_000)


def test_rolling_loglikelihood_is_the_perplexity(adapter, model, tokenizer):
    short = type(adapter)(model=model, tokenizer=tokenizer, batch_size=2, max_length=24)
    texts = [LONG_TEXT, CORPUS[3]]
    rolling = short.loglikelihood_rolling(requests("loglikelihood_rolling", *[(t,) for t in texts]))
    for text, logprob in zip(texts, rolling):
        result = perplexity(model, tokenizer, [text], max_seq_length=24)
        assert -logprob == pytest.approx(result["mean_nll"] * result["tokens"], rel=1e-6)


def test_generate_until_equals_stream_generate(adapter, model, tokenizer):
    prompts = [CORPUS[0], CORPUS[5], CORPUS[10]]
    # A stop string taken from what the first prompt generates, so that one stop really acts.
    free = generate(model, tokenizer, prompts[0], 12)
    stop = free[4:6]
    assert stop and stop in free
    gen_kwargs = [{"until": [stop], "max_gen_toks": 12}, {"until": "\n", "max_gen_toks": 5},
                  {"until": ["zz", stop], "max_gen_toks": 9, "do_sample": False}]
    texts = adapter.generate_until(requests("generate_until", *zip(prompts, gen_kwargs)))
    for prompt, kwargs, text in zip(prompts, gen_kwargs, texts):
        until = [kwargs["until"]] if isinstance(kwargs["until"], str) else kwargs["until"]
        assert text == generate(model, tokenizer, prompt, kwargs["max_gen_toks"], stop=until)
    assert texts[0] == free[: free.index(stop)]


TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{question}}}}"
doc_to_target: {target}
"""
MULTIPLE_CHOICE = """doc_to_choice: "{{choices}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
GENERATE = """generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


def test_simple_evaluate_runs_local_tasks(adapter, tmp_path, monkeypatch):
    """lm_eval's own pipeline (task YAML, a local JSON dataset, requests, metrics) on the
    adapter: its responses are the adapter's direct answers, its accuracy what they imply."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [{"question": "The capital of France is", "choices": [" Paris", " Berlin", " Rome"],
             "label": 0, "answer": "Paris"},
            {"question": "Two plus two is", "choices": [" four", " seven", " blue"], "label": 2,
             "answer": "four"}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (tmp_path / "mc.yaml").write_text(
        TASK.format(name="tiny_mc", data=data, kind="multiple_choice", target="label")
        + MULTIPLE_CHOICE)
    (tmp_path / "gen.yaml").write_text(
        TASK.format(name="tiny_gen", data=data, kind="generate_until", target='"{{answer}}"')
        + GENERATE)
    out = lm_eval.simple_evaluate(model=adapter, tasks=["tiny_mc", "tiny_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path),
                                                           include_defaults=False),
                                  bootstrap_iters=0, log_samples=True)
    picked = []
    for sample in sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        direct = adapter.loglikelihood(requests("loglikelihood",
                                                *[(doc["question"], c) for c in doc["choices"]]))
        assert [r[0] for r in sample["resps"]] == direct
        picked.append(int(np.argmax([logprob for logprob, _ in direct])) == doc["label"])
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(picked))
    for sample in out["samples"]["tiny_gen"]:
        question = docs[sample["doc_id"]]["question"]
        direct = adapter.generate_until(requests(
            "generate_until", (question, {"until": ["\n", "."], "max_gen_toks": 6})))
        assert sample["resps"] == [direct]

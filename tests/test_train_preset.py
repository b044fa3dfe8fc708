"""`mlx-mobilellm train`: pretraining from scratch on local text. The token file is the text
tokenized and concatenated, made once and reused until a source changes; packed batches are
windows of the stream that never reach the held-out validation tokens; the loss goes down, a
stopped run resumed follows the uninterrupted one, gradient checkpointing trains alike, and two
data-parallel ranks train as one process; the output folder loads and generates; bad input is
one `error:` line with nothing left behind; the 140m preset has R1's parameter count."""

from __future__ import annotations

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from generation_helpers import write_bpe_folder
from mlx_mobilellm import generate, load, load_tokenizer
from mlx_mobilellm.cli import main
from mlx_mobilellm.errors import CheckpointError, ParameterError
from mlx_mobilellm.models.config import MobileLLMConfig
from mlx_mobilellm.training import trainer
from mlx_mobilellm.training.initialization import fresh_model, read_model_config
from mlx_mobilellm.training.packed import training_batches, validation_loss, validation_size
from mlx_mobilellm.training.token_file import TOKENS_FILE, token_file, tokenizer_identity
from test_distributed import CLI, launch_two
from test_trainer import assert_close_pairs, assert_close_trees, losses

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "A small model learns to repeat what it reads many times.",
             "Rain falls on the hills and the rivers run to the sea.",
             "She counted one, two, three, and then she began again."]
TINY = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, hidden_dim=128,
            max_seq_len=128, rope_base=10000.0)
# Steps 1-8 with a checkpoint every 3 and a validation every 4; a cosine schedule with warmup,
# accumulation and clipping, so that every part of a step has to resume exactly.
RUN = ["--seq-length", 32, "--batch-size", 4, "--iters", 8, "--learning-rate", 3e-3,
       "--warmup", 2, "--grad-accumulation-steps", 2, "--grad-clip", 0.5, "--save-every", 3,
       "--steps-per-eval", 4, "--steps-per-report", 1, "--val-batches", 2, "--seed", 3,
       "--val-fraction", 0.1, "--quiet"]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return write_bpe_folder(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    return load_tokenizer(tokenizer_folder)


def write_corpus(folder, repeats=6):
    """Two text files, a JSONL file of documents (with a blank line) in a subfolder, and a
    hidden file that is not read."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "b.txt").write_text(" ".join(SENTENCES * repeats))
    (folder / "a.txt").write_text("\n".join(SENTENCES[::-1] * repeats))
    (folder / "more").mkdir(exist_ok=True)
    lines = [json.dumps({"text": s}) for s in SENTENCES * repeats]
    (folder / "more" / "c.jsonl").write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
    (folder / ".hidden.txt").write_text("never read")
    return folder


def documents(folder):
    """The corpus's documents in the token file's order: a.txt, b.txt, more/c.jsonl's lines."""
    docs = [(folder / "a.txt").read_text(), (folder / "b.txt").read_text()]
    for line in (folder / "more" / "c.jsonl").read_text().splitlines():
        if line.strip():
            docs.append(json.loads(line)["text"])
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def tiny_model_config(tokenizer):
    return MobileLLMConfig(**TINY, vocab_size=tokenizer.vocab_size)


def cli(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def train_cli(capsys, config, tokenizer_folder, data, output, *extra):
    status, out, err = cli(capsys, "train", "--config", config, "--tokenizer", tokenizer_folder,
                           "--data", data, "--output", output, *RUN, *extra)
    assert status == 0, err
    return trainer.read_metrics(output)


def saved_weights(folder) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(folder / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_config, tokenizer_folder, corpus):
    """(output folder, metrics) of the reference run: RUN, uninterrupted."""
    output = tmp_path_factory.mktemp("run") / "pretrained"
    status = main([str(a) for a in ["train", "--config", tiny_config, "--tokenizer",
                                     tokenizer_folder, "--data", corpus, "--output", output, *RUN]])
    assert status == 0
    return output, trainer.read_metrics(output)


# --- the token file -----------------------------------------------------------------------

def test_token_file_is_the_documents_tokenized_and_concatenated(tmp_path, tokenizer,
                                                               tokenizer_folder):
    data = write_corpus(tmp_path / "data")
    identity = tokenizer_identity({"tokenizer.json": (tokenizer_folder / "tokenizer.json")
                                   .read_text()})
    eos = tokenizer.eos_token_ids[0]
    expected = [t for doc in documents(data) for t in tokenizer.encode(doc) + [eos]]
    tokens = token_file(data, tmp_path / "out" / "tokens", tokenizer, identity, quiet=True)
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    index = json.loads((tmp_path / "out" / "tokens" / "tokens.json").read_text())
    assert [s["path"] for s in index["sources"]] == ["a.txt", "b.txt", "more/c.jsonl"]
    assert index["tokens"] == len(expected) and index["tokenizer"] == identity

    # Reused as it is: not written again.
    path = tmp_path / "out" / "tokens" / TOKENS_FILE
    written = path.stat().st_mtime_ns
    assert token_file(data, path.parent, tokenizer, identity, quiet=True).tolist() == expected
    assert path.stat().st_mtime_ns == written
    # A source changed: rebuilt with its new text.
    (data / "b.txt").write_text("Only this now.")
    expected = [t for doc in documents(data) for t in tokenizer.encode(doc) + [eos]]
    assert token_file(data, path.parent, tokenizer, identity, quiet=True).tolist() == expected
    rebuilt = path.stat().st_mtime_ns
    assert rebuilt != written
    # Another tokenizer: rebuilt too.
    token_file(data, path.parent, tokenizer, "another", quiet=True)
    assert path.stat().st_mtime_ns != rebuilt
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


# --- packed batches -----------------------------------------------------------------------

def test_packed_batches_are_windows_of_the_training_tokens_only():
    tokens = np.arange(1000, dtype=np.uint32)  # each token says where it is
    held_out = validation_size(len(tokens), 16, 0.1)
    assert held_out == 100
    train_count = len(tokens) - held_out
    batches = training_batches(tokens, train_count, 16, 4, seed=7)
    seen = set()
    for _ in range(200):
        inputs, labels = next(batches)
        rows = np.array(inputs)
        assert rows.shape == (4, 16) and np.array_equal(rows, np.array(labels))
        assert (np.diff(rows, axis=1) == 1).all()  # consecutive tokens of the stream
        assert rows.max() < train_count  # never a validation token
        seen.update(rows[:, 0].tolist())
    assert min(seen) == 0 and max(seen) == train_count - 16  # every start can be drawn
    # Micro-batch n is the same whenever it is asked for: what a resumed run relies on.
    again = training_batches(tokens, train_count, 16, 4, seed=7, start=150)
    restarted = training_batches(tokens, train_count, 16, 4, seed=7)
    for _ in range(150):
        next(restarted)
    for _ in range(3):
        assert np.array_equal(np.array(next(again)[0]), np.array(next(restarted)[0]))


def test_validation_reads_the_held_out_windows_once(tokenizer):
    tokens = np.arange(200) % 50
    model = fresh_model(tiny_model_config(tokenizer), seed=0)
    first = 200 - validation_size(200, 16, 0.3)  # 60 held out: windows at 140, 156, 172
    windows = [tokens[s:s + 16] for s in (140, 156, 172)]
    expected = np.mean([model(mx.array(w[None]), labels=mx.array(w[None])).loss.item()
                        for w in windows])
    assert validation_loss(model, tokens, first, 16, batch_size=2) == pytest.approx(expected,
                                                                                    rel=1e-5)


def test_too_few_tokens_are_refused_naming_the_flags():
    validation_size(64, 32, 0.01)  # one window each
    with pytest.raises(ParameterError, match=r"63 tokens, too few for seq_length 32: it needs "
                                             r"32 to train on and 32 to validate on"):
        validation_size(63, 32, 0.01)
    assert validation_size(32, 32, 0.0) == 0


# --- the command line ---------------------------------------------------------------------

def test_training_lowers_the_loss_and_reports_validation_perplexity(uninterrupted):
    output, metrics = uninterrupted
    train = [loss for _, loss in losses(metrics)]
    assert [step for step, _ in losses(metrics)] == list(range(1, 9))
    assert train[-1] < 0.7 * train[0]
    validation = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in validation] == [4, 8]
    assert validation[-1]["val_loss"] < validation[0]["val_loss"]
    for m in validation:
        assert m["val_perplexity"] == pytest.approx(math.exp(m["val_loss"]), rel=1e-12)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl",
                 "loss_curve.png", "checkpoint", "tokens/tokens.bin", "tokens/tokens.json"):
        assert (output / name).exists(), name
    assert not [p for p in output.rglob(".*")]  # no temporary left


def test_the_output_folder_loads_and_generates(uninterrupted, tokenizer, capsys):
    output, _ = uninterrupted
    model, loaded = load(output)
    assert loaded.encode("The quick brown fox") == tokenizer.encode("The quick brown fox")
    config = json.loads((output / "config.json").read_text())
    assert config["vocab_size"] == tokenizer.vocab_size
    # every id generation stops at (this tokenizer has two); the first ends each document
    assert config["eos_token_id"] == tokenizer.eos_token_ids and len(tokenizer.eos_token_ids) == 2
    assert_close_trees({k: np.array(v) for k, v in
                        mx.load(str(output / "checkpoint" / "adapters.safetensors")).items()},
                       saved_weights(output), 0.0)
    want = generate(model, loaded, loaded.encode("The quick"), 6)
    status, out, err = cli(capsys, "generate", "--model", output, "--prompt", "The quick",
                           "--max-tokens", 6, "--ignore-chat-template", "--dtype", "float32")
    assert status == 0, err
    assert out == want + "\n"


class Stopped(Exception):
    pass


def test_a_stopped_run_resumes_to_the_uninterrupted_one(uninterrupted, tiny_config,
                                                        tokenizer_folder, corpus, tmp_path,
                                                        capsys, monkeypatch):
    reference, reference_metrics = uninterrupted
    output = tmp_path / "stopped"
    original, steps = trainer.TrainingStep.loss_and_gradients, []

    def stopping(self, batches):
        steps.append(1)
        if len(steps) == 5:  # in step 5, after the checkpoint of step 3
            raise Stopped
        return original(self, batches)

    with monkeypatch.context() as patch:
        patch.setattr(trainer.TrainingStep, "loss_and_gradients", stopping)
        with pytest.raises(Stopped):
            train_cli(capsys, tiny_config, tokenizer_folder, corpus, output)
    tokens = output / "tokens" / TOKENS_FILE
    written = tokens.stat().st_mtime_ns
    metrics = train_cli(capsys, tiny_config, tokenizer_folder, corpus, output, "--resume")
    assert tokens.stat().st_mtime_ns == written  # the token file was reused, not rebuilt
    for key in ("train_loss", "val_loss", "val_perplexity", "learning_rate"):
        assert_close_pairs(losses(metrics, key), losses(reference_metrics, key), 1e-6)
    assert_close_trees(saved_weights(output), saved_weights(reference), 1e-6)


def test_resuming_with_another_config_is_refused_in_one_line(uninterrupted, tiny_config,
                                                            tokenizer_folder, corpus, tmp_path,
                                                            capsys):
    output = tmp_path / "run"
    shutil.copytree(uninterrupted[0], output)
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**TINY, "embed_dim": 96}))
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    status, _, err = cli(capsys, "train", "--config", wider, "--tokenizer", tokenizer_folder,
                         "--data", corpus, "--output", output, *RUN, "--resume")
    assert status == 1 and err.count("\n") == 1
    assert "another model config" in err and "adapter_config.json" in err
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before  # nothing touched


def test_gradient_checkpointing_gives_the_same_training(uninterrupted, tiny_config,
                                                        tokenizer_folder, corpus, tmp_path,
                                                        capsys):
    reference, reference_metrics = uninterrupted
    output = tmp_path / "checkpointed"
    metrics = train_cli(capsys, tiny_config, tokenizer_folder, corpus, output,
                        "--grad-checkpoint")
    for key in ("train_loss", "val_loss"):
        assert_close_pairs(losses(metrics, key), losses(reference_metrics, key), 1e-5)
    assert_close_trees(saved_weights(output), saved_weights(reference), 1e-5)


def test_two_ranks_train_as_one_process(uninterrupted, tiny_config, tokenizer_folder, corpus,
                                        tmp_path):
    # The same global batch of 4 windows, 2 rows per rank; rank 1 reads rank 0's token file.
    _, reference_metrics = uninterrupted
    output = tmp_path / "two"
    result = launch_two(CLI, "train", "--config", tiny_config, "--tokenizer", tokenizer_folder,
                        "--data", corpus, "--output", output, *RUN)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = trainer.read_metrics(output)
    for key in ("train_loss", "val_loss", "learning_rate"):
        assert_close_pairs(losses(metrics, key), losses(reference_metrics, key), 1e-5)
    assert (output / "config.json").exists()
    # Two ranks indeed: a batch of 3 windows does not split over them.
    result = launch_two(CLI, "train", "--config", tiny_config, "--tokenizer", tokenizer_folder,
                        "--data", corpus, "--output", tmp_path / "three", *RUN,
                        "--batch-size", 3)
    assert "--batch-size 3 does not split evenly over 2 processes" in result.stderr, \
        result.stdout + result.stderr


@pytest.mark.parametrize("case", ["empty", "not-utf8", "bad-jsonl", "empty-document",
                                  "too-long", "unknown-preset", "too-few-tokens",
                                  "batch-too-big"])
def test_bad_input_is_one_error_line_and_nothing_written(case, tiny_config, tokenizer_folder,
                                                         tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    config, extra = tiny_config, []
    expected = {
        "empty": "no .txt or .jsonl files",
        "not-utf8": "a.txt: not UTF-8 text (byte 0xff at offset 4)",
        "bad-jsonl": "c.jsonl:2: not a JSON line",
        "empty-document": "a.txt: a document with no text",
        "too-long": "--seq-length 129 is beyond the config's max_seq_len (128)",
        "unknown-preset": "--config '9000m': neither a preset (140m, 360m",
        "too-few-tokens": "too few for --seq-length 32",
        "batch-too-big": "--batch-size 1000 windows of 32 tokens are more than the",
    }[case]
    if case == "not-utf8":
        (data / "a.txt").write_bytes(b"good\xff bad")
    elif case == "bad-jsonl":
        (data / "c.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    elif case == "empty-document":
        (data / "a.txt").write_text("")
    elif case == "too-few-tokens":
        (data / "a.txt").write_text("Too short.")
    elif case != "empty":
        write_corpus(data)
    if case == "too-long":
        extra = ["--seq-length", 129]
    if case == "batch-too-big":
        extra = ["--batch-size", 1000]
    if case == "unknown-preset":
        config = "9000m"
    output = tmp_path / "out"
    status, _, err = cli(capsys, "train", "--config", config, "--tokenizer", tokenizer_folder,
                         "--data", data, "--output", output, *RUN, *extra)
    assert status == 1
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not output.exists()


def test_the_140m_preset_has_r1s_parameter_count():
    config = read_model_config("140m")
    assert config.vocab_size == 128256
    assert fresh_model(config, seed=0).num_parameters() == 140_248_512


def test_initialisation_is_seeded_normal_002_and_ones(tokenizer):
    config = tiny_model_config(tokenizer)
    a, b, c = fresh_model(config, 1), fresh_model(config, 1), fresh_model(config, 2)
    wa, wb, wc = (dict(tree_flatten(m.parameters())) for m in (a, b, c))
    assert all(np.array_equal(np.array(wa[k]), np.array(wb[k])) for k in wa)
    assert not np.array_equal(np.array(wa["embed_tokens.weight"]),
                              np.array(wc["embed_tokens.weight"]))
    assert np.array(wa["embed_tokens.weight"]).std() == pytest.approx(0.02, rel=0.05)
    assert np.array_equal(np.array(wa["decoder.norm.weight"]), np.ones(TINY["embed_dim"]))
    with pytest.raises(CheckpointError):
        read_model_config("no-such-preset")

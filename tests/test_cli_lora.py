"""`mlx-mobilellm lora` and `mlx-mobilellm fuse` on a tiny Llama converted from transformers:
training writes adapters, metrics and a loss curve and lowers the loss; --test reports loss and
perplexity; --config files work under the flags; bad input is one `error:` line; fused models
give the adapted model's logits, in MLX and, exported, in transformers; `generate
--adapter-path` and `load(..., adapter_path=)` apply the adapters."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from convert.convert import convert
from mlx_mobilellm import generate, load
from mlx_mobilellm.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mlx_mobilellm.training.trainer import read_metrics
from test_cli_generate import cli, messages, one_error_line, tiny_folder  # noqa: F401 (fixture)

TEST_LINE = re.compile(r"^test loss ([\d.]+), test perplexity ([\d.]+)$", re.M)
# Every answer is the same sentence: a tiny model learns it within a few dozen steps.
PROMPTS = ["hi there", "tell me a story", "what is 2 + 2?", "name a colour", "say something",
           "how are you?", "where is the dog?", "count to three", "a question", "one more"]
ANSWER = "The quick brown fox jumps over the lazy dog."
FAST = ["--batch-size", 2, "--learning-rate", 1e-3, "--lora-rank", 4, "--steps-per-eval", 10,
        "--val-batches", 2, "--quiet"]


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    pairs = [{"prompt": p, "completion": ANSWER} for p in PROMPTS]
    write_jsonl(folder / "train.jsonl", pairs[:6])
    write_jsonl(folder / "valid.jsonl", pairs[6:8])
    write_jsonl(folder / "test.jsonl", pairs[8:])
    return folder


@pytest.fixture(scope="module")
def trained(tiny_folder, data, tmp_path_factory):
    """(adapter folder, stdout) of a LoRA run with --test on the tiny model."""
    adapters = tmp_path_factory.mktemp("run") / "adapters"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = _main("lora", "--model", tiny_folder, "--train", "--data", data, "--iters", 30,
                       "--steps-per-report", 5, "--save-every", 10, "--adapter-path", adapters,
                       "--mask-prompt", "--test", *FAST)
    assert status == 0
    return adapters, out.getvalue()


def _main(*argv) -> int:
    from mlx_mobilellm.cli import main

    return main([str(a) for a in argv])


def train_steps(adapters) -> list:
    return [m["step"] for m in read_metrics(adapters) if "train_loss" in m]


def logits(model, tokens) -> np.ndarray:
    return np.array(model(mx.array([tokens])).logits.astype(mx.float32))


def sample_tokens(tokenizer) -> list:
    return tokenizer.apply_chat_template(messages("tell me a story"))


# --- lora ---------------------------------------------------------------------------------

def test_training_writes_adapters_metrics_and_a_lower_loss(trained, tiny_folder):
    adapters, out = trained
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, "metrics.jsonl", "checkpoint"):
        assert (adapters / name).exists(), name
    assert (adapters / "loss_curve.png").stat().st_size > 0

    config = json.loads((adapters / ADAPTER_CONFIG).read_text())
    assert config["fine_tune_type"] == "lora"
    assert (config["rank"], config["scale"], config["dropout"]) == (4, 20.0, 0.0)
    assert config["num_layers"] == 2  # the default 16, on a model with 2 blocks
    assert set(config["keys"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                   "up_proj", "down_proj"}
    assert Path(config["model"]) == Path(tiny_folder).resolve()

    metrics = read_metrics(adapters)
    train = [m["train_loss"] for m in metrics if "train_loss" in m]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert [m["step"] for m in metrics if "train_loss" in m] == [5, 10, 15, 20, 25, 30]
    assert train[-1] < 0.5 * train[0]
    assert len(val) == 3 and val[-1] < val[0]


def test_test_flag_reports_loss_and_perplexity(trained, tiny_folder, data, capsys):
    adapters, out = trained
    loss, perplexity = map(float, TEST_LINE.search(out).groups())
    assert perplexity == pytest.approx(math.exp(loss), rel=1e-3)
    # --test alone evaluates the adapters already in --adapter-path: the same figure ...
    status, again, err = cli(capsys, "lora", "--model", tiny_folder, "--data", data, "--test",
                             "--adapter-path", adapters, "--batch-size", 2, "--mask-prompt")
    assert status == 0, err
    assert again == out[TEST_LINE.search(out).start():]
    # ... and an empty one the base model, whose loss on the learnt answer is higher.
    status, base, err = cli(capsys, "lora", "--model", tiny_folder, "--data", data, "--test",
                            "--adapter-path", adapters.parent / "none", "--batch-size", 2,
                            "--mask-prompt")
    assert status == 0 and "testing the base model" in err
    assert float(TEST_LINE.search(base).group(1)) > loss + 1


def test_config_file_with_flags_overriding_it(tiny_folder, data, tmp_path, capsys):
    adapters = tmp_path / "adapters"
    config = tmp_path / "lora.yaml"
    config.write_text(
        f"model: {tiny_folder}\ntrain: true\ndata: {data}\niters: 5\nbatch_size: 2\n"
        "learning_rate: 1e-3\n"  # YAML reads this as a string; the option's type converts it
        "num_layers: 1\nfine_tune_type: dora\nsteps_per_report: 1\n"
        f"adapter_path: {adapters}\nquiet: true\n"
        "lora_parameters: {rank: 2, scale: 10.0, dropout: 0.1, keys: [q_proj, v_proj]}\n")
    status, _, err = cli(capsys, "lora", "--config", config, "--iters", 3, "--lora-rank", 3)
    assert status == 0, err
    saved = json.loads((adapters / ADAPTER_CONFIG).read_text())
    assert (saved["fine_tune_type"], saved["rank"], saved["scale"], saved["dropout"]) == \
        ("dora", 3, 10.0, 0.1)
    assert (saved["num_layers"], saved["keys"]) == (1, ["q_proj", "v_proj"])
    assert train_steps(adapters) == [1, 2, 3]
    assert read_metrics(adapters)[0]["learning_rate"] == pytest.approx(1e-3)


def test_json_config_file(tiny_folder, data, tmp_path, capsys):
    adapters = tmp_path / "adapters"
    config = tmp_path / "lora.json"
    config.write_text(json.dumps({"train": True, "iters": 2, "batch_size": 2, "quiet": True,
                                  "lr_schedule": "cosine", "warmup": 1, "optimizer": "adamw",
                                  "grad_clip": 1.0, "grad_accumulation_steps": 2,
                                  "grad_checkpoint": True, "steps_per_report": 1}))
    status, _, err = cli(capsys, "lora", "-c", config, "--model", tiny_folder, "--data", data,
                         "--adapter-path", adapters)
    assert status == 0, err
    assert train_steps(adapters) == [1, 2]


def bad_line_data(tmp_path, line: str) -> Path:
    folder = tmp_path / "bad"
    write_jsonl(folder / "train.jsonl", [{"text": "fine"}, {"text": "fine too"}])
    with (folder / "train.jsonl").open("a") as f:
        f.write(line + "\n")
    return folder


@pytest.mark.parametrize("line,message", [
    ('{"text": "unterminated', "not valid JSON"),
    ('{"question": "no known keys"}', "a line needs 'text'"),
], ids=["json", "keys"])
def test_bad_data_line_is_one_error_line(tiny_folder, tmp_path, capsys, line, message):
    folder = bad_line_data(tmp_path, line)
    status, _, err = cli(capsys, "lora", "--model", tiny_folder, "--train", "--data", folder,
                         "--iters", 1, "--adapter-path", tmp_path / "a", "--quiet")
    assert status == 1
    error = one_error_line(err)
    assert f"{folder / 'train.jsonl'}:3" in error and message in error


def test_config_file_errors(tiny_folder, data, tmp_path, capsys):
    for text, message in [("learning_rat: 1e-3\n", "unknown option 'learning_rat'"),
                          ("iters: many\n", "option 'iters' cannot be 'many'"),
                          ("optimizer: lion\n", "use one of adam, adamw, sgd"),
                          ("- a list\n", "expected a mapping"),
                          ("lora_parameters: {rnk: 2}\n", "lora_parameters may hold only")]:
        config = tmp_path / "bad.yaml"
        config.write_text(text)
        status, _, err = cli(capsys, "lora", "--config", config, "--model", tiny_folder,
                             "--train", "--data", data)
        assert status == 1
        assert str(config) in one_error_line(err) and message in err, (text, err)


@pytest.mark.parametrize("flags,message", [
    ([], "nothing to do"),
    (["--train"], "--data DIR is needed"),
    (["--train", "--data", "{data}", "--num-layers", 5], "--num-layers 5: the model has only 2"),
    (["--train", "--data", "{data}", "--iters", 0], "--iters must be at least 1"),
    (["--train", "--data", "{data}", "--lora-keys", "q_proj,wq"], "unknown layer name(s) ['wq']"),
    (["--train", "--data", "{data}", "--lora-dropout", 1], "--lora-dropout must be in [0, 1)"),
    (["--train", "--data", "{empty}"], "needs train.jsonl"),
    (["--train", "--data", "{data}", "--batch-size", 7], "fewer than --batch-size 7"),
    (["--train", "--data", "{data}", "--resume"], "no checkpoint to resume from"),
], ids=["nothing", "data", "num-layers", "iters", "keys", "dropout", "empty", "batch", "resume"])
def test_bad_options_are_one_error_line(tiny_folder, data, tmp_path, capsys, flags, message):
    (tmp_path / "empty").mkdir()
    flags = [str(f).format(data=data, empty=tmp_path / "empty") for f in flags]
    status, _, err = cli(capsys, "lora", "--model", tiny_folder, "--adapter-path",
                         tmp_path / "adapters", "--quiet", *flags)
    assert status == 1
    assert message in one_error_line(err)


def test_resume_continues_and_refuses_other_adapter_shapes(tiny_folder, data, tmp_path, capsys):
    adapters = tmp_path / "adapters"
    common = ["lora", "--model", tiny_folder, "--train", "--data", data, "--adapter-path",
              adapters, "--save-every", 2, "--steps-per-report", 1, *FAST]
    assert cli(capsys, *common, "--iters", 2)[0] == 0
    status, _, err = cli(capsys, *common, "--iters", 4, "--resume", "--lora-rank", 8)
    assert status == 1 and "rank 4 but this run asks for 8" in one_error_line(err)
    assert cli(capsys, *common, "--iters", 4, "--resume")[0] == 0
    assert train_steps(adapters) == [1, 2, 3, 4]


def test_divergence_is_one_error_line(tiny_folder, data, tmp_path, capsys):
    status, _, err = cli(capsys, "lora", "--model", tiny_folder, "--train", "--data", data,
                         "--adapter-path", tmp_path / "a", "--iters", 20, "--batch-size", 2,
                         "--optimizer", "sgd", "--learning-rate", 1e30, "--quiet")
    assert status == 1
    message = one_error_line(err)
    assert "training diverged at step" in message
    assert "lower --learning-rate or set --grad-clip" in message


# --- adapters at load time and in generate ------------------------------------------------

def test_load_with_adapter_path_changes_the_logits(trained, tiny_folder):
    adapters, _ = trained
    base, tokenizer = load(tiny_folder)
    adapted, _ = load(tiny_folder, adapter_path=adapters)
    tokens = sample_tokens(tokenizer)
    assert np.abs(logits(adapted, tokens) - logits(base, tokens)).max() > 1e-2
    assert not adapted.training


def test_generate_with_adapter_path_prints_the_adapted_generation(trained, tiny_folder, capsys):
    adapters, _ = trained
    model, tokenizer = load(tiny_folder, adapter_path=adapters)
    expected = generate(model, tokenizer, tokenizer.apply_chat_template(messages("hi there")), 12)
    status, out, err = cli(capsys, "generate", "--model", tiny_folder, "--adapter-path", adapters,
                           "--prompt", "hi there", "--max-tokens", 12)
    assert status == 0, err
    assert out == expected + "\n"
    assert "quick brown" in out  # what the adapters learnt
    status, _, err = cli(capsys, "generate", "--model", tiny_folder, "--adapter-path",
                         adapters.parent / "missing", "--prompt", "hi")
    assert status == 1 and "adapter_config.json: not found" in one_error_line(err)


# --- fuse ---------------------------------------------------------------------------------

def test_fuse_gives_the_adapted_logits_in_mlx_and_transformers(trained, tiny_folder, tmp_path,
                                                               capsys):
    adapters, _ = trained
    fused_path, hf_path = tmp_path / "fused", tmp_path / "fused-hf"
    # --model defaults to the base model that adapter_config.json records.
    status, _, err = cli(capsys, "fuse", "--adapter-path", adapters, "--save-path", fused_path,
                         "--export-hf", hf_path, "--quiet")
    assert status == 0, err
    adapted, tokenizer = load(tiny_folder, adapter_path=adapters)
    fused, fused_tokenizer = load(fused_path)
    tokens = sample_tokens(tokenizer)
    expected = logits(adapted, tokens)
    assert np.abs(logits(fused, tokens) - expected).max() <= 1e-4
    assert fused_tokenizer.encode("hi there") == tokenizer.encode("hi there")

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_path, torch_dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        hf_logits = hf(torch.tensor([tokens])).logits.numpy()
    assert np.abs(hf_logits - expected).max() <= 1e-4

    capsys.readouterr()
    status, _, err = cli(capsys, "fuse", "--adapter-path", adapters, "--save-path", fused_path)
    assert status == 1 and "already exists" in one_error_line(err)
    status, _, err = cli(capsys, "fuse", "--adapter-path", tmp_path / "none", "--save-path",
                         tmp_path / "other")
    assert status == 1 and "adapter_config.json: not found" in one_error_line(err)
    assert not (tmp_path / "other").exists()


def test_dora_and_quantized_base_fuse(tiny_folder, data, tmp_path, capsys):
    """DoRA on a 4-bit base, trained in float32 (--dtype float32): `fuse --dequantize` gives
    the logits of the quantized base with the adapters; plain fuse re-quantizes."""
    quantized = convert(tiny_folder, tmp_path / "q4", quantize=True, q_group_size=32, quiet=True)
    adapters = tmp_path / "adapters"
    status, _, err = cli(capsys, "lora", "--model", quantized, "--dtype", "float32", "--train",
                         "--data", data, "--iters", 4, "--adapter-path", adapters,
                         "--fine-tune-type", "dora", *FAST)
    assert status == 0, err
    adapted, tokenizer = load(quantized, adapter_path=adapters)
    tokens = sample_tokens(tokenizer)
    expected = logits(adapted, tokens)

    status, _, err = cli(capsys, "fuse", "--model", quantized, "--adapter-path", adapters,
                         "--save-path", tmp_path / "float", "--dequantize", "--quiet")
    assert status == 0, err
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    assert "quantization" not in config
    assert np.abs(logits(load(tmp_path / "float")[0], tokens) - expected).max() <= 1e-4

    status, _, err = cli(capsys, "fuse", "--model", quantized, "--adapter-path", adapters,
                         "--save-path", tmp_path / "requantized", "--quiet")
    assert status == 0, err
    config = json.loads((tmp_path / "requantized" / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (4, 32)
    # Each re-quantized layer is the fused float weight quantized as the base was.
    fused = load(tmp_path / "float")[0].decoder.layers[1].attention.q_proj.weight
    layer = load(tmp_path / "requantized")[0].decoder.layers[1].attention.q_proj
    for ours, expected_part in zip((layer.weight, layer.scales, layer.biases),
                                   mx.quantize(fused, group_size=32, bits=4)):
        assert mx.array_equal(ours, expected_part)
    base = load(quantized)[0].decoder.layers[1].attention.q_proj
    assert not mx.array_equal(base.weight, layer.weight)  # the adapters changed it

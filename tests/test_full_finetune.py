"""Full fine-tuning (`--fine-tune-type full`): the same loop as LoRA over every weight of a float
model. It learns and moves every parameter (or only the last --num-layers blocks'), a stopped
run resumed follows an uninterrupted one, gradient checkpointing and two data-parallel ranks
train alike, a quantized model is refused in one line, and the CLI leaves a model folder in
--adapter-path that load() and `generate --model` read, with the trained weights."""

from __future__ import annotations

import json
import math
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten

from convert.convert import convert
from generation_helpers import tiny_model
from mlx_mobilellm import generate, load
from mlx_mobilellm.lora import apply_adapters
from mlx_mobilellm.training import trainer
from mlx_mobilellm.training.data import Example
from test_cli_generate import cli, messages, one_error_line, tiny_folder  # noqa: F401 (fixture)
from test_cli_lora import FAST, TEST_LINE, data, logits, sample_tokens  # noqa: F401 (fixture)
from test_distributed import EXAMPLES, SCRIPT, SETTINGS, launch_two
from test_trainer import (RESUME_ARGS, TESTS, VOCAB, assert_close_pairs, assert_close_trees,
                          losses, make_examples, quantized_model, run, run_uncompiled)

FULL = {"fine_tune_type": "full"}


def full_model(adapters=FULL, **overrides):
    model = tiny_model(VOCAB, seed=0, **overrides)
    apply_adapters(model, adapters)
    return model


def weights_of(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def checkpoint_weights(folder) -> dict:
    saved = mx.load(str(folder / "checkpoint" / "adapters.safetensors"))
    return {k: np.array(v) for k, v in saved.items()}


# --- the library's loop ---------------------------------------------------------------------

def test_loss_goes_down_and_every_parameter_changes(tmp_path):
    rng = np.random.default_rng(0)
    sequences = [[int(t) for t in rng.integers(1, VOCAB, 16)] for _ in range(2)]
    examples = [Example(list(s), 0) for s in sequences * 2]
    model = full_model()
    assert dict(tree_flatten(model.trainable_parameters())).keys() == weights_of(model).keys()
    before = weights_of(model)
    model, metrics = run(tmp_path, examples, model=model, adapters=FULL, iters=20, batch_size=4,
                         learning_rate=3e-3, save_every=10)
    curve = [loss for _, loss in losses(metrics)]
    assert len(curve) == 20 and all(math.isfinite(x) for x in curve)
    assert curve[-1] < 0.3 * curve[0]
    after = weights_of(model)
    assert after.keys() == before.keys()
    unchanged = [k for k in after if np.array_equal(before[k], after[k])]
    assert unchanged == []  # embeddings and norms too, not only the blocks' linear layers
    # The checkpoint holds every weight and both Adam moments of each; no adapters file is
    # written beside it (the CLI writes the model folder there instead).
    assert_close_trees(checkpoint_weights(tmp_path), after, 0.0)
    optimizer = mx.load(str(tmp_path / "checkpoint" / "optimizer.safetensors"))
    assert {k for k in optimizer if k.endswith((".m", ".v"))} == \
        {f"{k}.{moment}" for k in after for moment in "mv"}
    assert not (tmp_path / "adapters.safetensors").exists()


def test_num_layers_trains_only_the_last_blocks(tmp_path):
    adapters = {**FULL, "num_layers": 1}
    model = full_model(adapters)
    before = weights_of(model)
    model, _ = run(tmp_path, make_examples(4), model=model, adapters=adapters, iters=3)
    after = weights_of(model)
    moved = {k for k in after if not np.array_equal(before[k], after[k])}
    assert moved == {k for k in after if k.startswith("decoder.layers.1.")}


def test_a_quantized_model_is_refused():
    with pytest.raises(ValueError, match="full fine-tuning needs float weights") as error:
        quantized_model(FULL)
    assert "--dtype float32" in str(error.value)


class Stopped(Exception):
    pass


def test_a_stopped_run_resumes_to_the_uninterrupted_one(tmp_path, monkeypatch):
    # Model dropout, accumulation, warmup + cosine, clipping (test_trainer's resume settings):
    # stopped in the middle of step 5, after the checkpoint of step 3.
    def train(folder, resume):
        return run(folder, make_examples(7), valid=make_examples(3, seed=1),
                   model=full_model(dropout=0.1), adapters=FULL, resume=resume, **RESUME_ARGS)

    original, steps = trainer.TrainingStep.loss_and_gradients, []

    def stopping(self, batches):
        steps.append(1)
        if len(steps) == 5:
            raise Stopped
        return original(self, batches)

    with monkeypatch.context() as patch:
        patch.setattr(trainer.TrainingStep, "loss_and_gradients", stopping)
        with pytest.raises(Stopped):
            train(tmp_path / "stopped", resume=False)
    resumed, resumed_metrics = train(tmp_path / "stopped", resume=True)
    reference, reference_metrics = train(tmp_path / "uninterrupted", resume=False)
    for key in ("train_loss", "val_loss", "learning_rate"):
        assert_close_pairs(losses(resumed_metrics, key), losses(reference_metrics, key), 1e-5)
    assert_close_trees(weights_of(resumed), weights_of(reference), 1e-5)
    # resuming restored the trained weights, not a fresh model's
    fresh = weights_of(full_model())
    assert max(np.abs(fresh[k] - v).max() for k, v in weights_of(resumed).items()) > 1e-3


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    results = []
    for checkpointing in (False, True):
        results.append(run(tmp_path / str(checkpointing), make_examples(6),
                           model=full_model(dropout=0.1), adapters=FULL, iters=4,
                           grad_checkpoint=checkpointing))
    (plain, plain_metrics), (checkpointed, checkpointed_metrics) = results
    assert checkpointed.decoder.gradient_checkpointing
    assert_close_pairs(losses(checkpointed_metrics), losses(plain_metrics), 1e-5)
    assert_close_trees(weights_of(checkpointed), weights_of(plain), 1e-5)


def test_compiled_step_trains_as_the_uncompiled_one(tmp_path):
    settings = dict(iters=4, grad_accumulation_steps=2, max_grad_norm=0.5, adapters=FULL, seed=3)
    compiled, compiled_metrics = run(tmp_path / "compiled", make_examples(6),
                                     model=full_model(dropout=0.1), **settings)
    plain, plain_metrics = run_uncompiled(tmp_path / "plain", make_examples(6),
                                          model=full_model(dropout=0.1), **settings)
    assert_close_pairs(losses(compiled_metrics), losses(plain_metrics), 1e-5)
    assert_close_trees(weights_of(compiled), weights_of(plain), 1e-5)


def test_two_ranks_train_as_one_process(tmp_path):
    # test_distributed's launched script, with the full type: the ranks sum the gradients of
    # every weight. Rank 0 writes the final checkpoint (step 6), rank 1 nothing.
    settings = {**SETTINGS, "adapters": FULL}
    script = tmp_path / "launched.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), folder=str(tmp_path / "two"), iters=6,
                                    resume=False, examples=EXAMPLES, settings=settings))
    result = launch_two(sys.executable, script)
    output = result.stdout + result.stderr
    assert "rank 0 of 2 done" in output and "rank 1 of 2 done" in output, output
    single, single_metrics = run(tmp_path / "one", make_examples(**EXAMPLES), iters=6, **settings)
    two = tmp_path / "two" / "rank0"
    assert_close_trees(checkpoint_weights(two), weights_of(single), 1e-5)
    assert_close_pairs(losses(trainer.read_metrics(two)), losses(single_metrics), 1e-5)
    assert not (tmp_path / "two" / "rank1").exists()


# --- the command line -------------------------------------------------------------------------

def test_cli_writes_a_model_folder_that_loads_and_generates(tiny_folder, data, tmp_path, capsys):
    folder = tmp_path / "full"
    status, _, err = cli(capsys, "lora", "--model", tiny_folder, "--train", "--data", data,
                         "--fine-tune-type", "full", "--iters", 6, "--save-every", 3,
                         "--adapter-path", folder, "--mask-prompt", "--grad-checkpoint", *FAST)
    assert status == 0, err
    assert not (folder / "adapters.safetensors").exists()
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # no staging left
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"):
        assert (folder / name).exists(), name

    # The folder's model is the trained one: the base with the final checkpoint's weights.
    trained, tokenizer = load(tiny_folder)
    trained.load_weights(list(mx.load(str(folder / "checkpoint" / "adapters.safetensors"))
                              .items()))
    saved, saved_tokenizer = load(folder)
    tokens = sample_tokens(tokenizer)
    expected = logits(trained, tokens)
    assert np.abs(logits(saved, tokens) - expected).max() <= 1e-5
    assert np.abs(logits(load(tiny_folder)[0], tokens) - expected).max() > 1e-2
    assert saved_tokenizer.encode("hi there") == tokenizer.encode("hi there")

    prompt = saved_tokenizer.apply_chat_template(messages("hi there"))
    want = generate(saved, saved_tokenizer, prompt, 8)
    status, out, err = cli(capsys, "generate", "--model", folder, "--prompt", "hi there",
                           "--max-tokens", 8, "--dtype", "float32")
    assert status == 0, err
    assert out == want + "\n"

    # --test reads the folder as a model; export writes it for transformers, same logits
    status, out, err = cli(capsys, "lora", "--model", folder, "--data", data, "--test",
                           "--adapter-path", folder, "--batch-size", 2, "--mask-prompt")
    assert status == 0 and TEST_LINE.search(out), err
    status, _, err = cli(capsys, "export", "--model", folder, "--hf-path", tmp_path / "hf",
                         "--quiet")
    assert status == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                           torch_dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(hf(torch.tensor([tokens])).logits.numpy() - expected).max() <= 1e-4

    # --resume continues, and rewrites the folder's model at the end
    status, _, err = cli(capsys, "lora", "--model", tiny_folder, "--train", "--data", data,
                         "--fine-tune-type", "full", "--iters", 8, "--resume",
                         "--adapter-path", folder, "--mask-prompt", *FAST)
    assert status == 0, err
    resumed = logits(load(folder)[0], tokens)
    assert np.abs(resumed - expected).max() > 0
    # a run killed while writing the folder: resumed at its last step, it writes it again
    (folder / "config.json").unlink()
    (folder / "model.safetensors").unlink()
    status, _, err = cli(capsys, "lora", "--model", tiny_folder, "--train", "--data", data,
                         "--fine-tune-type", "full", "--iters", 8, "--resume",
                         "--adapter-path", folder, "--mask-prompt", *FAST)
    assert status == 0, err
    assert np.array_equal(logits(load(folder)[0], tokens), resumed)


def test_cli_refuses_a_quantized_model_in_one_line(tiny_folder, data, tmp_path, capsys):
    quantized = convert(tiny_folder, tmp_path / "q4", quantize=True, q_group_size=32, quiet=True)
    status, _, err = cli(capsys, "lora", "--model", quantized, "--train", "--data", data,
                         "--fine-tune-type", "full", "--iters", 2, "--adapter-path",
                         tmp_path / "full", *FAST)
    assert status == 1
    message = one_error_line(err)
    assert "full fine-tuning needs float weights" in message and "--dtype float32" in message
    # dequantized it trains
    status, _, err = cli(capsys, "lora", "--model", quantized, "--dtype", "float32", "--train",
                         "--data", data, "--fine-tune-type", "full", "--iters", 2,
                         "--adapter-path", tmp_path / "full", *FAST)
    assert status == 0, err
    assert "quantization" not in json.loads((tmp_path / "full" / "config.json").read_text())

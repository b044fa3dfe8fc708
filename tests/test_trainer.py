"""The training loop on a tiny random model with LoRA: it learns, only the adapters move,
gradient accumulation / clipping / schedules against hand computations, metrics and
checkpoints on disk, a run killed for real and resumed, divergence, gradient checkpointing,
and evaluate() against a token-weighted mean computed in numpy."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from generation_helpers import tiny_model
from mlx_mobilellm.errors import CheckpointError
from mlx_mobilellm.lora import apply_adapters
from mlx_mobilellm.training import trainer
from mlx_mobilellm.training.data import Example, length_grouped_batches
from mlx_mobilellm.training.trainer import (TrainingArgs, TrainingDiverged, evaluate,
                                            learning_rate_schedule, plot_loss_curve, read_metrics,
                                            train)

TESTS = Path(__file__).resolve().parent
VOCAB = 64
PAD = 0
ADAPTERS = {"fine_tune_type": "lora", "rank": 4, "scale": 2.0, "dropout": 0.0}
TRAIN_KEYS = {"step", "train_loss", "learning_rate", "tokens_per_s", "peak_memory_gb"}


def make_model(adapters=ADAPTERS, **overrides):
    """The same tiny random model every time (2 blocks, width 32), adapters initialised from
    a fixed seed."""
    model = tiny_model(VOCAB, seed=0, **overrides)
    mx.random.seed(1)
    apply_adapters(model, adapters)
    return model


def make_examples(count, seed=0, lengths=(6, 14), masked=True):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(count):
        length = int(rng.integers(*lengths)) if lengths[1] > lengths[0] else lengths[0]
        tokens = [int(t) for t in rng.integers(1, VOCAB, length)]
        examples.append(Example(tokens, int(rng.integers(0, 4)) if masked else 0))
    return examples


def run(folder, examples, *, model=None, valid=None, resume=False, adapters=ADAPTERS, **args):
    """Train (quietly, a report every step, no checkpoint before the end unless asked)."""
    settings = dict(iters=4, batch_size=2, learning_rate=1e-2, lr_schedule="constant",
                    steps_per_report=1, steps_per_eval=1000, save_every=1000, quiet=True)
    settings.update(args)
    model = model or make_model(adapters)
    datasets = {"train": examples, **({"valid": valid} if valid else {})}
    train(model, datasets, TrainingArgs(**settings), folder, adapters, PAD, resume=resume)
    return model, read_metrics(folder)


def adapters_of(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def frozen_of(model) -> dict:
    trainable = set(dict(tree_flatten(model.trainable_parameters())))
    return {k: np.array(v) for k, v in tree_flatten(model.parameters()) if k not in trainable}


def losses(metrics, key="train_loss"):
    return [(m["step"], m[key]) for m in metrics if key in m]


def assert_close_trees(a: dict, b: dict, tolerance: float):
    assert a.keys() == b.keys()
    for name in a:
        assert np.abs(a[name] - b[name]).max() <= tolerance, name


def assert_close_pairs(a, b, tolerance):
    assert [step for step, _ in a] == [step for step, _ in b]
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= tolerance


# --- learning -----------------------------------------------------------------------------------

def test_loss_goes_down_and_only_adapters_change(tmp_path):
    rng = np.random.default_rng(0)
    sequences = [[int(t) for t in rng.integers(1, VOCAB, 16)] for _ in range(2)]
    examples = [Example(list(s), 0) for s in sequences * 2]
    model = make_model({**ADAPTERS, "rank": 8})
    base_before, adapters_before = frozen_of(model), adapters_of(model)
    model, metrics = run(tmp_path, examples, model=model, iters=30, batch_size=4,
                         adapters={**ADAPTERS, "rank": 8})
    curve = [loss for _, loss in losses(metrics)]
    assert len(curve) == 30 and all(math.isfinite(x) for x in curve)
    assert curve[-1] < 0.3 * curve[0]
    assert np.mean(curve[-5:]) < np.mean(curve[:5])
    # base weights bit-identical; every adapter tensor moved
    base_after = frozen_of(model)
    assert base_after.keys() == base_before.keys() and len(base_after) > 0
    assert all(np.array_equal(base_before[k], base_after[k]) for k in base_before)
    after = adapters_of(model)
    assert all(not np.array_equal(adapters_before[k], after[k]) for k in after)
    # the final adapters are saved beside the metrics
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    assert_close_trees({k: np.array(v) for k, v in saved.items()}, after, 0.0)
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == {**ADAPTERS, "rank": 8}
    assert not model.training  # back in eval mode


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # equal lengths, so each micro-batch mean weighs the same as in the big batch
    examples = make_examples(4, lengths=(10, 10), masked=False)
    common = dict(iters=3, optimizer="sgd", learning_rate=0.5)
    big, big_metrics = run(tmp_path / "big", examples, batch_size=4, **common)
    small, small_metrics = run(tmp_path / "small", examples, batch_size=2,
                               grad_accumulation_steps=2, **common)
    assert_close_trees(adapters_of(small), adapters_of(big), 1e-5)
    assert_close_pairs(losses(small_metrics), losses(big_metrics), 1e-5)
    assert not np.allclose(adapters_of(big)["decoder.layers.0.attention.q_proj.lora_b"], 0)


def hand_gradient(examples):
    """Gradient of the batch loss at the initial adapters, and the initial adapters."""
    model = make_model()
    model.train()
    batch = [e.tokens for e in examples]
    inputs = mx.array(batch, dtype=mx.int32)
    labels = mx.array([[-100] * e.prompt_length + e.tokens[e.prompt_length:] for e in examples], dtype=mx.int32)
    _, grads = nn.value_and_grad(model, lambda m, x, y: m(x, labels=y).loss)(model, inputs, labels)
    return {k: np.array(v, np.float64) for k, v in tree_flatten(grads)}, adapters_of(model)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3, 1e6], ids=["no-clip", "clipped", "loose"])
def test_max_grad_norm_clips_the_step(tmp_path, max_grad_norm):
    examples = make_examples(4, lengths=(9, 9))
    grads, start = hand_gradient(examples)
    norm = math.sqrt(sum((g ** 2).sum() for g in grads.values()))
    lr = 0.1
    factor = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / norm)
    model, _ = run(tmp_path, examples, iters=1, batch_size=4, optimizer="sgd", learning_rate=lr,
                   max_grad_norm=max_grad_norm)
    expected = {k: start[k] - lr * factor * grads[k] for k in grads}
    got = adapters_of(model)
    scale = max(np.abs(v).max() for v in expected.values())
    assert_close_trees(got, expected, 1e-5 * scale)
    step = {k: got[k] - start[k] for k in got}
    step_norm = math.sqrt(sum((s ** 2).sum() for s in step.values()))
    assert step_norm == pytest.approx(lr * norm * factor, rel=1e-4)
    if max_grad_norm == 1e-3:
        assert norm > 1e-2  # the clip is active: the step is lr * 1e-3 long
        assert step_norm == pytest.approx(lr * 1e-3, rel=1e-4)


# --- learning-rate schedules --------------------------------------------------------------------

def expected_lr(step, lr, iters, warmup, schedule):
    """Written from the definitions: linear warmup from lr/warmup to lr over `warmup` steps,
    then cosine / linear decay to 0 over the remaining iters - warmup steps, or constant."""
    if step < warmup:
        return lr / warmup + (lr - lr / warmup) * step / warmup
    progress = min((step - warmup) / (iters - warmup), 1.0)
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr * (1 - progress)
    return lr


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 4])
def test_learning_rate_schedules(schedule, warmup):
    args = TrainingArgs(iters=20, learning_rate=2e-3, warmup=warmup, lr_schedule=schedule)
    rates = learning_rate_schedule(args)
    for step in (0, 1, 3, 4, 5, 10, 15, 19, 20):
        assert rates(mx.array(step)).item() == pytest.approx(
            expected_lr(step, 2e-3, 20, warmup, schedule), rel=1e-5, abs=1e-9), step
    if warmup:
        assert rates(mx.array(0)).item() == pytest.approx(2e-3 / 4)
        assert rates(mx.array(warmup)).item() == pytest.approx(2e-3)
    if schedule != "constant":
        assert rates(mx.array(20)).item() == pytest.approx(0.0, abs=1e-9)


def test_unknown_schedule_or_optimizer_is_an_error():
    with pytest.raises(CheckpointError, match="lr_schedule 'step'"):
        learning_rate_schedule(TrainingArgs(lr_schedule="step"))
    with pytest.raises(CheckpointError, match="optimizer 'lion'"):
        trainer.make_optimizer(TrainingArgs(optimizer="lion"))


# --- metrics, evaluation, plots --------------------------------------------------------------------

def test_metrics_file_has_reports_and_validation_at_the_configured_steps(tmp_path):
    examples, valid = make_examples(6), make_examples(5, seed=1)
    common = dict(iters=7, learning_rate=1e-2, warmup=2, lr_schedule="cosine", steps_per_eval=3,
                  val_batches=10)
    model, metrics = run(tmp_path / "a", examples, valid=valid, steps_per_report=3, **common)
    train_records = [m for m in metrics if "train_loss" in m]
    val_records = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in train_records] == [3, 6, 7]
    assert [m["step"] for m in val_records] == [3, 6, 7]
    assert all(set(m) == TRAIN_KEYS for m in train_records)
    assert all(set(m) == {"step", "val_loss"} for m in val_records)
    assert all(m["tokens_per_s"] > 0 and m["peak_memory_gb"] >= 0 for m in train_records)
    # the learning rate an update used: the schedule at step - 1 (MLX counts updates from 0)
    for m in train_records:
        assert m["learning_rate"] == pytest.approx(expected_lr(m["step"] - 1, 1e-2, 7, 2, "cosine"), rel=1e-5)
    # a report's train_loss is the mean over its window: compare with a run reporting every step
    _, every = run(tmp_path / "b", examples, valid=valid, steps_per_report=1, **common)
    per_step = dict(losses(every))
    windows = {3: [1, 2, 3], 6: [4, 5, 6], 7: [7]}
    for m in train_records:
        assert m["train_loss"] == pytest.approx(np.mean([per_step[s] for s in windows[m["step"]]]), abs=1e-5)
    # the last validation loss is evaluate() on the final adapters
    final = evaluate(model, valid, 2, PAD, 10)
    assert val_records[-1]["val_loss"] == pytest.approx(final, abs=1e-5)

    path = plot_loss_curve(tmp_path / "a")
    assert path == tmp_path / "a" / "loss_curve.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def hand_loss(model, examples):
    """Token-weighted mean next-token cross-entropy over the examples, in float64 numpy, one
    unpadded example at a time."""
    total, count = 0.0, 0
    for e in examples:
        logits = np.array(model(mx.array([e.tokens])).logits[0], np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        for t in range(max(e.prompt_length, 1), len(e.tokens)):
            total -= log_probs[t - 1, e.tokens[t]]
            count += 1
    return total / count


@pytest.mark.parametrize("batch_size, max_batches", [(1, None), (3, None), (4, None), (3, 1), (3, 2)])
def test_evaluate_is_the_token_weighted_mean_loss(batch_size, max_batches):
    model = make_model()
    for _, module in model.named_modules():  # adapters that do something
        if hasattr(module, "lora_b"):
            module.lora_b = mx.full(module.lora_b.shape, 0.05)
    examples = make_examples(7, seed=4, lengths=(3, 20))
    if max_batches is None:
        subset = examples
    else:
        order = length_grouped_batches(examples, batch_size, 0, 0)[:max_batches]
        subset = [examples[i] for batch in order for i in batch]
    got = evaluate(model, examples, batch_size, PAD, max_batches)
    assert got == pytest.approx(hand_loss(model, subset), rel=1e-5)
    # token weighting differs from a plain mean of per-example losses here
    per_example = np.mean([hand_loss(model, [e]) for e in subset])
    if len(subset) > 1:
        assert abs(got - per_example) > 1e-4


# --- checkpoints, resume, divergence -----------------------------------------------------------

def checkpoint_spy(monkeypatch):
    """Record, at each checkpoint, what is on disk and what the model holds."""
    original, seen = trainer._save_checkpoint, []

    def spy(folder, model, optimizer, step, *rest, **kwargs):
        original(folder, model, optimizer, step, *rest, **kwargs)
        checkpoint = Path(folder) / "checkpoint"
        seen.append({
            "step": step,
            "state": json.loads((checkpoint / "trainer_state.json").read_text()),
            "files": sorted(p.name for p in checkpoint.iterdir()),
            "adapters": {k: np.array(v) for k, v in mx.load(str(checkpoint / "adapters.safetensors")).items()},
            "optimizer": {k: np.array(v) for k, v in mx.load(str(checkpoint / "optimizer.safetensors")).items()},
            "model": adapters_of(model),
            "bytes": {p.name: p.read_bytes() for p in checkpoint.iterdir()},
        })

    monkeypatch.setattr(trainer, "_save_checkpoint", spy)
    return seen


def test_checkpoints_every_save_every_steps(tmp_path, monkeypatch):
    seen = checkpoint_spy(monkeypatch)
    model, _ = run(tmp_path, make_examples(6), iters=8, save_every=3)
    assert [s["step"] for s in seen] == [3, 6, 8]
    names = set(adapters_of(model))
    for record in seen:
        assert record["files"] == ["adapter_config.json", "adapters.safetensors",
                                   "optimizer.safetensors", "trainer_state.json"]
        assert record["state"]["step"] == record["step"]
        assert_close_trees(record["adapters"], record["model"], 0.0)
        # AdamW state: the update count and both moments of every adapter
        assert int(record["optimizer"]["step"]) == record["step"]
        assert {k for k in record["optimizer"] if k.endswith((".m", ".v"))} == \
            {f"{n}.{moment}" for n in names for moment in "mv"}
    assert not np.array_equal(seen[0]["adapters"]["decoder.layers.1.ffn.up_proj.lora_b"],
                              seen[1]["adapters"]["decoder.layers.1.ffn.up_proj.lora_b"])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


# A run killed for real: this script trains in a subprocess and stops dead (sleeps) in the
# middle of step HANG_STEP, after the checkpoint of step 3 and the report of step 4 are on
# disk; the test SIGKILLs it there. The hook is the trainer's step, outside the compiled
# functions (inside them Python runs only while tracing).
RESUME_ADAPTERS = {"fine_tune_type": "lora", "rank": 4, "scale": 2.0, "dropout": 0.1}
RESUME_ARGS = dict(iters=8, batch_size=2, grad_accumulation_steps=2, learning_rate=1e-2, warmup=2,
                   lr_schedule="cosine", save_every=3, steps_per_report=2, steps_per_eval=4,
                   val_batches=2, max_grad_norm=1.0, seed=5)
HANG_STEP = 5
SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import mlx_mobilellm  # first, as in the tests' own process: the same BLAS, the same numbers
import test_trainer
from mlx_mobilellm.training import trainer

steps = 0
original = trainer.TrainingStep.loss_and_gradients

def hanging_loss_and_gradients(self, batches):
    global steps
    steps += 1
    if steps == {hang_step}:  # its micro-batches drawn, its random state seeded
        Path({marker!r}).write_text("hanging")
        time.sleep(600)
    return original(self, batches)

trainer.TrainingStep.loss_and_gradients = hanging_loss_and_gradients
test_trainer.resume_run({folder!r}, resume=False)
"""


def resume_run(folder, resume: bool):
    """Model dropout and adapter dropout on, accumulation, warmup + cosine, clipping: every
    random and stateful part of a run has to be restored."""
    model = make_model(RESUME_ADAPTERS, dropout=0.1)
    return run(folder, make_examples(7), valid=make_examples(3, seed=1), model=model,
               resume=resume, adapters=RESUME_ADAPTERS, **RESUME_ARGS)


def test_killed_run_resumes_to_the_same_adapters_and_losses(tmp_path):
    folder, marker = tmp_path / "killed", tmp_path / "hanging"
    script = tmp_path / "train_then_hang.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), hang_step=HANG_STEP, marker=str(marker),
                                    folder=str(folder)))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"the training subprocess ended early:\n{process.stderr.read()}")
            assert time.monotonic() < deadline, "the training subprocess did not reach its step"
            time.sleep(0.05)
        state = json.loads((folder / "checkpoint" / "trainer_state.json").read_text())
        assert state["step"] == 3
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    # the dead run had logged past its checkpoint (step 4's report and validation)
    assert [m["step"] for m in read_metrics(folder)] == [2, 4, 4]
    assert not (folder / "adapters.safetensors").exists()

    resumed, resumed_metrics = resume_run(folder, resume=True)
    reference, reference_metrics = resume_run(tmp_path / "uninterrupted", resume=False)

    assert [(m["step"], sorted(m)) for m in resumed_metrics] == \
        [(m["step"], sorted(m)) for m in reference_metrics]
    assert [m["step"] for m in reference_metrics if "train_loss" in m] == [2, 4, 6, 8]
    for key in ("train_loss", "val_loss", "learning_rate"):
        assert_close_pairs(losses(resumed_metrics, key), losses(reference_metrics, key), 1e-5)
    assert_close_trees(adapters_of(resumed), adapters_of(reference), 1e-5)
    on_disk = [{k: np.array(v) for k, v in mx.load(str(f / "adapters.safetensors")).items()}
               for f in (folder, tmp_path / "uninterrupted")]
    assert_close_trees(*on_disk, 1e-5)
    # and resuming really restored something: the adapters are not those of a fresh start
    fresh = adapters_of(make_model(RESUME_ADAPTERS))
    assert np.abs(fresh["decoder.layers.0.attention.q_proj.lora_b"]
                  - adapters_of(resumed)["decoder.layers.0.attention.q_proj.lora_b"]).max() > 1e-3


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        run(tmp_path, make_examples(4), resume=True)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, bad):
    seen = checkpoint_spy(monkeypatch)
    original, calls = trainer.TrainingStep.loss_and_gradients, []

    def diverging_loss_and_gradients(self, batches):
        calls.append(1)
        loss, grads = original(self, batches)
        return (loss * float(bad) if len(calls) >= 5 else loss), grads

    monkeypatch.setattr(trainer.TrainingStep, "loss_and_gradients", diverging_loss_and_gradients)
    model = make_model()
    with pytest.raises(TrainingDiverged) as error:
        run(tmp_path, make_examples(6), model=model, iters=10, save_every=2)
    message = str(error.value)
    assert "diverged at step 5" in message and "step 4" in message
    assert str(tmp_path / "checkpoint") in message
    assert isinstance(error.value, CheckpointError)  # the CLI prints it as one line
    assert [s["step"] for s in seen] == [2, 4]
    checkpoint = tmp_path / "checkpoint"
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == seen[-1]["bytes"]
    # the model still holds the step-4 adapters: no NaN update was applied
    assert_close_trees(adapters_of(model), seen[-1]["model"], 0.0)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize("adapter_dropout, model_dropout", [(0.0, 0.0), (0.2, 0.1)])
def test_gradient_checkpointing_gives_the_same_training(tmp_path, adapter_dropout, model_dropout):
    adapters = {**ADAPTERS, "fine_tune_type": "dora", "dropout": adapter_dropout}
    examples = make_examples(6)
    results = []
    for checkpointing in (False, True):
        model = make_model(adapters, dropout=model_dropout)
        results.append(run(tmp_path / str(checkpointing), examples, model=model, adapters=adapters,
                           iters=4, grad_checkpoint=checkpointing))
    (plain, plain_metrics), (checkpointed, checkpointed_metrics) = results
    assert checkpointed.decoder.gradient_checkpointing and not plain.decoder.gradient_checkpointing
    assert_close_pairs(losses(checkpointed_metrics), losses(plain_metrics), 1e-5)
    assert_close_trees(adapters_of(checkpointed), adapters_of(plain), 1e-5)


# --- the compiled step --------------------------------------------------------------------------

def quantized_model(adapters, **overrides):
    """make_model's model with its linear layers in 4 bits (QLoRA); width 64 and FFN 128 are
    multiples of the group size."""
    model = tiny_model(VOCAB, seed=0, embed_dim=64, hidden_dim=128, **overrides)
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda _, module: isinstance(module, nn.Linear))
    mx.random.seed(1)
    apply_adapters(model, adapters)
    return model


def run_uncompiled(*args, **kwargs):
    mx.disable_compile()
    try:
        return run(*args, **kwargs)
    finally:
        mx.enable_compile()


@pytest.mark.parametrize("kind, build, grad_checkpoint", [
    ("lora", make_model, False), ("lora", make_model, True), ("dora", make_model, True),
    ("lora", quantized_model, True)], ids=["lora", "lora-checkpointed", "dora-checkpointed", "qlora"])
def test_compiled_step_trains_as_the_uncompiled_one(tmp_path, kind, build, grad_checkpoint):
    # Adapter and model dropout, accumulation and clipping: every input the compiled functions
    # must take afresh each call (adapters, optimizer state, random state) is exercised; one
    # captured as a constant of the first trace would repeat its masks or undo its updates.
    adapters = {**ADAPTERS, "fine_tune_type": kind, "dropout": 0.2}
    settings = dict(iters=5, grad_accumulation_steps=2, max_grad_norm=0.5, warmup=2,
                    lr_schedule="cosine", grad_checkpoint=grad_checkpoint, seed=3)
    examples = make_examples(6)
    compiled, compiled_metrics = run(tmp_path / "compiled", examples, adapters=adapters,
                                     model=build(adapters, dropout=0.1), **settings)
    plain, plain_metrics = run_uncompiled(tmp_path / "plain", examples, adapters=adapters,
                                          model=build(adapters, dropout=0.1), **settings)
    assert_close_pairs(losses(compiled_metrics), losses(plain_metrics), 1e-5)
    assert_close_trees(adapters_of(compiled), adapters_of(plain), 1e-5)
    fresh = adapters_of(build(adapters))
    assert not np.allclose(fresh["decoder.layers.0.ffn.up_proj.lora_b"],
                           adapters_of(compiled)["decoder.layers.0.ffn.up_proj.lora_b"])


def loss_calls(monkeypatch) -> list:
    """The batch width of every call of the trainer's loss in Python, from now on."""
    original, widths = trainer._loss, []

    def counted_loss(model, inputs, labels):
        widths.append(inputs.shape[1])
        return original(model, inputs, labels)

    monkeypatch.setattr(trainer, "_loss", counted_loss)
    return widths


def test_the_step_is_traced_once_per_batch_shape(tmp_path, monkeypatch):
    # Compiled, the loss runs in Python only while a step is traced: once for a first
    # micro-batch and once for a later one (which adds to the gradients so far), then never
    # again while the batch shape stays the same. Uncompiled it would run for every one.
    calls = loss_calls(monkeypatch)
    run(tmp_path, make_examples(4, lengths=(10, 10)), iters=4, grad_accumulation_steps=2)
    assert calls == [10, 10]


def test_past_the_compiled_shapes_new_ones_run_uncompiled(tmp_path, monkeypatch):
    # Every traced shape keeps its graph: with room for two, the batches of the other two
    # widths run in Python every time, and the training is still the same.
    monkeypatch.setattr(trainer, "MAX_COMPILED_SHAPES", 2)
    calls = loss_calls(monkeypatch)
    examples = [Example([int(t) for t in np.arange(1, width + 1)], 0)
                for width in (6, 6, 8, 8, 10, 10, 12, 12)]
    model, metrics = run(tmp_path / "capped", examples, iters=8, batch_size=2)
    # two epochs of one batch per width, in shuffled orders: the first two widths seen are
    # traced once, the other two run both times
    counts = Counter(calls)
    assert sorted(counts.items()) == sorted({**dict.fromkeys((6, 8, 10, 12), 2),
                                             **dict.fromkeys(calls[:2], 1)}.items())
    reference, reference_metrics = run_uncompiled(tmp_path / "plain", examples, iters=8, batch_size=2)
    assert_close_pairs(losses(metrics), losses(reference_metrics), 1e-5)
    assert_close_trees(adapters_of(model), adapters_of(reference), 1e-5)

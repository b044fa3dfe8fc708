"""The training loop: optimizer and schedule, gradient accumulation and clipping, validation,
metrics, checkpoints that a later run resumes from, and a stop on NaN.

The loop reads its data through TrainingData, so that fine-tuning on JSONL examples (train)
and pretraining on a packed token stream (training/packed.py) run the same steps."""

from __future__ import annotations

import json
import math
import reprlib
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..errors import CheckpointError, ParameterError
from ..input_checks import is_finite_number, is_whole_number, read_json_object
from ..lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FULL, LoRALinear, adapter_weights,
                    check_tensors, read_safetensors, save_adapters)
from ..sampling import check_seed
from . import distributed
from .data import iterate_batches

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
# The adapter options a checkpoint's adapters are shaped by: a resumed run must ask for the same.
ADAPTER_SHAPE_OPTIONS = ("fine_tune_type", "rank", "keys", "num_layers")


@dataclass
class TrainingArgs:
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    min_learning_rate: float = 0.0
    """Where the cosine and linear schedules end."""
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    """cosine, linear (decay to min_learning_rate after warmup) or constant."""
    warmup: int = 0
    grad_accumulation_steps: int = 1
    max_grad_norm: Optional[float] = None
    grad_checkpoint: bool = False
    seed: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    quiet: bool = False


class TrainingDiverged(ParameterError):
    """The loss stopped being finite; the message says which parameters to change."""
    pass


def learning_rate_schedule(args: TrainingArgs):
    steps = max(args.iters - args.warmup, 1)
    if args.lr_schedule == "cosine":
        decay = optim.cosine_decay(args.learning_rate, steps, args.min_learning_rate)
    elif args.lr_schedule == "linear":
        decay = optim.linear_schedule(args.learning_rate, args.min_learning_rate, steps)
    elif args.lr_schedule == "constant":
        decay = lambda step: mx.array(args.learning_rate)  # noqa: E731
    else:
        raise ParameterError(lambda name: f"{name('lr_schedule')} {args.lr_schedule!r}: use cosine, "
                             "linear or constant")
    if not args.warmup:
        return decay
    warmup = optim.linear_schedule(args.learning_rate / args.warmup, args.learning_rate, args.warmup)
    return optim.join_schedules([warmup, decay], [args.warmup])


def make_optimizer(args: TrainingArgs) -> optim.Optimizer:
    schedule = learning_rate_schedule(args)
    if args.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return optim.Adam(learning_rate=schedule)
    if args.optimizer == "sgd":
        return optim.SGD(learning_rate=schedule, weight_decay=args.weight_decay)
    raise ParameterError(lambda name: f"{name('optimizer')} {args.optimizer!r}: use adamw, adam or sgd")


def _loss(model, inputs, labels):
    return model(inputs, labels=labels).loss


def _weighted_loss(model, inputs, labels, weight):
    """A rank's loss times its share of the batch's tokens (1 on one rank): distributed.shard."""
    return _loss(model, inputs, labels) * weight


def evaluate(model, examples, batch_size: int, pad_id: int, max_batches: Optional[int] = None) -> float:
    """Mean loss per counted token over (up to max_batches) batches."""
    total, tokens = 0.0, 0
    batches = iterate_batches(examples, min(batch_size, len(examples)), pad_id, loop=False)
    for number, (inputs, labels) in enumerate(batches):
        if max_batches is not None and number >= max_batches:
            break
        counted = (labels[:, 1:] != -100).sum().item()
        total += _loss(model, inputs, labels).item() * counted
        tokens += counted
    return total / max(tokens, 1)


@dataclass
class TrainingData:
    """What the loop trains on. micro_batches(start): the (inputs, labels) micro-batches from
    micro-batch number `start` on, the same ones whenever asked, so that a resumed run sees
    what an uninterrupted one would. validate(model), if given: the validation metrics
    ({"val_loss": ...}, VALIDATION_LABELS' keys) of the model in eval mode."""
    micro_batches: Callable[[int], Iterator]
    validate: Optional[Callable[[nn.Module], dict]] = None


# How the progress output names the validation metrics.
VALIDATION_LABELS = {"val_loss": "validation loss", "val_perplexity": "perplexity"}


def example_data(datasets: dict, args: TrainingArgs, pad_id: int) -> TrainingData:
    """TrainingData over JSONL examples ({split: [Example]}): length-grouped batches, and the
    mean loss over the "valid" split when there is one."""
    def micro_batches(start):
        return iterate_batches(datasets["train"], args.batch_size, pad_id, args.seed,
                               start_step=start)

    def validate(model):
        return {"val_loss": evaluate(model, datasets["valid"], args.batch_size, pad_id,
                                     args.val_batches)}

    return TrainingData(micro_batches, validate if "valid" in datasets else None)


def _save_checkpoint(folder: Path, model, optimizer, step: int, adapter_config: dict,
                     window: Optional[dict] = None) -> None:
    """The trainable parameters (adapters, or a full fine-tune's weights) under the adapters'
    file names, optimizer state and step (and the loss-report window in progress), written
    to a temporary folder then swapped in."""
    temporary = folder / f".{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    save_adapters(temporary, model, adapter_config)
    mx.save_safetensors(str(temporary / OPTIMIZER_STATE), dict(tree_flatten(optimizer.state)))
    (temporary / TRAINER_STATE).write_text(json.dumps({"step": step, **(window or {})}) + "\n")
    final = folder / CHECKPOINT_DIR
    previous = folder / f".{CHECKPOINT_DIR}.old"
    if final.exists():
        final.rename(previous)
    temporary.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


def _resume(folder: Path, model, optimizer, adapter_config: dict, iters: int) -> dict:
    """Restore the trainable parameters and optimizer of the checkpoint in `folder` and return
    its trainer state. Every file is read and checked before anything is restored."""
    checkpoint = folder / CHECKPOINT_DIR
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no checkpoint to resume from")
    saved_config = read_json_object(checkpoint / ADAPTER_CONFIG)
    for key in ADAPTER_SHAPE_OPTIONS:
        if saved_config.get(key) != adapter_config.get(key):
            raise CheckpointError(f"{checkpoint / ADAPTER_CONFIG}: the checkpoint has {key} "
                                  f"{saved_config.get(key)!r} but this run asks for "
                                  f"{adapter_config.get(key)!r}; resume with the same adapter "
                                  "options")
    state = _trainer_state(checkpoint / TRAINER_STATE, iters)
    adapters = read_safetensors(checkpoint / ADAPTER_WEIGHTS)
    check_tensors(checkpoint / ADAPTER_WEIGHTS, adapters, adapter_weights(model), "the adapters "
                  "of this run", "was the checkpoint written by another version or edited?")
    optimizer_state = read_safetensors(checkpoint / OPTIMIZER_STATE)
    check_tensors(checkpoint / OPTIMIZER_STATE, optimizer_state,
                  dict(tree_flatten(optimizer.state)), "this run's optimizer state",
                  "resume with the optimizer it was saved with")
    model.load_weights(list(adapters.items()), strict=False)
    optimizer.state = tree_unflatten(list(optimizer_state.items()))
    return state


def _trainer_state(path: Path, iters: int) -> dict:
    """trainer_state.json: the step, and the loss-report window in progress (optional)."""
    state = read_json_object(path)
    counts = {"step": state.get("step"), "window_steps": state.get("window_steps", 0),
              "window_tokens": state.get("window_tokens", 0)}
    for name, value in counts.items():
        if not is_whole_number(value) or value < 0:
            raise CheckpointError(f"{path}: '{name}' must be a whole number >= 0, got "
                                  f"{reprlib.repr(value)}")
    loss = state.get("window_loss", 0.0)
    if not is_finite_number(loss):
        raise CheckpointError(f"{path}: 'window_loss' must be a finite number, got "
                              f"{reprlib.repr(loss)}")
    if counts["step"] > iters:
        raise ParameterError(lambda name: f"{path}: the checkpoint is at step {counts['step']}, "
                             f"beyond {name('iters')} ({iters}); resume with {name('iters')} of at "
                             f"least {counts['step']}")
    return {**counts, "window_loss": float(loss)}


def _truncate_metrics(folder: Path, step: int) -> None:
    """Drop the records an interrupted run logged after its last checkpoint: the resumed run
    logs those steps again."""
    kept = [m for m in read_metrics(folder) if m["step"] <= step]
    temporary = folder / f".{METRICS_FILE}.tmp"
    temporary.write_text("".join(json.dumps(m) + "\n" for m in kept))
    temporary.replace(folder / METRICS_FILE)


def _set_dropout_keys(model) -> None:
    """A fresh dropout key per adapter, drawn here, outside any gradient checkpoint, so that
    a checkpointed block recomputed in the backward pass draws the same masks."""
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear) and m.dropout_p > 0]
    if adapters:
        keys = mx.random.split(mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32), len(adapters))
        for module, key in zip(adapters, keys):
            module.set_dropout_key(key)


def _clear_dropout_keys(model) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.set_dropout_key(None)


# Each batch shape gets its own trace, kept for the whole run (about 10 MB of graph for the
# demo model, measured). Past this many shapes, new ones run uncompiled: tracing a shape costs
# about what compiling saves on one step, so this bounds memory without slowing anything down.
MAX_COMPILED_SHAPES = 8


class TrainingStep:
    """One optimizer step: the mean loss and gradients over its micro-batches, then the update.

    Both halves are compiled (mx.compile, like mlx-lm's trainer): the model's arrays (frozen
    ones too), the optimizer's state and MLX's random state are the compiled functions' inputs
    and outputs, so each call sees the current values rather than those of its first trace.
    The dropout keys are drawn from that random state inside the compiled call. The update is
    a separate call so that the trainer can refuse a non-finite loss before anything changes.
    Compiled or not, a step draws the same random numbers and computes the same values, so
    MLX_DISABLE_COMPILE=1 (or mx.disable_compile()) runs the same training, uncompiled.
    Launched on several ranks, each computes its rows' share of the loss and gradients and
    the ranks sum them once per step, outside the compiled functions, so that compiling
    changes nothing there either.
    """

    def __init__(self, model, optimizer, args: TrainingArgs, group):
        self.model, self.optimizer, self.args, self.group = model, optimizer, args, group
        self._loss_and_grad = nn.value_and_grad(model, _weighted_loss)
        state = [model.state, optimizer.state, mx.random.state]
        self._compiled_micro_batch = mx.compile(self._micro_batch, inputs=state, outputs=state)
        self._compiled_shapes = set()
        self._update = mx.compile(self._apply, inputs=state, outputs=state)

    def _micro_batch_function(self, inputs, grads):
        """The compiled micro-batch function for a shape traced already or with room left for
        one more, else the plain function. A first micro-batch (grads None) and a later one
        are different traces."""
        shape = (inputs.shape, grads is None)
        if shape not in self._compiled_shapes and len(self._compiled_shapes) < MAX_COMPILED_SHAPES:
            self._compiled_shapes.add(shape)
        return self._compiled_micro_batch if shape in self._compiled_shapes else self._micro_batch

    def _micro_batch(self, inputs, labels, weight, grads):
        """(loss, grads + this micro-batch's gradients); grads is None for the first."""
        _set_dropout_keys(self.model)
        loss, micro_grads = self._loss_and_grad(self.model, inputs, labels, weight)
        _clear_dropout_keys(self.model)  # the keys are this trace's arrays: none may outlive it
        return loss, micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)

    def _apply(self, grads):
        grads = tree_map(lambda g: g / self.args.grad_accumulation_steps, grads)
        if self.args.max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, self.args.max_grad_norm)
        self.optimizer.update(self.model, grads)

    def loss_and_gradients(self, batches: list):
        """(mean loss as a float, summed gradients) over the (inputs, labels, weight)
        micro-batches of distributed.shard, summed over the ranks."""
        total, grads = 0.0, None
        for inputs, labels, weight in batches:
            loss, grads = self._micro_batch_function(inputs, grads)(inputs, labels, weight, grads)
            total = total + loss
        summed = distributed.sum_over_ranks({"loss": total / len(batches), "grads": grads},
                                            self.group)
        mx.eval(summed)
        return summed["loss"].item(), summed["grads"]

    def apply(self, grads) -> None:
        """The optimizer update with the mean of the summed gradients (clipped if asked)."""
        self._update(grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)


def _log(folder: Path, record: dict) -> None:
    with (folder / METRICS_FILE).open("a") as f:
        f.write(json.dumps(record) + "\n")


def train(model, datasets: dict, args: TrainingArgs, adapter_path, adapter_config: dict,
          pad_id: int, resume: bool = False) -> dict:
    """Train the model's trainable parameters on JSONL examples ({split: [Example]}, "train"
    and optionally "valid"); see train_on."""
    return train_on(model, example_data(datasets, args, pad_id), args, adapter_path,
                    adapter_config, resume)


def train_on(model, data: TrainingData, args: TrainingArgs, adapter_path,
             adapter_config: dict, resume: bool = False) -> dict:
    """Train the model's trainable parameters; return the last metrics. They are saved to
    adapter_path's checkpoint (with the optimizer state) every save_every steps, and adapters
    also beside it at the end; a "full" fine-tune leaves the trained model to its caller to
    save. Launched on several ranks (mlx.launch), they share each batch and rank 0 alone
    writes and reports."""
    group = distributed.world()
    distributed.check_batch_size(args.batch_size, group)
    main = distributed.is_main(group)
    if not main:
        args = replace(args, quiet=True)
    folder = Path(adapter_path)
    if main:
        folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(check_seed(args.seed))
    if args.grad_checkpoint:
        model.enable_gradient_checkpointing()
    model.train()
    optimizer = make_optimizer(args)
    optimizer.init(model.trainable_parameters())
    # Rank 0 alone reads the checkpoint: the other machines need no copy of it.
    resumed = resume and main
    state = (_resume(folder, model, optimizer, adapter_config, args.iters) if resumed
             else {"step": 0})
    state["step"] = distributed.share_main_state(model, optimizer, state["step"], group)
    if resumed:
        _truncate_metrics(folder, state["step"])
    elif main:
        (folder / METRICS_FILE).unlink(missing_ok=True)
    try:
        return _train_steps(model, data, args, folder, adapter_config, optimizer, state, group)
    finally:
        _clear_dropout_keys(model)


def _train_steps(model, data: TrainingData, args, folder, adapter_config, optimizer, state,
                 group) -> dict:
    start, main = state["step"], distributed.is_main(group)

    training_step = TrainingStep(model, optimizer, args, group)
    micro_batches = data.micro_batches(start * args.grad_accumulation_steps)
    from tqdm import tqdm

    bar = tqdm(total=args.iters, initial=start, disable=args.quiet, desc="training")
    # A checkpoint taken between two reports carries the window in progress, so that a resumed
    # run reports the same mean losses as an uninterrupted one.
    window_loss, window_steps, window_tokens, window_start = (
        state.get("window_loss", 0.0), state.get("window_steps", 0), state.get("window_tokens", 0),
        time.perf_counter())
    last, saved_step = {}, (start or None)
    for step in range(start + 1, args.iters + 1):
        # Dropout masks independent of resuming.
        mx.random.seed(distributed.step_seed(args.seed, step, group))
        batches = [next(micro_batches) for _ in range(args.grad_accumulation_steps)]
        step_loss, grads = training_step.loss_and_gradients(
            [distributed.shard(inputs, labels, group) for inputs, labels in batches])
        window_tokens += sum(distributed.counted_tokens(labels) for _, labels in batches)
        if not math.isfinite(step_loss):
            saved = (f"; the weights of step {saved_step} are kept in {folder / CHECKPOINT_DIR}"
                     if saved_step else "")
            raise TrainingDiverged(lambda name: f"training diverged at step {step}: loss is "
                                   f"{step_loss}{saved}; lower {name('learning_rate')} or set "
                                   f"{name('max_grad_norm')}")
        training_step.apply(grads)
        window_loss += step_loss
        window_steps += 1
        bar.update(1)

        if step % args.steps_per_report == 0 or step == args.iters:
            elapsed = time.perf_counter() - window_start
            last = {"step": step, "train_loss": window_loss / window_steps,
                    "learning_rate": optimizer.learning_rate.item(),
                    "tokens_per_s": window_tokens / elapsed,
                    "peak_memory_gb": mx.get_peak_memory() / 1e9}
            if main:
                _log(folder, last)
            bar.set_postfix(loss=f"{last['train_loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                            mem_gb=f"{last['peak_memory_gb']:.2f}")
            window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        evaluating = step % args.steps_per_eval == 0 or step == args.iters
        if main and data.validate is not None and evaluating:
            model.eval()
            record = data.validate(model)
            model.train()
            _log(folder, {"step": step, **record})
            if not args.quiet:
                bar.write(f"step {step}: " + ", ".join(f"{VALIDATION_LABELS[k]} {v:.3f}"
                                                       for k, v in record.items()))
        if step % args.save_every == 0 or step == args.iters:
            if main:
                _save_checkpoint(folder, model, optimizer, step, adapter_config,
                                 {"window_loss": window_loss, "window_steps": window_steps,
                                  "window_tokens": window_tokens})
            saved_step = step
    bar.close()
    # A fully fine-tuned model is the result itself, which its caller saves as a model folder
    # (the converter's writer, which the library may not import); its trainable parameters,
    # written here, would be a second copy of the weights.
    if main and adapter_config.get("fine_tune_type") != FULL:
        save_adapters(folder, model, adapter_config)
    model.eval()
    return last


def read_metrics(folder) -> list:
    """The records of metrics.jsonl (none when there is no file), each an object with a step."""
    path = Path(folder) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise CheckpointError(f"{path}:{number}: not a metrics record (a JSON object with a "
                                  "step); delete the line, or the file to start the log afresh")
        records.append(record)
    return records


def plot_loss_curve(folder) -> Optional[Path]:
    """loss_curve.png from the metrics file, if matplotlib (the `plot` extra) is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: pip install matplotlib for a loss-curve PNG", file=sys.stderr)
        return None
    metrics = read_metrics(folder)
    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if points:
            axes.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    path = Path(folder) / "loss_curve.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


"""`mlx-mobilellm train`: pretrain a model from scratch, a preset (--config 140m) or a JSON file of
MobileLLMConfig fields, on a folder of local text.

The text is tokenized once into OUTPUT/tokens (training/token_file.py) and cut into packed
windows (training/packed.py); the loop is lora's (training/trainer.py) in its full mode, on a
freshly initialised model (training/initialization.py). OUTPUT ends up an MLX model folder
beside metrics.jsonl, loss_curve.png, the checkpoint (for --resume) and the token file.
Flags are lora's where the idea is the same; the defaults are pretraining's (AdamW with weight
decay 0.1, warmup then cosine decay to a tenth of the peak, clipping at 1), as in nanoGPT.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import SimpleNamespace

from ..errors import CheckpointError
from .lora import LR_SCHEDULES, OPTIMIZERS, STEP_COUNTS, check_training_bounds
from .options import Option, add_options

TRAIN_OPTIONS = (
    Option("config", None, "the model: a preset (140m, 360m, 950m, 7b, 70b, 671b) or a JSON "
           "file of MobileLLMConfig fields; vocab_size and the BOS/EOS ids come from the "
           "tokenizer", str, required=True),
    Option("tokenizer", None, "a model folder, a folder of tokenizer files or a .gguf file to "
           "take the tokenizer from (default: the built-in demo model's, SmolLM2's)", str),
    Option("data", None, "folder of .txt files (each one document) and/or .jsonl files of "
           '{"text": ...} lines (each line one document), read recursively', str,
           required=True),
    Option("output", "pretrained", "folder for the model, metrics.jsonl, loss_curve.png, the "
           "checkpoint and the token file (tokens/)", str),
    Option("seq_length", 1024, "tokens per training window (at most the config's max_seq_len)",
           int),
    Option("val_fraction", 0.01, "the share of the tokens, at the end of the text, held out "
           "for validation (at least one window); 0: no validation", float),
    Option("batch_size", 8, "windows per step", int),
    Option("iters", 1000, "training steps", int),
    Option("learning_rate", 1e-3, "peak learning rate", float),
    Option("min_lr", None, "learning rate at the end of the cosine or linear decay (default: "
           "a tenth of --learning-rate)", float),
    Option("optimizer", "adamw", "adam, adamw or sgd", str, OPTIMIZERS),
    Option("weight_decay", 0.1, "weight decay (adamw, sgd)", float),
    Option("lr_schedule", "cosine", "constant, cosine or linear decay after the warmup", str,
           LR_SCHEDULES),
    Option("warmup", 100, "linear warmup steps", int),
    Option("grad_accumulation_steps", 1, "micro-batches per optimizer step", int),
    Option("grad_clip", 1.0, "clip the gradients' global norm to this; 0: no clipping", float),
    Option("grad_checkpoint", False, "recompute activations in the backward pass (less memory)"),
    Option("seed", 0, "random seed (initial weights, batch windows)", int),
    Option("steps_per_report", 10, "steps between training-loss reports", int),
    Option("steps_per_eval", 200, "steps between validation losses", int),
    Option("val_batches", 25, "validation batches; -1: every held-out window", int),
    Option("save_every", 100, "steps between checkpoints (for --resume)", int),
    Option("resume", False, "continue from the checkpoint in --output"),
    Option("quiet", False, "no progress bars or reports"),
)
# Library parameters that these options set under another name.
PARAMETER_ALIASES = {"max_grad_norm": "grad_clip", "min_learning_rate": "min_lr"}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, TRAIN_OPTIONS)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(s) -> None:
    """Every flag value, before any work: the first bad one is refused in one line."""
    check_training_bounds(vars(s), TRAIN_OPTIONS,
                          {**dict.fromkeys(STEP_COUNTS, 1), "seq_length": 2, "warmup": 0},
                          ("val_batches",))
    if s.min_lr is not None and not 0 <= s.min_lr <= s.learning_rate:
        raise CheckpointError(f"--min-lr must be in [0, --learning-rate {s.learning_rate}], "
                              f"got {s.min_lr}")
    for name in ("weight_decay", "grad_clip"):
        if not 0 <= getattr(s, name) < math.inf:
            raise CheckpointError(f"{_flag(name)} must be >= 0 and finite, got {getattr(s, name)}")
    if not 0 <= s.val_fraction < 1:
        raise CheckpointError(f"--val-fraction must be in [0, 1), got {s.val_fraction}")
    for name in ("output", "data"):
        if not getattr(s, name):  # Path("") is the current directory
            raise CheckpointError(f"{_flag(name)} is empty; name a folder")
    output, data = Path(s.output), Path(s.data)
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"--output {output}: is a file; it names a folder (made if "
                              "missing) for the model, metrics, checkpoint and token file")
    if not data.is_dir():
        raise CheckpointError(f"--data {data}: not a folder; name a folder of .txt and/or "
                              ".jsonl files")
    if output.resolve().is_relative_to(data.resolve()):
        raise CheckpointError(f"--output {output} is inside --data {data}: its metrics.jsonl "
                              "would be read as training text; put it elsewhere")


def open_tokenizer(spec):
    """(tokenizer, its files for tokenizer_identity, the source whose tokenizer files the model
    folder gets) from a folder or a .gguf file; None: the demo model's."""
    from ..demo import demo_model_path
    from ..tokenizer import read_tokenizer_files, tokenizer_from_files, tokenizer_from_gguf_metadata

    path = demo_model_path() if spec is None else Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        from ..formats.gguf_file import read_metadata
        from ..formats.gguf_tokenizer import tokenizer_files

        metadata = read_metadata(path)[0]
        tokenizer = tokenizer_from_gguf_metadata(metadata, str(path))
        files, source = tokenizer_files(metadata), SimpleNamespace(folder=None,
                                                                   gguf_metadata=metadata)
    elif path.is_dir():
        files = read_tokenizer_files(path)
        tokenizer = tokenizer_from_files(files, str(path))
        source = SimpleNamespace(folder=path, gguf_metadata=None)
    else:
        raise CheckpointError(f"--tokenizer {spec}: not a folder or a .gguf file; name a model "
                              "folder, a folder of tokenizer files or a .gguf file")
    if tokenizer is None:
        raise CheckpointError(f"--tokenizer {path}: no tokenizer (tokenizer.json, "
                              "tokenizer.model or GGUF tokenizer metadata)")
    return tokenizer, files, source


def model_and_tokenizer(s):
    """(config fitted to the tokenizer, note or None, tokenizer, its files, its source); the
    window length checked against the config."""
    from ..training.initialization import fit_to_tokenizer, read_model_config

    config = read_model_config(s.config)
    tokenizer, files, source = open_tokenizer(s.tokenizer)
    config, note = fit_to_tokenizer(config, tokenizer)
    if s.seq_length > config.max_seq_len:
        raise CheckpointError(f"--seq-length {s.seq_length} is beyond the config's max_seq_len "
                              f"({config.max_seq_len}); lower it")
    return config, note, tokenizer, files, source


def _check_resumable(folder: Path, adapter_config: dict) -> None:
    """A checkpoint to resume, of this model: another config would fail, later, on a shape."""
    from ..input_checks import read_json_object
    from ..lora import ADAPTER_CONFIG
    from ..training.trainer import CHECKPOINT_DIR

    path = folder / CHECKPOINT_DIR / ADAPTER_CONFIG
    if not path.exists():
        raise CheckpointError(f"{folder / CHECKPOINT_DIR}: no checkpoint to resume from")
    saved = read_json_object(path).get("model_config")
    if saved != adapter_config["model_config"]:
        raise CheckpointError(f"{path}: the checkpoint is of another model config; resume with "
                              "the --config and --tokenizer it was trained with")


def _training_args(s, quiet: bool):
    from ..training.trainer import TrainingArgs

    return TrainingArgs(
        iters=s.iters, batch_size=s.batch_size, learning_rate=s.learning_rate,
        min_learning_rate=s.learning_rate / 10 if s.min_lr is None else s.min_lr,
        optimizer=s.optimizer, weight_decay=s.weight_decay, lr_schedule=s.lr_schedule,
        warmup=s.warmup, grad_accumulation_steps=s.grad_accumulation_steps,
        max_grad_norm=s.grad_clip or None, grad_checkpoint=s.grad_checkpoint, seed=s.seed,
        steps_per_report=s.steps_per_report, steps_per_eval=s.steps_per_eval,
        val_batches=None if s.val_batches == -1 else s.val_batches, save_every=s.save_every,
        quiet=quiet)


def run_train(args: argparse.Namespace) -> None:
    from convert.save import save_model_into

    from ..training.distributed import check_batch_size, is_main, world
    from ..training.initialization import fresh_model
    from ..training.packed import check_sizes, packed_data, validation_size
    from ..training.token_file import shared_tokens, text_sources, tokenizer_identity
    from ..training.trainer import plot_loss_curve, train_on

    s = args
    _check(s)
    check_batch_size(s.batch_size, world())
    main = is_main(world())
    quiet = s.quiet or not main  # launched on several ranks, rank 0 alone prints and writes
    config, note, tokenizer, files, source = model_and_tokenizer(s)
    data, folder = Path(s.data), Path(s.output)
    text_sources(data)  # no text: refused before anything is written
    adapter_config = {"fine_tune_type": "full", "num_layers": config.num_layers,
                      "model_config": config.to_dict()}
    if s.resume and main:
        _check_resumable(folder, adapter_config)
    if note and not quiet:
        print(note, file=sys.stderr)

    tokens = shared_tokens(data, folder / "tokens", tokenizer, tokenizer_identity(files), quiet,
                           lambda count: check_sizes(count, s.seq_length, s.val_fraction,
                                                      s.batch_size))
    model = fresh_model(config, s.seed)
    if not quiet:
        held_out = validation_size(len(tokens), s.seq_length, s.val_fraction)
        print(f"pretraining {model.num_parameters():,} parameters on {len(tokens) - held_out:,} "
              f"tokens ({held_out:,} held out for validation)", file=sys.stderr)
    training = _training_args(s, quiet)
    train_on(model, packed_data(tokens, s.seq_length, s.val_fraction, training), training,
             folder, adapter_config, resume=s.resume)
    if main:
        readme = (f"# {folder.resolve().name}\n\nMLX model folder written by `mlx-mobilellm "
                  f"train --config {s.config}`: pretrained from scratch on `{data}`.\n")
        save_model_into(model, folder, None, source, readme, quiet)
        plot_loss_curve(folder)
        if not quiet:
            print(f"wrote {folder}", file=sys.stderr)

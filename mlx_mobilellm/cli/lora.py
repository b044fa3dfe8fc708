"""`mlx-mobilellm lora`: fine-tune LoRA / DoRA adapters (QLoRA on quantized models), or every
weight of a float model (--fine-tune-type full), which is then written as a model folder.

Flags are mlx-lm's where the idea is the same. Every `lora` option can also come from a
`--config` file (YAML or JSON, the option names with underscores; mlx-lm's
`lora_parameters: {rank, scale, dropout, keys}` block is read too); flags given on the command
line override the file, and the file overrides the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import reprlib
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from ..errors import CheckpointError
from .options import Option, add_options

FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear")


def _key_list(value) -> tuple:
    """--lora-keys q_proj,v_proj (or a list in a config file)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(k, str) for k in items):
        raise ValueError("expected layer names, e.g. q_proj,v_proj")
    return tuple(k.strip() for k in items if k.strip())


_DTYPE_HELP = (
    "float32: dequantize a quantized model and train in float32. Default: train the model as "
    "loaded, so a quantized model gets QLoRA (adapters over the frozen quantized weights, as on "
    "a Mac). On MLX's CPU backend quantized matmuls have no fast backward pass: the 4-bit demo "
    "model takes about 30 s a step there against about 2 s in float32 (with OpenBLAS preloaded; "
    "see the README), so pass --dtype float32 on the CPU when memory allows.")

LORA_OPTIONS = (
    Option("model", None, "base model: MLX folder, Hugging Face folder, .gguf file or hub repo "
           "id (default: the built-in SmolLM2-135M-Instruct demo model)", str),
    Option("dtype", None, _DTYPE_HELP, str, ("float32",)),
    Option("train", False, "train adapters (or the model itself: --fine-tune-type full)"),
    Option("data", None, "folder with train.jsonl, valid.jsonl and (for --test) test.jsonl; "
           'lines of {"text"}, {"prompt", "completion"} or {"messages"}', str),
    Option("fine_tune_type", "lora", "lora, dora, or full: train the model's own weights (a "
           "float model: --dtype float32 for a quantized one) and write it as an MLX model "
           "folder in --adapter-path", str, FINE_TUNE_TYPES),
    Option("num_layers", 16, "adapt the last N blocks; -1: all (a model with fewer blocks "
           "than the default adapts all). full: every weight trains when N covers all blocks, "
           "else only those of the last N blocks", int),
    Option("lora_rank", 8, "adapter rank", int),
    Option("lora_scale", 20.0, "adapter output scale", float),
    Option("lora_dropout", 0.0, "dropout on the adapter input", float),
    Option("lora_keys", None, "comma-separated layer names to adapt (default: q_proj, k_proj, "
           "v_proj, o_proj, gate_proj, up_proj, down_proj)", _key_list),
    Option("mask_prompt", False, "learn only the completion / last assistant message"),
    Option("max_seq_length", 2048, "truncate longer examples to this many tokens", int),
    Option("batch_size", 4, "examples per step", int),
    Option("iters", 1000, "training steps", int),
    Option("learning_rate", 1e-5, "peak learning rate", float),
    Option("optimizer", "adam", "adam, adamw or sgd", str, OPTIMIZERS),
    Option("weight_decay", 0.0, "weight decay (adamw, sgd)", float),
    Option("lr_schedule", "constant", "constant, cosine or linear decay after the warmup", str,
           LR_SCHEDULES),
    Option("warmup", 0, "linear warmup steps", int),
    Option("grad_accumulation_steps", 1, "micro-batches per optimizer step", int),
    Option("grad_clip", None, "clip the gradients' global norm to this", float),
    Option("grad_checkpoint", False, "recompute activations in the backward pass (less memory)"),
    Option("seed", 0, "random seed (adapter init, batch order, dropout)", int),
    Option("steps_per_report", 10, "steps between training-loss reports", int),
    Option("steps_per_eval", 200, "steps between validation losses", int),
    Option("val_batches", 25, "validation batches; -1: the whole set", int),
    Option("save_every", 100, "steps between checkpoints (for --resume)", int),
    Option("adapter_path", "adapters", "folder for adapters.safetensors, adapter_config.json, "
           "metrics.jsonl, loss_curve.png and the checkpoint (full: the model folder's files "
           "instead of the adapters)", str),
    Option("resume", False, "continue from the checkpoint in --adapter-path"),
    Option("test", False, "report the test loss and perplexity (after training, or of the "
           "adapters already in --adapter-path)"),
    Option("test_batches", 500, "test batches; -1: the whole set", int),
    Option("quiet", False, "no progress bar or reports"),
)
OPTIONS_BY_NAME = {option.name: option for option in LORA_OPTIONS}
# Library parameters that these options set under another name.
PARAMETER_ALIASES = {"max_grad_norm": "grad_clip"}
# mlx-lm's YAML block → our option names.
LORA_PARAMETERS = {"rank": "lora_rank", "scale": "lora_scale", "dropout": "lora_dropout",
                   "keys": "lora_keys"}


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults stay None here: an option is "given" when it is not None, so that it can
    # override the config file, which overrides the options' defaults (see settings()).
    add_options(parser, LORA_OPTIONS, defaults=False)
    parser.add_argument("-c", "--config", help="YAML or JSON file of these options (underscores: "
                        "learning_rate: 1e-4); flags given here override it")


# --- settings: defaults < config file < command line --------------------------------------

def _coerce(option: Option, value, where: str):
    """A config-file value as the flag's type would give it."""
    wrong = CheckpointError(f"{where}: option '{option.name}' cannot be "
                            f"{reprlib.repr(value)}; {option.help}")
    if option.type is None:
        if not isinstance(value, bool):
            raise wrong
        return value
    if isinstance(value, bool) or (option.type is int and isinstance(value, float)):
        raise wrong
    if option.type is str and not isinstance(value, str):
        raise wrong
    try:
        value = option.type(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400)
        raise wrong from None
    if option.choices and value not in option.choices:
        raise CheckpointError(f"{where}: option '{option.name}' is {value!r}; use one of "
                              f"{', '.join(option.choices)}")
    return value


def read_config_file(path) -> dict:
    """{option name: value} from a YAML or JSON config file, checked and typed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the config file ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: not UTF-8 text ({error.reason} at byte "
                              f"{error.start})") from None
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except ValueError as error:
            raise CheckpointError(f"{path}: not valid JSON ({error})") from None
        except RecursionError:
            raise CheckpointError(f"{path}: nested too deeply to be a config file") from None
    else:
        try:
            import yaml
        except ImportError:
            raise CheckpointError(f"{path}: reading YAML needs pyyaml (pip install pyyaml); "
                                  "or write the config as .json") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise CheckpointError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
        except RecursionError:
            raise CheckpointError(f"{path}: nested too deeply to be a config file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a mapping of option names to values")
    raw = dict(raw)
    nested = raw.pop("lora_parameters", None) or {}
    if not isinstance(nested, dict) or set(nested) - set(LORA_PARAMETERS):
        raise CheckpointError(f"{path}: lora_parameters may hold only {', '.join(LORA_PARAMETERS)}")
    raw.update({LORA_PARAMETERS[k]: v for k, v in nested.items()})
    values = {}
    for name, value in raw.items():
        option = OPTIONS_BY_NAME.get(str(name).replace("-", "_"))
        if option is None:
            raise CheckpointError(f"{path}: unknown option '{name}' (the options are the flags of "
                                  "`mlx-mobilellm lora --help`, with underscores)")
        if value is not None:
            values[option.name] = _coerce(option, value, str(path))
    return values


def settings(args: argparse.Namespace) -> SimpleNamespace:
    values = {option.name: option.default for option in LORA_OPTIONS}
    if args.config:
        values.update(read_config_file(args.config))
    values.update({name: getattr(args, name) for name in OPTIONS_BY_NAME
                   if getattr(args, name, None) is not None})
    _check(values)
    return SimpleNamespace(**values)


# Step counts and sizes reach MLX (the schedule's step, array shapes) as 64-bit integers.
MAX_COUNT = 2**63 - 1


def check_training_bounds(values: dict, options, lowest: dict, all_or_count: tuple) -> None:
    """The bounds the training commands (lora, train) share, the first broken one refused in
    one line: counts within MLX's 64-bit integers, each of `lowest` ({name: least value}) at
    least that, each of `all_or_count` -1 (all) or at least 1, a positive and finite learning
    rate, a seed MLX takes."""
    def flag(name):
        return "--" + name.replace("_", "-")

    for option in options:
        value = values[option.name]
        counts = option.type is int and option.name != "seed"  # a seed's range: check_seed
        if counts and value is not None and value > MAX_COUNT:
            raise CheckpointError(f"{flag(option.name)} must be at most 2**63 - 1, got {value}")
    for name, low in lowest.items():
        if values[name] is not None and values[name] < low:
            raise CheckpointError(f"{flag(name)} must be at least {low}, got {values[name]}")
    for name in all_or_count:
        if values[name] == 0 or values[name] < -1:
            raise CheckpointError(f"{flag(name)} must be -1 (all) or at least 1, got "
                                  f"{values[name]}")
    # Written so that NaN, which compares false with everything, is refused too.
    if not 0 < values["learning_rate"] < math.inf:
        raise CheckpointError(f"--learning-rate must be positive and finite, got "
                              f"{values['learning_rate']}")
    try:
        from ..sampling import check_seed

        check_seed(values["seed"])
    except ValueError as error:
        raise CheckpointError(str(error)) from None


# Every optimizer step and report needs a count of at least one.
STEP_COUNTS = ("iters", "batch_size", "grad_accumulation_steps", "steps_per_report",
               "steps_per_eval", "save_every")


def _check(values: dict) -> None:
    check_training_bounds(values, LORA_OPTIONS,
                          {**dict.fromkeys(STEP_COUNTS + ("lora_rank",), 1), "max_seq_length": 2,
                           "warmup": 0},
                          ("num_layers", "val_batches", "test_batches"))
    if values["grad_clip"] is not None and not 0 < values["grad_clip"] < math.inf:
        raise CheckpointError(f"--grad-clip must be positive and finite, got {values['grad_clip']}")
    if not 0 <= values["lora_dropout"] < 1:
        raise CheckpointError(f"--lora-dropout must be in [0, 1), got {values['lora_dropout']}")
    if not -math.inf < values["lora_scale"] < math.inf:
        raise CheckpointError(f"--lora-scale must be a finite number, got {values['lora_scale']}")
    if not 0 <= values["weight_decay"] < math.inf:
        raise CheckpointError(f"--weight-decay must be >= 0, got {values['weight_decay']}")
    if not values["adapter_path"]:  # Path("") is the current directory
        raise CheckpointError("--adapter-path is empty; name the folder for the adapters")
    folder = Path(values["adapter_path"])
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"--adapter-path {folder}: is a file; it names a folder (made if "
                              "missing) for the adapters, metrics and checkpoint")
    if values["lora_keys"] is not None:
        from ..lora import DEFAULT_TARGETS

        unknown = [k for k in values["lora_keys"] if k not in DEFAULT_TARGETS]
        if unknown or not values["lora_keys"]:
            raise CheckpointError(f"--lora-keys: unknown layer name(s) {unknown}; choose from "
                                  f"{', '.join(DEFAULT_TARGETS)}")
    if not values["train"] and not values["test"]:
        raise CheckpointError("nothing to do: pass --train (and/or --test)")
    if values["data"] is None:
        raise CheckpointError("--data DIR is needed: a folder with train.jsonl and valid.jsonl "
                              "(and test.jsonl for --test)")


# --- lora ---------------------------------------------------------------------------------

def model_spec(spec) -> str:
    """How adapter_config.json records the base model: an absolute path when it is local."""
    if spec is None:
        from ..demo import demo_model_path

        return str(demo_model_path())
    return str(Path(spec).resolve()) if Path(spec).exists() else str(spec)


def load_base(spec: str, dtype: Optional[str], quiet: bool):
    from ..compute_dtype import dequantized, on_cpu, slow_blas_note
    from ..loading import load

    model, tokenizer = load(spec)
    if tokenizer is None:
        raise CheckpointError(f"{spec}: has no tokenizer files; fine-tuning needs one")
    note = slow_blas_note()
    if note and not quiet:
        print(note, file=sys.stderr)
    quantized = any(".scales" in name for name in parameter_names(model))
    if dtype == "float32":
        model = dequantized(model)
    elif quantized and on_cpu() and not quiet:
        print("note: training a quantized model on the CPU is slow (quantized matmuls have no "
              "fast backward pass there); --dtype float32 dequantizes it first", file=sys.stderr)
    return model, tokenizer


def parameter_names(model) -> list:
    from mlx.utils import tree_flatten

    return [name for name, _ in tree_flatten(model.parameters())]


def _adapter_config(s: SimpleNamespace, model, spec: str) -> dict:
    from ..lora import DEFAULT_TARGETS

    layers = len(model.decoder.layers)
    if s.num_layers > layers:
        if s.num_layers != OPTIONS_BY_NAME["num_layers"].default:  # asked for explicitly
            raise CheckpointError(f"--num-layers {s.num_layers}: the model has only {layers} "
                                  "blocks; use -1 for all")
    count = layers if s.num_layers == -1 else min(s.num_layers, layers)
    if s.fine_tune_type == "full":  # no adapter: rank, scale, dropout and keys mean nothing
        return {"fine_tune_type": "full", "num_layers": count, "model": spec, "dtype": s.dtype}
    return {"fine_tune_type": s.fine_tune_type, "rank": s.lora_rank, "scale": s.lora_scale,
            "dropout": s.lora_dropout, "keys": list(s.lora_keys or DEFAULT_TARGETS),
            "num_layers": count, "model": spec, "dtype": s.dtype}


def _training_args(s: SimpleNamespace):
    from ..training.trainer import TrainingArgs

    values = {f.name: getattr(s, f.name) for f in fields(TrainingArgs) if hasattr(s, f.name)}
    values["max_grad_norm"] = s.grad_clip
    values["val_batches"] = None if s.val_batches == -1 else s.val_batches
    return TrainingArgs(**values)


def save_full_model(model, folder: Path, spec: str, quiet: bool) -> None:
    """A fully fine-tuned model as an MLX model folder in `folder`, beside the metrics and
    the checkpoint (convert.save.save_model_into), with the base model's tokenizer files and
    export format."""
    from convert.save import save_model_into

    from ..formats.sources import open_checkpoint

    base = open_checkpoint(spec, quiet=True)  # its tokenizer files and export format
    source_format = base.original_format if base.source_format == "mlx" else base.export_format
    readme = (f"# {folder.name}\n\nMLX model folder written by `mlx-mobilellm lora "
              f"--fine-tune-type full`: `{spec}` with every trained weight.\n")
    save_model_into(model, folder, source_format, base, readme, quiet)


def run_lora(args: argparse.Namespace) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..lora import ADAPTER_CONFIG, apply_adapters, load_adapters
    from ..training.data import load_dataset
    from ..training.distributed import is_main, world
    from ..training.trainer import evaluate, plot_loss_curve, train

    s = settings(args)
    # Launched on several ranks (mlx.launch), rank 0 alone prints and writes.
    main = is_main(world())
    s.quiet = s.quiet or not main
    spec = model_spec(s.model)
    model, tokenizer = load_base(spec, s.dtype, s.quiet)
    datasets = load_dataset(s.data, tokenizer, s.max_seq_length, s.mask_prompt)
    for wanted, split in ((s.train, "train"), (s.test, "test")):
        if wanted and split not in datasets:
            raise CheckpointError(f"{Path(s.data) / (split + '.jsonl')}: not found; "
                                  f"--{split} needs it")
    if s.train and len(datasets["train"]) < s.batch_size:
        raise CheckpointError(f"{Path(s.data) / 'train.jsonl'}: {len(datasets['train'])} "
                              f"examples, fewer than --batch-size {s.batch_size}; add examples "
                              "or lower --batch-size")
    pad_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0
    folder = Path(s.adapter_path)

    if s.train:
        if "valid" not in datasets and not s.quiet:
            print(f"note: no {Path(s.data) / 'valid.jsonl'}: training without validation",
                  file=sys.stderr)
        adapter_config = _adapter_config(s, model, spec)
        mx.random.seed(s.seed)  # the adapters' initial values
        try:
            apply_adapters(model, adapter_config)
        except ValueError as error:
            raise CheckpointError(str(error)) from None
        full = s.fine_tune_type == "full"
        if not s.quiet:
            count = sum(p.size for _, p in tree_flatten(model.trainable_parameters()))
            trained, blocks = adapter_config["num_layers"], len(model.decoder.layers)
            kind = "" if full else f"{s.fine_tune_type} "
            rank = "" if full else f" (rank {s.lora_rank})"
            where = ("the whole model" if full and trained == blocks
                     else f"the last {trained} of {blocks} blocks")
            print(f"training {count:,} {kind}parameters{rank} in {where}", file=sys.stderr)
        train(model, datasets, _training_args(s), folder, adapter_config, pad_id, resume=s.resume)
        if main:
            if full:
                save_full_model(model, folder, spec, s.quiet)
            plot_loss_curve(folder)
        if not s.quiet:
            print(f"wrote {folder if full else folder / 'adapters.safetensors'}", file=sys.stderr)
    elif (folder / ADAPTER_CONFIG).exists():
        load_adapters(model, folder)
    elif not s.quiet:
        print(f"note: no adapters in {folder}: testing the base model", file=sys.stderr)

    if s.test and main:
        model.eval()
        loss = evaluate(model, datasets["test"], s.batch_size, pad_id,
                        None if s.test_batches == -1 else s.test_batches)
        perplexity = math.exp(loss) if loss < 700 else math.inf
        print(f"test loss {loss:.4f}, test perplexity {perplexity:.4f}")

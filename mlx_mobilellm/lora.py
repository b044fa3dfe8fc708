"""LoRA and DoRA adapters on linear layers, float or quantized (QLoRA), and fusing them back.

A LoRA layer computes base(x) + scale * B(A(dropout(x))) with A: (rank, in) and B: (out, rank);
B starts at zero, so a fresh adapter changes nothing. DoRA also learns the magnitude of each
output row of the merged weight. Only the adapters train: apply_adapters freezes the rest.
The "full" fine-tune type adds no adapter: the model's own (float) weights train.
"""

from __future__ import annotations

import json
import math
import reprlib
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import CheckpointError
from .input_checks import is_finite_number, is_whole_number, read_json_object
from .quantization import QUANTIZED_LAYERS, layer_weight

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


def _features(layer: nn.Module):
    weight = layer_weight(layer)
    return weight.shape[1], weight.shape[0]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        in_features, out_features = _features(base)
        self.base = base
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        self.dropout_p = dropout
        self.set_dropout_key(None)
        bound = 1 / math.sqrt(in_features)
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_features))
        self.lora_b = mx.zeros((out_features, rank))

    def set_dropout_key(self, key: Optional[mx.array]) -> None:
        """Fix the dropout mask's random key (None: draw from MLX's global generator). A
        gradient-checkpointed block is run again in the backward pass and must draw the same
        mask, so the trainer sets a key per step from outside the checkpoint. Kept out of the
        parameters (a plain attribute, not a module member)."""
        object.__setattr__(self, "_dropout_key", key)

    def _dropout(self, x: mx.array) -> mx.array:
        if self._dropout_key is None or not self.training or self.dropout_p == 0:
            return self.dropout(x)
        keep = mx.random.bernoulli(1 - self.dropout_p, x.shape, key=self._dropout_key)
        return mx.where(keep, x / (1 - self.dropout_p), 0).astype(x.dtype)

    def delta(self) -> mx.array:
        """What the adapter adds to the base weight."""
        return self.scale * (self.lora_b @ self.lora_a)

    def __call__(self, x: mx.array) -> mx.array:
        # Scaled at the rank-wide intermediate: rank values per token to multiply, not one per
        # output feature (and as many fewer in the backward pass).
        update = ((self._dropout(x) @ self.lora_a.T) * self.scale) @ self.lora_b.T
        return self.base(x) + update.astype(x.dtype)

    def fused_weight(self) -> mx.array:
        weight = layer_weight(self.base)
        return (weight + self.delta().astype(weight.dtype)).astype(weight.dtype)


class DoRALinear(LoRALinear):
    """Weight-decomposed LoRA: W' = m * (W + scale·BA) / ||W + scale·BA|| per output row, with
    the magnitudes m learnt (initialised to the base rows' norms)."""

    def __init__(self, base: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__(base, rank, scale, dropout)
        self.magnitude = mx.linalg.norm(layer_weight(base).astype(mx.float32), axis=1)

    def fused_weight(self) -> mx.array:
        weight = layer_weight(self.base)
        merged = weight.astype(mx.float32) + self.delta()
        norms = mx.linalg.norm(merged, axis=1, keepdims=True)
        return (self.magnitude[:, None] * merged / norms).astype(weight.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        # Base output plus LoRA, rescaled row-wise; the norm is taken without gradient through
        # the merged weight, as the DoRA paper does to save memory.
        merged = layer_weight(self.base).astype(mx.float32) + self.delta()
        norms = mx.stop_gradient(mx.linalg.norm(merged, axis=1))
        return super().__call__(x) * (self.magnitude / norms).astype(x.dtype)


ADAPTER_TYPES = {"lora": LoRALinear, "dora": DoRALinear}
FULL = "full"
FINE_TUNE_TYPES = (*ADAPTER_TYPES, FULL)


def adapter_targets(model, keys: Sequence[str], num_layers: Optional[int]) -> list:
    """(path, module) of the linear layers to adapt: those whose name ends in one of `keys`,
    in the last num_layers blocks (all when None)."""
    layers = model.decoder.layers
    first = 0 if num_layers is None or num_layers >= len(layers) else len(layers) - num_layers
    targets = []
    for index in range(first, len(layers)):
        for path, module in layers[index].named_modules():
            if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and path.split(".")[-1] in keys:
                targets.append((f"decoder.layers.{index}.{path}", module))
    return targets


def adapter_settings(config: dict) -> dict:
    """The config's settings with their defaults, each checked: a bad one would otherwise build
    adapters that fail later, far from the file or option that set it."""
    settings = {"fine_tune_type": "lora", "rank": 8, "scale": 20.0, "dropout": 0.0,
                "keys": None, "num_layers": None}
    settings.update((name, config[name]) for name in settings if name in config)
    kind, rank, dropout, keys, layers = (
        settings[name] for name in ("fine_tune_type", "rank", "dropout", "keys", "num_layers"))
    rules = {"fine_tune_type": (isinstance(kind, str) and kind in FINE_TUNE_TYPES,
                                f"one of {', '.join(FINE_TUNE_TYPES)}"),
             "rank": (is_whole_number(rank) and rank >= 1, "a whole number >= 1"),
             "scale": (is_finite_number(settings["scale"]), "a finite number"),
             "dropout": (is_finite_number(dropout) and 0 <= dropout < 1, "a number in [0, 1)"),
             "keys": (keys is None or (isinstance(keys, (list, tuple))
                                       and all(isinstance(k, str) for k in keys)),
                      "a list of layer names"),
             "num_layers": (layers is None or (is_whole_number(layers) and layers >= 1),
                            "a whole number >= 1")}
    for name, (good, requirement) in rules.items():
        if not good:
            raise ValueError(f"'{name}' must be {requirement}, got {reprlib.repr(settings[name])}")
    # As a float: MLX cannot multiply by an int beyond 64 bits (std::bad_cast), which JSON allows.
    return {**settings, "scale": float(settings["scale"]), "dropout": float(dropout)}


def apply_adapters(model, config: dict) -> None:
    """Freeze the model and wrap the configured layers in adapters (in place).
    config: {"fine_tune_type": "lora"|"dora", "rank", "scale", "dropout", "keys", "num_layers"};
    "full" wraps nothing and leaves the model's own weights trainable instead (see
    unfreeze_for_full)."""
    settings = adapter_settings(config)
    if settings["fine_tune_type"] == FULL:
        unfreeze_for_full(model, settings["num_layers"])
        return
    kind, rank = ADAPTER_TYPES[settings["fine_tune_type"]], settings["rank"]
    keys = tuple(settings["keys"] or DEFAULT_TARGETS)
    targets = adapter_targets(model, keys, settings["num_layers"])
    if not targets:
        raise ValueError(f"no linear layer matches the adapter keys {list(keys)}")
    # A rank at a layer's width already allows any update: more only allocates (without bound).
    narrowest = min(min(_features(module)) for _, module in targets)
    if rank > narrowest:
        raise ValueError(f"'rank' {rank} is above {narrowest}, the width of the narrowest "
                         f"adapted layer: a rank of {narrowest} already allows any update there")
    model.freeze()
    replacements = [(path, kind(module, rank, settings["scale"], settings["dropout"]))
                    for path, module in targets]
    model.update_modules(tree_unflatten(replacements))
    model.train(model.training)  # new adapters follow the model's mode (eval: no dropout)


def unfreeze_for_full(model, num_layers: Optional[int]) -> None:
    """Full fine-tuning: every parameter trains (embeddings and norms too), or, with
    num_layers below the model's block count, only those of the last num_layers blocks, as
    mlx-lm's full type does. A quantized model is refused: its packed integer weights have
    no gradient."""
    quantized = next((path for path, module in model.named_modules()
                      if isinstance(module, QUANTIZED_LAYERS)), None)
    if quantized is not None:
        raise ValueError(f"full fine-tuning needs float weights, but {quantized} is quantized; "
                         "dequantize the model (--dtype float32) or start from a float one")
    layers = model.decoder.layers
    if num_layers is None or num_layers >= len(layers):
        model.unfreeze()
        return
    model.freeze()
    for block in layers[len(layers) - num_layers:]:
        block.unfreeze()


def adapter_weights(model) -> dict:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(folder, model, config: dict) -> None:
    """adapters.safetensors + adapter_config.json, each written to a temporary file first."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights_tmp = folder / f".{ADAPTER_WEIGHTS}.tmp.safetensors"
    mx.save_safetensors(str(weights_tmp), adapter_weights(model))
    config_tmp = folder / f".{ADAPTER_CONFIG}.tmp"
    config_tmp.write_text(json.dumps(config, indent=2) + "\n")
    weights_tmp.replace(folder / ADAPTER_WEIGHTS)
    config_tmp.replace(folder / ADAPTER_CONFIG)


def read_safetensors(path: Path) -> dict:
    """The tensors of a safetensors file, or a CheckpointError that names it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: cannot load: no such file")
    try:
        return mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError) as error:  # what MLX raises for malformed files
        raise CheckpointError(f"{path}: cannot load ({' '.join(str(error).split())}); the file "
                              "is truncated or corrupt") from None


def check_tensors(path: Path, found: dict, expected: dict, against: str, advice: str) -> None:
    """`found` has exactly the tensor names and shapes of `expected` (both name → array): a
    mismatched file would otherwise load silently and fail later, or leave fresh values in
    place."""
    want = {name: tuple(a.shape) for name, a in expected.items()}
    have = {name: tuple(a.shape) for name, a in found.items()}
    if have != want:
        missing, extra = sorted(want.keys() - have), sorted(have.keys() - want)
        wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
        raise CheckpointError(f"{path}: does not match {against} (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}, wrong shape {wrong[:3]}); {advice}")


def load_adapters(model, folder) -> dict:
    """Wrap `model` as the saved adapter config says and load the adapter weights."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file; adapters are a folder (adapter_config.json "
                              "and adapters.safetensors, as `mlx-mobilellm lora` writes them)")
    config = read_json_object(folder / ADAPTER_CONFIG)
    if config.get("fine_tune_type") == FULL:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: 'fine_tune_type' is full: a fully "
                              "fine-tuned model is a model folder, not adapters; load that "
                              "folder as the model")
    try:
        apply_adapters(model, config)
    except ValueError as error:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG}: {error}") from None
    weights = read_safetensors(folder / ADAPTER_WEIGHTS)
    check_tensors(folder / ADAPTER_WEIGHTS, weights, adapter_weights(model), ADAPTER_CONFIG,
                  "was it saved with another config or model?")
    model.load_weights(list(weights.items()), strict=False)
    return config


def fuse(model, dequantize: bool = False) -> None:
    """Merge every adapter into its base layer (in place). A quantized base is re-quantized
    with its own bits and group size, unless dequantize is set."""
    fused = []
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            weight = module.fused_weight()
            base = module.base
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight = weight
            if isinstance(base, nn.QuantizedLinear) and not dequantize:
                linear = nn.QuantizedLinear.from_linear(linear, base.group_size, base.bits, mode=base.mode)
            fused.append((path, linear))
    model.update_modules(tree_unflatten(fused))
    model.unfreeze()

"""A model to pretrain from scratch: a preset or a JSON file of MobileLLMConfig fields, sized to
the tokenizer it will read, with fresh weights.

The weights follow Hugging Face Llama's (and so MobileLLM's) initialisation: every matrix
(linear layers and the embedding, which the tied head shares) drawn from a normal
distribution of standard deviation 0.02, every norm weight one. Each parameter has its own
key split from the seed in name order, so a seed gives the same model on every machine and
every run (data-parallel ranks start equal without being sent rank 0's weights).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import CheckpointError, ParameterError
from ..input_checks import read_json_object
from ..models.config import MobileLLMConfig, get_mobilellm_config
from ..models.mobilellm import MobileLLM

INIT_STD = 0.02
PRESETS = ("140m", "360m", "950m", "7b", "70b", "671b")


def read_model_config(spec: str) -> MobileLLMConfig:
    """A preset by name, or the MobileLLMConfig fields of a JSON file."""
    if str(spec).strip().lower() in PRESETS:
        return get_mobilellm_config(spec)
    path = Path(spec)
    if not path.is_file():
        raise ParameterError(lambda name: f"{name('config')} {spec!r}: neither a preset "
                             f"({', '.join(PRESETS)}) nor a JSON file of MobileLLMConfig fields")
    try:
        return MobileLLMConfig.from_dict(read_json_object(path))
    except (TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: {error}") from None


def fit_to_tokenizer(config: MobileLLMConfig, tokenizer) -> Tuple[MobileLLMConfig, Optional[str]]:
    """The config with the tokenizer's vocabulary size and BOS/EOS ids, and a note saying what
    changed (None when nothing did)."""
    vocab_size = max(tokenizer.vocab_size, tokenizer.max_token_id + 1)
    eos = tokenizer.eos_token_ids
    fitted = dataclasses.replace(config, vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=eos[0] if len(eos) == 1 else (eos or None))
    changed = [f"{name} {getattr(config, name)!r} -> {getattr(fitted, name)!r}"
               for name in ("vocab_size", "bos_token_id", "eos_token_id")
               if getattr(config, name) != getattr(fitted, name)]
    note = (f"note: the config's {', '.join(changed)}, from the tokenizer {tokenizer.source}"
            if changed else None)
    return fitted, note


def initialize(model: MobileLLM, seed: int, std: float = INIT_STD) -> MobileLLM:
    """Fresh float32 weights in place (see the module's docstring); returns the model."""
    parameters = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(seed), len(parameters))
    fresh = [(name, mx.ones(p.shape) if p.ndim == 1
              else std * mx.random.normal(p.shape, key=key))
             for (name, p), key in zip(parameters, keys)]
    model.update(tree_unflatten(fresh))
    return model


def fresh_model(config: MobileLLMConfig, seed: int) -> MobileLLM:
    return initialize(MobileLLM(config), seed)

"""MobileLLMConfig: the architecture hyperparameters, and the named presets.

The first twelve fields are the CheaperTraining seed's, with its defaults. The rest describe
what real checkpoints need beyond it; their defaults keep the seed's meaning (a MobileLLM-R1
style model: interleaved RoPE on every layer, weightless QK-norm, tied embeddings).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Callable, Optional

from ..input_checks import is_finite_number, is_whole_number
from .rope import SUPPORTED_ROPE_TYPES

# Stored in config.json so that a folder written by us is never mistaken for a Hugging Face one.
MODEL_TYPE = "mlx_mobilellm"


def as_id_list(ids) -> list:
    """A token id or a sequence of them, as a list of ints."""
    return [int(ids)] if isinstance(ids, Integral) else [int(i) for i in ids]


class ConfigFieldError(ValueError):
    """A config field with a value it cannot have. `field` is our name for it, so that the
    reader of another format can name the field as its own file spells it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"MobileLLMConfig.{field} {problem}")
        self.field, self.problem = field, problem


def _short(value) -> str:
    """repr(value), cut short: a config value can be as long as the file."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_token_id(value) -> bool:
    return is_whole_number(value) and value >= 0


def _optional(accepts: Callable) -> Callable:
    return lambda value: value is None or accepts(value)


def _positive_int(value) -> bool:
    return is_whole_number(value) and value > 0


def _positive_number(value) -> bool:
    return is_finite_number(value) and value > 0


def _token_ids(value) -> bool:
    """None, one id, or a list of them (eos_token_id)."""
    return _optional(_is_token_id)(value) or (
        isinstance(value, list) and all(_is_token_id(i) for i in value))


def _rope_scaling_problem(scaling: dict) -> Optional[str]:
    """What is wrong with a rope_scaling object, or None: RoPE divides by these numbers."""
    if not all(isinstance(v, (str, int, float, type(None))) for v in scaling.values()):
        return f"must hold only numbers and strings, got {_short(scaling)}"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        return f"has rope_type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    if kind == "default":
        return None
    if not _positive_number(scaling.get("factor")):
        return f"needs a positive number 'factor' for rope_type {kind!r}, got {_short(scaling)}"
    if kind == "llama3":
        # rope.py's defaults for the keys a config may leave out.
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        context = scaling.get("original_max_position_embeddings", 8192)
        if not (_positive_number(low) and is_finite_number(high) and high > low and _positive_number(context)):
            return ("needs positive numbers low_freq_factor < high_freq_factor and "
                    f"original_max_position_embeddings, got {_short(scaling)}")
    return None


# Every field: a test of the value, and what the value must be (for the error message).
_FIELD_RULES = {
    **{name: (_positive_int, "a positive integer") for name in (
        "num_layers", "num_heads", "num_kv_heads", "embed_dim", "hidden_dim", "vocab_size",
        "max_seq_len")},
    **{name: (_optional(_positive_int), "a positive integer or null")
       for name in ("head_dim", "attention_chunk_size")},
    **{name: (lambda v: isinstance(v, bool), "true or false") for name in (
        "use_qk_norm", "tie_word_embeddings", "rope_traditional", "qk_norm_weight",
        "attn_temperature_tuning", "layer_sharing")},
    "rope_base": (_positive_number, "a positive number"),
    "norm_eps": (_positive_number, "a positive number"),
    "floor_scale": (_positive_number, "a positive number"),
    "attn_scale": (is_finite_number, "a number"),
    "dropout": (lambda v: is_finite_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "rope_scaling": (_optional(lambda v: isinstance(v, dict)), "an object or null"),
    "nope_layers": (lambda v: isinstance(v, list) and all(is_whole_number(i) for i in v),
                    "a list of layer indices"),
    "bos_token_id": (_optional(_is_token_id), "a token id (an integer >= 0) or null"),
    "pad_token_id": (_optional(_is_token_id), "a token id (an integer >= 0) or null"),
    "eos_token_id": (_token_ids, "a token id (an integer >= 0), a list of them, or null"),
}
_NUMBERS = ("rope_base", "norm_eps", "floor_scale", "attn_scale", "dropout")


def check_field(name: str, value) -> None:
    """Refuse a value of the wrong type or range for field `name` (ConfigFieldError)."""
    accepts, what = _FIELD_RULES[name]
    if not accepts(value):
        raise ConfigFieldError(name, f"must be {what}, got {_short(value)}")
    problem = _rope_scaling_problem(value) if name == "rope_scaling" and value else None
    if problem:
        raise ConfigFieldError(name, problem)


@dataclass
class MobileLLMConfig:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    hidden_dim: int
    vocab_size: int = 128256
    max_seq_len: int = 32768
    rope_base: float = 500000.0
    use_qk_norm: bool = True
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5

    # Beyond the seed.
    head_dim: Optional[int] = None
    """Width of one attention head; None means embed_dim // num_heads."""
    rope_traditional: bool = True
    """True rotates interleaved pairs (MobileLLM-R1, GGUF); False rotates halves (HF Llama)."""
    rope_scaling: Optional[dict] = None
    """None, {"rope_type": "linear", "factor": f} or Llama-3's {"rope_type": "llama3", ...}."""
    qk_norm_weight: bool = False
    """False: QK-norm is a weightless RMS norm per head (MobileLLM-R1). True: it has weights."""
    nope_layers: list = field(default_factory=list)
    """Indices of layers without RoPE (and without QK-norm), as in Llama 4's NoPE layers."""
    attention_chunk_size: Optional[int] = None
    """RoPE layers attend only within aligned chunks of this many tokens (Llama 4)."""
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    """Llama 4's query temperature on NoPE layers: 1 + attn_scale * log1p(floor((p+1)/floor_scale))."""
    layer_sharing: bool = False
    """Original MobileLLM's immediate block-wise sharing: every block runs twice in a row."""
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    """An id or a list of ids; generation stops a row at any of them."""
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_field(f.name, getattr(self, f.name))
        for name in _NUMBERS:
            setattr(self, name, float(getattr(self, name)))
        if self.head_dim is None and self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) is not divisible by num_heads ({self.num_heads}); "
                "change one of them or set head_dim explicitly"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) is not divisible by num_kv_heads "
                f"({self.num_kv_heads}): each KV head must serve the same number of query heads"
            )
        if self.dim_per_head <= 0 or self.dim_per_head % 2:
            raise ValueError(f"the head width must be a positive even number (RoPE rotates pairs), "
                             f"got {self.dim_per_head}; set head_dim or change embed_dim/num_heads")
        self.nope_layers = sorted(self.nope_layers)
        bad = [i for i in self.nope_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigFieldError("nope_layers", f"{_short(bad)} are outside 0..{self.num_layers - 1}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = getattr(self, name)
            outside = [] if ids is None else [i for i in as_id_list(ids) if i >= self.vocab_size]
            if outside:
                raise ConfigFieldError(name, f"{_short(outside)} is outside the vocabulary "
                                             f"(vocab_size {self.vocab_size})")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads

    @property
    def eos_token_ids(self) -> list:
        if self.eos_token_id is None:
            return []
        return as_id_list(self.eos_token_id)

    def to_dict(self) -> dict:
        """The config.json form: every field, plus model_type."""
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict) -> "MobileLLMConfig":
        """Inverse of to_dict. Unknown keys are an error: a typo must not silently fall back."""
        values = {k: v for k, v in values.items() if k != "model_type"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MobileLLMConfig field(s): {', '.join(unknown)}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(f"config is missing required field(s): {', '.join(missing)}")
        return cls(**values)


# MobileLLM-R1's sizes (KV heads and FFN widths from the released checkpoints) and
# Llama-like shapes for the large names. "671b" is a dense stand-in with the parameter count
# of the MoE model of that name: a dense SwiGLU whose width makes the total come out right.
_PRESETS = {
    "140m": dict(num_layers=15, num_heads=9, num_kv_heads=3, embed_dim=576, hidden_dim=2048),
    "360m": dict(num_layers=15, num_heads=16, num_kv_heads=4, embed_dim=1024, hidden_dim=4096),
    "950m": dict(num_layers=22, num_heads=24, num_kv_heads=6, embed_dim=1536, hidden_dim=6144),
    "7b": dict(num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, hidden_dim=14336),
    "70b": dict(num_layers=80, num_heads=64, num_kv_heads=8, embed_dim=8192, hidden_dim=28672),
    "671b": dict(num_layers=61, num_heads=128, num_kv_heads=128, embed_dim=7168,
                 hidden_dim=501760),
}

# MobileLLM-R1's tokenizer (Llama 3): <|begin_of_text|>, <|end_of_text|>.
_R1_SPECIAL_TOKENS = dict(bos_token_id=128000, eos_token_id=128001)


def get_mobilellm_config(name: str) -> MobileLLMConfig:
    """The preset of that name ("140m", "360m", "950m", "7b", "70b", "671b"; any case)."""
    preset = _PRESETS.get(str(name).strip().lower())
    if preset is None:
        raise ValueError(f"unknown MobileLLM config {name!r}; valid names: {', '.join(_PRESETS)}")
    return MobileLLMConfig(**preset, **_R1_SPECIAL_TOKENS)

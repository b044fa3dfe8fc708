"""Hugging Face config.json → MobileLLMConfig, for the architectures we read."""

from __future__ import annotations

from mlx_mobilellm.models.config import MobileLLMConfig

from mlx_mobilellm.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama4_text", "llama", "mobilellm")


def _rope(hf: dict, default_theta: float):
    """(base, scaling) from either transformers 4.x (rope_theta, rope_scaling at top level) or
    5.x (rope_parameters holding both) configs."""
    params = dict(hf.get("rope_parameters") or {})
    legacy_scaling = hf.get("rope_scaling") or {}
    base = params.pop("rope_theta", hf.get("rope_theta", legacy_scaling.get("rope_theta", default_theta)))
    scaling = params or {k: v for k, v in legacy_scaling.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(base), (None if kind == "default" else scaling)


def _require(hf: dict, field: str, where: str):
    if field not in hf:
        raise CheckpointError(f"{where}: required field '{field}' is missing")
    return hf[field]


def _refuse_biases(hf: dict, where: str) -> None:
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise CheckpointError(f"{where}: '{field}: true' is not supported (MobileLLM has no biases)")


def _common(hf: dict, where: str, defaults: dict) -> dict:
    """Fields both architectures share. `defaults` holds transformers' own defaults for the
    fields a config.json may omit, which differ between the two config classes."""
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    _refuse_biases(hf, where)
    heads = _require(hf, "num_attention_heads", where)
    return dict(
        vocab_size=_require(hf, "vocab_size", where),
        num_layers=_require(hf, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        embed_dim=_require(hf, "hidden_size", where),
        max_seq_len=hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
        norm_eps=hf.get("rms_norm_eps", defaults["rms_norm_eps"]),
        head_dim=hf.get("head_dim", defaults["head_dim"]),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def _llama4_text(hf: dict, where: str) -> dict:
    if hf.get("moe_layers"):
        raise CheckpointError(
            f"{where}: Llama-4 mixture-of-experts layers {hf['moe_layers']} are not supported; "
            "only dense llama4_text models (MobileLLM-R1) convert")
    num_layers = _require(hf, "num_hidden_layers", where)
    # no_rope_layers[i] == 1 means layer i USES RoPE. Missing: transformers' default, a NoPE
    # layer every no_rope_layer_interval layers.
    interval = hf.get("no_rope_layer_interval", 4)
    uses_rope = hf.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
    base, scaling = _rope(hf, 500000.0)
    return dict(
        _common(hf, where, dict(max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=128)),
        hidden_dim=_require(hf, "intermediate_size_mlp", where),
        rope_base=base, rope_scaling=scaling, rope_traditional=True,
        use_qk_norm=hf.get("use_qk_norm", True),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        nope_layers=[i for i in range(num_layers) if not uses_rope[i]],
        attention_chunk_size=hf.get("attention_chunk_size", 8192),
        attn_temperature_tuning=hf.get("attn_temperature_tuning", True),
        floor_scale=float(hf.get("floor_scale", 8192)),
        attn_scale=float(hf.get("attn_scale", 0.1)),
    )


def _llama(hf: dict, where: str) -> dict:
    base, scaling = _rope(hf, 10000.0)
    return dict(
        _common(hf, where, dict(max_position_embeddings=2048, rms_norm_eps=1e-6, head_dim=None)),
        hidden_dim=_require(hf, "intermediate_size", where),
        rope_base=base, rope_scaling=scaling, rope_traditional=False,
        use_qk_norm=False,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )


def _mobilellm(hf: dict, where: str) -> dict:
    """Original MobileLLM (custom code on the hub): Llama with rotate-half RoPE, where
    share_embedding ties the head whatever tie_word_embeddings says, and layer_sharing runs
    every block twice in a row."""
    return dict(
        _llama(hf, where),
        tie_word_embeddings=bool(hf.get("share_embedding", hf.get("tie_word_embeddings", False))),
        layer_sharing=bool(hf.get("layer_sharing", False)),
    )


_READERS = {"llama4_text": _llama4_text, "llama": _llama, "mobilellm": _mobilellm}


def config_from_hf(hf: dict, where: str = "config.json") -> MobileLLMConfig:
    """Our config for a Hugging Face config dict; `where` names the file in error messages."""
    model_type = hf.get("model_type")
    reader = _READERS.get(model_type)
    if reader is None:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        return MobileLLMConfig(**reader(hf, where))
    except (TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{where}: {error}") from None

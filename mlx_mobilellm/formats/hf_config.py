"""Hugging Face config.json ↔ MobileLLMConfig, for the architectures we read and export."""

from __future__ import annotations

from typing import Optional

from ..errors import CheckpointError
from ..models.config import ConfigFieldError, MobileLLMConfig, check_field

SUPPORTED_MODEL_TYPES = ("llama4_text", "llama", "mobilellm")

# Our config fields as Hugging Face configs name them (the others have the same name).
_HF_FIELDS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads", "embed_dim": "hidden_size",
              "hidden_dim": "intermediate_size", "max_seq_len": "max_position_embeddings",
              "norm_eps": "rms_norm_eps", "rope_base": "rope_theta"}


def hf_field(ours: str, model_type: str) -> str:
    """The config.json field of a Hugging Face model_type that sets our field `ours`."""
    if ours == "hidden_dim" and model_type == "llama4_text":
        return "intermediate_size_mlp"  # dense layers' width; intermediate_size is the experts'
    return _HF_FIELDS.get(ours, ours)


def hf_model_type(hf: dict, where: str) -> str:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r:.60} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def _object(hf: dict, field: str, where: str) -> dict:
    """An optional field holding a JSON object (absent or null: empty)."""
    value = hf.get(field)
    if not isinstance(value, (dict, type(None))):
        raise CheckpointError(f"{where}: '{field}' must be an object or null, got {value!r:.60}")
    return value or {}


def _rope(hf: dict, default_theta: float, where: str):
    """(base, scaling) from either transformers 4.x (rope_theta, rope_scaling at top level) or
    5.x (rope_parameters holding both) configs."""
    params = dict(_object(hf, "rope_parameters", where))
    legacy_scaling = _object(hf, "rope_scaling", where)
    base = params.pop("rope_theta", hf.get("rope_theta", legacy_scaling.get("rope_theta", default_theta)))
    scaling = params or {k: v for k, v in legacy_scaling.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return base, (None if kind == "default" else scaling)


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
        # LLaMA-1 conversions (and models made from them) write -1 for "no padding token".
        pad_token_id=None if hf.get("pad_token_id") == -1 else hf.get("pad_token_id"),
    )


def _uses_rope(hf: dict, num_layers, where: str) -> list:
    """no_rope_layers: for each layer, 1 when it USES RoPE. Missing: transformers' default,
    a NoPE layer every no_rope_layer_interval layers."""
    check_field("num_layers", num_layers)  # before counting to it
    uses_rope = hf.get("no_rope_layers")
    if uses_rope:
        if not (isinstance(uses_rope, list) and len(uses_rope) == num_layers
                and all(flag in (0, 1) for flag in uses_rope)):
            raise CheckpointError(f"{where}: 'no_rope_layers' must list 1 (RoPE) or 0 (NoPE) for "
                                  f"each of the {num_layers} layers, got {uses_rope!r:.60}")
        return uses_rope
    interval = hf.get("no_rope_layer_interval", 4)
    if not (isinstance(interval, int) and interval > 0):
        raise CheckpointError(f"{where}: 'no_rope_layer_interval' must be a positive integer, "
                              f"got {interval!r:.60}")
    return [int((i + 1) % interval != 0) for i in range(num_layers)]


def _attention_chunk_size(hf: dict, uses_rope: list, where: str):
    """Llama 4 attends in chunks on its RoPE layers, unless `layer_types` (which configs of
    recent transformers write, and which it obeys) says otherwise: all "full_attention" means
    no chunks. Chunks on other layers than the RoPE ones are refused (ours cannot say that)."""
    chunk = hf.get("attention_chunk_size", 8192)
    layer_types = hf.get("layer_types")
    if layer_types is None or chunk is None:
        return chunk
    kinds = ("full_attention", "chunked_attention")
    if not (isinstance(layer_types, list) and len(layer_types) == len(uses_rope)
            and all(kind in kinds for kind in layer_types)):
        raise CheckpointError(f"{where}: 'layer_types' must list full_attention or "
                              f"chunked_attention for each of the {len(uses_rope)} layers, got "
                              f"{layer_types!r:.80}")
    chunked = [kind == "chunked_attention" for kind in layer_types]
    if not any(chunked):
        return None
    if chunked != [bool(flag) for flag in uses_rope]:
        raise CheckpointError(f"{where}: 'layer_types' puts chunked attention on layers other "
                              "than the RoPE ones; that layout is not supported")
    return chunk


def _truthy(value):
    """A flag that real configs also write as a number (Llama 4 Scout's
    attn_temperature_tuning is 4); other types are left for the config to refuse."""
    return bool(value) if isinstance(value, int) else value


def _llama4_text(hf: dict, where: str) -> dict:
    if hf.get("moe_layers"):
        raise CheckpointError(
            f"{where}: Llama-4 mixture-of-experts layers {hf['moe_layers']} are not supported; "
            "only dense llama4_text models (MobileLLM-R1) convert")
    num_layers = _require(hf, "num_hidden_layers", where)
    uses_rope = _uses_rope(hf, num_layers, where)
    base, scaling = _rope(hf, 500000.0, where)
    return dict(
        _common(hf, where, dict(max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=128)),
        hidden_dim=_require(hf, "intermediate_size_mlp", where),
        rope_base=base, rope_scaling=scaling, rope_traditional=True,
        use_qk_norm=hf.get("use_qk_norm", True),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        nope_layers=[i for i in range(num_layers) if not uses_rope[i]],
        attention_chunk_size=_attention_chunk_size(hf, uses_rope, where),
        attn_temperature_tuning=_truthy(hf.get("attn_temperature_tuning", True)),
        floor_scale=hf.get("floor_scale", 8192),
        attn_scale=hf.get("attn_scale", 0.1),
    )


def _llama(hf: dict, where: str) -> dict:
    base, scaling = _rope(hf, 10000.0, where)
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
        tie_word_embeddings=hf.get("share_embedding", hf.get("tie_word_embeddings", False)),
        layer_sharing=hf.get("layer_sharing", False),
    )


_READERS = {"llama4_text": _llama4_text, "llama": _llama, "mobilellm": _mobilellm}


def config_from_hf(hf: dict, where: str = "config.json") -> MobileLLMConfig:
    """Our config for a Hugging Face config dict; `where` names the file in error messages."""
    model_type = hf_model_type(hf, where)
    try:
        return MobileLLMConfig(**_READERS[model_type](hf, where))
    except ConfigFieldError as error:
        raise CheckpointError(f"{where}: '{hf_field(error.field, model_type)}' {error.problem}") from None
    except ValueError as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{where}: {error}") from None


# ---------------------------------------------------------------------------------------------
# MobileLLMConfig → Hugging Face config.json: the inverse of config_from_hf, per model type.

_ARCHITECTURES = {"llama4_text": "Llama4ForCausalLM", "llama": "LlamaForCausalLM",
                  "mobilellm": "MobileLLMForCausalLM"}


def _refuse(model_type: str, what: str, fix: str) -> None:
    raise CheckpointError(f"cannot export as {model_type}: {what}; {fix}")


def _rope_to_hf(config: MobileLLMConfig) -> dict:
    """RoPE in both spellings: transformers 5 reads rope_parameters; transformers 4.x, vLLM
    and mlx-lm read the top-level rope_theta / rope_scaling. They carry the same values."""
    scaling = dict(config.rope_scaling) if config.rope_scaling else None
    parameters = {"rope_theta": config.rope_base, **(scaling or {"rope_type": "default"})}
    return dict(rope_theta=config.rope_base, rope_scaling=scaling, rope_parameters=parameters)


def _common_to_hf(config: MobileLLMConfig, model_type: str) -> dict:
    return dict(
        architectures=[_ARCHITECTURES[model_type]],
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.embed_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.dim_per_head,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        attention_bias=False,
        **_rope_to_hf(config),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def plain_attention_gaps(config: MobileLLMConfig) -> list:
    """What the model's attention does beyond Llama's plain RoPE attention on every layer, which
    neither a Llama config nor llama.cpp's llama GGUF can say: empty when there is nothing."""
    gaps = []
    if config.use_qk_norm:
        gaps.append("the model uses QK-norm (MobileLLM-R1 does)")
    if config.nope_layers:
        gaps.append(f"layers {config.nope_layers} are NoPE (no RoPE)")
    # Chunked attention changes results only when a chunk is shorter than the context.
    if config.attention_chunk_size is not None and config.attention_chunk_size < config.max_seq_len:
        gaps.append(f"RoPE layers attend in chunks of {config.attention_chunk_size} tokens")
    return gaps


def _check_llama_expressible(config: MobileLLMConfig, model_type: str) -> None:
    gaps = plain_attention_gaps(config)
    if gaps:
        _refuse(model_type, f"{gaps[0]}, which Llama cannot express", "export as llama4_text instead")


def _llama4_text_to_hf(config: MobileLLMConfig) -> dict:
    if config.use_qk_norm and config.qk_norm_weight:
        _refuse("llama4_text", "the model's QK-norm has weights; Llama 4's is weightless",
                "export as another format (this one cannot carry q_norm/k_norm weights)")
    if config.layer_sharing:
        _refuse("llama4_text", "the model shares each block between two layers (layer_sharing)",
                "export as mobilellm instead")
    # floor_scale is an int in Llama4TextConfig (its strict validation refuses a float).
    floor_scale = int(config.floor_scale) if float(config.floor_scale).is_integer() else config.floor_scale
    return dict(
        _common_to_hf(config, "llama4_text"),
        # Dense layers read intermediate_size_mlp; intermediate_size is the (unused) expert
        # width, set equal so that nothing looks half-configured.
        intermediate_size=config.hidden_dim,
        intermediate_size_mlp=config.hidden_dim,
        moe_layers=[],
        # 1 means the layer USES RoPE.
        no_rope_layers=[0 if i in config.nope_layers else 1 for i in range(config.num_layers)],
        attention_chunk_size=config.attention_chunk_size,
        attn_temperature_tuning=config.attn_temperature_tuning,
        floor_scale=floor_scale,
        attn_scale=config.attn_scale,
        use_qk_norm=config.use_qk_norm,
    )


def _llama_fields(config: MobileLLMConfig, model_type: str) -> dict:
    _check_llama_expressible(config, model_type)
    return dict(_common_to_hf(config, model_type), intermediate_size=config.hidden_dim,
                mlp_bias=False, pretraining_tp=1)


def _llama_to_hf(config: MobileLLMConfig) -> dict:
    if config.layer_sharing:
        _refuse("llama", "the model shares each block between two layers (layer_sharing)",
                "export as mobilellm instead")
    return _llama_fields(config, "llama")


def _mobilellm_to_hf(config: MobileLLMConfig) -> dict:
    """Original MobileLLM ties through share_embedding and keeps tie_word_embeddings false,
    as its released configs do. No auto_map is written: its modeling code is not ours to
    ship, and a config pointing at code that is not there cannot load."""
    return dict(_llama_fields(config, "mobilellm"),
                share_embedding=config.tie_word_embeddings, tie_word_embeddings=False,
                layer_sharing=config.layer_sharing)


_WRITERS = {"llama4_text": _llama4_text_to_hf, "llama": _llama_to_hf, "mobilellm": _mobilellm_to_hf}


def config_to_hf(config: MobileLLMConfig, model_type: str, *, dtype: Optional[str] = None) -> dict:
    """The Hugging Face config.json dict of `model_type` for our config: the inverse of
    config_from_hf (config_from_hf(config_to_hf(c, t)) == c for a config read from type t).
    dtype ("float32", ...) names the weights' dtype, written as transformers 5 (dtype) and
    4.x (torch_dtype) spell it. Raises CheckpointError for what the format cannot express."""
    writer = _WRITERS.get(model_type)
    if writer is None:
        raise CheckpointError(f"model_type {model_type!r} cannot be exported; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    hf = writer(config)
    if dtype is not None:
        hf.update(dtype=dtype, torch_dtype=dtype)
    return hf

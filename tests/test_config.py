"""MobileLLMConfig (the seed's fields, validation, dict round trip) and the named presets."""

import dataclasses
import json
import resource
import sys

import mlx.core as mx
import pytest

from mlx_mobilellm.models import MobileLLM, MobileLLMConfig, get_mobilellm_config

REQUIRED = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, hidden_dim=64)

# The seed's attribute table: name -> default.
SEED_DEFAULTS = {
    "vocab_size": 128256,
    "max_seq_len": 32768,
    "rope_base": 500000,
    "use_qk_norm": True,
    "tie_word_embeddings": True,
    "dropout": 0.0,
    "norm_eps": 1e-5,
}

POSITIVE_SIZES = ["num_layers", "num_heads", "num_kv_heads", "embed_dim", "hidden_dim",
                  "vocab_size", "max_seq_len"]


def make(**overrides) -> MobileLLMConfig:
    return MobileLLMConfig(**{**REQUIRED, **overrides})


# --- fields and defaults -------------------------------------------------------------------

@pytest.mark.parametrize("name,default", sorted(SEED_DEFAULTS.items()))
def test_seed_default(name, default):
    config = make()
    value = getattr(config, name)
    assert value == default
    assert type(value) is type(default) or (isinstance(default, (int, float))
                                            and isinstance(value, (int, float)))


def test_seed_attributes_exist_with_given_values():
    seed = dict(vocab_size=128256, num_layers=22, num_heads=24, num_kv_heads=6, embed_dim=1536,
                hidden_dim=6144, max_seq_len=32768, rope_base=500000, use_qk_norm=True,
                tie_word_embeddings=True, dropout=0.1, norm_eps=1e-6)
    config = MobileLLMConfig(**seed)
    for name, value in seed.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_required_fields_have_no_default(name):
    values = {k: v for k, v in REQUIRED.items() if k != name}
    with pytest.raises(TypeError):
        MobileLLMConfig(**values)


# --- validation ----------------------------------------------------------------------------

def test_heads_must_divide_embed_dim():
    with pytest.raises(ValueError, match="embed_dim"):
        make(embed_dim=30, num_heads=4, num_kv_heads=2)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        make(embed_dim=48, num_heads=6, num_kv_heads=4)


@pytest.mark.parametrize("name", POSITIVE_SIZES)
@pytest.mark.parametrize("value", [0, -4])
def test_non_positive_sizes_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        make(**{name: value})


@pytest.mark.parametrize("overrides", [
    dict(embed_dim=32, num_heads=4, num_kv_heads=4),
    dict(embed_dim=32, num_heads=4, num_kv_heads=1),
    dict(embed_dim=36, num_heads=6, num_kv_heads=3),
])
def test_valid_geometries_accepted(overrides):
    config = make(**overrides)
    assert config.embed_dim % config.num_heads == 0


# --- dict round trip -----------------------------------------------------------------------

ROUND_TRIP_CONFIGS = [
    make(),
    make(vocab_size=100, max_seq_len=128, rope_base=10000.0, use_qk_norm=False,
         tie_word_embeddings=False, dropout=0.25, norm_eps=1e-6),
    get_mobilellm_config("950m"),
]


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS)
@pytest.mark.parametrize("through_json", [False, True])
def test_to_dict_from_dict_round_trip(config, through_json):
    d = config.to_dict()
    for field in dataclasses.fields(MobileLLMConfig):
        assert d[field.name] == getattr(config, field.name)
    if through_json:
        d = json.loads(json.dumps(d))
    again = MobileLLMConfig.from_dict(d)
    assert again == config
    assert again.to_dict() == config.to_dict()


def test_from_dict_rejects_unknown_field():
    d = make().to_dict()
    d["num_layer"] = 3  # a typo must not be silently ignored
    with pytest.raises(ValueError, match="num_layer"):
        MobileLLMConfig.from_dict(d)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_from_dict_rejects_missing_required(name):
    d = make().to_dict()
    del d[name]
    with pytest.raises(ValueError, match=name):
        MobileLLMConfig.from_dict(d)


def test_from_dict_fills_defaults_for_missing_optional():
    config = MobileLLMConfig.from_dict(dict(REQUIRED))
    for name, default in SEED_DEFAULTS.items():
        assert getattr(config, name) == default


def test_from_dict_validates():
    with pytest.raises(ValueError):
        MobileLLMConfig.from_dict({**REQUIRED, "num_kv_heads": 3})


# --- presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("name,layers,heads,dim,params", [
    ("140m", 15, 9, 576, 140_248_512),
    ("360m", 15, 16, 1024, 359_431_168),
    ("950m", 22, 24, 1536, 949_685_760),
])
def test_small_presets_exact_parameter_count(name, layers, heads, dim, params):
    config = get_mobilellm_config(name)
    assert (config.num_layers, config.num_heads, config.embed_dim) == (layers, heads, dim)
    assert config.vocab_size == 128256 and config.tie_word_embeddings
    assert MobileLLM(config).num_parameters() == params


def analytic_parameter_count(c: MobileLLMConfig) -> int:
    head_dim = c.embed_dim // c.num_heads
    attention = c.embed_dim * head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    ffn = 3 * c.embed_dim * c.hidden_dim
    per_layer = attention + ffn + 2 * c.embed_dim
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.embed_dim
    return c.vocab_size * c.embed_dim + c.num_layers * per_layer + c.embed_dim + head


@pytest.mark.parametrize("name,layers,heads,dim,target", [
    ("7b", 32, 32, 4096, 7e9),
    ("70b", 80, 64, 8192, 70e9),
    ("671b", 61, 128, 7168, 671e9),
])
def test_large_presets_parameter_count(name, layers, heads, dim, target):
    config = get_mobilellm_config(name)
    assert (config.num_layers, config.num_heads, config.embed_dim) == (layers, heads, dim)
    count = analytic_parameter_count(config)
    assert abs(count - target) / target < 0.10


@pytest.mark.parametrize("name", ["140m", "360m", "950m", "7b"])
def test_num_parameters_matches_analytic_count(name):
    config = get_mobilellm_config(name)
    assert MobileLLM(config).num_parameters() == analytic_parameter_count(config)


@pytest.mark.parametrize("spelling", ["950M", " 950m ", "950m"])
def test_preset_name_case_insensitive(spelling):
    assert get_mobilellm_config(spelling) == get_mobilellm_config("950m")


@pytest.mark.parametrize("name", ["7B", "671B", "140M"])
def test_preset_upper_case(name):
    assert get_mobilellm_config(name) == get_mobilellm_config(name.lower())


@pytest.mark.parametrize("bad", ["1b", "", "950", "mobilellm-950m"])
def test_unknown_preset_lists_valid_names(bad):
    with pytest.raises(ValueError) as info:
        get_mobilellm_config(bad)
    message = str(info.value)
    for valid in ["140m", "360m", "950m", "7b", "70b", "671b"]:
        assert valid in message


def _rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def test_671b_num_parameters_without_materialising_weights():
    config = get_mobilellm_config("671b")
    mx.reset_peak_memory()
    rss_before = _rss_bytes()
    model = MobileLLM(config)
    count = model.num_parameters()
    peak = mx.get_peak_memory()
    rss_growth = _rss_bytes() - rss_before
    del model
    assert count == analytic_parameter_count(config)
    assert abs(count - 671e9) / 671e9 < 0.10
    gib = 1 << 30
    assert peak < gib / 4, f"MLX peak memory {peak / gib:.2f} GiB"
    assert rss_growth < gib, f"RSS grew by {rss_growth / gib:.2f} GiB"


def test_odd_derived_head_dim_rejected():
    with pytest.raises(ValueError):
        make(embed_dim=36, num_heads=12, num_kv_heads=4)

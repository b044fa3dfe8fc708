"""Numerical parity with transformers, an independent implementation of both architectures.

Each case builds a tiny random transformers model (Llama4ForCausalLM as MobileLLM-R1, or
LlamaForCausalLM), saves it with save_pretrained, loads the folder with mlx_mobilellm.load and
compares, in float32: logits on a random batch, 20 greedy tokens, and left-padded batches.
Every comparison is shown to be sensitive: a deliberately misconfigured model (RoPE layout
flipped, or the case's special feature switched off) must miss by far more than the tolerance.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import torch
import transformers

import mlx_mobilellm  # noqa: E402
from mlx_mobilellm.models import MobileLLM  # noqa: E402

# The models are tiny: on a 2-core machine torch's threads only fight over them (and with MLX).
torch.set_num_threads(1)

VOCAB = 256
SEQ = 24
NEW_TOKENS = 20
TOL = 1e-4
PAD = 5  # left padding of the second row in the padding tests
# A deliberately wrong model must miss by at least this much: 100x the tolerance.
SENSITIVE = 100 * TOL
# Greedy decoding is only comparable where the best token wins clearly.
MIN_MARGIN = 1e-3

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    # Larger than the default 0.02 so that logits spread out and greedy paths are not ties.
    initializer_range=0.1,
)
LLAMA4 = dict(COMMON, intermediate_size=96, intermediate_size_mlp=160, moe_layers=[])
LLAMA = dict(COMMON, intermediate_size=160)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@dataclasses.dataclass(frozen=True)
class Case:
    arch: str                      # "llama4" or "llama"
    config: dict                   # transformers config arguments
    transformers4: bool = False    # rewrite config.json as transformers 4.x wrote it
    # Changes to our config that must visibly break parity (the case's features really act).
    breaks: tuple = ()
    padding_invariant: bool = True  # transformers gives the same logits padded and unpadded

CASES = {
    # MobileLLM-R1 shape: dense Llama 4, RoPE + weightless QK-norm on every layer.
    "llama4-r1-tied-gqa": Case("llama4", dict(
        LLAMA4, num_hidden_layers=2, no_rope_layers=[1, 1], tie_word_embeddings=True)),
    "llama4-r1-untied-mqa": Case("llama4", dict(
        LLAMA4, num_hidden_layers=2, no_rope_layers=[1, 1], tie_word_embeddings=False,
        num_key_value_heads=1, head_dim=32, eos_token_id=[2, 3])),  # head_dim != hidden / heads
    # transformers' default Llama 4 layout: layer 3 is NoPE (no RoPE, no QK-norm, full attention,
    # query temperature); the RoPE layers attend within chunks of 8 < SEQ tokens.
    "llama4-nope-chunked-temperature": Case(
        "llama4",
        dict(LLAMA4, num_hidden_layers=4, tie_word_embeddings=True, attention_chunk_size=8,
             attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5),
        breaks=(dict(attention_chunk_size=None), dict(attn_temperature_tuning=False)),
        # transformers scales NoPE queries by the position counted from the padded row's start
        # (cache_position), so its padded logits differ from the unpadded ones; ours must
        # match its padded ones.
        padding_invariant=False),
    # Chunks alone (no temperature): a left-padded row must attend exactly as unpadded, which
    # needs chunks counted from its first real token, as transformers counts them.
    "llama4-chunked-untied": Case(
        "llama4",
        dict(LLAMA4, num_hidden_layers=4, tie_word_embeddings=False, attention_chunk_size=8,
             attn_temperature_tuning=False),
        breaks=(dict(attention_chunk_size=None),)),
    # layer_types all full_attention (as recent transformers writes and obeys it): no chunks
    # though attention_chunk_size is set.
    "llama4-layer-types-full-attention": Case(
        "llama4",
        dict(LLAMA4, num_hidden_layers=2, no_rope_layers=[1, 1], tie_word_embeddings=True,
             attention_chunk_size=8, layer_types=["full_attention"] * 2),
        breaks=(dict(attention_chunk_size=8),)),
    # An R1 config.json as transformers 4.x wrote it: top-level rope_theta, no rope_parameters.
    # Not the 500000 default, so a reader that misses it fails.
    "llama4-r1-transformers4-config": Case(
        "llama4",
        dict(LLAMA4, num_hidden_layers=2, no_rope_layers=[1, 1], tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        transformers4=True, breaks=(dict(rope_base=500000.0),)),
    "llama-tied-gqa": Case("llama", dict(LLAMA, num_hidden_layers=2, tie_word_embeddings=True)),
    "llama-untied-mqa": Case("llama", dict(
        LLAMA, num_hidden_layers=3, tie_word_embeddings=False, num_key_value_heads=1)),
    # original_max_position_embeddings 64 with head_dim 16: 4 frequencies are slowed 8x and 2
    # blended, so the scaling changes the logits.
    "llama-llama3-rope": Case(
        "llama", dict(LLAMA, num_hidden_layers=2, tie_word_embeddings=False,
                      rope_parameters=LLAMA3_ROPE),
        breaks=(dict(rope_scaling=None),)),
    "llama-llama3-rope-transformers4-config": Case(
        "llama", dict(LLAMA, num_hidden_layers=2, tie_word_embeddings=True,
                      rope_parameters=LLAMA3_ROPE),
        transformers4=True, breaks=(dict(rope_scaling=None), dict(rope_base=500000.0))),
}


def as_transformers4_config(folder: Path) -> None:
    """Rewrite a transformers-5 config.json the way transformers 4.x wrote it: rope_theta at
    the top level, scaling (if any) under rope_scaling, no rope_parameters."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = None if params.get("rope_type", "default") == "default" else params
    path.write_text(json.dumps(config, indent=2))


def build_transformers_model(case: Case, seed: int = 0):
    torch.manual_seed(seed)
    if case.arch == "llama4":
        model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**case.config))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**case.config))
    with torch.no_grad():
        # Norm weights start at 1: randomise them so that swapping two norms cannot go unseen.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.5 * torch.randn_like(param))
    model.generation_config.eos_token_id = None  # always generate every requested token
    model.generation_config.pad_token_id = 0
    return model.eval()


@dataclasses.dataclass
class Pair:
    name: str
    case: Case
    hf: object
    ours: MobileLLM
    folder: Path


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory) -> Pair:
    case = CASES[request.param]
    hf = build_transformers_model(case)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    if case.transformers4:
        as_transformers4_config(folder)
        assert "rope_parameters" not in json.loads((folder / "config.json").read_text())
    model, tokenizer = mlx_mobilellm.load(folder)
    assert tokenizer is None
    return Pair(request.param, case, hf, model, folder)


def random_ids(seed: int = 1, batch: int = 2, length: int = SEQ) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator).numpy()


def hf_logits(hf, ids: np.ndarray, mask: np.ndarray = None) -> np.ndarray:
    with torch.no_grad():
        out = hf(torch.from_numpy(ids).long(),
                 attention_mask=None if mask is None else torch.from_numpy(mask).long())
    return out.logits.float().numpy()


def our_logits(model: MobileLLM, ids: np.ndarray, mask: np.ndarray = None) -> np.ndarray:
    out = model(mx.array(ids), attention_mask=None if mask is None else mx.array(mask))
    return np.array(out.logits.astype(mx.float32))


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.abs(a - b).max())


def hf_greedy(hf, ids: np.ndarray, mask: np.ndarray):
    """transformers' greedy tokens, and the smallest top-1/top-2 logit gap along the way."""
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                          max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack(out.scores).float().topk(2, dim=-1).values
    margin = float((top2[..., 0] - top2[..., 1]).min())
    return out.sequences.numpy(), margin


def left_padded(ids: np.ndarray, pad: int = PAD):
    """Row 1 keeps only its last SEQ - pad tokens, left-padded with id 0; row 0 is unchanged."""
    padded = ids.copy()
    padded[1, :pad] = 0
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    return padded, mask


def test_config_read_from_checkpoint(pair):
    """The loaded config carries what the checkpoint says (and what parity below relies on)."""
    hf_config, ours = pair.hf.config, pair.ours.config
    assert ours.num_layers == hf_config.num_hidden_layers
    assert ours.num_kv_heads == hf_config.num_key_value_heads
    assert ours.dim_per_head == hf_config.head_dim
    assert ours.tie_word_embeddings == hf_config.tie_word_embeddings
    assert ours.rope_base == hf_config.rope_parameters["rope_theta"]
    assert ours.rope_traditional == (pair.case.arch == "llama4")
    if pair.case.arch == "llama4":
        assert ours.nope_layers == [i for i, rope in enumerate(hf_config.no_rope_layers) if not rope]
    assert ("lm_head.weight" in dict(tree_flatten(pair.ours.parameters()))) != ours.tie_word_embeddings


def test_logits_match_transformers(pair):
    ids = random_ids()
    diff = max_diff(our_logits(pair.ours, ids), hf_logits(pair.hf, ids))
    assert diff <= TOL, f"{pair.name}: max |logits diff| {diff:.3g} > {TOL}"


def test_greedy_generation_matches_transformers(pair):
    ids = random_ids(seed=2)
    expected, margin = hf_greedy(pair.hf, ids, np.ones_like(ids))
    assert margin > MIN_MARGIN, "near-tie in the reference: choose another seed"
    ours = np.array(pair.ours.generate(mx.array(ids), max_new_tokens=NEW_TOKENS, temperature=0,
                                       eos_token_id=[]))
    assert expected.shape == ours.shape == (2, SEQ + NEW_TOKENS)
    np.testing.assert_array_equal(ours[:, :SEQ], ids)
    new = expected[:, SEQ:]
    assert len(np.unique(new)) >= 4, "degenerate reference: the token comparison would prove little"
    np.testing.assert_array_equal(ours[:, SEQ:], new)


def test_left_padded_logits_match_transformers(pair):
    ids = random_ids(seed=3)
    padded, mask = left_padded(ids)
    ours = our_logits(pair.ours, padded, mask)
    reference = hf_logits(pair.hf, padded, mask)
    unpadded = hf_logits(pair.hf, padded[1:, PAD:])[0]
    # Row 0 has no padding; it must not be disturbed by row 1's.
    assert max_diff(ours[0], reference[0]) <= TOL
    if pair.case.padding_invariant:
        # The reference really is padding-blind here, so "same as unpadded" is well defined.
        assert max_diff(reference[1, PAD:], unpadded) <= TOL
        expected = unpadded
    else:
        expected = reference[1, PAD:]
    diff = max_diff(ours[1, PAD:], expected)
    assert diff <= TOL, f"{pair.name}: left-padded row off by {diff:.3g}"


def test_left_padded_generation_matches_transformers(pair):
    padded, mask = left_padded(random_ids(seed=4))
    expected, margin = hf_greedy(pair.hf, padded, mask)
    assert margin > MIN_MARGIN, "near-tie in the reference: choose another seed"
    ours = np.array(pair.ours.generate(mx.array(padded), max_new_tokens=NEW_TOKENS, temperature=0,
                                       attention_mask=mx.array(mask), eos_token_id=[]))
    np.testing.assert_array_equal(ours[:, SEQ:], expected[:, SEQ:])


def misconfigured(model: MobileLLM, **changes) -> MobileLLM:
    """Our model with the same weights and some config fields changed."""
    wrong = MobileLLM(dataclasses.replace(model.config, **changes))
    wrong.load_weights(tree_flatten(model.parameters()))
    wrong.eval()
    return wrong


def test_comparison_is_sensitive(pair):
    """The parity above is not vacuous: the wrong RoPE layout, or any of the case's special
    features switched off, misses transformers by far more than the tolerance."""
    ids = random_ids()
    reference = hf_logits(pair.hf, ids)
    changes = (dict(rope_traditional=not pair.ours.config.rope_traditional),) + pair.case.breaks
    for change in changes:
        diff = max_diff(our_logits(misconfigured(pair.ours, **change), ids), reference)
        assert diff > SENSITIVE, f"{pair.name}: {change} only moves the logits by {diff:.3g}"
    # ... while an unchanged copy (the helper itself) still matches.
    assert max_diff(our_logits(misconfigured(pair.ours), ids), reference) <= TOL

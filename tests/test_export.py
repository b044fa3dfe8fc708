"""Export: an MLX model folder back out to Hugging Face safetensors (convert.export) and GGUF
(convert.gguf_export).

Tiny transformers models are saved with save_pretrained, converted with convert.convert and
exported again. The checks: transformers loads the export with no missing or unexpected keys
and gives our logits (float32, within 1e-4); HF → MLX → HF gives back the very same tensors
and an equivalent config; quantized models export dequantized; a GGUF-sourced folder (GGUF
built here with the gguf package, Q/K rows permuted as llama.cpp stores them) exports with
rotate-half rows for LlamaForCausalLM; the GGUF export reads back with gguf's reader, with our
own GGUF loader (an independent reader), with transformers' GGUF loader, and its tokenizer
metadata turns back into a tokenizer that encodes as the original.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

import mlx_mobilellm
from convert.convert import convert
from convert.export import (export_hf, halves_to_interleaved, interleaved_to_halves,
                            restore_rope_layout)
from convert.gguf_export import export_gguf
from mlx_mobilellm.formats.hf_config import config_from_hf, config_to_hf
from mlx_mobilellm.errors import CheckpointError
from mlx_mobilellm.formats.model_folder import INDEX_FILE
from mlx_mobilellm.models import MobileLLM, MobileLLMConfig

torch.set_num_threads(1)  # tiny models: more threads only fight with MLX's on 2 cores

TOL = 1e-4
VOCAB = 320  # room for the 300-token byte-level BPE trained below
IDS = np.random.default_rng(3).integers(3, VOCAB, size=(2, 20))
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, initializer_range=0.1, num_hidden_layers=2)
LLAMA4 = dict(COMMON, intermediate_size=96, intermediate_size_mlp=160, moe_layers=[])
LLAMA = dict(COMMON, intermediate_size=160)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    # MobileLLM-R1's shape: RoPE + weightless QK-norm on every layer, tied embeddings.
    "llama4-r1-tied": ("llama4", dict(LLAMA4, no_rope_layers=[1, 1], tie_word_embeddings=True)),
    # Untied, a NoPE layer with query temperature, chunked attention, a list of EOS ids.
    "llama4-nope-chunked-untied": ("llama4", dict(
        LLAMA4, num_hidden_layers=4, tie_word_embeddings=False, attention_chunk_size=8,
        attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5, eos_token_id=[2, 3])),
    "llama-llama3-rope-untied": ("llama", dict(LLAMA, tie_word_embeddings=False,
                                               rope_parameters=LLAMA3_ROPE)),
}
# Keys of transformers' parsed config that say nothing about the model's computation.
CONFIG_KEYS_IGNORED = {"transformers_version", "initializer_range", "_name_or_path",
                       # Llama 4's MoE expert width: dense layers read intermediate_size_mlp
                       "intermediate_size"}


# --- helpers ------------------------------------------------------------------------------

def make_hf(arch: str, config: dict, folder: Path, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama4":
        model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**config))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    with torch.no_grad():  # norms start at 1: randomise them so that a swapped norm shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.5 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model.eval()


def load_transformers(folder: Path, **kwargs):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).logits.float().numpy()


def our_logits(path) -> np.ndarray:
    model, _ = mlx_mobilellm.load(path)
    return np.array(model(mx.array(IDS)).logits.astype(mx.float32))


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.abs(a - b).max())


def hf_tensors(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    return {name: array for f in files for name, array in load_file(f).items()}


def no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.endswith(".tmp")]


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Q/K rows from Hugging Face Llama's rotate-half layout to the interleaved pairs GGUF
    stores, written here from the layouts' definition (not with the code under test):
    row i and row i + d/2 of each head become rows 2i and 2i + 1."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        first, second = w[h * d:h * d + d // 2], w[h * d + d // 2:(h + 1) * d]
        out[h * d:(h + 1) * d:2] = first        # rows 2i
        out[h * d + 1:(h + 1) * d:2] = second   # rows 2i + 1
    return out


# --- the RoPE row permutation -------------------------------------------------------------

def test_rope_row_permutations_invert_each_other_and_carry_rope_across():
    heads, d, width = 3, 8, 5
    w = mx.random.normal((heads * d, width), key=mx.random.key(0))
    to_interleaved = halves_to_interleaved(w, d)
    assert not mx.array_equal(to_interleaved, w)
    assert mx.array_equal(interleaved_to_halves(to_interleaved, d), w)
    assert mx.array_equal(halves_to_interleaved(interleaved_to_halves(w, d), d), w)
    assert np.array_equal(np.array(to_interleaved), llama_cpp_permute(np.array(w), heads))

    # Rotate-half RoPE on the original rows equals interleaved RoPE on the permuted rows,
    # read back through the inverse permutation: the attention scores cannot tell them apart.
    x = mx.random.normal((1, 7, width), key=mx.random.key(1))

    def rotated(weight, traditional):
        q = (x @ weight.T).reshape(1, 7, heads, d).transpose(0, 2, 1, 3)
        return mx.fast.rope(q, d, traditional=traditional, base=10000.0, scale=1.0, offset=0)

    halves = rotated(w, False)
    interleaved = rotated(to_interleaved, True)
    back = interleaved_to_halves(interleaved.transpose(0, 1, 3, 2).reshape(heads * d, 7), d)
    assert mx.allclose(back, halves.transpose(0, 1, 3, 2).reshape(heads * d, 7), atol=1e-5)
    # ... and it is not the identity: unpermuted rows under interleaved RoPE differ.
    assert not mx.allclose(rotated(w, True), halves, atol=1e-3)


def test_restored_layout_gives_the_same_model_weighted_qk_norm_included():
    """A model with interleaved rows, its Q/K rows and QK-norm weights permuted to the
    rotate-half layout and run with rotate-half RoPE, computes the same logits."""
    config = MobileLLMConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, hidden_dim=96,
                             vocab_size=VOCAB, max_seq_len=64, rope_base=10000.0,
                             qk_norm_weight=True, rope_traditional=True)
    model = MobileLLM(config)
    weights = {name: array if not name.endswith("norm.weight")
               else 1 + 0.5 * mx.random.normal(array.shape, key=mx.random.key(len(name)))
               for name, array in tree_flatten(model.parameters())}
    model.load_weights(list(weights.items()))
    halves = dataclasses.replace(config, rope_traditional=False)

    def logits(permuted: dict) -> np.ndarray:
        other = MobileLLM(halves)
        other.load_weights(list(permuted.items()))
        return np.array(other.eval()(mx.array(IDS)).logits)

    expected = np.array(model.eval()(mx.array(IDS)).logits)
    restored = {n: restore_rope_layout(n, a, config, interleaved=False) for n, a in weights.items()}
    assert max_diff(logits(restored), expected) <= 1e-5
    # Leaving the norm weights in place is visibly wrong: the test sees them.
    rows_only = {n: a if "_norm." in n else restored[n] for n, a in weights.items()}
    assert max_diff(logits(rows_only), expected) > 100 * TOL


CONFIGS = {
    "llama4_text": MobileLLMConfig(
        num_layers=4, num_heads=4, num_kv_heads=1, embed_dim=64, hidden_dim=160, vocab_size=VOCAB,
        max_seq_len=256, rope_base=10000.0, head_dim=32, nope_layers=[3], attention_chunk_size=8,
        attn_temperature_tuning=True, floor_scale=4.0, attn_scale=0.5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama": MobileLLMConfig(
        num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, hidden_dim=160, vocab_size=VOCAB,
        max_seq_len=256, rope_base=10000.0, head_dim=16, rope_traditional=False, use_qk_norm=False,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, norm_eps=1e-6, bos_token_id=1),
    "mobilellm": MobileLLMConfig(
        num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, hidden_dim=160, vocab_size=VOCAB,
        max_seq_len=256, rope_base=10000.0, head_dim=16, rope_traditional=False, use_qk_norm=False,
        layer_sharing=True, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_config_to_hf_inverts_config_from_hf(model_type):
    config = CONFIGS[model_type]
    hf = config_to_hf(config, model_type, dtype="bfloat16")
    assert hf["model_type"] == model_type and hf["dtype"] == hf["torch_dtype"] == "bfloat16"
    assert config_from_hf(hf) == config
    if model_type != "mobilellm":  # transformers knows these two: its config class accepts it
        parsed = transformers.AutoConfig.for_model(**hf)
        assert parsed.rope_parameters["rope_theta"] == config.rope_base
    if model_type == "mobilellm":
        assert hf["share_embedding"] is True and hf["tie_word_embeddings"] is False


# --- Hugging Face round trips ---------------------------------------------------------------

@pytest.fixture(scope="module", params=list(CASES))
def round_trip(request, tmp_path_factory):
    arch, config = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = make_hf(arch, config, root / "hf")
    convert(root / "hf", root / "mlx", quiet=True)
    export_hf(root / "mlx", root / "out", quiet=True)
    return arch, model, root


def test_hf_round_trip_gives_back_the_same_tensors(round_trip):
    _, _, root = round_trip
    original, exported = hf_tensors(root / "hf"), hf_tensors(root / "out")
    assert sorted(exported) == sorted(original)
    for name, array in original.items():
        assert exported[name].dtype == array.dtype and np.array_equal(exported[name], array), name
    no_leftovers(root)


def test_hf_round_trip_gives_an_equivalent_config(round_trip):
    _, _, root = round_trip
    raw = {n: json.loads((root / n / "config.json").read_text()) for n in ("hf", "out")}
    assert config_from_hf(raw["out"]) == config_from_hf(raw["hf"])
    parsed = {n: transformers.AutoConfig.from_pretrained(root / n).to_dict() for n in raw}
    for key, value in parsed["hf"].items():
        if key not in CONFIG_KEYS_IGNORED:
            assert parsed["out"].get(key) == value, key


def test_transformers_runs_the_export_with_our_logits(round_trip):
    _, original, root = round_trip
    exported = load_transformers(root / "out")
    ours = our_logits(root / "mlx")
    assert max_diff(hf_logits(exported), ours) <= TOL
    assert max_diff(hf_logits(original), ours) <= TOL


def test_quantized_folder_exports_dequantized(tmp_path):
    make_hf("llama4", dict(LLAMA4, no_rope_layers=[1, 1], tie_word_embeddings=True), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32, quiet=True)
    export_hf(tmp_path / "q4", tmp_path / "out", quiet=True)
    tensors = hf_tensors(tmp_path / "out")
    assert all(a.dtype == np.float32 for a in tensors.values())
    assert not [n for n in tensors if n.endswith((".scales", ".biases"))]
    # mx.dequantize is exact: transformers computes with the weights our 4-bit model uses.
    assert max_diff(hf_logits(load_transformers(tmp_path / "out")), our_logits(tmp_path / "q4")) <= TOL


def test_llama_exports_as_llama4_text_with_interleaved_rows(tmp_path):
    """model_type override: rotate-half rows permuted to Llama 4's interleaved layout."""
    original = make_hf("llama", dict(LLAMA, tie_word_embeddings=True), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", quiet=True)
    export_hf(tmp_path / "mlx", tmp_path / "out", model_type="llama4_text", quiet=True)
    exported = load_transformers(tmp_path / "out")
    assert type(exported).__name__ == "Llama4ForCausalLM"
    assert max_diff(hf_logits(exported), hf_logits(original)) <= TOL


def test_sharded_export_with_index(tmp_path):
    make_hf("llama", dict(LLAMA, tie_word_embeddings=False), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", quiet=True)
    export_hf(tmp_path / "mlx", tmp_path / "out", max_shard_bytes=60_000, quiet=True)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert max_diff(hf_logits(load_transformers(tmp_path / "out")), our_logits(tmp_path / "mlx")) <= TOL


def test_refusals_leave_nothing_behind(tmp_path):
    make_hf("llama4", dict(LLAMA4, no_rope_layers=[1, 1], tie_word_embeddings=True), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", quiet=True)
    with pytest.raises(CheckpointError, match="QK-norm"):
        export_hf(tmp_path / "mlx", tmp_path / "as-llama", model_type="llama", quiet=True)
    assert not (tmp_path / "as-llama").exists()
    no_leftovers(tmp_path)

    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        export_hf(tmp_path / "mlx", tmp_path / "out", quiet=True)
    export_hf(tmp_path / "mlx", tmp_path / "out", force=True, quiet=True)
    assert (tmp_path / "out" / "config.json").exists()


def test_original_mobilellm_and_cheapertraining_round_trip(tmp_path):
    """Formats transformers cannot run: the export must give the source's files back, and
    our loader the same logits."""
    make_hf("llama", dict(LLAMA, tie_word_embeddings=True), tmp_path / "mobilellm")
    raw = json.loads((tmp_path / "mobilellm" / "config.json").read_text())
    raw.update(model_type="mobilellm", architectures=["MobileLLMForCausalLM"],
               share_embedding=True, tie_word_embeddings=False, layer_sharing=True)
    (tmp_path / "mobilellm" / "config.json").write_text(json.dumps(raw))

    config = dataclasses.replace(CONFIGS["llama4_text"], rope_scaling=None, qk_norm_weight=True)
    model = MobileLLM(config)
    (tmp_path / "cheapertraining").mkdir()
    mx.save_safetensors(str(tmp_path / "cheapertraining" / "model.safetensors"),
                        dict(tree_flatten(model.parameters())))
    raw = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    (tmp_path / "cheapertraining" / "config.json").write_text(json.dumps(raw))

    for source in ("mobilellm", "cheapertraining"):
        convert(tmp_path / source, tmp_path / f"{source}-mlx", quiet=True)
        export_hf(tmp_path / f"{source}-mlx", tmp_path / f"{source}-out", quiet=True)
        original, exported = hf_tensors(tmp_path / source), hf_tensors(tmp_path / f"{source}-out")
        assert sorted(exported) == sorted(original)
        assert all(np.array_equal(exported[n], a) for n, a in original.items())
        configs = [json.loads((tmp_path / f / "config.json").read_text())
                   for f in (source, f"{source}-out")]
        if source == "mobilellm":
            assert config_from_hf(configs[1]) == config_from_hf(configs[0])
        else:
            assert configs[1] == configs[0]
        assert max_diff(our_logits(tmp_path / f"{source}-out"),
                        our_logits(tmp_path / f"{source}-mlx")) <= TOL


def test_folder_without_a_recorded_format_exports_by_its_features(tmp_path):
    make_hf("llama4", dict(LLAMA4, no_rope_layers=[1, 1], tie_word_embeddings=True), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", quiet=True)
    raw = json.loads((tmp_path / "mlx" / "config.json").read_text())
    del raw["source_format"]  # as a model made here, not converted, would have it
    (tmp_path / "mlx" / "config.json").write_text(json.dumps(raw))
    export_hf(tmp_path / "mlx", tmp_path / "out", quiet=True)  # QK-norm: only llama4_text says it
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama4_text"


# --- a GGUF-sourced folder back to Hugging Face Llama ---------------------------------------

def write_llama_gguf(model, path: Path, quantized: dict = None) -> None:
    """A llama.cpp-style GGUF of a transformers LlamaForCausalLM: llama.* metadata, tensors
    under GGUF names with Q/K rows interleaved, F32 or block-quantized (`quantized` maps a
    GGUF name suffix to a GGMLQuantizationType)."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    block = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        module = name[: -len(".weight")]
        if module.startswith("model.layers."):
            _, _, n, rest = module.split(".", 3)
            out = f"blk.{n}.{block[rest]}.weight"
        else:
            out = f"{names[module]}.weight"
        if out.endswith("attn_q.weight"):
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif out.endswith("attn_k.weight"):
            array = llama_cpp_permute(array, config.num_key_value_heads)
        kind = next((k for suffix, k in (quantized or {}).items() if out.endswith(suffix)), None)
        if kind is None:
            writer.add_tensor(out, np.ascontiguousarray(array))
        else:
            writer.add_tensor(out, gguf.quants.quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


GGUF_CASES = {
    "f32": None,
    "q8_0-q4_0": {"attn_q.weight": gguf.GGMLQuantizationType.Q8_0,
                  "attn_k.weight": gguf.GGMLQuantizationType.Q4_0,
                  "ffn_up.weight": gguf.GGMLQuantizationType.Q4_0},
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_sourced_folder_exports_rotate_half_llama(tmp_path, case):
    original = make_hf("llama", dict(LLAMA, tie_word_embeddings=False), tmp_path / "hf")
    write_llama_gguf(original, tmp_path / "model.gguf", GGUF_CASES[case])
    convert(tmp_path / "model.gguf", tmp_path / "mlx", quiet=True)
    # GGUF block scales are float16: float32 keeps the dequantized weights exact (the default,
    # the scales' dtype, would round them to float16).
    export_hf(tmp_path / "mlx", tmp_path / "out", dtype="float32", quiet=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"
    exported = load_transformers(tmp_path / "out")
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert max_diff(hf_logits(exported), our_logits(tmp_path / "mlx")) <= TOL
    if case == "f32":  # nothing was rounded: the rows are the original's, bit for bit
        q = "model.layers.1.self_attn.q_proj.weight"
        assert np.array_equal(hf_tensors(tmp_path / "out")[q], original.state_dict()[q].numpy())
        assert max_diff(hf_logits(exported), hf_logits(original)) <= TOL


# --- GGUF export --------------------------------------------------------------------------

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_bpe(folder: Path, pre: str = "gpt-2") -> None:
    """A byte-level BPE tokenizer (300 tokens) with the pre-tokenizer of GPT-2, Llama 3
    ("llama-bpe": its regex, BOS added by the post-processor) or SmolLM (digits split one by
    one), and a tokenizer_config.json with a chat template, in `folder`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = {
        "gpt-2": byte_level,
        "llama-bpe": pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"), byte_level]),
        "smollm": pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]),
    }[pre]
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog 2024", "hello world, hello there!"] * 20
    tokenizer.train_from_iterator(text, trainer)
    tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>",
                        "chat_template": "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"}
    if pre == "llama-bpe":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    else:
        tokenizer_config["add_bos_token"] = False
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


@pytest.fixture(scope="module")
def gguf_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-export")
    original = make_hf("llama", dict(LLAMA, tie_word_embeddings=False), root / "hf")
    byte_level_bpe(root / "hf")
    convert(root / "hf", root / "mlx", quiet=True)
    export_gguf(root / "mlx", root / "model.gguf", quiet=True)
    return original, root


def test_gguf_export_reads_back_with_names_shapes_and_metadata(gguf_export):
    _, root = gguf_export
    reader = gguf.GGUFReader(str(root / "model.gguf"))
    meta = {key: field.contents() for key, field in reader.fields.items()}
    assert meta["general.architecture"] == "llama"
    expected = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 160,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.rope.dimension_count": 16, "llama.context_length": 256, "llama.vocab_size": VOCAB,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.add_bos_token": False}
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert len(meta["tokenizer.ggml.tokens"]) == VOCAB and meta["tokenizer.ggml.tokens"][1] == "<s>"
    assert meta["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL
    assert meta["tokenizer.ggml.token_type"][VOCAB - 1] == gguf.TokenType.UNUSED
    assert meta["tokenizer.ggml.merges"][0].count(" ") == 1
    assert "</s>" in meta["tokenizer.chat_template"]

    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}  # ggml order: columns first
    assert shapes["token_embd.weight"] == [64, VOCAB] and shapes["output.weight"] == [64, VOCAB]
    assert shapes["blk.1.attn_k.weight"] == [64, 32] and shapes["blk.0.ffn_down.weight"] == [160, 64]
    assert shapes["output_norm.weight"] == [64] and len(shapes) == 3 + 2 * 9
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    no_leftovers(root)


def test_gguf_export_loads_back_with_our_reader_and_transformers(gguf_export):
    original, root = gguf_export
    ours = our_logits(root / "mlx")
    assert max_diff(our_logits(root / "model.gguf"), ours) <= TOL
    assert max_diff(hf_logits(original), ours) <= TOL
    exported = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file="model.gguf")
    assert max_diff(hf_logits(exported.eval()), ours) <= TOL


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smollm"])
def test_gguf_export_tokenizer_turns_back_into_the_same_tokenizer(gguf_export, tmp_path, pre):
    """GGUF tokenizer metadata → convert's GGUF tokenizer rebuild → the same token ids."""
    from tokenizers import Tokenizer

    _, root = gguf_export
    shutil.copytree(root / "mlx", tmp_path / "mlx")
    byte_level_bpe(tmp_path / "mlx", pre)
    export_gguf(tmp_path / "mlx", tmp_path / "model.gguf", quiet=True)
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(tmp_path / "model.gguf")).fields.items()}
    assert meta["tokenizer.ggml.pre"] == pre
    assert meta["tokenizer.ggml.add_bos_token"] is (pre == "llama-bpe")

    convert(tmp_path / "model.gguf", tmp_path / "from-gguf", quiet=True)  # rebuilds tokenizer.json
    text = "The lazy fox says hello,  world 12345!\n\nthe end</s>"
    ids = [Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
           for folder in (tmp_path / "mlx", tmp_path / "from-gguf")]
    assert ids[1] == ids[0]


def test_gguf_export_of_quantized_and_float16_folders(tmp_path):
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    make_hf("llama", dict(LLAMA, tie_word_embeddings=True, rope_parameters=linear), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32, quiet=True)
    export_gguf(tmp_path / "q4", tmp_path / "q4.gguf", quiet=True)
    assert max_diff(our_logits(tmp_path / "q4.gguf"), our_logits(tmp_path / "q4")) <= TOL
    meta = {k: f.contents() for k, f in gguf.GGUFReader(str(tmp_path / "q4.gguf")).fields.items()}
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 2.0

    convert(tmp_path / "hf", tmp_path / "f16", dtype="float16", quiet=True)
    export_gguf(tmp_path / "f16", tmp_path / "f16.gguf", quiet=True)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "f16.gguf")).tensors}
    assert "output.weight" not in types  # tied: llama.cpp reads token_embd
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    with pytest.raises(CheckpointError, match="already exists"):
        export_gguf(tmp_path / "f16", tmp_path / "f16.gguf", quiet=True)


def test_export_of_a_gguf_writes_its_tokenizer_files(tmp_path):
    """A GGUF carries its tokenizer as metadata: export writes it as tokenizer.json and
    tokenizer_config.json, which transformers loads (it wrote no tokenizer before)."""
    from test_convert import GGUF_VOCAB, Q, transformers_model, write_gguf

    path = write_gguf(tmp_path / "model.gguf", transformers_model("llama", vocab_size=GGUF_VOCAB),
                      lambda name: Q.F32)
    export_hf(path, tmp_path / "hf", quiet=True)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = mlx_mobilellm.load_tokenizer(path)
    assert theirs("the three")["input_ids"] == ours.encode("the three")

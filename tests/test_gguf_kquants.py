"""GGUF files in the types MLX has no kernels for (K-quants, Q5_0/Q5_1, IQ*, ...): read from
their bytes, dequantized by the gguf package to float16, and checked against transformers'
GGUF loader, which dequantizes the same bytes independently of our reading of the file.

gguf 0.19 quantizes none of the K-quants or IQ types, so those tensors are written as random
blocks in each type's documented layout, their float16 scale fields set so the weights have a
trained model's spread: the bytes, not an original float model, are what both readers see.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten

import mlx_mobilellm
from mlx_mobilellm.cli import main as cli_main
from mlx_mobilellm.errors import CheckpointError
from mlx_mobilellm.formats import gguf_file
from mlx_mobilellm.formats.gguf_file import read_header, read_metadata
from test_convert import GGUF_VOCAB, IDS, SMOLLM2_GGUF, Q, our_logits, transformers_model, write_gguf

# Byte offsets of the float16 scale fields in one block (llama.cpp's ggml-common.h block_*).
SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
                Q.IQ4_XS: (0,), Q.IQ2_XXS: (0,)}
WEIGHT_STD = 0.05
# K-quant blocks hold 256 values, so every matrix's rows are a multiple of 256 wide.
SIZES = dict(vocab_size=GGUF_VOCAB, hidden_size=256, intermediate_size=256, head_dim=64)
# Largest |difference| / largest |logit| against transformers (which dequantizes to float32),
# measured over LAYOUTS: 5e-5 to 1.8e-3 as we load (float16: its rounding of the weights), and
# 6e-7 to 4.6e-6 with the dequantized weights kept in float32 (the same values both sides).
REL_TOL = {"float16": 5e-3, "float32": 2e-5}


def random_blocks(shape: tuple, qtype, seed: int) -> np.ndarray:
    """Random blocks of `qtype` for a float matrix of `shape`, scaled to WEIGHT_STD."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, width = shape
    blocks = np.random.default_rng(seed).integers(0, 256, (rows * width // block_values, block_bytes),
                                                  dtype=np.uint8)

    def with_scale(scale: float) -> np.ndarray:
        out = blocks.copy()
        for at in SCALE_FIELDS[qtype]:
            out[:, at : at + 2] = np.full((len(out), 1), scale, np.float16).view(np.uint8)
        return out.reshape(rows, -1)

    # Each weight is linear in the scale fields: measure the spread at 1, then scale to fit.
    spread = gguf.quants.dequantize(with_scale(1.0), qtype).std()
    return with_scale(WEIGHT_STD / spread)


def write_file(path: Path, tensor_type, tied: bool, monkeypatch) -> Path:
    """A tiny Llama GGUF with tensor_type(gguf name) per matrix: types gguf can quantize from
    the float model, the others as random blocks."""
    real_quantize = gguf.quants.quantize
    seeds = iter(range(1000))

    def quantize(array: np.ndarray, qtype) -> np.ndarray:
        if qtype in SCALE_FIELDS:
            return random_blocks(array.shape, qtype, next(seeds))
        return real_quantize(array, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", quantize)
    hf = transformers_model("llama", tie_word_embeddings=tied, **SIZES)
    write_gguf(path, hf, tensor_type)
    monkeypatch.setattr(gguf.quants, "quantize", real_quantize)
    return path


def transformers_logits(path: Path) -> np.ndarray:
    model = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).logits.numpy()


def q4_k_m(name: str):
    """Like llama.cpp's Q4_K_M: 6 bits where the quality matters most."""
    return Q.Q6_K if name.startswith("output") or "attn_v" in name or "ffn_down" in name else Q.Q4_K


LAYOUTS = {
    "Q4_K_M": (q4_k_m, False),
    "Q2_K-Q3_K": (lambda name: Q.Q2_K if "ffn" in name else Q.Q3_K, True),
    "Q5_K": (lambda name: Q.Q5_K, True),
    "Q5_0-Q5_1": (lambda name: Q.Q5_1 if "ffn" in name else Q.Q5_0, False),
    # MLX's own types in the same file are dequantized too: the model is all float.
    "IQ4_XS-IQ2_XXS-Q8_0": (lambda name: Q.Q8_0 if name.startswith("token_embd")
                            else Q.IQ2_XXS if "ffn_up" in name else Q.IQ4_XS, False),
    "TQ2_0-Q4_0": (lambda name: Q.TQ2_0 if "ffn" in name else Q.Q4_0, True),
    # Float matrices beside them come through as stored.
    "Q4_K-BF16-F16": (lambda name: Q.Q4_K if "ffn" in name else Q.BF16 if "attn" in name
                      else Q.F16, False),
}


def note_lines(text: str) -> list:
    return [line for line in text.splitlines() if " dequantized to " in line]


@pytest.mark.parametrize("dequantized", ["float16", "float32"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_match_transformers(layout, dequantized, tmp_path, monkeypatch, capfd):
    """As loaded (float16), and with float32 kept, which leaves nothing but our reading of
    the file to differ."""
    monkeypatch.setattr(gguf_file, "_DEQUANTIZED", np.dtype(dequantized).type)
    tensor_type, tied = LAYOUTS[layout]
    path = write_file(tmp_path / "model.gguf", tensor_type, tied, monkeypatch)
    expected = transformers_logits(path)
    capfd.readouterr()
    model, _ = mlx_mobilellm.load(path, dtype="float32")
    notes = note_lines(capfd.readouterr().err)
    ours = our_logits(model)
    error = np.abs(ours - expected).max() / np.abs(expected).max()
    print(f"{layout} in {dequantized}: max |difference| / max |logit| = {error:.2e}")
    assert error < REL_TOL[dequantized]
    quantized = [kind for kind in read_metadata(path)[1].values()
                 if kind not in ("F32", "F16", "BF16")]
    types, count = sorted(set(quantized)), len(quantized)
    assert notes == [f"{path}: {count} tensors in {'/'.join(types)} dequantized to {dequantized} (MLX "
                     "has no kernels for some of these types); `mlx-mobilellm convert -q` "
                     "re-quantizes them"]
    # As loaded, without a dtype: float matrices, nothing quantized.
    model, _ = mlx_mobilellm.load(path)
    parameters = dict(tree_flatten(model.parameters()))
    assert parameters["decoder.layers.0.ffn.up_proj.weight"].dtype == getattr(mx, dequantized)
    assert not any(name.endswith(".scales") for name in parameters)


def test_convert_q_requantizes(tmp_path, monkeypatch, capfd):
    path = write_file(tmp_path / "model.gguf", q4_k_m, False, monkeypatch)
    expected = transformers_logits(path)
    capfd.readouterr()
    out = tmp_path / "mlx"
    assert cli_main(["convert", "--hf-path", str(path), "--mlx-path", str(out), "-q"]) == 0
    assert len(note_lines(capfd.readouterr().err)) == 1
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    ours = our_logits(mlx_mobilellm.load(out, dtype="float32")[0])
    cosine = (ours * expected).sum() / np.linalg.norm(ours) / np.linalg.norm(expected)
    print(f"4-bit MLX re-quantization vs transformers: cosine {cosine:.4f}")
    assert cosine > 0.9  # measured 0.946: random 4-6 bit blocks quantized again in 4 bits
    # --quiet keeps the note back too.
    assert cli_main(["convert", "--hf-path", str(path), "--mlx-path", str(tmp_path / "q"),
                     "--quiet"]) == 0
    assert note_lines(capfd.readouterr().err) == []


def error_line(capfd, argv: list) -> str:
    capfd.readouterr()
    assert cli_main(["convert", *argv]) != 0
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def test_truncated_kquant_tensor_is_refused_in_one_line(tmp_path, monkeypatch, capfd):
    path = write_file(tmp_path / "model.gguf", q4_k_m, False, monkeypatch)
    header = read_header(path)
    name, dims, _, offset = max(header.tensors, key=lambda record: record[3])
    assert name == "output.weight"  # Q6_K, the last tensor
    end = header.data_start + offset + dims[1] * dims[0] // 256 * gguf.GGML_QUANT_SIZES[Q.Q6_K][1]
    path.write_bytes(path.read_bytes()[: end - 100])
    out = tmp_path / "mlx"
    line = error_line(capfd, ["--hf-path", str(path), "--mlx-path", str(out)])
    assert line == (f"error: {path}: tensor 'output.weight' ends at byte {end}, past the end of "
                    f"the {end - 100}-byte file: the file is truncated")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_type_nothing_reads_is_refused_in_one_line(tmp_path, capfd):
    """Q8_K (llama.cpp's intermediate type) is one the gguf package does not dequantize."""
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 292), np.uint8), raw_dtype=Q.Q8_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = error_line(capfd, ["--hf-path", str(path), "--mlx-path", str(tmp_path / "mlx")])
    assert f"{path}: tensor 'token_embd.weight' is Q8_K, which neither MLX reads nor the " \
           "installed gguf package dequantizes" in line
    assert "Q4_K" in line and "llama-quantize" in line


def test_non_finite_dequantized_values_are_refused(tmp_path, monkeypatch):
    path = write_file(tmp_path / "model.gguf", lambda name: Q.Q4_K, True, monkeypatch)
    header = read_header(path)
    offset = next(offset for name, _, _, offset in header.tensors if name == "blk.1.ffn_up.weight")
    data = bytearray(path.read_bytes())
    at = header.data_start + offset + 3 * gguf.GGML_QUANT_SIZES[Q.Q4_K][1]  # the 4th block's d
    data[at : at + 2] = np.array([np.inf], np.float16).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.1\.ffn_up\.weight' \(Q4_K\) "
                                              "dequantizes to values that are not finite"):
        mlx_mobilellm.load(path)


def test_metadata_reads_as_mlx_reads_it():
    """Our header walk reads the metadata (MLX's reader would load every tensor, and fails on
    most of the types above): on the real SmolLM2 file it gives exactly what mx.load gives."""
    ours, _ = read_metadata(SMOLLM2_GGUF)
    _, theirs = mx.load(str(SMOLLM2_GGUF), return_metadata=True)
    theirs = {key: value.item() if isinstance(value, mx.array) and value.ndim == 0
              else value.tolist() if isinstance(value, mx.array) else value
              for key, value in theirs.items()}
    assert ours == theirs
    assert {key: type(value) for key, value in ours.items()} == \
           {key: type(value) for key, value in theirs.items()}

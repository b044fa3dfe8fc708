"""An MLX model folder → one llama.cpp GGUF file (architecture "llama").

What the file holds:
  - llama.* hyperparameters (context length, widths, heads, head width, RoPE base and linear
    scaling, RMS-norm epsilon, vocabulary size);
  - every tensor under llama.cpp's names (token_embd, blk.N.attn_q ..., output_norm, and
    output only when the embeddings are untied), Q/K rows in the interleaved-pair layout
    llama.cpp's RoPE expects;
  - tensors in F32 or F16: float32 stays F32, float16 stays F16, bfloat16 becomes F32 (exact;
    F16 could overflow bfloat16's range), norm weights are always F32 (as llama.cpp keeps
    them). Quantized models are dequantized exactly and written as F32: re-quantize with
    llama.cpp's llama-quantize (Q4_K_M, Q8_0, ...);
  - the tokenizer, when the folder has a byte-level BPE tokenizer.json (GPT-2 / Llama 3 /
    SmolLM kind): tokenizer.ggml.model "gpt2", tokens, token types, merges, bos/eos/pad ids,
    the chat template, and tokenizer.ggml.pre when the pre-tokenizer is one we recognise
    (llama-bpe, smollm, gpt-2). Without a tokenizer.json (or with a SentencePiece
    tokenizer.model) only weights and hyperparameters are written.
Refused, with the reason: what GGUF's llama architecture cannot express — QK-norm, NoPE
layers, chunked attention, layer sharing, Llama-3 RoPE scaling (llama.cpp wants a
rope_freqs tensor, which this exporter does not write).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from mlx_mobilellm.errors import CheckpointError
from mlx_mobilellm.formats.hf_config import plain_attention_gaps
from mlx_mobilellm.formats.names import from_ours
from mlx_mobilellm.formats.sources import Checkpoint, open_checkpoint
from mlx_mobilellm.input_checks import read_json_object
from mlx_mobilellm.models.config import MobileLLMConfig

from .destination import atomic_output, check_destination
from .export import STORES_INTERLEAVED, float_weights, restore_rope_layout
from .progress import progress

ARCHITECTURE = "llama"


# --- what GGUF llama can say --------------------------------------------------------------

def rope_scaling_kind(config: MobileLLMConfig) -> str:
    return (config.rope_scaling or {}).get("rope_type", "default")


def check_expressible(config: MobileLLMConfig, where: str) -> None:
    gaps = plain_attention_gaps(config)
    if config.layer_sharing:
        gaps.append("every block runs twice in a row (layer_sharing)")
    kind = rope_scaling_kind(config)
    if kind not in ("default", "linear"):
        gaps.append(f"RoPE scaling {kind!r} is not written (only linear scaling is)")
    if gaps:
        raise CheckpointError(f"{where}: cannot export to GGUF (llama architecture): {gaps[0]}, "
                              "which llama.cpp's llama cannot express; export to Hugging Face "
                              "safetensors instead (export_hf)")


def write_hyperparameters(writer, config: MobileLLMConfig) -> None:
    import gguf

    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.embed_dim)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.dim_per_head)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.dim_per_head * config.num_heads != config.embed_dim:
        # llama.cpp assumes embed_dim / heads unless told the head width.
        writer.add_key_length(config.dim_per_head)
        writer.add_value_length(config.dim_per_head)
    if rope_scaling_kind(config) == "linear":  # check_expressible refused the other kinds
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))


# --- tensors ------------------------------------------------------------------------------

def gguf_float(array: mx.array) -> mx.array:
    """The dtype written: F16 for float16 matrices, F32 for everything else (dequantized
    weights arrive in float32 and stay exact)."""
    if array.dtype == mx.float16 and array.ndim > 1:
        return array
    return array.astype(mx.float32)


def gguf_tensors(checkpoint: Checkpoint) -> list:
    """(GGUF name, lazy float array) for every tensor, Q/K rows interleaved."""
    config = checkpoint.config
    tensors = []
    for name, array in float_weights(checkpoint, exact=True):
        array = restore_rope_layout(name, array, config, STORES_INTERLEAVED["gguf"])
        tensors.append((from_ours(name, "gguf"), gguf_float(array)))
    return sorted(tensors, key=_file_order)


def _file_order(item) -> tuple:
    """llama.cpp's order: token_embd, the blocks by index, then output_norm and output."""
    name = item[0]
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd.") else 2, 0, name)


# --- tokenizer ----------------------------------------------------------------------------

# Pre-tokenizers llama.cpp knows by name, recognised by their tokenizer.json structure.
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|"
                 " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _steps(pre: Optional[dict]) -> list:
    if not pre:
        return []
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(tokenizer: dict) -> Optional[str]:
    steps = _steps(tokenizer.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_REGEX:
        return "llama-bpe"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    return None


def _mentions_byte_level(part) -> bool:
    if isinstance(part, dict):
        return part.get("type") == "ByteLevel" or any(_mentions_byte_level(v) for v in part.values())
    if isinstance(part, list):
        return any(_mentions_byte_level(v) for v in part)
    return False


def is_byte_level_bpe(tokenizer: dict) -> bool:
    return ((tokenizer.get("model") or {}).get("type") == "BPE"
            and _mentions_byte_level(tokenizer.get("pre_tokenizer")))


def vocabulary(tokenizer: dict, vocab_size: int, where: str):
    """(tokens, token types) for ids 0..vocab_size-1. Added special tokens are CONTROL,
    other added tokens USER_DEFINED; ids the tokenizer leaves empty (an embedding padded to
    a round size) get placeholder names, UNUSED."""
    from gguf import TokenType

    tokens: list = [None] * vocab_size
    types = [TokenType.NORMAL] * vocab_size

    def place(token: str, index: int, kind) -> None:
        if not 0 <= index < vocab_size:
            raise CheckpointError(f"{where}: token {token!r} has id {index}, outside the model's "
                                  f"vocabulary of {vocab_size}: the tokenizer does not belong to this model")
        tokens[index], types[index] = token, kind

    for token, index in tokenizer["model"]["vocab"].items():
        place(token, index, TokenType.NORMAL)
    for added in tokenizer.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        place(added["content"], added["id"], kind)
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index], types[index] = f"[PAD{index}]", TokenType.UNUSED
    return tokens, types


def _merges(tokenizer: dict) -> list:
    # tokenizers writes merges as "a b" strings (older) or ["a", "b"] pairs (newer).
    return [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"].get("merges", [])]


def _adds_bos(tokenizer: dict, tokenizer_config: dict) -> Optional[bool]:
    """tokenizer_config's add_bos_token, else whether the post-processor's single-sequence
    template starts with a special token (Llama 3 adds BOS that way)."""
    if isinstance(tokenizer_config.get("add_bos_token"), bool):
        return tokenizer_config["add_bos_token"]
    post = tokenizer.get("post_processor") or {}
    for step in post.get("processors", []) if post.get("type") == "Sequence" else [post]:
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or [{}]
            return "SpecialToken" in single[0]
    return None


def _chat_template(folder: Path, tokenizer_config: dict) -> Optional[str]:
    template = tokenizer_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return template


def _read_json(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def write_tokenizer(writer, checkpoint: Checkpoint) -> bool:
    """Tokenizer metadata from the folder's byte-level BPE tokenizer.json; False (nothing
    written) when there is none."""
    folder = checkpoint.folder
    if folder is None or not (folder / "tokenizer.json").is_file():
        return False
    tokenizer = _read_json(folder / "tokenizer.json")
    if not is_byte_level_bpe(tokenizer):
        return False
    config = checkpoint.config
    tokens, types = vocabulary(tokenizer, config.vocab_size, str(folder / "tokenizer.json"))
    writer.add_tokenizer_model("gpt2")
    pre = pre_tokenizer_name(tokenizer)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    if config.eos_token_ids:
        writer.add_eos_token_id(config.eos_token_ids[0])  # GGUF has one; llama.cpp finds EOT tokens itself
    if config.pad_token_id is not None:
        writer.add_pad_token_id(config.pad_token_id)
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    adds_bos = _adds_bos(tokenizer, tokenizer_config)
    if adds_bos is not None:
        writer.add_add_bos_token(adds_bos)
    template = _chat_template(folder, tokenizer_config)
    if template:
        writer.add_chat_template(template)
    return True


# --- the file -----------------------------------------------------------------------------

def _file_type(tensors: list) -> int:
    from gguf import LlamaFileType

    f16 = any(array.dtype == mx.float16 for _, array in tensors)
    return LlamaFileType.MOSTLY_F16 if f16 else LlamaFileType.ALL_F32


def _write(path: Path, checkpoint: Checkpoint, name: str, quiet: bool) -> bool:
    """Header, metadata and tensor table first (shapes and dtypes are known without reading
    a weight), then the tensor data one tensor at a time: one tensor in memory at once.
    Returns whether tokenizer metadata was written."""
    from gguf import GGUFWriter

    tensors = gguf_tensors(checkpoint)
    writer = GGUFWriter(str(path), ARCHITECTURE)
    try:
        writer.add_name(name)
        writer.add_file_type(_file_type(tensors))
        write_hyperparameters(writer, checkpoint.config)
        has_tokenizer = write_tokenizer(writer, checkpoint)
        for tensor_name, array in tensors:
            np_dtype = np.float16 if array.dtype == mx.float16 else np.float32
            writer.add_tensor_info(tensor_name, array.shape, np.dtype(np_dtype), array.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, array in progress(tensors, len(tensors), "exporting", quiet):
            writer.write_tensor_data(np.ascontiguousarray(np.array(array)))
    finally:
        writer.close()
    return has_tokenizer


def export_gguf(mlx_path, out_file, *, force: bool = False, quiet: bool = False) -> Path:
    """Write the model in `mlx_path` (an MLX model folder; any checkpoint convert reads also
    works) as the GGUF file `out_file`, llama architecture, F32/F16 tensors (quantized models
    are dequantized), with tokenizer metadata when the folder has a byte-level BPE
    tokenizer.json (otherwise weights and hyperparameters only). See the module docstring for
    what is written and what is refused. The file is written beside `out_file` under a
    temporary name and renamed when complete; an existing file is replaced only with force,
    and only when it is a GGUF file (see destination.check_destination).
    """
    out_file = Path(out_file)
    check_destination(out_file, force, [mlx_path], folder=False)  # before the (long) reading
    checkpoint = open_checkpoint(mlx_path, quiet=quiet)
    checkpoint.validate()
    check_expressible(checkpoint.config, str(mlx_path))

    with atomic_output(out_file, force, [mlx_path], folder=False) as temporary:
        has_tokenizer = _write(temporary, checkpoint, Path(mlx_path).name, quiet)
    if not has_tokenizer and not quiet:
        print(f"{out_file}: no byte-level BPE tokenizer.json in {mlx_path}; the GGUF holds "
              "weights and hyperparameters only", file=sys.stderr)
    return out_file

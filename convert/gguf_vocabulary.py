"""The tokenizer of an MLX model folder as GGUF metadata: a byte-level BPE tokenizer.json
(GPT-2 / Llama 3 / SmolLM kind) becomes tokenizer.ggml.model "gpt2", its tokens, token types,
merges, bos/eos/pad ids, the chat template, and tokenizer.ggml.pre when the pre-tokenizer is one
llama.cpp knows (written by transformers' tokenizers, or rebuilt from a GGUF at convert)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mlx_mobilellm.errors import CheckpointError
from mlx_mobilellm.formats.gguf_tokenizer import LLAMA3_SPLIT, PRE_TOKENIZERS
from mlx_mobilellm.formats.sources import Checkpoint
from mlx_mobilellm.input_checks import read_json_object

def _steps(pre: Optional[dict]) -> list:
    if not pre:
        return []
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


# The GGUF pre-tokenizer names by the regexes convert's GGUF tokenizer rebuild splits with
# (formats.gguf_tokenizer.byte_level_bpe); of names that split alike (llama-bpe, llama3,
# llama-v3), llama.cpp treats all the same, and the first is written.
_REBUILT = {pre.splits: name for name, pre in reversed(PRE_TOKENIZERS.items())}


def pre_tokenizer_name(tokenizer: dict) -> Optional[str]:
    """The tokenizer.ggml.pre name for a tokenizer.json's pre-tokenizer: the structures
    transformers' tokenizers write for GPT-2, Llama 3 and SmolLM, and the ones convert
    rebuilds from a GGUF (so that GGUF → MLX → GGUF keeps the name); None when unknown."""
    steps = _steps(tokenizer.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("use_regex", True) \
            and set(kinds[:-1]) == {"Split"}:
        splits = tuple((s.get("pattern") or {}).get("Regex") for s in steps[:-1])
        return _REBUILT.get(splits)
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



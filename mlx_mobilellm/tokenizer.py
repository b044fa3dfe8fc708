"""Tokenizers: Hugging Face tokenizer.json, SentencePiece tokenizer.model, and the vocabulary
inside a GGUF file, behind one small interface."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

from .chat_template import render_chat_template
from .errors import CheckpointError
from .input_checks import is_whole_number, json_object


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _json_kind(value) -> str:
    kinds = {bool: "true/false", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _is_token(value) -> bool:
    return isinstance(value, str) or (isinstance(value, dict)
                                      and isinstance(value.get("content"), str))


def _is_template(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str) for t in value))


def _is_ids(value) -> bool:
    ids = value if isinstance(value, list) else [value]
    return all(is_whole_number(i) and i >= 0 for i in ids)


# Fields this module reads, per file: (is it valid?, what it must be). Absent or null: a default.
_TOKEN = (_is_token, 'a string or {"content": string}')
_FLAG = (lambda value: isinstance(value, bool), "true or false")
_TEMPLATE = (_is_template, 'a string or an array of {"name": string, "template": string}')
_FIELDS = {
    "tokenizer_config.json": {"bos_token": _TOKEN, "eos_token": _TOKEN, "add_bos_token": _FLAG,
                              "add_eos_token": _FLAG, "chat_template": _TEMPLATE},
    "chat_template.json": {"chat_template": _TEMPLATE},
    "generation_config.json": {"eos_token_id": (_is_ids, "a token id or an array of token ids")},
}


def _read_json(files: dict, name: str, where: str) -> dict:
    """The JSON object in files[name] ({} when absent), its fields checked."""
    text = files.get(name)
    config = json_object(text, f"{where}/{name}") if text else {}
    for field, (valid, expected) in _FIELDS[name].items():
        value = config.get(field)
        if value is not None and not valid(value):
            raise CheckpointError(f"{where}/{name}: field '{field}' must be {expected}, "
                                  f"not {_json_kind(value)}")
    return config


def _pick_template(template) -> Optional[str]:
    """A template string, or the "default" one of a list of named templates."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


class Tokenizer:
    """encode(str) -> list[int], decode(ids) -> str, eos_token_ids, apply_chat_template().
    `source` names the file it was read from, for messages."""

    def __init__(self, backend, config: dict, chat_template: Optional[str],
                 extra_eos_ids: Sequence[int] = (), source: str = "the tokenizer"):
        self._backend = backend
        self.source = source
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        eos = [self.token_to_id(self.eos_token), *extra_eos_ids]
        self.eos_token_ids = list(dict.fromkeys(i for i in eos if i is not None))

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def max_token_id(self) -> int:
        """The largest id encode() can give: a tokenizer.json's ids need not be contiguous."""
        return self._backend.max_token_id()

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for, which decode([token]) cannot give when the token is
        part of a character (a byte-level piece, a <0xNN> byte): OpenAI's logprobs carry them
        so that a client can put such characters together."""
        return self._backend.token_bytes(token)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True,
                            tokenize: bool = True, **variables):
        """The conversation as the model was trained to see it: token ids, or the text with
        tokenize=False. The template already writes the BOS token when it wants one."""
        if not self.chat_template:
            raise CheckpointError("this model has no chat template; use a plain prompt "
                                  "(--ignore-chat-template)")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                    **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _byte_level_alphabet() -> dict:
    """GPT-2's byte-level BPE writes each byte as one printable character: the printable
    Latin-1 ones as themselves, the other bytes as the code points from 256 up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_bytes(piece: str) -> bytes:
    """A SentencePiece-style piece: a <0xNN> byte, or text with ▁ for spaces."""
    byte = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(byte[1], 16)]) if byte else piece.replace("\u2581", " ").encode()


class _HFBackend:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        self.byte_level = "ByteLevel" in json.dumps(decoder)
        self.added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}

    def token_bytes(self, token):
        piece = self.tokenizer.id_to_token(token) or ""
        if piece in self.added:  # special tokens are written as they are
            return piece.encode()
        if self.byte_level:
            return bytes(_BYTE_LEVEL.get(ch, 0) for ch in piece)
        return _piece_bytes(piece)

    def token_to_id(self, token):
        return self.tokenizer.token_to_id(token)

    def max_token_id(self):
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)

    def encode(self, text, add_special_tokens):
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class _SentencePieceBackend:
    def __init__(self, processor, add_bos: bool, add_eos: bool):
        self.processor = processor
        self.add_bos, self.add_eos = add_bos, add_eos
        self.vocab_size = processor.get_piece_size()

    def token_to_id(self, token):
        """The piece's id; None for text that is no piece (sentencepiece answers with the unknown
        piece's id, or -1 when the model has none)."""
        index = self.processor.piece_to_id(token)
        if index < 0 or (index == self.processor.unk_id() and token != self.processor.id_to_piece(index)):
            return None
        return index

    def encode(self, text, add_special_tokens):
        ids = self.processor.encode(text)
        if add_special_tokens:  # an id of -1: the model has no such token
            bos, eos = self.processor.bos_id(), self.processor.eos_id()
            ids = ([bos] if self.add_bos and bos >= 0 else []) + ids
            ids = ids + ([eos] if self.add_eos and eos >= 0 else [])
        return ids

    def max_token_id(self):
        return self.vocab_size - 1

    def token_bytes(self, token):
        if not 0 <= token < self.vocab_size or self.processor.is_control(token):
            return b""  # as decode writes them
        return _piece_bytes(self.processor.id_to_piece(token))

    def decode(self, ids, skip_special_tokens):
        # A model whose embedding is padded past the vocabulary can generate an id that has no
        # piece: it decodes to nothing (sentencepiece would raise), as in `tokenizers`.
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if skip_special_tokens:
            ids = [i for i in ids if not self.processor.is_control(i)]
        return self.processor.decode(ids)


def _sentencepiece_defaults(processor) -> dict:
    """BOS and EOS as the model names them (an id of -1: it has none)."""
    def piece(index: int) -> Optional[str]:
        return processor.id_to_piece(index) if index >= 0 else None

    return {"bos_token": piece(processor.bos_id()), "eos_token": piece(processor.eos_id())}


TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json")


def tokenizer_from_files(files: dict, where: str, eos_token_ids: Sequence[int] = ()) -> Optional[Tokenizer]:
    """The tokenizer described by a model's tokenizer files ({name: text}, and
    "tokenizer.model" as bytes); None when there is neither tokenizer.json nor tokenizer.model.
    EOS ids are the tokenizer's eos_token plus generation_config.json's plus eos_token_ids."""
    config = _read_json(files, "tokenizer_config.json", where)
    generation = _read_json(files, "generation_config.json", where)
    extra_eos = list(eos_token_ids)
    if generation.get("eos_token_id") is not None:
        eos = generation["eos_token_id"]
        extra_eos += eos if isinstance(eos, list) else [eos]
    template = files.get("chat_template.jinja") or _pick_template(
        config.get("chat_template")
        or _read_json(files, "chat_template.json", where).get("chat_template"))

    if files.get("tokenizer.json"):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = _HFBackend(HFTokenizer.from_str(files["tokenizer.json"]))
        except Exception as error:
            raise CheckpointError(f"{where}/tokenizer.json: cannot load ({error})") from None
        return Tokenizer(backend, config, template, extra_eos, f"{where}/tokenizer.json")
    if files.get("tokenizer.model"):
        import sentencepiece

        try:
            processor = sentencepiece.SentencePieceProcessor(model_proto=files["tokenizer.model"])
        except Exception as error:
            raise CheckpointError(f"{where}/tokenizer.model: cannot load ({error})") from None
        backend = _SentencePieceBackend(processor, config.get("add_bos_token") is not False,
                                        config.get("add_eos_token") is True)
        return Tokenizer(backend, {**_sentencepiece_defaults(processor), **config}, template,
                         extra_eos, f"{where}/tokenizer.model")
    return None


def read_tokenizer_files(folder: Path) -> dict:
    files = {name: _read_text(folder / name) for name in TEXT_FILES if (folder / name).exists()}
    if (folder / "tokenizer.model").exists():
        files["tokenizer.model"] = (folder / "tokenizer.model").read_bytes()
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at "
                              f"offset {error.start}); the file is damaged or in another "
                              "encoding: download it again, or save it as UTF-8") from None


def tokenizer_from_gguf_metadata(metadata: dict, where: str,
                                 eos_token_ids: Sequence[int] = ()) -> Optional[Tokenizer]:
    from .formats.gguf_tokenizer import tokenizer_files

    tokenizer = tokenizer_from_files(tokenizer_files(metadata), where, eos_token_ids)
    if tokenizer is not None:
        tokenizer.source = f"{where} (its tokenizer metadata)"
    return tokenizer


def check_fits_model(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
    """Refuses a tokenizer that can give ids past the model's embedding (`vocab_size` rows, of
    the model at `where`): the embedding gather does not check its indices (seen: a segfault).
    An embedding larger than the vocabulary (padded, as many real models are) is fine."""
    highest = tokenizer.max_token_id
    if highest >= vocab_size:
        raise CheckpointError(f"{tokenizer.source}: token ids go up to {highest}, but the model "
                              f"{where} has {vocab_size} embedding rows (vocab_size): use the "
                              "tokenizer that came with this model")


def load_tokenizer(path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
    """The tokenizer of a model folder (tokenizer.json, else tokenizer.model) or a .gguf file."""
    path = Path(path)
    if path.suffix == ".gguf":
        from .formats.gguf_file import read_metadata

        tokenizer = tokenizer_from_gguf_metadata(read_metadata(path)[0], str(path), eos_token_ids)
    else:
        tokenizer = tokenizer_from_files(read_tokenizer_files(path), str(path), eos_token_ids)
    if tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer (tokenizer.json, tokenizer.model or GGUF "
                              "tokenizer metadata)")
    return tokenizer

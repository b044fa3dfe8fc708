"""Tokenizers: Hugging Face tokenizer.json, SentencePiece tokenizer.model, and the vocabulary
inside a GGUF file, behind one small interface."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from .chat_template import render_chat_template
from .errors import CheckpointError


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _parse_json(text: Optional[str], where: str) -> dict:
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError as error:
        raise CheckpointError(f"{where}: not valid JSON ({error})") from None


def _pick_template(template) -> Optional[str]:
    """A template string, or the "default" one of a list of named templates."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


class Tokenizer:
    """encode(str) -> list[int], decode(ids) -> str, eos_token_ids, apply_chat_template()."""

    def __init__(self, backend, config: dict, chat_template: Optional[str],
                 extra_eos_ids: Sequence[int] = ()):
        self._backend = backend
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        eos = [self.token_to_id(self.eos_token), *extra_eos_ids]
        self.eos_token_ids = list(dict.fromkeys(i for i in eos if i is not None))

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens)

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


class _HFBackend:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        return self.tokenizer.token_to_id(token)

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
        index = self.processor.piece_to_id(token)
        return None if index == self.processor.unk_id() and token != self.processor.id_to_piece(index) else index

    def encode(self, text, add_special_tokens):
        ids = self.processor.encode(text)
        if add_special_tokens:
            ids = ([self.processor.bos_id()] if self.add_bos else []) + ids
            ids = ids + ([self.processor.eos_id()] if self.add_eos else [])
        return ids

    def decode(self, ids, skip_special_tokens):
        if skip_special_tokens:
            ids = [i for i in ids if not self.processor.is_control(i)]
        return self.processor.decode(ids)


def _sentencepiece_defaults(processor) -> dict:
    return {"bos_token": processor.id_to_piece(processor.bos_id()),
            "eos_token": processor.id_to_piece(processor.eos_id())}


TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "chat_template.jinja", "chat_template.json")


def tokenizer_from_files(files: dict, where: str, eos_token_ids: Sequence[int] = ()) -> Optional[Tokenizer]:
    """The tokenizer described by a model's tokenizer files ({name: text}, and
    "tokenizer.model" as bytes); None when there is neither tokenizer.json nor tokenizer.model.
    EOS ids are the tokenizer's eos_token plus generation_config.json's plus eos_token_ids."""
    config = _parse_json(files.get("tokenizer_config.json"), f"{where}/tokenizer_config.json")
    generation = _parse_json(files.get("generation_config.json"), f"{where}/generation_config.json")
    extra_eos = list(eos_token_ids)
    if generation.get("eos_token_id") is not None:
        eos = generation["eos_token_id"]
        extra_eos += eos if isinstance(eos, list) else [eos]
    template = files.get("chat_template.jinja") or _pick_template(
        config.get("chat_template")
        or _parse_json(files.get("chat_template.json"), f"{where}/chat_template.json").get("chat_template"))

    if files.get("tokenizer.json"):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = _HFBackend(HFTokenizer.from_str(files["tokenizer.json"]))
        except Exception as error:
            raise CheckpointError(f"{where}/tokenizer.json: cannot load ({error})") from None
        return Tokenizer(backend, config, template, extra_eos)
    if files.get("tokenizer.model"):
        import sentencepiece

        try:
            processor = sentencepiece.SentencePieceProcessor(model_proto=files["tokenizer.model"])
        except Exception as error:
            raise CheckpointError(f"{where}/tokenizer.model: cannot load ({error})") from None
        backend = _SentencePieceBackend(processor, config.get("add_bos_token", True),
                                        config.get("add_eos_token", False))
        return Tokenizer(backend, {**_sentencepiece_defaults(processor), **config}, template,
                         extra_eos)
    return None


def read_tokenizer_files(folder: Path) -> dict:
    files = {name: (folder / name).read_text(encoding="utf-8")
             for name in TEXT_FILES if (folder / name).exists()}
    if (folder / "tokenizer.model").exists():
        files["tokenizer.model"] = (folder / "tokenizer.model").read_bytes()
    return files


def tokenizer_from_gguf_metadata(metadata: dict, where: str,
                                 eos_token_ids: Sequence[int] = ()) -> Optional[Tokenizer]:
    from convert.gguf_tokenizer import tokenizer_files

    return tokenizer_from_files(tokenizer_files(metadata), where, eos_token_ids)


def load_tokenizer(path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
    """The tokenizer of a model folder (tokenizer.json, else tokenizer.model) or a .gguf file."""
    path = Path(path)
    if path.suffix == ".gguf":
        from convert.gguf_file import read_metadata

        tokenizer = tokenizer_from_gguf_metadata(read_metadata(path)[0], str(path), eos_token_ids)
    else:
        tokenizer = tokenizer_from_files(read_tokenizer_files(path), str(path), eos_token_ids)
    if tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer (tokenizer.json, tokenizer.model or GGUF "
                              "tokenizer metadata)")
    return tokenizer

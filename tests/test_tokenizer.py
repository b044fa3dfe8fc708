"""mlx_mobilellm.load_tokenizer: tokenizer.json, SentencePiece tokenizer.model and GGUF
vocabularies encode as their reference implementations do; EOS ids; chat templates render as
transformers renders them, in a sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from generation_helpers import (BOS, CHAT_TEMPLATE, CORPUS, EOT, IM_END, IM_START, bpe_tokenizer,
                                sentencepiece_model, write_bpe_folder, write_sentencepiece_folder)
from mlx_mobilellm import CheckpointError, load_tokenizer
from mlx_mobilellm.chat_template import ChatTemplateError
from mlx_mobilellm.demo import demo_model_path

CONVERSATIONS = {
    "user only": [{"role": "user", "content": "What is the capital of France?"}],
    "with system": [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": "Capital of France?"}],
    "multi turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "Hello! 🦙"},
                   {"role": "user", "content": "  café, 你好  "}],
}

# A Llama-3 style template (header ids, eot after each turn) with a loop variable and tojson.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}{{ tools | tojson }}{% endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n\n' + message['content'] | trim + '<|eot|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n\n' }}{%- endif %}"
)
TEMPLATES = {"chatml": CHAT_TEMPLATE, "llama3": LLAMA3_TEMPLATE}


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory) -> Path:
    return write_bpe_folder(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    return demo_model_path()


@pytest.fixture(scope="module")
def gguf_tokenizers(demo_gguf):
    """(ours, transformers'), each loaded once: transformers takes seconds to read the vocab."""
    return (load_tokenizer(demo_gguf),
            AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name))


# --- tokenizer.json ------------------------------------------------------------------------------

@pytest.mark.parametrize("reference", ["auto", "fast"])
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenizer_json_encodes_like_transformers(bpe_folder, reference, add_special_tokens):
    ours = load_tokenizer(bpe_folder)
    theirs = (AutoTokenizer.from_pretrained(bpe_folder) if reference == "auto" else
              PreTrainedTokenizerFast(tokenizer_file=str(bpe_folder / "tokenizer.json")))
    for text in CORPUS + ["", " ", "\n\n\n"]:
        want = theirs.encode(text, add_special_tokens=add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == want, text
    # The default adds BOS (the tokenizer.json's post-processor says so), as transformers does.
    assert ours.encode("hi")[0] == ours.bos_token_id == theirs.convert_tokens_to_ids(BOS)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_tokenizer_json_decodes_like_transformers(bpe_folder, skip_special_tokens):
    ours = load_tokenizer(bpe_folder)
    theirs = AutoTokenizer.from_pretrained(bpe_folder)
    for text in CORPUS:
        ids = theirs.encode(text)
        assert (ours.decode(ids, skip_special_tokens=skip_special_tokens)
                == theirs.decode(ids, skip_special_tokens=skip_special_tokens)), text
    assert ours.decode(ours.encode(CORPUS[8]), skip_special_tokens=True) == CORPUS[8]


def test_special_tokens_in_text_are_single_tokens(bpe_folder):
    ours = load_tokenizer(bpe_folder)
    ids = ours.encode(f"{IM_START}user{IM_END}", add_special_tokens=False)
    assert ids[0] == ours.token_to_id(IM_START) and ids[-1] == ours.token_to_id(IM_END)
    assert ours.vocab_size == bpe_tokenizer().get_vocab_size()


# --- SentencePiece -------------------------------------------------------------------------------

SP_TEXTS = [t for t in CORPUS if "<|" not in t] + ["Ω≈ç√ rare ∫ characters ⊕ fall back to bytes"]


@pytest.mark.parametrize("config", [{}, {"add_bos_token": True}, {"add_bos_token": False},
                                    {"add_bos_token": True, "add_eos_token": True}],
                         ids=["default", "bos", "no-bos", "bos+eos"])
def test_sentencepiece_encodes_like_sentencepiece(tmp_path, config):
    folder = write_sentencepiece_folder(tmp_path, **config)
    ours = load_tokenizer(folder)
    reference = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model())
    add_bos = config.get("add_bos_token", True)  # transformers' LlamaTokenizer default
    add_eos = config.get("add_eos_token", False)
    for text in SP_TEXTS:
        plain = reference.encode(text)
        assert ours.encode(text, add_special_tokens=False) == plain, text
        assert ours.encode(text) == reference.encode(text, add_bos=add_bos, add_eos=add_eos), text
        assert ours.decode(ours.encode(text)) == reference.decode(plain)
    byte_pieces = [reference.id_to_piece(i) for i in reference.encode(SP_TEXTS[-1])]
    assert any(p.startswith("<0x") for p in byte_pieces)  # byte fallback was exercised
    assert ours.bos_token == "<s>" and ours.bos_token_id == reference.bos_id()
    assert ours.eos_token_ids == [reference.eos_id()]


def test_sentencepiece_skip_special_tokens(tmp_path):
    ours = load_tokenizer(write_sentencepiece_folder(tmp_path))
    ids = ours.encode("Hello world") + ours.eos_token_ids
    assert ours.decode(ids, skip_special_tokens=True) == "Hello world"


# --- GGUF ----------------------------------------------------------------------------------------

GGUF_TEXTS = [
    "What is the capital of France?",
    "Hello world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces  ",
    "line one\nline two\n\n\tindented",
    "It's, we'll, I'VE, they'd, YOU'RE",
    "def add(a, b):\n    return a + b",
    "café naïve déjà vu, 你好，世界 and a llama 🦙",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_gguf_encodes_like_transformers(gguf_tokenizers, add_special_tokens):
    ours, theirs = gguf_tokenizers
    for text in GGUF_TEXTS:
        assert (ours.encode(text, add_special_tokens=add_special_tokens)
                == theirs.encode(text, add_special_tokens=add_special_tokens)), text
    assert ours.eos_token == theirs.eos_token == IM_END
    assert ours.chat_template == theirs.chat_template
    messages = CONVERSATIONS["user only"]
    assert (ours.apply_chat_template(messages, tokenize=False)
            == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


# --- EOS ids -------------------------------------------------------------------------------------

def test_eos_ids_merge_tokenizer_and_generation_config(tmp_path):
    # tokenizer_config's eos (<|im_end|>) first, then generation_config's list, without repeats.
    tokenizer = load_tokenizer(write_bpe_folder(tmp_path, eos_token=IM_END,
                                                generation_eos=(EOT, IM_END)))
    assert tokenizer.eos_token_ids == [tokenizer.token_to_id(IM_END), tokenizer.token_to_id(EOT)]
    # Extra ids (the model config's) are merged in too.
    extra = load_tokenizer(tmp_path, eos_token_ids=[7, tokenizer.token_to_id(EOT)])
    assert extra.eos_token_ids == [tokenizer.token_to_id(IM_END), 7, tokenizer.token_to_id(EOT)]


def test_eos_id_single_int_in_generation_config(tmp_path):
    folder = write_bpe_folder(tmp_path, eos_token=EOT)
    im_end = load_tokenizer(folder).token_to_id(IM_END)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": im_end}))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.eos_token_ids == [tokenizer.token_to_id(EOT), im_end]


# --- chat templates ------------------------------------------------------------------------------

@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(tmp_path, template, conversation,
                                                 add_generation_prompt):
    folder = write_bpe_folder(tmp_path, chat_template=TEMPLATES[template])
    ours = load_tokenizer(folder)
    theirs = AutoTokenizer.from_pretrained(folder)
    messages = CONVERSATIONS[conversation]
    want = theirs.apply_chat_template(messages, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                    tokenize=False)
    assert text == want
    assert text.startswith(BOS) and text.count(BOS) == 1
    assert text.endswith("assistant\n\n" if template == "llama3" else "assistant\n") == add_generation_prompt
    # Token ids: the rendered text, without a second BOS.
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == theirs.encode(want, add_special_tokens=False)
    assert ids.count(ours.bos_token_id) == 1


def test_chat_template_extra_variables(tmp_path):
    ours = load_tokenizer(write_bpe_folder(tmp_path, chat_template=LLAMA3_TEMPLATE))
    text = ours.apply_chat_template(CONVERSATIONS["user only"], tokenize=False,
                                    tools=[{"name": "lookup", "café": 1}])
    assert '[{"name": "lookup", "café": 1}]' in text


def test_chat_template_from_chat_template_jinja(tmp_path):
    folder = write_bpe_folder(tmp_path, chat_template=None)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert load_tokenizer(folder).apply_chat_template(
        CONVERSATIONS["multi turn"][:2], tokenize=False) == "[Be brief.][hi]"


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{{ messages[0].update({'content': 'x'}) }}",
])
def test_chat_template_is_sandboxed(tmp_path, attack):
    ours = load_tokenizer(write_bpe_folder(tmp_path, chat_template=attack))
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="unsafe"):
        ours.apply_chat_template(messages, tokenize=False)
    assert messages == [{"role": "user", "content": "hi"}]  # nothing was changed


def test_chat_template_raise_exception_is_a_clear_error(tmp_path):
    template = ("{% if messages[0]['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}"
                "{% for m in messages %}{{ m.content }}{% endfor %}")
    ours = load_tokenizer(write_bpe_folder(tmp_path, chat_template=template))
    assert ours.apply_chat_template(CONVERSATIONS["user only"], tokenize=False) == \
        CONVERSATIONS["user only"][0]["content"]
    with pytest.raises(ChatTemplateError) as error:
        ours.apply_chat_template(CONVERSATIONS["with system"])
    assert str(error.value) == "the chat template refused the conversation: System role not supported"
    assert isinstance(error.value, ValueError)


def test_chat_template_syntax_error_is_a_clear_error(tmp_path):
    ours = load_tokenizer(write_bpe_folder(tmp_path, chat_template="{% for m in messages %}"))
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ours.apply_chat_template(CONVERSATIONS["user only"])


@pytest.mark.parametrize("kind", ["tokenizer.json", "tokenizer.model"])
def test_no_chat_template_raises_checkpoint_error(tmp_path, kind):
    folder = (write_bpe_folder(tmp_path, chat_template=None) if kind == "tokenizer.json"
              else write_sentencepiece_folder(tmp_path))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.chat_template is None
    with pytest.raises(CheckpointError, match="no chat template.*--ignore-chat-template"):
        tokenizer.apply_chat_template(CONVERSATIONS["user only"])


# --- errors --------------------------------------------------------------------------------------

def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", "{not json", "tokenizer.json: cannot load"),
    ("tokenizer_config.json", "{not json", "tokenizer_config.json: not valid JSON"),
    ("generation_config.json", "[1,", "generation_config.json: not valid JSON"),
])
def test_malformed_files_name_the_file(tmp_path, name, content, message):
    folder = write_bpe_folder(tmp_path)
    (folder / name).write_text(content)
    with pytest.raises(CheckpointError, match=message):
        load_tokenizer(folder)


# --- the bytes of one token --------------------------------------------------------------

BYTES_TEXT = "emoji 🦙🦙 and 👍🏽! CJK 你好 accents: café  two  spaces"


@pytest.mark.parametrize("kind", ["tokenizer.json", "sentencepiece", "gguf"])
def test_token_bytes_concatenate_to_the_text(tmp_path, bpe_folder, demo_gguf, kind):
    """Byte-level pieces and <0xNN> byte-fallback pieces are parts of characters: decoding one
    gives U+FFFD, its bytes give the character back when put together."""
    folder = {"tokenizer.json": lambda: bpe_folder,
              "sentencepiece": lambda: write_sentencepiece_folder(tmp_path / "sp"),
              "gguf": lambda: demo_gguf}[kind]()
    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode(BYTES_TEXT, add_special_tokens=False)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    joined = b"".join(pieces)
    # what decode gives, byte for byte (SentencePiece drops the leading space marker and has
    # normalised the double spaces on encoding; byte-level BPE gives the text back whole)
    assert joined.decode().lstrip(" ") == tokenizer.decode(ids)
    assert kind == "sentencepiece" or joined.decode() == BYTES_TEXT
    assert any(len(p) and not p.decode("utf-8", "ignore") for p in pieces)  # partial characters
    special = tokenizer.eos_token_ids[0]
    assert tokenizer.token_bytes(special) == tokenizer.decode([special]).encode()

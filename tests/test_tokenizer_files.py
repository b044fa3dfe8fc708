"""Tokenizer files from an untrusted checkpoint: each damaged file or field of the wrong type is
one CheckpointError naming it (never a traceback, never silently used), and a tokenizer whose
ids reach past the model's embedding is refused before the model reads rows it does not have."""

from __future__ import annotations

import json

import pytest

from generation_helpers import _bpe_json, write_bpe_folder, write_sentencepiece_folder
from mlx_mobilellm import CheckpointError, load_tokenizer
from mlx_mobilellm.detokenizer import StreamingDetokenizer
from mlx_mobilellm.tokenizer import check_fits_model
from test_gguf_tokenizer import tiny_metadata, write_gguf
from mlx_mobilellm.formats.gguf_tokenizer import write_tokenizer_files

NOT_UTF8 = b'{"bos_token": "caf\xe9"}'  # Latin-1, as an editor might save it


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json",
                                  "generation_config.json", "chat_template.jinja",
                                  "chat_template.json"])
def test_non_utf8_file_is_named(tmp_path, name):
    folder = write_bpe_folder(tmp_path)
    (folder / name).write_bytes(NOT_UTF8)
    with pytest.raises(CheckpointError,
                       match=rf"{name}: not UTF-8 text \(byte 0xe9 at offset 18\)"):
        load_tokenizer(folder)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json",
                                  "chat_template.json"])
@pytest.mark.parametrize("content, kind", [("[1, 2]", "array"), ("null", "null"),
                                           ("42", "number"), ('"text"', "string")])
def test_json_that_is_not_an_object_is_named(tmp_path, name, content, kind):
    folder = write_bpe_folder(tmp_path, chat_template=None)
    (folder / name).write_text(content)
    with pytest.raises(CheckpointError, match=rf"{name}: holds a JSON {kind}, not an object"):
        load_tokenizer(folder)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
def test_deeply_nested_json_is_named(tmp_path, name):
    folder = write_bpe_folder(tmp_path)
    (folder / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=f"{name}: JSON nested too deeply"):
        load_tokenizer(folder)


@pytest.mark.parametrize("name, field, value", [
    ("tokenizer_config.json", "chat_template", 5),
    ("tokenizer_config.json", "chat_template", {"default": "{{ x }}"}),
    ("tokenizer_config.json", "chat_template", [{"name": "default", "template": 1}]),
    ("tokenizer_config.json", "chat_template", ["{{ x }}"]),
    ("tokenizer_config.json", "bos_token", 5),
    ("tokenizer_config.json", "bos_token", {"content": ["<s>"]}),
    ("tokenizer_config.json", "eos_token", ["</s>"]),
    ("tokenizer_config.json", "add_bos_token", "yes"),
    ("tokenizer_config.json", "add_eos_token", 1),
    ("chat_template.json", "chat_template", 5),
    ("generation_config.json", "eos_token_id", "abc"),
    ("generation_config.json", "eos_token_id", [1, "2"]),
    ("generation_config.json", "eos_token_id", 1.5),
    ("generation_config.json", "eos_token_id", True),
    ("generation_config.json", "eos_token_id", -1),
])
def test_field_of_the_wrong_type_is_named(tmp_path, name, field, value):
    folder = write_bpe_folder(tmp_path, chat_template=None)
    path = folder / name
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, field: value}))
    with pytest.raises(CheckpointError, match=f"{name}: field '{field}' must be "):
        load_tokenizer(folder)


def test_sentencepiece_folder_checks_its_config_too(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer_config.json: field 'add_bos_token' must "
                                              "be true or false, not a string"):
        load_tokenizer(write_sentencepiece_folder(tmp_path, add_bos_token="false"))


def test_null_fields_take_their_defaults(tmp_path):
    # transformers writes null for unset special tokens; that is not an error.
    folder = write_bpe_folder(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None,
                                                              "add_bos_token": None}))
    assert load_tokenizer(folder).eos_token is None


# --- GGUF tokenizer metadata -----------------------------------------------------------------

@pytest.mark.parametrize("changes, field", [
    ({"tokenizer.ggml.tokens": 5}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.tokens": "ab"}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.tokens": ["a", "b", 3]}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": [1]}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.merges": "a b"}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.token_type": ["1", "1", "1"]}, "tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.token_type": [1.5, 1, 1]}, "tokenizer.ggml.token_type"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": ["x", 0.0, 0.0]},
     "tokenizer.ggml.scores"),
    ({"tokenizer.ggml.bos_token_id": "1"}, "tokenizer.ggml.bos_token_id"),
    ({"tokenizer.ggml.eos_token_id": 1.5}, "tokenizer.ggml.eos_token_id"),
    ({"tokenizer.ggml.padding_token_id": [0]}, "tokenizer.ggml.padding_token_id"),
    ({"tokenizer.ggml.pre": ["gpt-2"]}, "tokenizer.ggml.pre"),
    ({"tokenizer.ggml.model": ["gpt2"]}, "tokenizer.ggml.model"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token"),
    ({"tokenizer.chat_template": 5}, "tokenizer.chat_template"),
])
def test_gguf_metadata_of_the_wrong_type_is_named(tmp_path, changes, field):
    with pytest.raises(CheckpointError, match=f"GGUF metadata field '{field}' must be "):
        write_tokenizer_files(tiny_metadata(**changes), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_gguf_file_with_wrong_types_through_load_tokenizer(tmp_path):
    def fields(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b", "ab"])
        writer.add_token_merges(["a b"])
        writer.add_string("tokenizer.ggml.eos_token_id", "2")

    with pytest.raises(CheckpointError, match="'tokenizer.ggml.eos_token_id' must be an integer"):
        load_tokenizer(write_gguf(tmp_path / "model.gguf", fields))


# --- vocabulary against the model's embedding ------------------------------------------------

def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    tokenizer = load_tokenizer(write_bpe_folder(tmp_path))  # ids 0..319
    with pytest.raises(CheckpointError, match=r"tokenizer.json: token ids go up to 319, but the "
                                              r"model m has 256 embedding rows"):
        check_fits_model(tokenizer, 256, "m")
    check_fits_model(tokenizer, 320, "m")
    check_fits_model(tokenizer, 384, "m")  # padded embeddings are common and fine


def test_fit_counts_ids_not_tokens(tmp_path):
    # A tokenizer.json's ids need not be contiguous: 321 tokens, ids up to 9000.
    folder = write_bpe_folder(tmp_path)
    data = json.loads(_bpe_json(320))
    data["model"]["vocab"]["far away"] = 9000
    (folder / "tokenizer.json").write_text(json.dumps(data))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.vocab_size < 400
    with pytest.raises(CheckpointError, match="token ids go up to 9000"):
        check_fits_model(tokenizer, 400, "m")


def test_sentencepiece_fit_and_padded_ids(tmp_path):
    tokenizer = load_tokenizer(write_sentencepiece_folder(tmp_path))
    with pytest.raises(CheckpointError, match=r"tokenizer.model: token ids go up to 511"):
        check_fits_model(tokenizer, 500, "m")
    # A padded model can generate an id past the vocabulary: it decodes to nothing.
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    for skip in (False, True):
        assert tokenizer.decode(hello + [600], skip_special_tokens=skip) == "Hello"
    stream = StreamingDetokenizer(tokenizer)
    assert "".join(stream.add_token(t) for t in hello + [600, 601]) + stream.finalize() == "Hello"


def test_gguf_tokenizer_names_the_gguf(tmp_path):
    from mlx_mobilellm.demo import demo_model_path

    tokenizer = load_tokenizer(demo_model_path())
    with pytest.raises(CheckpointError, match=r"\.gguf \(its tokenizer metadata\): token ids go up "
                                              r"to 49151"):
        check_fits_model(tokenizer, 32000, "m")
    check_fits_model(tokenizer, 49152, "m")


def test_load_refuses_a_tokenizer_larger_than_the_embedding(tmp_path):
    """Through mlx_mobilellm.load: the tokenizer's ids reach past the 256 rows the model has,
    and are refused before any prompt reaches the embedding."""
    from mlx_mobilellm import load
    from test_convert import save_hf, transformers_model

    folder = save_hf(transformers_model("llama", vocab_size=256), tmp_path / "model")
    write_bpe_folder(folder)  # ids 0..319
    with pytest.raises(CheckpointError, match="token ids go up to 319, but the model"):
        load(folder)


def test_sentencepiece_model_without_unk_bos_and_pad(tmp_path):
    """Found by the fuzz tests: a tokenizer.model whose header lost the unk / bos / pad ids
    (-1: none) loaded, then raised IndexError on the first token it did not know."""
    from generation_helpers import sentencepiece_model

    raw = sentencepiece_model()
    (tmp_path / "tokenizer.model").write_bytes(raw[:4] + raw[18:])
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.bos_token is None and tokenizer.bos_token_id is None
    assert tokenizer.token_to_id("no such piece") is None
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"

"""Constrained decoding to JSON (mlx_mobilellm/constrained/): the automaton character by
character, the schema subset check_schema accepts and refuses, the token-level mask against a
token-by-token reading, and generation by tiny random models through real tokenizers (a BPE
trained here, SentencePiece, the demo model's 49152-token GGUF vocabulary) whose output must
parse and validate (with jsonschema, an independent validator) and end at EOS right away."""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from generation_helpers import tiny_model, write_bpe_folder, write_sentencepiece_folder
from mlx_mobilellm import load_tokenizer, stream_generate
from mlx_mobilellm.constrained import MAX_DIGITS, MAX_WHITESPACE, check_schema, json_processor
from mlx_mobilellm.demo import demo_model_path


class CharTokenizer:
    """One token per character (id 0 is EOS, a special token), so the processor's mask says
    which character the automaton takes next."""
    source = "the character tokenizer"

    def __init__(self, chars: str, eos_token_ids=(0,)):
        self.chars = ["<eos>", *chars]
        self.eos_token_ids = list(eos_token_ids)
        self.max_token_id = len(self.chars) - 1

    def encode(self, text, add_special_tokens=True):
        return [self.chars.index(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.chars[i] for i in ids if not (skip_special_tokens and i == 0))


CHARS = CharTokenizer("".join(map(chr, range(32, 127))) + "\t\n\réü日本🦙")


def read(schema, text: str) -> str:
    """"refused" (at some character), "complete" (EOS may come, and then nothing else) or
    "prefix" (more must come)."""
    processor = json_processor(CHARS, schema)
    history = [1]
    for ch in text:
        allowed = np.isfinite(np.array(processor(mx.array(history), mx.zeros((1, 200)))[0]))
        token = CHARS.chars.index(ch)
        if not allowed[token]:
            return "refused"
        history.append(token)
    allowed = np.isfinite(np.array(processor(mx.array(history), mx.zeros((1, 200)))[0]))
    if not allowed[0]:
        return "prefix"
    # Once an object, array or string is complete, only EOS may follow.
    assert allowed[1:].sum() == 0 or text.lstrip()[:1] not in '{["', text
    return "complete"


PERSON = {"type": "object", "additionalProperties": False, "required": ["name"],
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 3},
                         "age": {"type": "integer"}}}
OPEN_PERSON = {"type": "object", "properties": {"age": {"type": "integer"}}}
ENUM = {"enum": ["a", "é", 1, [1, 2], None]}
SHAPES = {"anyOf": [
    {"type": "object", "properties": {"r": {"type": "number"}}, "required": ["r"],
     "additionalProperties": False},
    {"type": "object", "properties": {"w": {"type": "integer"}, "h": {"type": "integer"}},
     "required": ["w", "h"], "additionalProperties": False}]}
REFS = {"$defs": {"id": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/$defs/id"},
        "minItems": 1, "maxItems": 2}

CASES = [
    (None, '{}', "complete"),
    (None, '{"a": [1, -2.5E+3, 0.5e-2, "x\\n\\"\\u00e9\\ud83e\\udd99", true, null, {}]}',
     "complete"),
    (None, '{"é日": "本🦙", "": {"b": []}}', "complete"),
    (None, '[1]', "refused"),  # any JSON object: the root is an object
    (None, '{"a": 01', "refused"),
    (None, '{"a": -', "prefix"),
    (None, '{"a": 1.', "prefix"),
    (None, '{"a": tru', "prefix"),
    (None, '{"a": trux', "refused"),
    (None, '{"a" 1', "refused"),
    (None, '{"a": 1,}', "refused"),
    (None, '{"a": 1} ', "refused"),
    (None, '{"a": "\\x', "refused"),
    (None, '{"a": "\\ud83e', "prefix"),
    (None, '{"a": "\\ud83e"', "refused"),  # a lone high surrogate
    (None, '{"a": "\\udc', "refused"),  # a lone low one
    (None, '{"a": "tab\there"}', "refused"),  # control characters must be escaped
    (None, "{" + " " * MAX_WHITESPACE + "}", "complete"),
    (None, "{" + " " * (MAX_WHITESPACE + 1), "refused"),
    (None, '{"a": ' + "9" * MAX_DIGITS + "}", "complete"),
    (None, '{"a": ' + "9" * (MAX_DIGITS + 1), "refused"),
    (PERSON, '{"name": "Bob", "age": -7}', "complete"),
    (PERSON, '{"age": 7, "name": "B"}', "complete"),
    (PERSON, '{"n\\u0061me": "B"}', "complete"),  # a key spelled with an escape
    (PERSON, '{"n\\u0062', "refused"),
    (PERSON, '{"nam', "prefix"),
    (PERSON, '{"nae', "refused"),
    (PERSON, '{}', "refused"),  # name is required
    (PERSON, '{"age": 7}', "refused"),
    (PERSON, '{"name": ""', "refused"),  # minLength
    (PERSON, '{"name": "Bobb', "refused"),  # maxLength
    (PERSON, '{"name": "Bob", "name"', "refused"),  # the same key twice
    (PERSON, '{"name": "Bob", "age": 7,', "refused"),  # no key is left to add
    (PERSON, '{"name": "Bob", "age": 7.5', "refused"),
    (OPEN_PERSON, '{"ag": "x", "agex": [], "age": 3}', "complete"),
    (OPEN_PERSON, '{"age": "x"', "refused"),
    (OPEN_PERSON, '{"a\\u0067e": "x"', "refused"),
    (ENUM, '"a"', "complete"),
    (ENUM, '"\\u0061"', "complete"),
    (ENUM, '"\\u0062', "refused"),
    (ENUM, '"é"', "complete"),
    (ENUM, '[1,2]', "complete"),
    (ENUM, '[1,3', "refused"),
    (ENUM, 'null', "complete"),
    (ENUM, '2', "refused"),
    (SHAPES, '{"r": 2.5}', "complete"),
    (SHAPES, '{"w": 2, "h": 3}', "complete"),
    (SHAPES, '{"w": 2, "r"', "refused"),
    (SHAPES, '{"w": 2.5', "refused"),
    (REFS, '[1, 2]', "complete"),
    (REFS, '[]', "refused"),
    (REFS, '[1, 2, ', "refused"),
    (REFS, '["a"', "refused"),
    ({"type": ["string", "null"], "maxLength": 1}, 'null', "complete"),
    ({"type": ["string", "null"], "maxLength": 1}, '"ab', "refused"),
    ({"type": "string", "nullable": True}, 'null', "complete"),
    ({"type": "string"}, 'null', "refused"),
    ({"type": "integer"}, '12', "complete"),
    ({"type": "boolean"}, 'false', "complete"),
    ({"const": {"k": [True]}}, '{"k":[true]}', "complete"),
    ({"type": "string", "enum": ["ab", "abc", 3], "maxLength": 2}, '"abc', "refused"),
    ({"type": "string", "enum": ["ab", "abc", 3], "maxLength": 2}, '3', "refused"),
    ({}, '"any value"', "complete"),
]


@pytest.mark.parametrize("schema, text, expected", CASES)
def test_automaton_reads_characters(schema, text, expected):
    assert read(schema, text) == expected
    if expected == "complete":
        value = json.loads(text)
        if schema is not None and "nullable" not in schema:
            jsonschema.validate(value, schema)


@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "pattern": "^a"}, "unsupported JSON Schema keyword 'pattern' at #;"),
    ({"properties": {"day": {"type": "string", "format": "date"}}},
     "'format' at #/properties/day"),
    ({"type": "integer", "minimum": 0}, "'minimum' at #"),
    ({"type": "array", "items": {"uniqueItems": True}}, "'uniqueItems' at #/items"),
    ({"allOf": [{}]}, "'allOf'"),
    ({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"},
     "recursive"),
    ({"$ref": "https://example.com/s.json"}, "only references into the schema itself"),
    ({"$ref": "#/$defs/missing"}, "points to nothing"),
    ({"type": "object", "anyOf": [{}]}, "'anyOf' at # must stand alone"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "'minLength' (3) is above 'maxLength'"),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, "names 'a'"),
    ({"enum": []}, "non-empty array"),
    ({"type": "integer", "enum": ["a"]}, "no value of 'enum'"),
    ({"type": "date"}, "'type' at #"),
    ({"type": "array", "items": [{}, {}]}, "'items' at # is an array"),
    ({"properties": {"a": False}}, "at #/properties/a is false"),
    ({"type": "string", "maxLength": -1}, "'maxLength' at # must be a whole number"),
])
def test_check_schema_refuses_what_it_cannot_enforce(schema, message):
    with pytest.raises(ValueError) as error:
        check_schema(schema)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError):
        json_processor(CHARS, schema)


def test_check_schema_accepts_the_subset():
    for schema in [None, True, {}, PERSON, OPEN_PERSON, ENUM, SHAPES, REFS,
                   {"title": "t", "description": "d", "definitions": {"x": {"const": 1}},
                    "anyOf": [{"$ref": "#/definitions/x", "description": "beside $ref"},
                              {"type": ["integer", "null"], "examples": [2]}]}]:
        assert check_schema(schema) is None


def test_processor_refuses_a_token_its_mask_refused_and_needs_an_eos():
    processor = json_processor(CHARS, None)
    processor(mx.array([1]), mx.zeros((1, 200)))
    with pytest.raises(ValueError, match="cannot continue the JSON"):
        processor(mx.array([1, CHARS.chars.index("x")]), mx.zeros((1, 200)))
    with pytest.raises(ValueError, match="EOS"):
        json_processor(CharTokenizer("{}", eos_token_ids=()), None)


# -- real tokenizers, tiny random models -------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("constrained")
    return {"bpe": load_tokenizer(write_bpe_folder(folder / "bpe")),
            "sentencepiece": load_tokenizer(write_sentencepiece_folder(folder / "sp")),
            "gguf": load_tokenizer(demo_model_path())}


# Schemas a random model finishes in 50 to 200 tokens (whitespace and escapes included):
# bounded strings, closed objects. Its context holds three times that.
SCHEMAS = {
    "flat": {"type": "object", "additionalProperties": False,
             "required": ["name", "age", "ok"],
             "properties": {"name": {"type": "string", "maxLength": 8},
                            "age": {"type": "integer"}, "ok": {"type": "boolean"}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["tags", "point"],
               "properties": {
                   "tags": {"type": "array", "minItems": 1, "maxItems": 3,
                            "items": {"type": "string", "enum": ["red", "green", "blue"]}},
                   "point": {"type": "object", "additionalProperties": False,
                             "required": ["x", "y"],
                             "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}}},
    "anyof": {"$defs": {"id": {"type": "integer"}}, "type": "object",
              "additionalProperties": False, "required": ["value", "list"],
              "properties": {
                  "value": {"anyOf": [{"$ref": "#/$defs/id"}, {"type": "string", "maxLength": 5},
                                      {"type": "null"}]},
                  "list": {"type": "array", "maxItems": 4,
                           "items": {"type": ["integer", "null"]}}}},
}


def generate(model, tokenizer, seed: int, processors=(), max_tokens: int = 600):
    responses = list(stream_generate(model, tokenizer, "Hello", max_tokens=max_tokens,
                                     temperature=1.0 if seed % 2 else 0.8, seed=seed,
                                     logits_processors=list(processors)))
    return "".join(r.text for r in responses), [r.token for r in responses], responses[-1]


def check_output(tokenizer, schema, text, tokens, last):
    """The text parses and validates, and it was complete exactly when EOS came."""
    assert last.finish_reason == "stop" and tokens[-1] in tokenizer.eos_token_ids, text
    jsonschema.validate(json.loads(text), schema or {"type": "object"})
    with pytest.raises(json.JSONDecodeError):
        json.loads(tokenizer.decode(tokens[:-2]))
    assert "\ufffd" not in text


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_model_writes_valid_json(tokenizers, kind, name):
    tokenizer, schema = tokenizers[kind], SCHEMAS[name]
    model = tiny_model(tokenizer.vocab_size, seed=3, max_seq_len=1024)
    for seed in range(3):
        check_output(tokenizer, schema, *generate(model, tokenizer, seed,
                                                  [json_processor(tokenizer, schema)]))
        # Unconstrained, the same model and seed write no JSON at all: the test can fail.
        text, _, _ = generate(model, tokenizer, seed, max_tokens=40)
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_any_object_with_a_model_that_likes_closing(tokenizers):
    """schema None: any object. Free strings end only when the model wants to, so a bias
    towards quotes and brackets (a processor before ours) stands in for a trained model."""
    tokenizer = tokenizers["bpe"]
    model = tiny_model(tokenizer.vocab_size, seed=4, max_seq_len=1024)
    closing = mx.array([6.0 * ('"' in tokenizer.decode([i]))
                        for i in range(tokenizer.vocab_size)])
    for seed in range(3):
        check_output(tokenizer, None, *generate(
            model, tokenizer, seed, [lambda history, logits: logits + closing,
                                     json_processor(tokenizer, None)]))


@pytest.mark.parametrize("name", ["flat", "nested"])
def test_demo_vocabulary(tokenizers, name):
    """The demo model's real 49152-token byte-level BPE: tokens with spaces inside, partial
    UTF-8 pieces (never allowed), many ways to spell each key."""
    tokenizer = tokenizers["gguf"]
    model = tiny_model(tokenizer.vocab_size, seed=5, embed_dim=16, num_heads=2, num_kv_heads=1,
                       hidden_dim=32, max_seq_len=1024)
    for seed in range(2):
        check_output(tokenizer, SCHEMAS[name], *generate(
            model, tokenizer, seed, [json_processor(tokenizer, SCHEMAS[name])]))


def test_inside_a_string_whole_characters_only(tokenizers):
    tokenizer = tokenizers["gguf"]
    processor = json_processor(tokenizer, {"type": "string"})
    quote = tokenizer.encode('"', add_special_tokens=False)
    processor(mx.array(quote), mx.zeros((1, 49152)))  # the prompt
    allowed = np.isfinite(np.array(processor(mx.array(quote * 2), mx.zeros((1, 49152)))[0]))
    texts = {i: tokenizer.decode([i]) for i in np.flatnonzero(allowed).tolist()}
    assert len(texts) > 40000  # nearly every token fits in a string...
    assert not any("\ufffd" in t for t in texts.values())  # ...but pieces of a character
    assert any(ord(c) > 127 for t in texts.values() for c in t)  # whole non-ASCII ones do
    assert not any(i in tokenizer.eos_token_ids for i in texts)


@pytest.mark.parametrize("kind", ["bpe", "gguf"])
def test_mask_equals_reading_each_token(tokenizers, kind):
    """The trie walk (with its shortcut inside strings) allows exactly the tokens whose text
    the automaton takes, checked token by token along random paths."""
    from mlx_mobilellm.constrained.automaton import run

    tokenizer = tokenizers[kind]
    schema = {"type": "object", "required": ["k"], "properties": {
        "k": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 4}},
        "e": {"enum": ['a"b', "é", 3]}}}
    rng = np.random.default_rng(0)
    steps = 0
    for _ in range(3 if kind == "bpe" else 1):
        processor = json_processor(tokenizer, schema)
        table = processor.grammar.table
        # Tokens with structure in them, chosen often, reach more states than prose does.
        structural = np.array([t is not None and any(c in t for c in '"{}[],:3\\')
                               for t in table.text_of])
        history = [1]
        for _ in range(25 if kind == "bpe" else 4):
            mask = np.isfinite(np.array(processor(mx.array(history),
                                                  mx.zeros((1, table.vocab_size)))[0]))
            state = list(processor.state)
            expected = np.array([t is not None and bool(run(state, t)) for t in table.text_of])
            expected[processor.eos] = processor.complete
            assert (mask == expected).all(), tokenizer.decode(history[1:])
            steps += 1
            choices = np.flatnonzero(mask & structural) if rng.random() < 0.7 else []
            token = int(rng.choice(choices if len(choices) else np.flatnonzero(mask)))
            if token in processor.eos:
                break
            history.append(token)
    assert steps >= 4

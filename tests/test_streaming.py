"""Streaming text: StreamingDetokenizer's deltas concatenate to the one-shot decode and never
show half a character; stream_generate never emits a stop string, even one split across
tokens. Outputs are engineered with a logits processor that forces a token sequence."""

from __future__ import annotations

import random
import unicodedata

import pytest

from generation_helpers import (CORPUS, collect, force_tokens, tiny_model, write_bpe_folder,
                                write_sentencepiece_folder)
from mlx_mobilellm import load_tokenizer, stream_generate
from mlx_mobilellm.demo import demo_model_path
from mlx_mobilellm.detokenizer import StreamingDetokenizer

REPLACEMENT = "\ufffd"
# Characters the tiny tokenizers never saw whole: they come out as 2-4 byte tokens each.
RARE = ["🦙🦙 🐉 and 🧑‍🚀", "中文字符，漢字とかな", "Ω≈ç√∫ ⊕ ∮ 𝔘𝔫𝔦", "a🦙b🐉c", "🎉"]
TEXTS = CORPUS + RARE


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizers")
    return {"bpe": load_tokenizer(write_bpe_folder(folder / "bpe")),
            "sentencepiece": load_tokenizer(write_sentencepiece_folder(folder / "sp")),
            "gguf": load_tokenizer(demo_model_path())}


def stream(tokenizer, ids) -> list:
    detokenizer = StreamingDetokenizer(tokenizer)
    return [detokenizer.add_token(t) for t in ids] + [detokenizer.finalize()]


def split_characters(tokenizer, ids) -> int:
    """How many tokens end mid-character (decode alone to U+FFFD)."""
    return sum(tokenizer.decode([t]).endswith(REPLACEMENT) for t in ids)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece", "gguf"])
def test_deltas_concatenate_to_the_one_shot_decode(tokenizers, kind):
    tokenizer = tokenizers[kind]
    split = 0
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        deltas = stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids), text
        assert not any(REPLACEMENT in d for d in deltas), (text, deltas)
        split += split_characters(tokenizer, ids)
    assert split > 5  # characters really were split across byte tokens


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_whole_text_round_trips(tokenizers, kind):
    tokenizer = tokenizers[kind]
    text = " ".join(RARE)
    # SentencePiece normalizes its input (NFKC) before encoding; byte-level BPE keeps it all.
    expected = text if kind == "bpe" else unicodedata.normalize("NFKC", text)
    assert "".join(stream(tokenizer, tokenizer.encode(text, add_special_tokens=False))) == expected


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_delta_appears_as_soon_as_the_character_is_complete(tokenizers, kind):
    tokenizer = tokenizers[kind]
    ids = tokenizer.encode("ab 🐉 cd", add_special_tokens=False)
    detokenizer = StreamingDetokenizer(tokenizer)
    seen = ""
    for i, token in enumerate(ids):
        seen += detokenizer.add_token(token)
        # Everything that decodes completely so far has been handed out (nothing held back
        # beyond an incomplete character).
        assert seen == tokenizer.decode(ids[: i + 1]).rstrip(REPLACEMENT)
    assert "🐉" in seen


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_incomplete_character_at_the_end_is_flushed_by_finalize(tokenizers, kind):
    tokenizer = tokenizers[kind]
    ids = tokenizer.encode("end 🐉", add_special_tokens=False)[:-1]  # drop the last byte token
    assert tokenizer.decode(ids).endswith(REPLACEMENT)
    detokenizer = StreamingDetokenizer(tokenizer)
    streamed = "".join(detokenizer.add_token(t) for t in ids)
    assert REPLACEMENT not in streamed
    assert streamed + detokenizer.finalize() == tokenizer.decode(ids)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_random_token_sequences_concatenate_to_the_decode(tokenizers, kind):
    """A small model can emit any ids, invalid UTF-8 included: the stream still adds up."""
    tokenizer = tokenizers[kind]
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 25))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids), ids


# --- stop strings through stream_generate --------------------------------------------------------

@pytest.fixture(scope="module")
def bpe(tokenizers):
    return tokenizers["bpe"]


@pytest.fixture(scope="module")
def model(bpe):
    return tiny_model(bpe.vocab_size, seed=1)


PROMPT = "Once upon a time"


def forced_run(model, tokenizer, text, stop, max_tokens=64, **kwargs):
    """stream_generate whose output is forced to be `text`, then pads with its own tokens."""
    target = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode(PROMPT)
    processor = force_tokens(target, len(prompt))
    joined, tokens, responses = collect(stream_generate(
        model, tokenizer, prompt, max_tokens, stop=stop, eos_token_ids=[],
        logits_processors=[processor], **kwargs))
    return joined, tokens, responses, target


@pytest.mark.parametrize("text, stop, expected", [
    ("Hello world. STOP and more text", ["STOP"], "Hello world. "),
    ("a llama 🦙🦙 eats grass", ["🦙🦙"], "a llama "),
    ("emoji split 🐉 mid byte", ["🐉 mid"], "emoji split "),
    ("aZQb then ZQX tail", ["ZQX"], "aZQb then "),  # a stop's prefix that does not complete
    ("first second third", ["third", "second"], "first "),  # the earliest stop wins
    ("tokenizer", ["z", "k"], "to"),  # ... also when one token ("okenizer") holds both
    ("done\n\nUser: next", ["\nUser:"], "done\n"),
    ("stop at once", ["stop"], ""),
])
def test_stop_strings_are_never_emitted(model, bpe, text, stop, expected):
    joined, tokens, responses, target = forced_run(model, bpe, text, stop)
    assert joined == expected
    assert responses[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in responses[:-1])
    assert tokens == target[: len(tokens)]
    assert not any(s in joined for s in stop)
    assert not any(REPLACEMENT in r.text for r in responses)
    # Generation ends on the token that completes the stop string.
    assert stop_completed_at(bpe, target, stop) == len(tokens)


def stop_completed_at(tokenizer, ids, stops) -> int:
    return next(n for n in range(1, len(ids) + 1)
                if any(s in tokenizer.decode(ids[:n]) for s in stops))


def test_stop_string_spans_several_tokens(bpe):
    """The cases above really split their stop strings across tokens."""
    for text, stop in [("Hello world. STOP and more text", "STOP"),
                       ("a llama 🦙🦙 eats grass", "🦙🦙"), ("aZQb then ZQX tail", "ZQX")]:
        ids = bpe.encode(text, add_special_tokens=False)
        assert not any(stop in bpe.decode([t]) for t in ids), stop
    # ... and one token holds two stop strings at once.
    assert [bpe.decode([t]) for t in bpe.encode("tokenizer", add_special_tokens=False)] == \
        ["t", "okenizer"]


def test_text_is_held_back_only_while_it_may_start_a_stop_string(model, bpe):
    text = "xy STOP"
    _, _, responses, target = forced_run(model, bpe, text, ["STOP"])
    deltas = [r.text for r in responses]
    held = next(i for i, t in enumerate(target) if bpe.decode([t]).startswith("S"))
    # Text that cannot start "STOP" is shown at once; from "S" on nothing is shown: it might
    # be (and here is) the stop string.
    assert held >= 3 and deltas[:held] == [bpe.decode([t]) for t in target[:held]]
    assert deltas[held:] == [""] * (len(deltas) - held) and len(deltas) == len(target)


def test_unmatched_stop_prefix_is_flushed_at_the_end(model, bpe):
    text = "the end ST"
    target = bpe.encode(text, add_special_tokens=False)
    joined, tokens, responses, _ = forced_run(model, bpe, text, ["STOP"], max_tokens=len(target))
    assert joined == text
    assert responses[-1].finish_reason == "length"


def test_without_stop_strings_everything_is_streamed(model, bpe):
    text = "Plain 🦙 text, 中文 and Ω."
    target = bpe.encode(text, add_special_tokens=False)
    joined, tokens, responses, _ = forced_run(model, bpe, text, [], max_tokens=len(target))
    assert tokens == target and joined == text
    assert not any(REPLACEMENT in r.text for r in responses)
    assert sum(r.text == "" for r in responses) >= 1  # some token ended mid-character


def test_eos_token_text_is_not_emitted(model, bpe):
    target = bpe.encode("bye", add_special_tokens=False) + bpe.eos_token_ids[:1]
    prompt = bpe.encode(PROMPT)
    joined, tokens, responses = collect(stream_generate(
        model, bpe, prompt, 20, logits_processors=[force_tokens(target, len(prompt))]))
    assert tokens == target
    assert joined == "bye" and responses[-1].finish_reason == "stop"


def test_stop_strings_with_sentencepiece(tokenizers):
    tokenizer = tokenizers["sentencepiece"]
    model = tiny_model(tokenizer.vocab_size, seed=2)
    joined, _, responses, _ = forced_run(model, tokenizer, "Hello Ω world ∮ end", ["∮"])
    assert joined == "Hello Ω world "
    assert responses[-1].finish_reason == "stop"

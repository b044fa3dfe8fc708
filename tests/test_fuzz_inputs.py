"""Fuzzing what a model folder or a user hands the tool besides weights: tokenizer files, chat
templates, adapter_config.json (with its adapter weights) and training JSONL. Each example runs
in the worker process (see fuzz_support): it works, or is refused with one CheckpointError
line — never a crash, a hang or a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convert.convert import convert
from fuzz_support import (EDGE_INTS, assert_clean, damaged_safetensors, json_values,
                          hostile_json_bytes, scratch_copy, short_text)
from generation_helpers import (CHAT_TEMPLATE, IM_END, write_bpe_folder,
                                write_sentencepiece_folder)
from mlx_mobilellm import load
from mlx_mobilellm.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_adapters, save_adapters
from test_convert import save_hf, transformers_model

DELETE = object()


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz-inputs")
    bpe = write_bpe_folder(root / "bpe")
    hf = save_hf(transformers_model("llama", vocab_size=320), root / "hf")
    write_bpe_folder(hf)  # the BPE tokenizer (vocabulary 320) and ChatML instead of test_convert's
    model_folder = convert(hf, root / "model", quiet=True)
    model, _ = load(model_folder)
    apply_adapters(model, {"fine_tune_type": "lora", "rank": 4, "scale": 10.0, "dropout": 0.0,
                           "keys": ["q_proj", "v_proj"], "num_layers": 2})
    save_adapters(root / "adapters", model, {"fine_tune_type": "lora", "rank": 4, "scale": 10.0,
                                             "dropout": 0.0, "keys": ["q_proj", "v_proj"],
                                             "num_layers": 2, "model": str(model_folder)})
    return {"bpe": bpe, "spm": write_sentencepiece_folder(root / "spm", add_bos_token=True),
            "model": model_folder, "adapters": root / "adapters"}


def edit_json(data, path: Path, fields: list, values, label: str) -> None:
    """Replace the file wholesale (now and then), or set / delete 1-3 of its fields."""
    if data.draw(st.integers(0, 5), label=f"{label} wholesale") == 0:
        path.write_bytes(data.draw(hostile_json_bytes, label=label))
        return
    content = json.loads(path.read_text()) if path.exists() else {}
    for _ in range(data.draw(st.integers(1, 3), label=f"{label} edits")):
        field = data.draw(st.sampled_from(sorted(set(content) | set(fields))), label=label)
        value = data.draw(st.just(DELETE) | values, label=field)
        if value is DELETE:
            content.pop(field, None)
        else:
            content[field] = value
    path.write_text(json.dumps(content))


# --- tokenizer files ---------------------------------------------------------------------------

TOKEN_TEXTS = st.sampled_from(["<|bos|>", IM_END, "<unk>", "", "not a token", "<s>"])
TOKENIZER_CONFIG_FIELDS = ["bos_token", "eos_token", "unk_token", "pad_token", "chat_template",
                           "add_bos_token", "add_eos_token", "model_max_length"]
token_values = TOKEN_TEXTS | st.fixed_dictionaries({"content": TOKEN_TEXTS | json_values}) | json_values
template_values = (st.sampled_from([CHAT_TEMPLATE, "{{", "{% for %}", ""])
                   | st.lists(st.fixed_dictionaries({"name": short_text | json_values,
                                                     "template": st.just(CHAT_TEMPLATE) | json_values}),
                              max_size=3))


@st.composite
def tokenizer_json_edit(draw, text: str) -> bytes:
    """tokenizer.json with one part of it replaced."""
    tokenizer = json.loads(text)
    part = draw(st.sampled_from(["vocab", "added_tokens", "model", "post_processor",
                                 "pre_tokenizer", "decoder", "normalizer", "merges"]))
    if part == "vocab":
        vocab = tokenizer["model"]["vocab"]
        vocab[draw(short_text)] = draw(st.sampled_from(EDGE_INTS) | json_values)
    elif part == "added_tokens":
        tokenizer["added_tokens"].append({
            "id": draw(st.sampled_from(EDGE_INTS) | json_values), "content": draw(short_text),
            "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": draw(st.booleans())})
    elif part == "merges":
        tokenizer["model"]["merges"] = draw(json_values)
    else:
        target = tokenizer if part != "model" else tokenizer["model"]
        key = part if part != "model" else draw(st.sampled_from(["type", "dropout", "unk_token"]))
        target[key] = draw(json_values)
    return json.dumps(tokenizer).encode()


@given(data=st.data())
def test_tokenizer_files(bases, worker, data):
    kind = data.draw(st.sampled_from(["bpe", "spm"]), label="tokenizer")
    with scratch_copy(bases[kind]) as root:
        folder = root / kind
        target = data.draw(st.sampled_from(["tokenizer_config.json", "generation_config.json",
                                            "tokenizer", "chat_template.jinja"]), label="file")
        if target == "tokenizer_config.json":
            edit_json(data, folder / target, TOKENIZER_CONFIG_FIELDS,
                      token_values | template_values, target)
        elif target == "generation_config.json":
            edit_json(data, folder / target, ["eos_token_id", "bos_token_id", "pad_token_id"],
                      st.sampled_from(EDGE_INTS) | json_values, target)
        elif target == "chat_template.jinja":
            (folder / target).write_bytes(data.draw(st.binary(max_size=60)
                                                    | st.text(max_size=60).map(str.encode)))
        elif kind == "bpe":
            path = folder / "tokenizer.json"
            damage = st.one_of(tokenizer_json_edit(path.read_text()), hostile_json_bytes)
            path.write_bytes(data.draw(damage, label="tokenizer.json"))
        else:
            path = folder / "tokenizer.model"
            raw = path.read_bytes()
            at = data.draw(st.integers(0, len(raw) - 1), label="at")
            path.write_bytes(raw[:at] + data.draw(st.binary(max_size=16), label="bytes")
                             + raw[at + data.draw(st.integers(0, 16), label="cut"):])
        assert_clean(worker.run(op="tokenizer", path=str(folder)), "tokenizer files")


# --- chat templates ----------------------------------------------------------------------------

sizes = st.sampled_from([0, 1, 3, 100, 10**4, 10**6, 10**9, 10**18, -1])
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                           "content": st.text(max_size=30)}), min_size=1, max_size=4)


@st.composite
def expressions(draw) -> str:
    """Jinja expressions, harmless and hostile: they stand for text in a template."""
    n, m = draw(sizes), draw(sizes)
    return draw(st.sampled_from([
        "messages[0]['content']", "bos_token", "'text'", f"'ab' * {n}", f"lipsum({n})",
        f"'ab'|center({n})", f"'ab'.ljust({n})", f"range({n})|list|length", f"{n} ** {m}",
        f"'%{abs(n) % 10**12}d' % 1", f"'x'|indent({n})", f"messages * {n}",
        f"('ab' * {n})|replace('a', 'aa')", "raise_exception('no')", "messages[99]['role']",
        "messages|tojson", f"'{{:>{abs(n) % 10**12}}}'.format(1)", "undefined_name.attr",
        "''.__class__", "messages.__class__.__mro__", f"[1] * {n}", f"'a'.zfill({n})",
    ]))


@st.composite
def templates(draw, depth: int = 0) -> str:
    """A chat template: text, expressions, loops over ranges and messages, recursive macros."""
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        choice = draw(st.integers(0, 5 if depth < 3 else 1))
        if choice == 0:
            parts.append(draw(st.text(alphabet="ab {}%#()[]|'\"\n", max_size=12)))
        elif choice == 1:
            parts.append("{{ " + draw(expressions()) + " }}")
        elif choice == 2:
            parts.append(f"{{% for i in range({draw(sizes)}) %}}{draw(templates(depth + 1))}"
                         "{% endfor %}")
        elif choice == 3:
            parts.append(f"{{% for m in messages %}}{draw(templates(depth + 1))}{{% endfor %}}")
        elif choice == 4:
            parts.append(f"{{% macro f(n) %}}{draw(templates(depth + 1))}{{{{ f(n) }}}}{{{{ f(n) }}}}"
                         "{% endmacro %}{{ f(1) }}")
        else:
            parts.append(f"{{% set s = {draw(expressions())} %}}{{{{ s ~ s }}}}"
                         f"{draw(templates(depth + 1))}")
    return "".join(parts)


@given(template=templates() | st.text(max_size=40), conversation=messages)
def test_chat_template(worker, template, conversation):
    reply = worker.run(op="render", template=template, messages=conversation)
    assert_clean(reply, "chat template")


# --- adapter_config.json and adapter weights ------------------------------------------------

ADAPTER_FIELDS = ["fine_tune_type", "rank", "scale", "dropout", "keys", "num_layers", "model",
                  "dtype"]
adapter_values = (st.sampled_from(["lora", "dora", "full", ["q_proj"], ["nope"], [], 0, -1, 2,
                                   10**6, 0.5, 1e308])
                  | st.sampled_from(EDGE_INTS) | json_values)


@given(data=st.data())
def test_adapter_config(bases, worker, data):
    with scratch_copy(bases["adapters"]) as root:
        folder = root / "adapters"
        if data.draw(st.booleans(), label="damage the weights"):
            path = folder / ADAPTER_WEIGHTS
            path.write_bytes(data.draw(damaged_safetensors(path.read_bytes()), label="weights"))
        else:
            edit_json(data, folder / ADAPTER_CONFIG, ADAPTER_FIELDS, adapter_values, ADAPTER_CONFIG)
        reply = worker.run(op="load", path=str(bases["model"]), adapter_path=str(folder))
        assert_clean(reply, "adapter_config.json")


# --- training JSONL ------------------------------------------------------------------------

GOOD_LINES = [{"text": "hello world"}, {"prompt": "hi", "completion": "there"},
              {"messages": [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"}]}]


@st.composite
def records(draw):
    """A JSONL record: a good one with one field changed, or anything JSON."""
    record = dict(draw(st.sampled_from(GOOD_LINES)))
    if draw(st.booleans()):
        record[draw(st.sampled_from(sorted(record) + ["role", "content", "text"]))] = draw(
            json_values | st.just([{"role": "user"}]) | st.just([{"role": 1, "content": []}]))
    return record


lines = st.one_of(records().map(lambda r: json.dumps(r).encode()), hostile_json_bytes,
                  st.just(b""), st.just(b"   "))


@given(data=st.data(), train=st.lists(lines, max_size=8), valid=st.none() | st.lists(lines, max_size=4))
def test_training_jsonl(bases, worker, data, train, valid):
    with scratch_copy() as root:
        folder = root / "data"
        folder.mkdir()
        (folder / "train.jsonl").write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in train))
        if valid is not None:
            (folder / "valid.jsonl").write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in valid))
        reply = worker.run(op="dataset", path=str(folder), tokenizer=str(bases["bpe"]),
                           max_seq_length=data.draw(st.sampled_from([2, 3, 8, 2048])),
                           mask_prompt=data.draw(st.booleans()),
                           batch_size=data.draw(st.sampled_from([1, 2, 4, 64])))
        assert_clean(reply, "training JSONL")

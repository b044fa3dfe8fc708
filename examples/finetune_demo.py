"""Teach the demo model (SmolLM2-135M-Instruct) a rigid output format with LoRA, in minutes.

The task (examples/lora/data): turn a sentence about a purchase into one line of JSON with a
fixed schema,

    prompt:     Extract as JSON: Maria bought 3 apples in Lisbon.
    completion: {"name": "Maria", "quantity": 3, "item": "apples", "city": "Lisbon"}

The base model answers in prose or with keys of its own; after ~60 LoRA steps it writes the
schema. The script

1. greedily generates answers to 3 held-out test prompts with the base model,
2. trains adapters with the user-facing command, `mlx-mobilellm lora --train --test ...`
   (prompt-masked prompt/completion lines, which train through the model's chat template),
3. generates for the same prompts with the adapters, and prints steps, minutes, first/last
   training loss, validation loss and test loss/perplexity.

Compute dtype: on MLX's CPU backend (Linux) quantized matmuls have no fast backward pass, so the
Q4_1 base is dequantized and trained in float32 (`--dtype float32`; ~1.5 s a step on 2 cores with
OpenBLAS preloaded, against ~25 s a step for QLoRA). On a Mac (Metal) the script trains QLoRA on
the 4-bit base as loaded. Generation likewise runs in float32 on the CPU.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python examples/finetune_demo.py

`--make-data` rewrites the JSONL files from a fixed seed (they are committed; no need to run it).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "lora" / "data"
SPLIT_SIZES = {"train": 320, "valid": 40, "test": 40}
SHOWN = 3  # test prompts shown before and after

# --- the dataset ---------------------------------------------------------------------------

NAMES = ["Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chen", "Sofia",
         "Ahmed", "Emma", "Raj", "Ingrid", "Tom", "Lucia", "Yusuf", "Hana", "Marco", "Zoe",
         "Ivan", "Nora", "Diego", "Mei", "Samuel", "Clara", "Omar", "Elena", "Kofi", "Anna"]
ITEMS = ["apples", "books", "pencils", "tickets", "candles", "oranges", "notebooks", "shirts",
         "plates", "lamps", "bananas", "cups", "umbrellas", "chairs", "batteries", "eggs",
         "bottles", "socks", "flowers", "maps", "tomatoes", "keys", "postcards", "towels"]
CITIES = ["Lisbon", "Tokyo", "Nairobi", "Oslo", "Lima", "Cairo", "Toronto", "Hanoi", "Madrid",
          "Dublin", "Seoul", "Quito", "Vienna", "Accra", "Perth", "Prague", "Denver", "Mumbai",
          "Tunis", "Riga", "Havana", "Kyoto", "Lagos", "Bergen"]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten", 12: "twelve"}
TEMPLATES = [
    "{name} bought {n} {item} in {city}.",
    "In {city}, {name} bought {n} {item}.",
    "{name} picked up {n} {item} at a market in {city}.",
    "Yesterday {name} purchased {n} {item} while visiting {city}.",
    "While in {city}, {name} got {n} {item}.",
    "{name} ordered {n} {item} from a shop in {city}.",
    "{n_cap} {item} were bought by {name} in {city}.",
    "Last week in {city} {name} paid for {n} {item}.",
]


def make_example(rng: random.Random) -> dict:
    name, item, city = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CITIES)
    quantity = rng.choice(list(NUMBER_WORDS) + [15, 20, 24, 30, 50])
    spelled = NUMBER_WORDS.get(quantity) if rng.random() < 0.5 else None
    n = spelled or str(quantity)
    sentence = rng.choice(TEMPLATES).format(name=name, n=n, n_cap=n[0].upper() + n[1:],
                                            item=item, city=city)
    answer = {"name": name, "quantity": quantity, "item": item, "city": city}
    return {"prompt": f"Extract as JSON: {sentence}", "completion": json.dumps(answer)}


def make_data() -> None:
    rng = random.Random(1234)
    seen = set()
    DATA.mkdir(parents=True, exist_ok=True)
    for split, size in SPLIT_SIZES.items():
        lines = []
        while len(lines) < size:
            example = make_example(rng)
            if example["prompt"] not in seen:  # no sentence in two splits
                seen.add(example["prompt"])
                lines.append(json.dumps(example))
        (DATA / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"wrote {DATA / f'{split}.jsonl'} ({size} lines)")


# --- before / after ------------------------------------------------------------------------

def load_model(adapter_path=None):
    """The demo model as it computes fastest here: float32 on the CPU backend, as loaded
    (4-bit) on Metal; with the adapters of `adapter_path` applied when given."""
    import mlx_mobilellm
    from mlx_mobilellm.compute_dtype import for_fast_compute
    from mlx_mobilellm.demo import demo_model_path
    from mlx_mobilellm.lora import load_adapters

    model, tokenizer = mlx_mobilellm.load(demo_model_path())
    model = for_fast_compute(model)
    if adapter_path is not None:  # after for_fast_compute, which rebuilds a quantized model
        load_adapters(model, adapter_path)
    return model, tokenizer


def answers(model, tokenizer, prompts) -> list:
    from mlx_mobilellm.generate import generate

    model.eval()
    return [generate(model, tokenizer,
                     tokenizer.apply_chat_template([{"role": "user", "content": p}]),
                     max_tokens=60, temperature=0.0).strip()
            for p in prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-data", action="store_true",
                        help="regenerate examples/lora/data/*.jsonl (deterministic) and stop")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--num-layers", type=int, default=16)
    parser.add_argument("--adapter-path", default=None,
                        help="where to write the adapters (default: a temporary folder)")
    args = parser.parse_args()
    if args.make_data:
        make_data()
        return

    from mlx_mobilellm.compute_dtype import on_cpu

    tests = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()][:SHOWN]
    prompts = [t["prompt"] for t in tests]

    model, tokenizer = load_model()
    before = answers(model, tokenizer, prompts)
    del model

    folder = Path(args.adapter_path or tempfile.mkdtemp(prefix="finetune_demo_"))
    command = ["mlx-mobilellm", "lora", "--train", "--test", "--data", str(DATA),
               "--mask-prompt", "--iters", str(args.iters), "--batch-size", "4",
               "--learning-rate", str(args.learning_rate), "--lora-rank", "8",
               "--num-layers", str(args.num_layers), "--steps-per-report", "1",
               "--steps-per-eval", str(args.iters), "--val-batches", "-1",
               "--test-batches", "-1", "--adapter-path", str(folder)]
    if on_cpu():
        command += ["--dtype", "float32"]  # dequantized base: QLoRA is ~15x slower on the CPU
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    minutes = (time.perf_counter() - start) / 60
    print(result.stdout, end="")
    if result.returncode:
        sys.exit(result.returncode)

    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train_losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    val_loss = [m["val_loss"] for m in metrics if "val_loss" in m][-1]
    test_line = result.stdout.strip().splitlines()[-1]  # "test loss X, test perplexity Y"

    model, tokenizer = load_model(folder)
    after = answers(model, tokenizer, prompts)

    for test, old, new in zip(tests, before, after):
        print(f"\nPROMPT:   {test['prompt']}\nEXPECTED: {test['completion']}")
        print(f"BEFORE:   {old}\nAFTER:    {new}")
    print(f"\nsteps {args.iters} (batch 4), training+eval {minutes:.1f} min "
          f"({'float32 on the CPU' if on_cpu() else 'QLoRA on the 4-bit base'}); "
          f"train loss {train_losses[0]:.3f} (step 1) -> {train_losses[-1]:.3f} (step {args.iters}), "
          f"mean of the last 10 steps {sum(train_losses[-10:]) / len(train_losses[-10:]):.3f}; "
          f"validation loss {val_loss:.3f}; {test_line}")
    print(f"adapters: {folder}")


if __name__ == "__main__":
    main()

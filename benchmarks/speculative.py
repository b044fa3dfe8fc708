"""Speculative decoding on the demo model: acceptance rate and speed-up over plain greedy.

There is no real small/large pair with one tokenizer on this machine (MobileLLM-R1 140M
drafting for 950M is the use case on a Mac), so the drafts here are built from the demo
model itself: its first N blocks with the final norm and head (a "layer-skip" draft, N/30 of
the cost), and the model itself (100 % acceptance: the upper bound of the overhead-free case).
Prints JSON; says which backend and BLAS the figures came from.
"""

from __future__ import annotations

import argparse
import json

import mlx_mobilellm
from mlx_mobilellm.compute_dtype import for_fast_compute
from mlx_mobilellm.demo import demo_model_path
from mlx_mobilellm.models import MobileLLM
from common import machine

PROMPTS = ["Explain why the sky is blue in two sentences.",
           "Write a Python function that reverses a string.",
           "List three facts about the Moon."]


def shallow_copy(model: MobileLLM, blocks: int) -> MobileLLM:
    """The model's first `blocks` blocks, its final norm and head: a cheap draft."""
    from dataclasses import replace

    draft = MobileLLM(replace(model.config, num_layers=blocks))
    draft.embed_tokens = model.embed_tokens
    draft.decoder.layers = model.decoder.layers[:blocks]
    draft.decoder.norm = model.decoder.norm
    draft.eval()
    return draft


def run(model, tokenizer, prompt_ids, max_tokens, draft=None, num_draft=3):
    stats = {}
    tokens, response = [], None
    for response in mlx_mobilellm.stream_generate(
            model, tokenizer, prompt_ids, max_tokens, eos_token_ids=[], draft_model=draft,
            num_draft_tokens=num_draft, draft_stats=stats):
        tokens.append(response.token)
    return tokens, response.generation_tps, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--draft-blocks", type=int, default=8)
    parser.add_argument("--num-draft", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = mlx_mobilellm.load(demo_model_path())
    model = for_fast_compute(model)
    drafts = {f"first_{args.draft_blocks}_blocks": shallow_copy(model, args.draft_blocks),
              "itself": model}
    results = {}
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        run(model, tokenizer, ids, 4)  # warm-up
        plain, plain_tps, _ = run(model, tokenizer, ids, args.max_tokens)
        for name, draft in drafts.items():
            tokens, tps, stats = run(model, tokenizer, ids, args.max_tokens, draft, args.num_draft)
            entry = results.setdefault(name, {"identical_to_greedy": True, "drafted": 0,
                                              "accepted": 0, "speedups": []})
            entry["identical_to_greedy"] &= tokens == plain
            entry["drafted"] += stats["drafted"]
            entry["accepted"] += stats["accepted"]
            entry["speedups"].append(round(tps / plain_tps, 3))
    for entry in results.values():
        entry["acceptance_rate"] = round(entry["accepted"] / max(entry["drafted"], 1), 3)
    print(json.dumps({
        "machine": machine(dtype="float32"),
        "model": "SmolLM2-135M-Instruct (demo), greedy", "max_tokens": args.max_tokens,
        "num_draft_tokens": args.num_draft, "drafts": results}, indent=2))


if __name__ == "__main__":
    main()

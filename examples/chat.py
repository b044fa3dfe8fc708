"""A scripted two-turn chat that reuses its KV cache: the second turn processes only the
tokens the first turn did not already put in the cache.

    python examples/chat.py
"""

import mlx_mobilellm
from mlx_mobilellm.demo import demo_model_path

model, tokenizer = mlx_mobilellm.load(demo_model_path(), dtype="auto")
cache = mlx_mobilellm.PromptCache.for_model(model)
history = []
for question in ("What is the capital of France?", "And what is its most famous tower?"):
    history.append({"role": "user", "content": question})
    prompt = tokenizer.apply_chat_template(history)
    answer, response = "", None
    print(f">> {question}")
    for response in mlx_mobilellm.stream_generate(model, tokenizer, prompt, max_tokens=60,
                                                  prompt_cache=cache):
        print(response.text, end="", flush=True)
        answer += response.text
    history.append({"role": "assistant", "content": answer})
    print(f"\n[prompt: {len(prompt)} tokens, of which {response.cached_tokens} came from the "
          f"cache and {response.prompt_tokens} were processed]\n")

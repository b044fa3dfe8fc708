"""Stream an answer from the built-in demo model (or --model), token by token.

    python examples/stream.py "Why is the sky blue?"
"""

import sys

import mlx_mobilellm
from mlx_mobilellm.demo import demo_model_path

question = sys.argv[1] if len(sys.argv) > 1 else "Why is the sky blue?"
# dtype="auto": as the CLI computes (float32 on a CPU with a fast BLAS).
model, tokenizer = mlx_mobilellm.load(demo_model_path(), dtype="auto")

prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}])
response = None
for response in mlx_mobilellm.stream_generate(model, tokenizer, prompt, max_tokens=200,
                                              temperature=0.7, top_p=0.9, seed=0):
    print(response.text, end="", flush=True)
print(f"\n\n[{response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s, "
      f"finish: {response.finish_reason}]")

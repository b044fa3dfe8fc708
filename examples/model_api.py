"""A tour of the models API: presets, parameter counts, a forward pass with loss, generation.

The weights here are random (no checkpoint is downloaded), so the generated ids mean nothing;
`mlx_mobilellm.load(folder)` gives the same model with real weights.
"""

import mlx.core as mx

from mlx_mobilellm.models import MobileLLM, MobileLLMConfig, get_mobilellm_config

for name in ("140m", "360m", "950m", "7b", "70b", "671b"):
    # Arrays are lazy: counting parameters materialises no weight, even for 671B.
    print(f"{name:>5}: {MobileLLM(get_mobilellm_config(name)).num_parameters():>15,} parameters")

mx.random.seed(0)
config = MobileLLMConfig(num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=128,
                         hidden_dim=512, vocab_size=1000, eos_token_id=0)
model = MobileLLM(config)
ids = mx.random.randint(1, config.vocab_size, (2, 16))
out = model(ids, labels=ids)
print(f"loss {out.loss.item():.3f} (ln(vocab) = {mx.log(mx.array(1000.0)).item():.3f}), "
      f"logits {out.logits.shape}, hidden_states {out.hidden_states.shape}")

model.eval()
generated = model.generate(ids[:, :4], max_new_tokens=8, temperature=0.8, top_p=0.9, seed=0)
print("prompt + 8 sampled tokens:", generated.tolist())

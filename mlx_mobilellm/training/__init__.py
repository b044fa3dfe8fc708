"""LoRA / QLoRA fine-tuning: datasets, the training loop, checkpoints."""

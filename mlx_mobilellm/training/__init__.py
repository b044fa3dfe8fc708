"""Training: LoRA / QLoRA / full fine-tuning datasets, pretraining token files and packed
batches, a fresh model's initialisation, the training loop, checkpoints."""

"""Fine-tuning: LoRA/DoRA layers, datasets, the loss and the training loop (see lora.py and fuse.py for the CLIs).

Internal: not part of the public API, which docs/api.md lists."""

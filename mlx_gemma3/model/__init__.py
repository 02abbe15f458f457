"""The model: config, text and vision towers, attention, caches, quantization, and loading a folder."""

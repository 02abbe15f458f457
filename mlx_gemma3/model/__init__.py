"""The model: config, text and vision towers, attention, caches, quantization, and loading a folder.

Internal: not part of the public API, which docs/api.md lists."""

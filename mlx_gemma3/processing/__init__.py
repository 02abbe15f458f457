"""Turning user input into model input and back: tokenizer, prompt rendering, images, tool calls.

Internal: not part of the public API, which docs/api.md lists."""

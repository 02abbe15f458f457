"""Turning user input into model input and back: tokenizer, prompt rendering, images, tool calls."""

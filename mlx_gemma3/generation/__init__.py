"""Generation: the step loop, samplers, streaming, multi-turn chat and background generation.

Internal: not part of the public API, which docs/api.md lists."""

"""Generation: the step loop, samplers, streaming, multi-turn chat and background generation."""

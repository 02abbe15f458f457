"""Gemma 3 across several processes with mx.distributed: pipeline stages or tensor-parallel shards."""

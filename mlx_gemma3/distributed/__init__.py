"""Gemma 3 across several processes with mx.distributed: pipeline stages or tensor-parallel shards.

Internal: not part of the public API, which docs/api.md lists."""

"""The local HTTP server (OpenAI-compatible API).

Internal: not part of the public API, which docs/api.md lists."""

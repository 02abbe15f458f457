"""The local HTTP server (OpenAI-compatible API)."""

"""A `python -m mlx_gemma3.server` process on 127.0.0.1 for tests: started on a free port, stopped with its log."""

from __future__ import annotations

import os
import subprocess
import sys


class ServerProcess:
    """The server started with `args` (and `env` added); `port` once it serves; `stop()` gives its stderr."""

    def __init__(self, *args: str, env: dict | None = None):
        command = [sys.executable, "-m", "mlx_gemma3.server", "--port", "0", *args]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)
        self.lines: list[str] = []
        while not self.lines or not self.lines[-1].startswith("serving"):
            line = self.process.stderr.readline()
            if not line:
                self.stop()
                raise AssertionError("the server ended before serving:\n" + "".join(self.lines))
            self.lines.append(line)
        self.port = int(self.lines[-1].split(" on http://", 1)[1].split(":", 1)[1].split("/")[0])
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> str:
        """End the server; what it wrote to stderr."""
        if self.process.poll() is None:
            self.process.terminate()
        rest = self.process.communicate(timeout=30)[1]
        return "".join(self.lines) + (rest or "")


def two_model_server(image_model, text_model, *args: str) -> ServerProcess:
    """One server with the tiny multimodal model as "tiny" and the tiny text model as "tiny-text" (and `args`)."""
    return ServerProcess(
        *("--model", str(image_model), "--served-model-name", "tiny"),
        *("--model", str(text_model), "--served-model-name", "tiny-text"),
        *args,
    )

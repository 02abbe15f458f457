"""Generation in a worker thread, for apps: a callback per text chunk, cancellable from any thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .text_stream import stream_generate
from .thread_streams import release_thread_streams

__all__ = ["BackgroundGeneration"]


class BackgroundGeneration:
    """Starts generating at once in a daemon thread; `cancel()` stops it within a token, `wait()` gives the text."""

    def __init__(self, model, processor, prompt, on_text: Callable[[str], None] | None = None, **options):
        self.text, self.tokens, self.finish_reason, self.error = "", 0, None, None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(model, processor, prompt, on_text, options), daemon=True
        )
        self._thread.start()

    def _run(self, model, processor, prompt, on_text, options) -> None:
        responses = stream_generate(model, processor, prompt, **options)
        try:
            for response in responses:
                if self._cancelled.is_set():
                    self.finish_reason = "cancelled"
                    return
                self.text += response.text
                self.tokens += 1
                self.finish_reason = response.finish_reason
                if on_text is not None and response.text:
                    on_text(response.text)
        except Exception as e:  # handed to the caller by wait()
            self.error = e
        finally:
            responses.close()
            release_thread_streams()  # MLX needs each thread to drop its own streams before it ends

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> str:
        """The text so far once the thread ends (re-raising its error, if any)."""
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.text

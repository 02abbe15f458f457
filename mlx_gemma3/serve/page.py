"""The chat page's files (HTML, CSS, JavaScript in serve/web/, its Markdown renderer and sanitizer in
serve/web/vendor/), served by the server at GET /.

Internal: not part of the public API, which docs/api.md lists."""

from __future__ import annotations

from importlib.resources import files

# URL path → (file in serve/web/, Content-Type); nothing outside this table is served.
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/vendor/marked.umd.js": ("vendor/marked.umd.js", "text/javascript; charset=utf-8"),
    "/vendor/purify.min.js": ("vendor/purify.min.js", "text/javascript; charset=utf-8"),
}


def page_file(path: str) -> tuple[bytes, str] | None:
    """The bytes and Content-Type of the page file at this URL path (its query ignored), or None."""
    entry = PAGE_FILES.get(path.split("?", 1)[0])
    return (
        None
        if entry is None
        else (files("mlx_gemma3.serve").joinpath("web", *entry[0].split("/")).read_bytes(), entry[1])
    )

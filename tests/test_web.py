"""The chat page at GET /, driven in a real headless Chromium (Playwright) against the server on 127.0.0.1."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import openai
import pytest
from PIL import Image

import mlx_gemma3
from mlx_gemma3.serve.http import ServerState, make_server

END_OF_TURN = 106
# Where the run leaves its screenshot of the page (CI keeps this folder as an artifact).
ARTIFACTS = Path(os.environ.get("MLX_GEMMA3_ARTIFACTS") or Path(tempfile.gettempdir()) / "mlx_gemma3-artifacts")


class Says:
    """A logits processor that makes the model say `ids` then end its turn, sleeping `pause` s a step so a reply
    streams visibly; counts the steps it saw."""

    def __init__(self, ids: list[int], pause: float = 0.0):
        self.script, self.pause, self.first, self.steps = [*ids, END_OF_TURN], pause, None, 0

    def __call__(self, tokens, logits):
        self.first = tokens.size if self.first is None else self.first
        self.steps += 1
        time.sleep(self.pause)
        chosen = self.script[min(tokens.size - self.first, len(self.script) - 1)]
        return mx.where(mx.arange(logits.shape[-1]) == chosen, 1e4, logits)


def chromium_path() -> str | None:
    """The system Chromium (Debian's `chromium`), or None for Playwright's own download."""
    return os.environ.get("MLX_GEMMA3_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        except Error as e:
            pytest.fail(
                f"no Chromium to drive: install Debian's `chromium` (apt-get install -y chromium) or run "
                f"`playwright install chromium` ({str(e).splitlines()[0]})"
            )
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    opened = context.new_page()
    opened.set_default_timeout(30_000)
    yield opened
    context.close()


def serve(model, processor, model_id: str, **policy):
    state = ServerState(model, processor, model_id, max_tokens_limit=600, **policy)
    httpd = make_server(state, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, state


@pytest.fixture(scope="module")
def text_server(tiny_chat_model):
    model, processor = mlx_gemma3.load(tiny_chat_model[0])
    httpd, state = serve(model, processor, "tiny-chat")
    yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    httpd.shutdown()
    httpd.server_close()


def say(state, text: str, pause: float = 0.0) -> Says:
    says = Says(state.processor.tokenizer.encode(text, add_bos=False), pause)
    state.extra_options["logits_processors"] = [says]
    return says


def set_settings(page, temperature="0", max_tokens="200", system=None):
    page.click("#toggle-settings")
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    if system is not None:
        page.fill("#system", system)
    page.click("#toggle-settings")


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_for_reply(page, count: int) -> None:
    """Until the page shows `count` messages and is no longer streaming."""
    page.wait_for_function(
        "n => document.querySelectorAll('.message').length === n && !document.querySelector('.message.streaming')",
        arg=count,
    )


def stats(page, index: int) -> dict:
    """The numbers the page shows under message `index`."""
    text = page.locator(".message").nth(index).locator(".stats").text_content()
    words = text.replace("·", " ").split()
    return {
        "completion": int(words[0]),
        "cached": int(words[words.index("of") - 1]),
        "prompt": int(words[words.index("of") + 1]),
        "tok/s": "tok/s" in text,
    }


def record_stream(page) -> None:
    """Keep every text the last message showed while the reply streamed (window.seenTexts)."""
    page.evaluate("""() => {
        window.seenTexts = [];
        new MutationObserver(() => {
            const last = [...document.querySelectorAll('.message.assistant .body')].at(-1);
            if (last && window.seenTexts.at(-1) !== last.textContent) window.seenTexts.push(last.textContent);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")


def message_texts(page) -> list[str]:
    return page.locator(".message .body").all_text_contents()


@pytest.mark.slow
def test_a_reply_streams_in_steps_with_its_statistics_and_the_next_turn_is_cached(text_server, page):
    url, state = text_server
    fetched = []
    page.on("request", lambda request: fetched.append(request.url))
    page.goto(url)
    page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny-chat'")
    assert page.is_disabled("#attach")  # a text-only model takes no images
    set_settings(page)
    record_stream(page)
    first = "Hello there, how are you today?"
    try:
        say(state, first, pause=0.05)
        ask(page, "Hi!")
        wait_for_reply(page, 2)
        seen = page.evaluate("window.seenTexts")
        say(state, "Fine.")
        ask(page, "And then?")
        wait_for_reply(page, 4)
    finally:
        state.extra_options.clear()
    assert seen[-1] == first and len(seen) >= 4  # arrived in several steps, each a longer start of the reply
    assert all(first.startswith(text) for text in seen)
    assert message_texts(page) == ["Hi!", first, "And then?", "Fine."]
    turn1, turn2 = stats(page, 1), stats(page, 3)
    assert turn1["completion"] == len(state.processor.tokenizer.encode(first, add_bos=False)) + 1  # + end of turn
    assert turn1["cached"] == 0 and turn1["tok/s"]
    assert turn1["prompt"] <= turn2["cached"] < turn2["prompt"]  # the prompt cache served all of turn 1
    assert all(address.startswith(f"{url}/") for address in fetched)  # nothing from elsewhere: it works offline


@pytest.mark.slow
def test_stop_aborts_the_request_and_the_server_stops_generating(text_server, page):
    url, state = text_server
    page.goto(url)
    set_settings(page, max_tokens="500")
    long = say(state, "and on " * 200, pause=0.03)
    try:
        ask(page, "Talk forever.")
        page.wait_for_function(
            "() => (document.querySelector('.message.assistant .body')?.textContent || '').length > 5"
        )
        page.click("#stop")
        page.wait_for_selector("#send:not([hidden])")
        time.sleep(1.0)
        stopped_at = long.steps
        time.sleep(0.5)
        assert (
            long.steps == stopped_at < 150
        )  # the server stopped within a few tokens of the abort, long before the end
    finally:
        state.extra_options.clear()
    assert page.locator(".message.assistant .stats").text_content() == "stopped"
    assert page.locator(".message.assistant .body").text_content()  # the partial reply is kept
    say(state, "Back again.")
    try:
        page.click(".message.assistant .regenerate")
        wait_for_reply(page, 2)
    finally:
        state.extra_options.clear()
    assert message_texts(page)[1] == "Back again."


MARKUP = (
    'Try <script>window.injected = 1</script><img src=x onerror="window.injected = 2"> <b>bold</b>\n'
    "[click me](javascript:window.injected=3) or "
    '<a href="javascript:window.injected=4" onclick="window.injected=5">this</a>\n'
    '```html\n<p class="x">  kept   verbatim</p>\n```\nDone.'
)
# Every element in the reply with an attribute that could run code or leave the page for a script.
LIVE_ATTRIBUTES = """reply => [...reply.querySelectorAll('*')].flatMap(node => [...node.attributes]
    .filter(a => a.name.startsWith('on') || /^\\s*(javascript|data|vbscript):/i.test(a.value))
    .map(a => `${node.tagName} ${a.name}=${a.value}`))"""


@pytest.mark.slow
def test_model_markup_never_becomes_live_html(text_server, page):
    url, state = text_server
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(url)
    set_settings(page, max_tokens="500")
    say(state, MARKUP)
    try:
        ask(page, "Show me some HTML.")
        wait_for_reply(page, 2)
    finally:
        state.extra_options.clear()
    reply = page.locator(".message.assistant .body")
    assert reply.locator("script, img, b, iframe, object, embed, style").count() == 0  # none came from the reply
    assert reply.evaluate(LIVE_ATTRIBUTES) == []
    text = reply.text_content()
    assert 'Try <script>window.injected = 1</script><img src=x onerror="window.injected = 2"> <b>bold</b>' in text
    assert '<a href="javascript:window.injected=4" onclick="window.injected=5">this</a>' in text
    assert reply.locator("pre code").text_content() == '<p class="x">  kept   verbatim</p>'
    page.get_by_text("click me").click()  # the Markdown link lost its javascript: target
    assert page.evaluate("window.injected") is None and dialogs == []


MARKDOWN_REPLY = (
    "Three steps:\n\n"
    "1. Mix **flour** and water.\n"
    "2. Knead for `10` minutes.\n\n"
    "| Tool | Use |\n"
    "|------|-----|\n"
    "| bowl | mixing |\n"
    "| oven | baking |\n\n"
    '```python\nprint("bread")\n```\n'
    "See [the docs](https://example.com/bread)."
)


@pytest.mark.slow
def test_a_reply_renders_as_markdown_with_a_copy_button_on_code(text_server, browser):
    url, state = text_server
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto(url)
        set_settings(page, max_tokens="500")
        say(state, MARKDOWN_REPLY)
        try:
            ask(page, "How do I bake bread?")
            wait_for_reply(page, 2)
        finally:
            state.extra_options.clear()
        reply = page.locator(".message.assistant .body")
        assert reply.locator("p").first.text_content() == "Three steps:"
        assert reply.locator("ol > li").all_text_contents() == ["Mix flour and water.", "Knead for 10 minutes."]
        assert reply.locator("ol strong").text_content() == "flour" and reply.locator("li code").text_content() == "10"
        assert reply.locator("table th").all_text_contents() == ["Tool", "Use"]
        assert reply.locator("table td").all_text_contents() == ["bowl", "mixing", "oven", "baking"]
        assert reply.locator("pre code.language-python").text_content() == 'print("bread")'
        link = reply.locator("a")
        assert link.get_attribute("href") == "https://example.com/bread" and link.get_attribute("rel") == (
            "noopener noreferrer"
        )
        reply.locator(".code-block .copy").click()
        page.wait_for_function("() => document.querySelector('.code-block .copy').textContent === 'Copied'")
        assert page.evaluate("navigator.clipboard.readText()") == 'print("bread")'
        assert page.locator(".message.user .body").text_content() == "How do I bake bread?"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat-page-markdown.png"))
    finally:
        context.close()


@pytest.fixture(scope="module")
def base_model_folder(tiny_chat_model, tmp_path_factory):
    """The tiny chat model without its chat template: a base model by the folder rule."""
    folder = tmp_path_factory.mktemp("base") / "tiny-pt"
    shutil.copytree(tiny_chat_model[0], folder)
    (folder / "chat_template.jinja").unlink()
    return folder


@pytest.mark.slow
def test_the_page_says_when_the_model_is_a_base_model(base_model_folder, text_server, page):
    model, processor = mlx_gemma3.load(base_model_folder)
    httpd, _ = serve(model, processor, "tiny-pt")
    try:
        page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/")
        page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny-pt'")
        assert page.is_visible("#model-note") and "base model" in page.text_content("#model-note")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat-page-base-model.png"))
    finally:
        httpd.shutdown()
        httpd.server_close()
    page.goto(text_server[0])
    page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny-chat'")
    assert page.is_hidden("#model-note")


@pytest.mark.slow
def test_a_refused_request_shows_the_servers_error_and_the_conversation_goes_on(text_server, page):
    url, state = text_server
    page.goto(url)
    set_settings(page, max_tokens="100000")
    ask(page, "First try.")
    page.wait_for_selector(".message.assistant .error")
    assert "'max_tokens' must lie in" in page.text_content(".message.assistant .error")
    set_settings(page, max_tokens="20")
    say(state, "Now it works.")
    try:
        ask(page, "Second try.")
        wait_for_reply(page, 4)
    finally:
        state.extra_options.clear()
    joined = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0).chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "First try.\n\nSecond try."}], max_tokens=1
    )
    assert message_texts(page)[3] == "Now it works." and stats(page, 3)["prompt"] == joined.usage.prompt_tokens


CODE_REPLY = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nIt returns the sum of a and b."


@pytest.mark.slow
def test_the_conversation_survives_a_reload_and_can_be_edited(text_server, page):
    url, state = text_server
    page.goto(url)
    set_settings(page, system="Answer in one line.")
    try:
        say(state, "A library.")
        ask(page, "What is MLX?")
        wait_for_reply(page, 2)
        say(state, "Water.")
        ask(page, "And what is H2O?")
        wait_for_reply(page, 4)
        shown = message_texts(page)
        page.reload()
        page.wait_for_selector(".message")
        assert message_texts(page) == shown and page.input_value("#system") == "Answer in one line."
        page.locator(".message.user .edit").first.click()
        page.fill(".message textarea", "What is MLX, in one line?")
        say(state, "An array framework for machine learning on Apple silicon.")
        page.click(".message .save")
        wait_for_reply(page, 2)
    finally:
        state.extra_options.clear()
    expected = ["What is MLX, in one line?", "An array framework for machine learning on Apple silicon."]
    assert message_texts(page) == expected
    page.reload()
    page.wait_for_selector(".message")
    assert message_texts(page) == expected
    say(state, CODE_REPLY)
    try:
        ask(page, "Write a Python function that adds two numbers.")
        wait_for_reply(page, 4)
    finally:
        state.extra_options.clear()
    assert page.locator(".message pre code").text_content() == "def add(a, b):\n    return a + b"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"))


def png_bytes(color: str, size=(30, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def drop_or_paste(page, kind: str, data: bytes) -> None:
    """Drop a PNG file on the page, or paste one into the message box, as a user's browser would."""
    page.evaluate(
        """([kind, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'picture.png', {type: 'image/png'}));
        const target = document.getElementById('input');
        if (kind === 'drop') target.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
        else target.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
    }""",
        [kind, base64.b64encode(data).decode()],
    )


@pytest.mark.slow
def test_images_attached_by_picker_drop_and_paste_reach_the_model(image_chat_model, page, tmp_path):
    _, model, processor, _, _ = image_chat_model
    httpd, _ = serve(model, processor, "tiny-vlm")
    port = httpd.server_address[1]
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#attach:not([disabled])")
        set_settings(page, max_tokens="8")
        (tmp_path / "red.png").write_bytes(png_bytes("red"))
        page.set_input_files("#file-input", str(tmp_path / "red.png"))
        drop_or_paste(page, "drop", png_bytes("green"))
        drop_or_paste(page, "paste", png_bytes("blue"))
        page.wait_for_function("() => document.querySelectorAll('#attachments img').length === 3")
        page.locator("#attachments button").nth(1).click()  # the dropped green one is taken off again
        noise = np.random.RandomState(0).randint(0, 256, (700, 2000, 3), dtype=np.uint8)
        Image.fromarray(noise).save(
            tmp_path / "large.png", compress_level=0
        )  # over 3 MB: scaled down before it is sent
        page.set_input_files("#file-input", str(tmp_path / "large.png"))
        page.wait_for_function("() => document.querySelectorAll('#attachments img').length === 3")
        large = page.locator("#attachments img").nth(2)
        large_src, large_width = large.get_attribute("src"), large.evaluate("image => image.naturalWidth")
        page.locator("#attachments button").nth(2).click()
        ask(page, "What colours?")
        wait_for_reply(page, 2)
        shown = stats(page, 1)
        urls = [f"data:image/png;base64,{base64.b64encode(png_bytes(c)).decode()}" for c in ("red", "blue")]
        content = [
            *({"type": "image_url", "image_url": {"url": u}} for u in urls),
            {"type": "text", "text": "What colours?"},
        ]
        direct = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        ).chat.completions.create(
            model="tiny-vlm", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
        )
        text_only = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        ).chat.completions.create(
            model="tiny-vlm", messages=[{"role": "user", "content": "What colours?"}], max_tokens=1
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert large_src.startswith("data:image/jpeg;base64,") and large_width == 1792
    assert page.locator(".message.user .images img").count() == 2
    kept = page.evaluate("JSON.parse(localStorage.getItem('mlx_gemma3.conversation'))")
    assert kept[1]["content"] == direct.choices[0].message.content and len(kept[0]["images"]) == 2
    assert shown["prompt"] == direct.usage.prompt_tokens > text_only.usage.prompt_tokens


@pytest.mark.slow
def test_a_server_with_an_api_key_asks_for_it_in_the_page(tiny_chat_model, page):
    model, processor = mlx_gemma3.load(tiny_chat_model[0])
    httpd, state = serve(model, processor, "tiny-keyed", api_key="sesame")
    try:
        page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/")
        page.wait_for_selector("#notice:not([hidden])")
        assert "API key is required" in page.text_content("#notice")
        page.click("#toggle-settings")
        page.fill("#max-tokens", "20")
        page.fill("#api-key", "sesame")
        page.press("#api-key", "Enter")
        page.wait_for_function("() => document.getElementById('model-name').textContent === 'tiny-keyed'")
        page.click("#toggle-settings")
        say(state, "Welcome in.")
        ask(page, "Knock knock.")
        wait_for_reply(page, 2)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert message_texts(page) == ["Knock knock.", "Welcome in."] and page.is_hidden("#notice")


def get(port: int, path: str, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, payload, response


def test_page_files_are_served_with_a_strict_policy_and_no_key(tiny_chat_model):
    model, processor = mlx_gemma3.load(tiny_chat_model[0])
    httpd, _ = serve(model, processor, "tiny", api_key="sesame")
    port = httpd.server_address[1]
    try:
        page_status, html, page_response = get(port, "/")
        script = get(port, "/app.js")
        vendored = [get(port, f"/vendor/{name}") for name in ("marked.umd.js", "purify.min.js")]
        models = get(port, "/v1/models")[0]
        other_host = get(port, "/", {"Host": "evil.example"})[0]
        unknown = get(port, "/../pyproject.toml", {"Authorization": "Bearer sesame"})[0]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert page_status == 200 and b"<title>mlx_gemma3 chat</title>" in html
    assert page_response.getheader("Content-Type") == "text/html; charset=utf-8"
    assert "script-src 'self'" in page_response.getheader("Content-Security-Policy")
    assert script[0] == 200 and script[2].getheader("Content-Type") == "text/javascript; charset=utf-8"
    assert [status for status, _, _ in vendored] == [200, 200]
    assert b"marked v18.3.0" in vendored[0][1] and b"DOMPurify 3.5.0" in vendored[1][1]
    assert (models, other_host, unknown) == (401, 403, 404)


@pytest.mark.slow
def test_no_web_turns_the_page_off_in_the_server_process(tiny_chat_model):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_gemma3.server", "--model", str(tiny_chat_model[0]), "--port", "0", "--no-web"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stderr.readline()
        assert line.startswith("serving") and "chat page" not in line, line
        port = int(line.split("/v1")[0].rsplit(":", 1)[1])
        status, payload, _ = get(port, "/")
        models = get(port, "/v1/models")
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert status == 404 and "--no-web" in json.loads(payload)["error"]["message"]
    assert models[0] == 200 and json.loads(models[1])["data"][0]["vision"] is False

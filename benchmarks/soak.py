"""A soak run of the server (not part of the test suite): mixed clients for --minutes on loopback, every request
answered or refused with a clear status, and the server's memory sampled throughout.

    python benchmarks/soak.py [--minutes 10] [--max-requests 20000] [--clients 6] [--json results/soak.json]

Two server processes on 127.0.0.1 serve a tiny random multimodal Gemma 3 (built here with transformers, as the
tests build theirs: the demo 270M reads text only, and a tiny model turns many requests over in ten minutes).
One serves plain requests, the other runs with --prompt-lookup 3 (every request speculative: speculative
decoding is a server flag, not a request field). Clients pick, in a fixed pseudo-random order: a long prompt
(about 700 tokens, prefilled 64 tokens per iteration), an image question and its follow-up turn, a JSON-schema
constrained reply, a short chat, a speculative request, and a stream the client closes after three chunks.
Every request must end as answered (200), refused (503 busy, with its message) or closed by its own client;
anything else (an error, a timeout, a stream without an end) is counted as lost. Each server prints MLX's active
and cached memory and its resident set every few seconds; the report compares the figures after warm-up (the
first fifth of the run) with the end of the run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import openai

TESTS = Path(__file__).resolve().parent.parent / "tests"
# Runs the server in a process that also prints its memory every PERIOD seconds (one JSON line on stdout).
WRAPPER = """
import json, os, sys, threading, time
import mlx.core as mx
from mlx_gemma3.server import main

def watch(period):
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        rss = int(open("/proc/self/statm").read().split()[1]) * page
        sample = {"t": time.time(), "active": mx.get_active_memory(), "cache": mx.get_cache_memory(), "rss": rss}
        print(json.dumps(sample), flush=True)
        time.sleep(period)

threading.Thread(target=watch, args=(float(sys.argv[1]),), daemon=True).start()
sys.exit(main(sys.argv[2:]))
"""
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["name", "count"],
}
KINDS = ("long", "image", "constrained", "short", "speculative", "disconnect")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=20000, help="stop after this many requests")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--period", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args()


def tiny_model(folder: Path) -> Path:
    """The tests' tiny multimodal model (random weights, a trained tiny tokenizer, Gemma's chat template)."""
    sys.path.insert(0, str(TESTS))
    from conftest import FIXTURES, SPM_IMAGE_TOKENS, convert, tiny_multimodal_model
    from spm_fixture import train_tokenizer

    hf = tiny_multimodal_model(seed=6, image_tokens=SPM_IMAGE_TOKENS, final_logit_softcapping=2.0)
    hf.save_pretrained(folder / "hf")
    train_tokenizer(folder / "hf")
    shutil.copyfile(FIXTURES / "gemma3_chat_template.jinja", folder / "hf" / "chat_template.jinja")
    return convert(folder / "hf", folder / "mlx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process whose memory samples are collected as they come."""

    def __init__(self, folder: Path, period: float, *flags: str):
        self.port, self.samples = free_port(), []
        command = [sys.executable, "-c", WRAPPER, str(period), "--model", str(folder), "--port", str(self.port)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([*command, *flags], stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        threading.Thread(target=self.read_samples, daemon=True).start()
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0, timeout=300
        )
        deadline = time.time() + 120
        while True:
            try:
                self.client.models.list()
                return
            except (openai.APIError, ValueError):
                if self.process.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start: {flags}") from None
                time.sleep(0.5)

    def read_samples(self) -> None:
        for line in self.process.stdout:
            if line.startswith("{"):
                self.samples.append(json.loads(line))

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def image_url(rng: random.Random) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), tuple(rng.randrange(256) for _ in range(3))).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def words(rng: random.Random, n: int) -> str:
    pool = "river mountain quiet engine silver garden letter window market harbor winter lantern orchard".split()
    return " ".join(rng.choice(pool) for _ in range(n))


def request(kind: str, rng: random.Random, plain: Server, speculative: Server) -> list[str]:
    """Send one request of this kind (two for an image conversation); the outcome of each."""
    if kind == "image":
        turn = [{"type": "image_url", "image_url": {"url": image_url(rng)}}, {"type": "text", "text": "What is it?"}]
        messages = [{"role": "user", "content": turn}]
        first, reply = chat(plain, messages, max_tokens=8)
        if first != "answered":
            return [first]
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        return [first, chat(plain, messages, max_tokens=8)[0]]
    if kind == "disconnect":
        server = rng.choice([plain, speculative])
        return [streamed(server, [{"role": "user", "content": words(rng, 20)}], 200, close_after=3)]
    if kind == "long":
        return [streamed(plain, [{"role": "user", "content": words(rng, 130)}], 16)]
    if kind == "constrained":
        format_ = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
        return [chat(plain, [{"role": "user", "content": words(rng, 12)}], 24, response_format=format_)[0]]
    if kind == "speculative":
        text = words(rng, 8)
        return [streamed(speculative, [{"role": "user", "content": f"{text} {text} {text}"}], 32)]
    return [streamed(plain, [{"role": "user", "content": words(rng, 10)}], rng.randint(4, 40))]


def outcome_of(error: Exception) -> str:
    if isinstance(error, openai.APIStatusError) and error.status_code == 503 and "busy" in str(error):
        return "refused"
    return f"lost: {type(error).__name__}: {str(error)[:120]}"


def chat(server: Server, messages: list, max_tokens: int, **extra) -> tuple[str, str]:
    try:
        reply = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, **extra)
    except Exception as e:  # noqa: BLE001 — every failure is counted by kind
        return outcome_of(e), ""
    ok = reply.choices[0].finish_reason in ("stop", "length")
    return ("answered" if ok else f"lost: finish {reply.choices[0].finish_reason}"), reply.choices[0].message.content


def streamed(server: Server, messages: list, max_tokens: int, close_after: int | None = None) -> str:
    try:
        stream = server.client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=max_tokens, stream=True
        )
        chunks, finish = 0, None
        for chunk in stream:
            chunks += 1
            finish = chunk.choices[0].finish_reason or finish if chunk.choices else finish
            if close_after is not None and chunks == close_after:
                stream.close()
                return "closed by its client"
    except Exception as e:  # noqa: BLE001
        return outcome_of(e)
    return "answered" if finish in ("stop", "length") else "lost: the stream ended without a finish reason"


def run_clients(args, plain: Server, speculative: Server) -> Counter:
    outcomes, lock, sent = Counter(), threading.Lock(), [0]
    deadline = time.time() + args.minutes * 60

    def client(number: int) -> None:
        rng = random.Random(number)
        while time.time() < deadline:
            with lock:
                if sent[0] >= args.max_requests:
                    return
                sent[0] += 1
            kind = KINDS[rng.randrange(len(KINDS))]
            for result in request(kind, rng, plain, speculative):
                with lock:
                    outcomes[(kind, result)] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def memory(samples: list[dict], start: float, end: float) -> dict:
    """Memory after warm-up (the first fifth) against the last fifth of the run, in MB."""
    span = end - start
    warm = [s for s in samples if start + 0.2 * span <= s["t"] <= start + 0.4 * span]
    late = [s for s in samples if s["t"] >= end - 0.2 * span]
    out = {"per_minute_mb": per_minute(samples, start, end)}
    for key in ("active", "cache", "rss"):
        out[key] = {
            "after_warm_up_mb": statistics.mean(s[key] for s in warm) / 2**20 if warm else None,
            "end_mb": statistics.mean(s[key] for s in late) / 2**20 if late else None,
            "peak_mb": max(s[key] for s in samples) / 2**20,
        }
    return out


def per_minute(samples: list[dict], start: float, end: float) -> list[dict]:
    """Each minute's mean active memory and resident set, in MB."""
    minutes = []
    for minute in range(int((end - start) // 60) + 1):
        inside = [s for s in samples if start + 60 * minute <= s["t"] < start + 60 * (minute + 1)]
        if inside:
            means = {key: round(statistics.mean(s[key] for s in inside) / 2**20, 2) for key in ("active", "rss")}
            minutes.append({"minute": minute + 1, **means})
    return minutes


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = tiny_model(Path(scratch))
        flags = ("--max-batch", "4", "--max-queue", "4", "--prefill-step-size", "64")
        plain = Server(folder, args.period, *flags)
        speculative = Server(folder, args.period, *flags, "--prompt-lookup", "3")
        try:
            start = time.time()
            outcomes = run_clients(args, plain, speculative)
            end = time.time()
            time.sleep(args.period)
        finally:
            plain.close()
            speculative.close()
    lost = sum(n for (_, result), n in outcomes.items() if result.startswith("lost"))
    results = {
        "minutes": (end - start) / 60,
        "requests": sum(outcomes.values()),
        "lost": lost,
        "outcomes": {f"{kind}: {result}": n for (kind, result), n in sorted(outcomes.items())},
        "memory": {"plain": memory(plain.samples, start, end), "speculative": memory(speculative.samples, start, end)},
    }
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

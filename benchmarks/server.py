"""The server under real clients: a multi-turn chat replayed with and without the prompt cache, a long prompt arriving
while others stream (the stall), the cost of a row joining a batch, and 1/4/8 clients at once.

    python benchmarks/server.py [--model MODEL] [--parts replay,stall,admission,concurrency] [--history 2000]
        [--max-tokens 48] [--clients 1,4,8] [--requests-per-client 2] [--long-prompt 2000] [--mlx-lm]
        [--json results/server.json]

Without --model the demo 270M GGUF. Every server is a real process on 127.0.0.1 driven by the `openai` client,
streaming, greedy. Replay: a chat is sent the way chat clients send it, the whole history every turn, until the
prompt reaches --history tokens; time to first token (TTFT, from sending the request to the first streamed
token) per turn with our prompt cache, without it (--prompt-cache-size 0) and, with --mlx-lm, mlx-lm's server on
the same folder. Concurrency: N clients each send --requests-per-client requests at once; aggregate generated
tokens per second and TTFT p50/p95, for our server batching (--max-batch 8) and one request at a time
(--max-batch 1). On MLX's CPU backend a decode step is compute-bound, so a batch of 8 costs about 8 single steps
and batching cannot raise throughput here; on a Mac's GPU a decode step is bound by reading the weights, which a
batch shares, so the same script shows what batching buys there.

Stall: --streams clients stream long replies; once each has a few tokens, a --long-prompt-token prompt arrives.
The running streams' longest gap between two tokens while it is read, as a share of its time to first token
(the loop reads a prompt a --prefill-step-size chunk per iteration, so the share is about chunk / prompt; a
server that reads the whole prompt before the next token would give about 1). Measured twice: plain requests,
and with --prompt-lookup on (every request speculative, the arriving one included).
Admission (in this process, no server): the time for a row to join a batch of 1 and of 8 rows that hold
--long-prompt tokens each (the batch's buffers evaluated), with free room (the usual case), when the room
doubles, and by merging every row again (what joining cost before the engine wrote rows in place).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

import mlx_gemma3
from mlx_gemma3.model.sources import model_folder

WORDS = (
    "river mountain quiet engine silver garden letter window market harbor winter lantern orchard signal "
    "copper meadow canvas thunder pocket ribbon compass marble velvet harvest anchor"
).split()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder, .gguf or repo id (default: the demo 270M GGUF)")
    parser.add_argument(
        "--parts", default="replay,stall,admission,concurrency", help="what to measure, comma-separated"
    )
    parser.add_argument(
        "--long-prompt", type=int, default=2000, help="tokens of the prompt that arrives (stall, admission)"
    )
    parser.add_argument("--streams", type=int, default=2, help="streams running when the long prompt arrives")
    parser.add_argument("--history", type=int, default=2000, help="replay until the prompt has this many tokens")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per reply")
    parser.add_argument("--sentences", type=int, default=8, help="sentences per user message (about 16 tokens each)")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients to measure, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--mlx-lm", action="store_true", help="also replay against mlx-lm's server (its prompt cache)")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args()


def user_message(turn: int, count: int = 8) -> str:
    rng = random.Random(turn)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(count)]
    return f"Note {turn}: " + " ".join(sentences) + " Summarise the note in one line."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A server process on 127.0.0.1 and an openai client for it."""

    def __init__(self, command: list[str], port: int):
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.process = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600
        )
        deadline = time.time() + 300
        while True:
            try:
                self.client.models.list()
                return
            except (openai.APIError, ValueError):  # not listening yet, or answering before it is ready
                if self.process.poll() is not None or time.time() > deadline:
                    self.close()
                    raise SystemExit(f"the server did not start: {' '.join(command)}") from None
                time.sleep(0.5)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def ours(folder: str, *flags: str) -> Served:
    port = free_port()
    return Served([sys.executable, "-m", "mlx_gemma3.server", "--model", folder, "--port", str(port), *flags], port)


def mlx_lm(folder: str) -> Served:
    port = free_port()
    return Served([sys.executable, "-m", "mlx_lm.server", "--model", folder, "--port", str(port)], port)


def ask(client, messages: list[dict], max_tokens: int) -> dict:
    """One streamed request: TTFT, the reply, its usage (None where the server gives none)."""
    tic, first, text, usage = time.perf_counter(), None, "", None
    stream = client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        if chunk.choices and (chunk.choices[0].delta.content or "") and first is None:
            first = time.perf_counter() - tic
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    return {
        "ttft": first if first is not None else time.perf_counter() - tic,
        "text": text,
        "usage": usage,
        "seconds": time.perf_counter() - tic,
    }


def replay(served: Served, turns: int | None, history: int, max_tokens: int, sentences: int) -> list[dict]:
    """The chat, turn by turn (until `turns` turns, or until the prompt reaches `history` tokens)."""
    messages, results = [], []
    for turn in range(turns or 1000):
        messages.append({"role": "user", "content": user_message(turn, sentences)})
        result = ask(served.client, messages, max_tokens)
        messages.append({"role": "assistant", "content": result["text"]})
        usage = result["usage"] or {}
        results.append(
            {
                "turn": turn + 1,
                "ttft": result["ttft"],
                "prompt_tokens": usage.get("prompt_tokens"),
                "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            }
        )
        print(
            f"  turn {turn + 1}: prompt {results[-1]['prompt_tokens']}, cached {results[-1]['cached_tokens']}, "
            f"TTFT {result['ttft']:.3f}s",
            flush=True,
        )
        if turns is None and (usage.get("prompt_tokens") or 0) >= history:
            break
    return results


def concurrent(served: Served, clients: int, per_client: int, max_tokens: int) -> dict:
    ttfts, tokens, lock = [], [], threading.Lock()
    start = threading.Barrier(clients)

    def client_loop(c: int) -> None:
        start.wait()
        for r in range(per_client):
            message = [{"role": "user", "content": user_message(100 + c * per_client + r)}]
            result = ask(served.client, message, max_tokens)
            with lock:
                ttfts.append(result["ttft"])
                tokens.append(result["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    tic = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - tic
    ttfts.sort()
    return {
        "clients": clients,
        "tokens": sum(tokens),
        "seconds": wall,
        "tokens_per_s": sum(tokens) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
    }


def replayed(served: Served, turns: int | None, args) -> list[dict]:
    try:
        return replay(served, turns, args.history, args.max_tokens, args.sentences)
    finally:
        served.close()


def run_replays(folder: str, args) -> dict:
    print("replay with the prompt cache", flush=True)
    results = {"cache": replayed(ours(folder), None, args)}
    turns = len(results["cache"])
    print("replay without the prompt cache", flush=True)
    results["no_cache"] = replayed(ours(folder, "--prompt-cache-size", "0"), turns, args)
    if args.mlx_lm:
        print("replay against mlx-lm's server", flush=True)
        results["mlx_lm"] = replayed(mlx_lm(folder), turns, args)
    return results


def run_concurrency(folder: str, args) -> dict:
    results = {}
    for label, batch in (("batched", "8"), ("one_at_a_time", "1")):
        served, results[label] = ours(folder, "--max-batch", batch), []
        try:
            ask(served.client, [{"role": "user", "content": "warm up"}], 4)
            for clients in [int(c) for c in args.clients.split(",")]:
                row = concurrent(served, clients, args.requests_per_client, args.max_tokens)
                print(
                    f"  {label}, {clients} clients: {row['tokens_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50']:.3f}s "
                    f"p95 {row['ttft_p95']:.3f}s",
                    flush=True,
                )
                results[label].append(row)
        finally:
            served.close()
    return results


def long_prompt(tokens: int, processor) -> str:
    """A user message of about `tokens` tokens (rendered in the chat template)."""
    text, turn = "", 0
    while len(processor.tokenizer.encode(text)) < tokens - 12:
        text += user_message(1000 + turn, 1) + " "
        turn += 1
    return text


def stream_times(client, prompt: str, max_tokens: int, times: list, stop: threading.Event) -> None:
    """Stream a completion, appending each token's arrival time, until it ends or `stop` is set."""
    stream = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if stop.is_set():
            stream.close()
            return


def stall(folder: str, args, processor, *flags: str) -> dict:
    """The running streams' longest gap between tokens while a long prompt is read, against its TTFT."""
    served = ours(folder, "--prompt-cache-size", "0", *flags)
    try:
        ask(served.client, [{"role": "user", "content": "warm up"}], 4)
        stop, threads, times = threading.Event(), [], [[] for _ in range(args.streams)]
        for i in range(args.streams):
            prompt = f"Story {i}: once upon a time, in a quiet harbor town, there lived"
            thread = threading.Thread(target=stream_times, args=(served.client, prompt, 4096, times[i], stop))
            thread.start()
            threads.append(thread)
        while min(len(t) for t in times) < 3:
            if not all(thread.is_alive() for thread in threads):
                raise SystemExit("a running stream ended before the long prompt was sent")
            time.sleep(0.05)
        sent = time.perf_counter()
        result = ask(served.client, [{"role": "user", "content": long_prompt(args.long_prompt, processor)}], 1)
        first = sent + result["ttft"]
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join()
        gaps = [
            b - a
            for stamps in times
            for a, b in zip(stamps, stamps[1:])
            if b > sent and a < first  # the gap overlaps the time the prompt was read
        ]
        longest = max(gaps, default=float("nan"))
        ttft = result["ttft"]
        tokens = (result["usage"] or {}).get("prompt_tokens")
        print(
            f"  {' '.join(flags) or 'plain'}: prompt {tokens} tokens, TTFT {ttft:.2f}s, longest gap {longest:.2f}s, "
            f"share {longest / ttft:.3f}",
            flush=True,
        )
        return {
            "flags": list(flags),
            "prompt_tokens": tokens,
            "ttft": ttft,
            "longest_gap": longest,
            "share": longest / ttft,
        }
    finally:
        served.close()


def run_stalls(folder: str, args) -> list[dict]:
    _, processor = mlx_gemma3.load(folder)
    print(f"stall: {args.streams} streams running, a {args.long_prompt}-token prompt arrives", flush=True)
    return [stall(folder, args, processor), stall(folder, args, processor, "--prompt-lookup", "3")]


def admission(folder: str, args) -> dict:
    """Seconds for a short row to join a batch of 1 and of 8 rows holding --long-prompt tokens each."""
    import mlx.core as mx

    from mlx_gemma3.generation.step import prefill
    from mlx_gemma3.model.cache import BatchCache

    model, _ = mlx_gemma3.load(folder)
    ids = [2, *range(1000, 1000 + args.long_prompt - 1)]
    long, short = model.make_cache(), model.make_cache()
    print(f"admission: prefilling {args.long_prompt} tokens once (the rows are copies)", flush=True)
    prefill(model, ids, long, 512)
    prefill(model, ids[:16], short, 512)

    def batch_of(rows: int, room: int) -> list:
        batch = [BatchCache.merge([layer.copy()]) for layer in long]
        for _ in range(room - 1):
            for layer, single in zip(batch, long):
                assert layer.join(single.copy())
        for _ in range(room - rows):
            for layer in batch:
                layer.leave(layer.batch_size - 1)
        evaluate(batch)
        return batch

    def evaluate(batch: list) -> None:
        mx.eval([part for layer in batch for part in (*layer.inner.keys, *layer.inner.values)])

    def timed(join, rows: int, room: int) -> float:
        best = float("inf")
        for _ in range(3):
            batch, row = batch_of(rows, room), [layer.copy() for layer in short]
            mx.eval([layer.state for layer in row])
            tic = time.perf_counter()
            batch = join(batch, row)
            evaluate(batch)
            best = min(best, time.perf_counter() - tic)
        return best

    def in_place(batch, row):
        return [layer if layer.join(single) else BatchCache.merge([layer, single]) for layer, single in zip(batch, row)]

    def merged(batch, row):
        return [BatchCache.merge([layer, single]) for layer, single in zip(batch, row)]

    results = {}
    for rows in (1, 8):
        results[rows] = {
            "free_room": timed(in_place, rows, 2 * rows),
            "room_doubles": timed(in_place, rows, rows),
            "merge_all_rows": timed(merged, rows, rows),
        }
        print(
            f"  batch of {rows}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in results[rows].items()), flush=True
        )
    return {str(rows): row for rows, row in results.items()}


def report(results: dict) -> None:
    if "replay" in results:
        report_replays(results["replay"])
    if "stall" in results:
        print("\n| requests | prompt tokens | TTFT | running streams' longest gap | share (target ≤ 0.35) |")
        print("|---|---|---|---|---|")
        for row in results["stall"]:
            print(
                f"| {' '.join(row['flags']) or 'plain'} | {row['prompt_tokens']} | {row['ttft']:.2f}s | "
                f"{row['longest_gap']:.2f}s | {row['share']:.3f} |"
            )
    if "admission" in results:
        rows = results["admission"]
        print("\n| join into | free room | room doubles | merge every row (before) |")
        print("|---|---|---|---|")
        for size, row in rows.items():
            print(
                f"| {size} row(s) | {row['free_room'] * 1000:.1f} ms | {row['room_doubles'] * 1000:.1f} ms | "
                f"{row['merge_all_rows'] * 1000:.1f} ms |"
            )
        ratio = rows["8"]["free_room"] / rows["1"]["free_room"]
        print(f"\njoin into 8 rows / into 1 row, free room: {ratio:.2f} (target ≤ 1.5)")
    if "concurrency" in results:
        report_concurrency(results["concurrency"])


def report_replays(replays: dict) -> None:
    print(
        "\n| turn | prompt tokens | cached | TTFT cache | TTFT no cache | ratio |"
        + (" TTFT mlx-lm |" if "mlx_lm" in replays else "")
    )
    print("|---|---|---|---|---|---|" + ("---|" if "mlx_lm" in replays else ""))
    for i, with_cache in enumerate(replays["cache"]):
        without = replays["no_cache"][i]
        line = (
            f"| {with_cache['turn']} | {with_cache['prompt_tokens']} | {with_cache['cached_tokens']} | "
            f"{with_cache['ttft']:.3f}s | {without['ttft']:.3f}s | {with_cache['ttft'] / without['ttft']:.2f} |"
        )
        if "mlx_lm" in replays:
            line += f" {replays['mlx_lm'][i]['ttft']:.3f}s |"
        print(line)
    last = replays["cache"][-1]["ttft"] / replays["no_cache"][-1]["ttft"]
    print(
        f"\nlast turn: TTFT with the cache = {last:.3f} × without (target ≤ 0.15: {'met' if last <= 0.15 else 'missed'})"
    )


def report_concurrency(concurrency: dict) -> None:
    print(
        "\n| clients | batched tok/s | one at a time tok/s | ratio | TTFT p50 / p95 batched | TTFT p50 / p95 one at a time |"
    )
    print("|---|---|---|---|---|---|")
    for batched, single in zip(concurrency["batched"], concurrency["one_at_a_time"]):
        print(
            f"| {batched['clients']} | {batched['tokens_per_s']:.1f} | {single['tokens_per_s']:.1f} | "
            f"{batched['tokens_per_s'] / single['tokens_per_s']:.2f} | {batched['ttft_p50']:.2f}s / {batched['ttft_p95']:.2f}s | "
            f"{single['ttft_p50']:.2f}s / {single['ttft_p95']:.2f}s |"
        )


def main() -> None:
    args = parse_args()
    folder = model_folder(args.model or mlx_gemma3.demo_gguf())
    parts, results = args.parts.split(","), {"model": str(folder)}
    runs = {"replay": run_replays, "stall": run_stalls, "admission": admission, "concurrency": run_concurrency}
    for part in parts:
        results[part] = runs[part](folder, args)
        if args.json:  # written after each part: a long run keeps what it measured
            args.json.write_text(json.dumps(results, indent=1))
    report(results)


if __name__ == "__main__":
    main()

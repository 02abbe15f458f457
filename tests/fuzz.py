"""Seeded fuzzing of every reader of outside data (GGUF, safetensors, config.json, tokenizer files and chat
templates, images): tests/test_fuzz.py runs a bounded number of cases, benchmarks/fuzz.py as many as asked.

Each reader runs in its own child process (`python tests/fuzz.py READER --seed S --cases N --work DIR`), so a
crash or hang is seen as one and cannot take the test run with it. A case passes when it ends in Gemma3Error
(one line) or is accepted with a valid result; anything else, a case past its time limit, or a case that raises
the process's peak memory by more than its input could explain is a failure."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np

CASE_SECONDS = 30  # one case; a hang ends in SIGALRM
MEMORY_SLACK = 256 * 2**20  # peak growth a case may cause beyond MEMORY_PER_INPUT_BYTE × its input's size
MEMORY_PER_INPUT_BYTE = 64
TINY = dict(hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64, layers=2, window=16, context=128)
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class Case(NamedTuple):
    name: str
    run: Callable[[], None]  # raises Gemma3Error, or returns after checking that the result is valid
    input_bytes: int


class Tally(NamedTuple):
    reader: str
    cases: int
    clean_errors: int
    accepted: int
    failures: list[str]


# ---------------------------------------------------------------- running cases


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"no answer within {CASE_SECONDS} s")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(case: Case) -> tuple[str, str]:
    """('error' | 'accepted' | 'failure', detail)."""
    from mlx_gemma3.errors import Gemma3Error

    before = peak_bytes()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        case.run()
        outcome = ("accepted", "")
    except Gemma3Error as e:
        message = str(e)
        outcome = ("error", message) if message and "\n" not in message else ("failure", f"not one line: {message!r}")
    except BaseException as e:  # noqa: BLE001 — anything else is what the fuzzing looks for
        if isinstance(e, KeyboardInterrupt):
            raise
        outcome = ("failure", f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        signal.alarm(0)
    grown = peak_bytes() - before
    if grown > MEMORY_SLACK + MEMORY_PER_INPUT_BYTE * case.input_bytes:
        outcome = ("failure", f"peak memory grew by {grown / 2**20:.0f} MB on a {case.input_bytes}-byte input")
    return outcome


def run_reader(reader: str, seed: int, cases: int, work: Path, verbose: bool = False) -> Tally:
    counts = {"error": 0, "accepted": 0}
    failures = []
    done = 0
    for case in READERS[reader](random.Random(seed), cases, work):
        print(f"case {case.name}", file=sys.stderr, flush=True)  # the last line names a case that crashed
        kind, detail = run_case(case)
        done += 1
        if kind == "failure":
            failures.append(f"{case.name}: {detail}")
        else:
            counts[kind] += 1
        if verbose:
            print(f"  {kind}: {detail[:200]}", file=sys.stderr, flush=True)
    return Tally(reader, done, counts["error"], counts["accepted"], failures)


# ---------------------------------------------------------------- mutations


def flip(data: bytes, rng: random.Random, start: int, stop: int, count: int) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        at = rng.randrange(start, stop)
        out[at] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
    return bytes(out)


def mutate(data: bytes, rng: random.Random, start: int, stop: int) -> tuple[str, bytes]:
    """One random damage within [start, stop): flipped bytes, inserted or deleted bytes, or a truncation."""
    kind = rng.choice(["flip", "flip", "insert", "delete", "truncate", "set"])
    at = rng.randrange(start, stop)
    if kind == "flip":
        return f"flip@{at}", flip(data, rng, at, min(stop, at + 64), rng.randint(1, 4))
    if kind == "insert":
        return f"insert@{at}", data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]
    if kind == "delete":
        return f"delete@{at}", data[:at] + data[at + rng.randint(1, 16) :]
    if kind == "truncate":
        return f"truncate@{at}", data[:at]
    value = rng.choice([0, 1, 0xFF, 0x7F, 0x80, 0x9A])
    return f"set@{at}={value:#x}", data[:at] + bytes([value]) * rng.randint(1, 8) + data[at + 1 :]


def one_line_cli(argv: list[str], main) -> None:
    """Run a CLI's main in process: exit 0, or exit 1 with one `error:` line (raised as Gemma3Error)."""
    from mlx_gemma3.errors import Gemma3Error

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("error: ")]
    if code == 0:
        return
    if code == 1 and len(lines) == 1:
        raise Gemma3Error(lines[0].removeprefix("error: "))
    raise AssertionError(f"exit {code} with stderr {err.getvalue()[-300:]!r}")


def nothing_written(out: Path) -> None:
    left = [p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}"))]
    if left:
        raise AssertionError(f"an error left {left} behind")


def check_model_runs(folder: Path) -> None:
    """A folder that load() accepts must run: logits of the right shape for a short prompt."""
    import mlx.core as mx

    import mlx_gemma3

    model, processor = mlx_gemma3.load(folder)
    ids = [2, 5, 6, 7] if processor.tokenizer is None else processor.tokenizer.encode("Hello world")
    logits = model(mx.array([ids]))
    mx.eval(logits)
    if logits.shape[:2] != (1, len(ids)):
        raise AssertionError(f"logits shape {logits.shape} for {len(ids)} tokens")


# ---------------------------------------------------------------- a tiny GGUF written with the gguf package


def tiny_gguf(path: Path, work: Path, extra=None) -> Path:
    """A small Gemma 3 GGUF as llama.cpp lays it out: trained SentencePiece pieces, random F32/Q8_0 tensors,
    a chat template; `extra(writer)` adds metadata."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2
    from spm_fixture import train_tokenizer

    t = TINY
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "gemma3")
    sizes = {
        "context_length": t["context"],
        "embedding_length": t["hidden"],
        "block_count": t["layers"],
        "feed_forward_length": t["intermediate"],
        "attention.head_count": t["heads"],
        "attention.head_count_kv": t["kv_heads"],
        "attention.key_length": t["head_dim"],
        "attention.value_length": t["head_dim"],
        "attention.sliding_window": t["window"],
    }
    for key, value in sizes.items():
        writer.add_uint32(f"gemma3.{key}", value)
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32("gemma3.rope.freq_base", 1_000_000.0)
    spm = work / "spm"
    spm.mkdir(exist_ok=True)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(train_tokenizer(spm).read_bytes())
    types = [3 if p.type == p.UNKNOWN else int(p.type) for p in proto.pieces]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece.replace("\u2581", " ") if k == 4 else p.piece for p, k in zip(proto.pieces, types)])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types(types)
    for key, i in (("unknown", 3), ("bos", 2), ("eos", 1), ("padding", 0)):
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id", i)
    writer.add_chat_template(TEMPLATE)
    if extra:
        extra(writer)
    vocab, h, hd, inter = len(proto.pieces), t["hidden"], t["head_dim"], t["intermediate"]
    shapes = {"token_embd": (vocab, h), "output_norm": (h,)}
    for n in range(t["layers"]):
        shapes.update(
            {
                f"blk.{n}.{k}": s
                for k, s in {
                    "attn_norm": (h,),
                    "attn_q": (t["heads"] * hd, h),
                    "attn_k": (t["kv_heads"] * hd, h),
                    "attn_v": (t["kv_heads"] * hd, h),
                    "attn_output": (h, t["heads"] * hd),
                    "attn_q_norm": (hd,),
                    "attn_k_norm": (hd,),
                    "post_attention_norm": (h,),
                    "ffn_norm": (h,),
                    "post_ffw_norm": (h,),
                    "ffn_gate": (inter, h),
                    "ffn_up": (inter, h),
                    "ffn_down": (h, inter),
                }.items()
            }
        )
    for name, shape in shapes.items():
        values = rng.standard_normal(shape).astype(np.float32) * 0.3 + (1.0 if len(shape) == 1 else 0.0)
        if name.endswith(("attn_q", "ffn_up")):
            writer.add_tensor(
                f"{name}.weight",
                gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(f"{name}.weight", values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def header_end(path: Path) -> int:
    """Where a GGUF file's tensor data starts (after header, metadata and tensor table)."""
    from mlx_gemma3.convert.gguf_file import read_gguf

    return min(t.data_offset for t in read_gguf(path).tensors)


def layout(path: Path) -> dict[str, int]:
    """Byte offsets of a few fields of a valid GGUF, for targeted damage: array counts, value types, tensor
    table entries (read with the gguf package's reader, which keeps them)."""
    import gguf

    reader = gguf.GGUFReader(path)
    spots = {}
    for name, f in reader.fields.items():
        key_end = f.offset + 8 + len(name)
        spots[f"type:{name}"] = key_end
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            spots[f"count:{name}"] = key_end + 8
    start = header_end(path)
    for t in reader.tensors:
        dims_at = t.field.offset + 8 + len(t.name) + 4
        spots[f"dim0:{t.name}"] = dims_at
        spots[f"type:{t.name}"] = dims_at + 8 * len(t.shape)
        spots[f"offset:{t.name}"] = dims_at + 8 * len(t.shape) + 4
    spots["data"] = start
    return spots


def targeted(data: bytes, spots: dict[str, int], rng: random.Random) -> tuple[str, bytes]:
    """Damage a chosen field: a huge or zero array count, an unknown value or tensor type, an absurd dimension,
    a tensor offset past the end, misaligned, or equal to another tensor's (overlap)."""
    key = rng.choice(sorted(k for k in spots if k != "data"))
    at = spots[key]
    what, _ = key.split(":", 1)
    if what == "count":
        value = rng.choice([0, 2**62, 2**32 + 1, 2**31, 10**12])
        return f"{key}={value}", data[:at] + struct.pack("<Q", value) + data[at + 8 :]
    if what == "type":
        value = rng.choice([13, 99, 2**31, 9, 8, 2, 39, 41])
        return f"{key}={value}", data[:at] + struct.pack("<I", value) + data[at + 4 :]
    if what == "dim0":
        value = rng.choice([0, 2**40, 2**63, 31, 10**12])
        return f"{key}={value}", data[:at] + struct.pack("<Q", value) + data[at + 8 :]
    others = [k for k in spots if k.startswith("offset:") and k != key]
    other = struct.unpack_from("<Q", data, spots[rng.choice(others)])[0] if others else 0
    value = rng.choice([2**40, len(data), 3, other, 2**64 - 32])
    return f"{key}={value}", data[:at] + struct.pack("<Q", value) + data[at + 8 :]


def nested_arrays(writer) -> None:
    writer.add_array("fuzz.nested", [[[1, 2], [3]], [[4]], [[5, 6, 7]]])


def gguf_tiny_cases(rng: random.Random, count: int, work: Path) -> Iterator[Case]:
    """The tiny GGUF, damaged in header, metadata and tensor table (random and targeted), converted by the CLI."""
    from mlx_gemma3.convert.__main__ import main

    seed = tiny_gguf(work / "tiny.gguf", work)
    data = seed.read_bytes()
    end, spots = header_end(seed), layout(seed)
    yield Case("original", _gguf_cli(main, seed, work / "out-original"), len(data))
    nested = tiny_gguf(work / "nested.gguf", work, nested_arrays)
    yield Case("nested arrays", _gguf_cli(main, nested, work / "out-nested"), nested.stat().st_size)
    for n in range(count):
        name, damaged = targeted(data, spots, rng) if n % 3 == 0 else mutate(data, rng, 0, end)
        path = work / f"case{n}.gguf"
        path.write_bytes(damaged)
        yield Case(name, _gguf_cli(main, path, work / f"out{n}"), len(damaged))


def _gguf_cli(main, path: Path, out: Path) -> Callable[[], None]:
    """Convert through the CLI: one error line and nothing written, or a folder that loads and runs."""

    def run():
        from mlx_gemma3.errors import Gemma3Error

        try:
            one_line_cli(["--gguf", str(path), "--mlx-path", str(out)], main)
        except Gemma3Error:
            nothing_written(out)
            raise
        check_model_runs(out)
        shutil.rmtree(out)

    return run


# ---------------------------------------------------------------- the real 270M's header


# Tokens of the real file whose 4th byte becomes 0x9a (invalid UTF-8 there): the three tracebacks of issue 22
# (`UnicodeDecodeError: 'utf-8' codec can't decode byte 0x9a in position 3`), now one-line errors.
BROKEN_TOKENS = (1000, 50_000, 200_000)


def real_head() -> tuple[bytes, int, int]:
    """(the real 270M's first bytes through its tensor table, where its tensor data starts, its full size)."""
    import mlx_gemma3

    path = mlx_gemma3.demo_gguf()  # assembled once into the model cache ($MLX_GEMMA3_CACHE)
    end = header_end(path)
    with open(path, "rb") as f:
        head = f.read(end)
    return head, end, path.stat().st_size


def long_token(head: bytes, index: int) -> tuple[int, int]:
    """(index, byte offset of the text) of the first token at or after `index` longer than 3 bytes in the real
    file (walking tokenizer.ggml.tokens)."""
    at = head.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4 + 8
    for i in range(1 << 20):
        length = struct.unpack_from("<Q", head, at)[0]
        if i >= index and length > 3:
            return i, at + 8
        at += 8 + length
    raise AssertionError("no such token")


def gguf_real_cases(rng: random.Random, count: int, work: Path) -> Iterator[Case]:
    """The real 270M's header, metadata and tensor table damaged; its tensor data left out (a sparse file of the
    full size), so each case reads and checks everything the converter checks before writing, in ~2 s."""
    head, end, size = real_head()
    for index in BROKEN_TOKENS:
        index, at = long_token(head, index)
        yield Case(
            f"token {index} byte 3 = 0x9a", _read_real(work, head[: at + 3] + b"\x9a" + head[at + 4 :], size), end
        )
    for _ in range(count):
        name, damaged = mutate(head, rng, 0, end)
        yield Case(name, _read_real(work, damaged, size), end)


def _read_real(work: Path, head: bytes, size: int) -> Callable[[], None]:
    def run():
        from mlx_gemma3.convert.gguf import read_conversion

        path = work / "case.gguf"
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(max(size, len(head)))
        read_conversion(path)

    return run


# ---------------------------------------------------------------- safetensors, index, config.json, tokenizer, template


def converted_tiny(work: Path) -> Path:
    """An MLX folder converted from the tiny GGUF: model.safetensors, config.json, tokenizer.model, template."""
    from mlx_gemma3.convert.gguf import convert_gguf

    with contextlib.redirect_stderr(io.StringIO()):
        return convert_gguf(tiny_gguf(work / "tiny.gguf", work), work / "seed")


def folder_case(seed: Path, work: Path, name: str, damage: Callable[[Path], None]) -> Case:
    """A copy of the seed folder, damaged, then loaded and run."""
    folder = work / "case"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(seed, folder)
    damage(folder)
    size = sum(p.stat().st_size for p in folder.iterdir())
    return Case(name, lambda: check_model_runs(folder), size)


def safetensors_cases(rng: random.Random, count: int, work: Path) -> Iterator[Case]:
    """model.safetensors damaged (header length, JSON, dtypes, shapes, offsets, bytes) and sharded indexes."""
    seed = converted_tiny(work)
    data = (seed / "model.safetensors").read_bytes()
    header_len = struct.unpack_from("<Q", data)[0]
    header = json.loads(data[8 : 8 + header_len])
    for name, damage in index_damages(header):
        yield folder_case(seed, work, name, damage)
    for n in range(count):
        if n % 2:
            name, damaged = mutate(data, rng, 0, 8 + header_len)
        else:
            name, edited = edit_header(header, rng)
            body = json.dumps(edited).encode()
            damaged = struct.pack("<Q", len(body)) + body + data[8 + header_len :]
        yield folder_case(seed, work, name, lambda f, d=damaged: (f / "model.safetensors").write_bytes(d))


def edit_header(header: dict, rng: random.Random) -> tuple[str, dict]:
    edited = json.loads(json.dumps(header))
    key = rng.choice(sorted(k for k in edited if k != "__metadata__"))
    entry = edited[key]
    field = rng.choice(["dtype", "shape", "data_offsets", "drop", "type"])
    if field == "dtype":
        entry["dtype"] = rng.choice(["F64", "I8", "Q4", "", "BOOL", "F8_E4M3", 7])
    elif field == "shape":
        entry["shape"] = rng.choice([[10**12, 64], [-1, 64], [0], [], [2**63], "64", [1.5, 2], [3] * 40])
    elif field == "data_offsets":
        start, stop = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[stop, start], [0, 2**40], [-8, stop], [start, stop - 1], [0, 4], [start]])
    elif field == "drop":
        del edited[key]
    else:
        edited[key] = rng.choice([None, [], "x", 3])
    return f"{field} of {key}", edited


def index_damages(header: dict):
    keys = sorted(k for k in header if k != "__metadata__")

    def index(weight_map, text=None):
        def damage(folder: Path):
            body = text if text is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
            (folder / "model.safetensors.index.json").write_text(body)

        return damage

    whole = {k: "model.safetensors" for k in keys}
    yield "index naming a missing shard", index({**whole, keys[0]: "model-00002-of-00002.safetensors"})
    yield "index missing a key", index({k: v for k, v in whole.items() if k != keys[1]})
    yield "index naming a key not in any shard", index({**whole, "model.extra.weight": "model.safetensors"})
    yield "index not JSON", index(None, "{weight_map: ")
    yield "index weight_map a list", index(None, json.dumps({"weight_map": ["model.safetensors"]}))
    yield "index shard path escaping the folder", index({**whole, keys[0]: "../model.safetensors"})

    def duplicate(folder: Path):
        shutil.copyfile(folder / "model.safetensors", folder / "model-00002-of-00002.safetensors")
        index({**whole, keys[0]: "model-00002-of-00002.safetensors"})(folder)

    yield "index with a key in two shards", duplicate


CONFIG_VALUES = [None, "64", -1, 0, 1.5, True, 10**12, 2**63, [], {}, "gelu", 1e308, float("nan")]


def config_cases(rng: random.Random, count: int, work: Path) -> Iterator[Case]:
    """config.json with wrong types, missing keys, absurd, zero or negative sizes, both key generations mixed."""
    seed = converted_tiny(work)
    config = json.loads((seed / "config.json").read_text())
    fixed = [
        ("vocab 10^12", {"vocab_size": 10**12}),
        ("hidden 10^12", {"hidden_size": 10**12}),
        ("layers 10^9", {"num_hidden_layers": 10**9}),
        (
            "both generations",
            {
                "rope_theta": 10_000.0,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                "sliding_window_pattern": 2,
            },
        ),
        ("legacy rope_scaling a string", {"rope_scaling": "linear"}),
        ("rope_parameters a list", {"rope_parameters": [1, 2]}),
        ("linear rope without factor", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}),
        ("text_config a string", {"model_type": "gemma3", "text_config": "x"}),
        ("vision_config a list", {"model_type": "gemma3", "text_config": {}, "vision_config": [1]}),
        ("quantization nonsense", {"quantization": {"bits": 3, "group_size": 7}}),
        ("quantization a string", {"quantization": "4bit"}),
        ("eos a string", {"eos_token_id": "1"}),
    ]
    for name, change in fixed:
        yield folder_case(seed, work, name, _config_writer({**config, **change}))
    yield folder_case(seed, work, "not JSON", lambda f: (f / "config.json").write_bytes(b'{"model_type": "gem'))
    yield folder_case(seed, work, "not UTF-8", lambda f: (f / "config.json").write_bytes(b'{"a\xff": 1}'))
    yield folder_case(seed, work, "a list", lambda f: (f / "config.json").write_text("[1, 2]"))
    keys = sorted(config)
    for n in range(count):
        edited = dict(config)
        key = rng.choice(keys + ["rope_theta", "layer_types", "rope_parameters", "final_logit_softcapping"])
        if n % 4 == 0 and key in edited:
            del edited[key]
            name = f"no {key}"
        else:
            value = rng.choice(CONFIG_VALUES)
            edited[key] = value
            name = f"{key}={value!r}"
        yield folder_case(seed, work, name, _config_writer(edited))


def _config_writer(config: dict) -> Callable[[Path], None]:
    return lambda folder: (folder / "config.json").write_text(json.dumps(config))


TEMPLATES = {
    "raises": "{{ raise_exception('no system role') }}",
    "undefined call": "{{ messages[0].nope() }}",
    "renders nothing": "",
    "renders whitespace": "{% for m in messages %}  {% endfor %}",
    "endless loop": "{% for i in range(10**9) %}{% for j in range(10**9) %}x{% endfor %}{% endfor %}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
    "deep recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "syntax error": "{% for m in messages %}",
    "huge output": "{{ 'x' * 10**10 }}",
    "attribute escape": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "not UTF-8": None,
}


def tokenizer_cases(rng: random.Random, count: int, work: Path) -> Iterator[Case]:
    """A damaged tokenizer.model (flips, truncation, random bytes) and chat templates that raise, loop, recurse
    or render nothing — each loaded and used to render and encode a conversation."""
    seed = converted_tiny(work)
    model = (seed / "tokenizer.model").read_bytes()
    for name, template in TEMPLATES.items():

        def damage(folder: Path, template=template):
            path = folder / "chat_template.jinja"
            path.write_bytes(b"{{ '\xff' }}" if template is None else template.encode())

        yield template_case(seed, work, f"template {name}", damage)
    yield template_case(
        seed, work, "tokenizer random bytes", lambda f: (f / "tokenizer.model").write_bytes(rng.randbytes(4096))
    )
    yield template_case(seed, work, "tokenizer empty", lambda f: (f / "tokenizer.model").write_bytes(b""))
    for _ in range(count):
        name, damaged = mutate(model, rng, 0, len(model))
        yield template_case(
            seed, work, f"tokenizer {name}", lambda f, d=damaged: (f / "tokenizer.model").write_bytes(d)
        )


def template_case(seed: Path, work: Path, name: str, damage: Callable[[Path], None]) -> Case:
    case = folder_case(seed, work, name, damage)

    def run():
        import mlx_gemma3
        from mlx_gemma3.processing.prompt import prompt_ids

        folder = work / "case"
        _, processor = mlx_gemma3.load(folder)
        messages = [{"role": "user", "content": "Hello there"}]
        ids = prompt_ids(processor, messages, None, True)
        if not ids or not all(isinstance(i, int) for i in ids):
            raise AssertionError(f"prompt ids {ids!r:.80}")

    return case._replace(run=run)


# ---------------------------------------------------------------- images


def image_seeds() -> dict[str, bytes]:
    from PIL import Image

    def saved(image, fmt, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    frames = [rgb.rotate(a) for a in (0, 90, 180)]
    return {
        "png": saved(rgb, "PNG"),
        "jpeg": saved(rgb, "JPEG"),
        "cmyk jpeg": saved(rgb.convert("CMYK"), "JPEG"),
        "16-bit png": saved(Image.fromarray(np.arange(40 * 56, dtype=np.uint16).reshape(40, 56) * 20), "PNG"),
        "palette png": saved(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0),
        "animated gif": saved(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": saved(rgb, "WEBP"),
        "la png": saved(rgb.convert("LA"), "PNG"),
        "tiff": saved(rgb, "TIFF"),
        "bmp": saved(rgb, "BMP"),
    }


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height (its one IDAT holds almost nothing)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def image_cases(rng: random.Random, count: int, work: Path) -> Iterator[Case]:
    """Truncated and damaged files, decompression bombs, CMYK/16-bit/palette/animated images, zero-size images:
    opened and preprocessed as the model's processor does."""
    seeds = image_seeds()
    fixed = {
        **seeds,
        "bomb 100000x100000": png_with_size(100_000, 100_000),
        "bomb 2^31 wide": png_with_size(2**31 - 1, 1),
        "zero width": png_with_size(0, 10),
        "zero size": png_with_size(0, 0),
        "empty": b"",
        "random bytes": rng.randbytes(2000),
    }
    for name, data in fixed.items():
        yield Case(name, _image_run(data), len(data))
    names = sorted(seeds)
    for _ in range(count):
        seed = rng.choice(names)
        name, damaged = mutate(seeds[seed], rng, 0, len(seeds[seed]))
        yield Case(f"{seed} {name}", _image_run(damaged), len(damaged))


def _image_run(data: bytes) -> Callable[[], None]:
    def run():
        from mlx_gemma3.processing.image import process_images

        pixels, crops = process_images([data], 56)
        if pixels.shape != (1, 56, 56, 3) or not np.isfinite(pixels).all():
            raise AssertionError(f"pixel values of shape {pixels.shape}")

    return run


# ---------------------------------------------------------------- the server, through real sockets

REQUEST_TIMEOUT = 1.0  # the server's --request-timeout: a body that does not arrive ends in a 408 this soon
VALID_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 3}


@contextlib.contextmanager
def served(folder: Path):
    """A real server process (`python -m mlx_gemma3.server`) on a free port of 127.0.0.1; yields the port."""
    import subprocess

    command = [
        sys.executable,
        "-m",
        "mlx_gemma3.server",
        "--model",
        str(folder),
        "--port",
        "0",
        "--request-timeout",
        str(REQUEST_TIMEOUT),
        "--max-tokens-limit",
        "8",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = process.stderr.readline()
            if not line:
                raise AssertionError(f"the server did not start (exit {process.wait()})")
        yield int(line.rsplit(":", 1)[1].split("/")[0])
    finally:
        process.kill()
        process.wait()


def http_request(body: bytes, headers: dict | None = None, path: str = "/v1/chat/completions") -> bytes:
    base = {
        "Host": "127.0.0.1",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in {**base, **(headers or {})}.items() if v is not None)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def exchange(port: int, pieces: list[bytes], pause: float = 0.0) -> bytes:
    """Send `pieces` (pausing between them), then read the whole reply; the server closes after it."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=CASE_SECONDS / 2) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(pause)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def check_reply(reply: bytes) -> None:
    """A 4xx with an OpenAI-style error body (raised as Gemma3Error), or a 200 holding a completion."""
    from mlx_gemma3.errors import Gemma3Error

    head, _, body = reply.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise AssertionError(f"no HTTP reply: {reply[:120]!r}")
    status = int(parts[1])
    payload = json.loads(body) if body.lstrip().startswith(b"{") else None
    if 400 <= status < 500:
        error = (payload or {}).get("error")
        if not isinstance(error, dict) or not isinstance(error.get("message"), str) or "type" not in error:
            raise AssertionError(f"{status} without an OpenAI-style error body: {body[:120]!r}")
        raise Gemma3Error(f"{status} {error['message'][:200]}")
    if status != 200 or not (payload and payload.get("choices") or body.startswith(b"data: ")):
        raise AssertionError(f"status {status}: {body[:200]!r}")


def server_case(port: int, name: str, pieces: list[bytes], pause: float = 0.0) -> Case:
    def run():
        try:
            check_reply(exchange(port, pieces, pause))
        finally:
            health = exchange(port, [b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"])
            if b" 200 " not in health.split(b"\r\n", 1)[0]:
                raise AssertionError(f"the server stopped answering /health: {health[:80]!r}")

    return Case(name, run, sum(map(len, pieces)))


def deep(levels: int) -> bytes:
    return b'{"model": "tiny", "messages": ' + b"[" * levels + b"]" * levels + b"}"


def server_cases(rng: random.Random, count: int, work: Path) -> Iterator[Case]:
    """Malformed, random and hostile request bodies and headers sent to a real server process over sockets."""
    seed = converted_tiny(work)
    valid = json.dumps(VALID_CHAT).encode()
    fixed = {
        "valid": [http_request(valid)],
        "valid streamed": [http_request(json.dumps({**VALID_CHAT, "stream": True}).encode())],
        "deep nesting": [http_request(deep(100_000))],
        "deep content": [
            http_request(
                json.dumps({**VALID_CHAT, "messages": [{"role": "user", "content": []}]})
                .encode()
                .replace(b"[]", b"[" * 5000 + b"]" * 5000)
            )
        ],
        "huge string": [
            http_request(
                json.dumps({**VALID_CHAT, "messages": [{"role": "user", "content": "ab " * 300_000}]}).encode()
            )
        ],
        "huge model name": [http_request(json.dumps({**VALID_CHAT, "model": "m" * 1_000_000}).encode())],
        "invalid UTF-8": [http_request(valid.replace(b"Hello", b"He\xffllo"))],
        "lone surrogate": [http_request(valid.replace(b"Hello", b"\\ud800"))],
        "Content-Length larger than the body": [http_request(valid, {"Content-Length": str(len(valid) + 50)})],
        "Content-Length smaller than the body": [http_request(valid, {"Content-Length": str(len(valid) // 2)})],
        "Content-Length negative": [http_request(valid, {"Content-Length": "-5"})],
        "Content-Length not a number": [http_request(valid, {"Content-Length": "12abc"})],
        "Content-Length huge": [http_request(valid, {"Content-Length": str(10**30)})],
        "no Content-Length": [http_request(valid, {"Content-Length": None})],
        "two Content-Lengths": [http_request(valid).replace(b"Connection", b"Content-Length: 3\r\nConnection")],
        "chunked": [http_request(b"5\r\n{}\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"})],
        "empty body": [http_request(b"")],
        "JSON null": [http_request(b"null")],
        "JSON array": [http_request(b"[1, 2]")],
        "NaN max_tokens": [http_request(valid.replace(b"3}", b"NaN}"))],
        "max_tokens 1e400": [http_request(valid.replace(b"3}", b"1e400}"))],
        "max_tokens 10^30": [http_request(valid.replace(b"3}", b"1000000000000000000000000000000}"))],
        "unknown route": [http_request(valid, path="/v1/" + "x" * 5000)],
        "header line 100 KB": [http_request(valid, {"X-Long": "y" * 100_000})],
        "garbage request line": [b"\x00\xff GARBAGE\r\n\r\n"],
    }
    with served(seed) as port:
        for name, pieces in fixed.items():
            yield server_case(port, name, pieces)
        request = http_request(valid)
        yield server_case(port, "slow body (in time)", [request[i : i + 40] for i in range(0, len(request), 40)], 0.05)
        yield server_case(port, "slow body (too slow)", [request[:-10], request[-10:]], REQUEST_TIMEOUT * 2.5)
        for n in range(count):
            if n % 2:
                name, body = mutate(valid, rng, 0, len(valid))
            else:
                name, edited = edit_request(rng)
                body = json.dumps(edited).encode()
            yield server_case(port, name, [http_request(body)])


REQUEST_VALUES = [None, "", "x" * 10_000, -1, 0, 10**20, 1.5, True, [], {}, [{}], {"role": "user"}, float("inf")]


def edit_request(rng: random.Random) -> tuple[str, dict]:
    body = json.loads(json.dumps(VALID_CHAT))
    key = rng.choice(
        [
            "model",
            "messages",
            "max_tokens",
            "temperature",
            "top_p",
            "stop",
            "stream",
            "logprobs",
            "tools",
            "seed",
            "n",
            "response_format",
            "stream_options",
            "top_logprobs",
        ]
    )
    value = rng.choice(REQUEST_VALUES)
    if key == "messages" and rng.random() < 0.5:
        field = rng.choice(["role", "content"])
        body["messages"][0][field] = value
        return f"messages[0].{field}={value!r:.30}", body
    body[key] = value
    return f"{key}={value!r:.30}", body


READERS = {
    "gguf-tiny": gguf_tiny_cases,
    "gguf-270m": gguf_real_cases,
    "safetensors": safetensors_cases,
    "config": config_cases,
    "tokenizer": tokenizer_cases,
    "image": image_cases,
    "server": server_cases,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz one reader in this process; prints its tally as JSON.")
    parser.add_argument("reader", choices=sorted(READERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=20, help="random cases, beyond the fixed ones")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (emptied)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    start = time.perf_counter()
    tally = run_reader(args.reader, args.seed, args.cases, args.work, args.verbose)
    print(json.dumps({**tally._asdict(), "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The long fuzz run: every reader of outside data, many seeded cases each (tests/fuzz.py), a table and JSON.

    python benchmarks/fuzz.py [--cases 1000] [--seeds 1,2,3] [--reader gguf-tiny ...] [--json results/fuzz.json]

Each (reader, seed) runs in its own child process, as in tests/test_fuzz.py, so a crash or hang shows as one.
The CI test runs seed 22 with a few dozen cases per reader; this script is for the hours before a release.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FUZZ = Path(__file__).resolve().parent.parent / "tests" / "fuzz.py"
READERS = ("gguf-tiny", "gguf-270m", "safetensors", "config", "tokenizer", "image", "server")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="random cases per reader and seed")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds")
    parser.add_argument("--reader", action="append", choices=READERS, help="only these readers (repeatable)")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds one reader and seed may take")
    parser.add_argument("--json", type=Path, help="write the tallies here")
    return parser.parse_args()


def fuzz(reader: str, seed: int, cases: int, timeout: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{reader}-") as work:
        command = [sys.executable, str(FUZZ), reader, "--seed", str(seed), "--cases", str(cases), "--work", f"{work}/w"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        last = [line for line in result.stderr.splitlines() if line.startswith("case ")][-1:]
        return {
            "reader": reader,
            "seed": seed,
            "cases": 0,
            "clean_errors": 0,
            "accepted": 0,
            "failures": [f"the fuzzer died (exit {result.returncode}) during {last}"],
            "seconds": None,
        }
    return {**json.loads(result.stdout.splitlines()[-1]), "seed": seed}


def main() -> None:
    args = parse_args()
    tallies = [
        fuzz(reader, int(seed), args.cases, args.timeout)
        for reader in args.reader or READERS
        for seed in args.seeds.split(",")
    ]
    print("| reader | seed | cases | clean errors | accepted | failures | seconds |")
    print("|---|---|---|---|---|---|---|")
    for t in tallies:
        print(
            f"| {t['reader']} | {t['seed']} | {t['cases']} | {t['clean_errors']} | {t['accepted']} | "
            f"{len(t['failures'])} | {t['seconds']} |"
        )
    for t in tallies:
        for failure in t["failures"]:
            print(f"FAILURE {t['reader']} seed {t['seed']}: {failure}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(tallies, indent=2) + "\n")
    sys.exit(1 if any(t["failures"] for t in tallies) else 0)


if __name__ == "__main__":
    main()

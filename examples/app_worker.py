"""An app-style integration: generate in a worker thread, show text as it arrives, cancel on demand.

Any Gemma 3 model works: the default, the demo 270M (a base model), continues the prompt as plain text."""

import argparse
import time

import mlx_gemma3
from mlx_gemma3.generation.background import BackgroundGeneration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="model folder, .gguf or Hub id (default: the demo 270M)")
    parser.add_argument("--prompt", default="The three most useful things to pack for a long hike are")
    parser.add_argument("--cancel-after", type=float, default=None, help="seconds before the 'user' presses Stop")
    args = parser.parse_args()

    model, processor = mlx_gemma3.load(args.model or mlx_gemma3.demo_model())
    job = BackgroundGeneration(
        model, processor, args.prompt, on_text=lambda text: print(text, end="", flush=True), max_tokens=200
    )
    if args.cancel_after is not None:  # a UI would call cancel() from its Stop button
        time.sleep(args.cancel_after)
        job.cancel()
    job.wait()
    print(f"\n[{job.finish_reason}, {job.tokens} tokens]")


if __name__ == "__main__":
    from mlx_gemma3.generation.thread_streams import release_thread_streams

    main()
    release_thread_streams()  # MLX wants this thread's streams dropped before the interpreter shuts down

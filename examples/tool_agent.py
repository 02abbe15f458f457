"""A tool-calling agent: Python functions become tools; the model's calls run and their results go back.

Needs an instruction-tuned Gemma 3 (12B or 27B call tools best; e.g. --model mlx-community/gemma-3-12b-it-4bit).
The default, the demo 270M, is a base model: it runs, but it does not call tools."""

import argparse

import mlx_gemma3
from mlx_gemma3.processing.tools import run_tools


def get_weather(city: str, unit: str = "celsius") -> dict:
    """Current weather for a city.

    Args:
        city: the city's name
        unit: celsius or fahrenheit
    """
    return {"city": city, "temperature": 21 if unit == "celsius" else 70, "unit": unit, "sky": "clear"}


def convert_currency(amount: float, source: str, target: str) -> float:
    """Convert an amount of money between two currencies (fixed demo rates).

    Args:
        amount: how much money
        source: currency code to convert from, e.g. EUR
        target: currency code to convert to, e.g. KRW
    """
    per_euro = {"EUR": 1.0, "USD": 1.08, "KRW": 1450.0, "JPY": 162.0}
    return round(amount / per_euro[source] * per_euro[target], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="an instruction-tuned Gemma 3 folder (12B or 27B call tools best)")
    parser.add_argument("--question", default="What's the weather in Seoul, and how much is 20 EUR in KRW?")
    args = parser.parse_args()

    model, processor = mlx_gemma3.load(args.model or mlx_gemma3.demo_model())
    chat = mlx_gemma3.Chat(model, processor, max_tokens=300)
    run = run_tools(chat, args.question, [get_weather, convert_currency], max_rounds=3)
    for calls, results in run.rounds:
        for call, result in zip(calls, results):
            print(f"called {call.name}({call.arguments}) -> {result}")
    print(run.reply)


if __name__ == "__main__":
    from mlx_gemma3.generation.thread_streams import release_thread_streams

    main()
    release_thread_streams()  # MLX wants this thread's streams dropped before the interpreter shuts down

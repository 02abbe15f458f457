"""`python -m mlx_gemma3.fuse`: fold trained adapters into the model's weights and write an ordinary model folder.

Internal: a command line, whose flags are its interface; the Python API is listed in docs/api.md."""

from __future__ import annotations

from pathlib import Path

from .cli import Parser, run
from .errors import Gemma3Error
from .model.sources import model_folder


def main(argv: list[str] | None = None) -> int:
    parser = Parser("fuse", description="Fuse fine-tuned adapters into a Gemma 3 model.")
    parser.add_argument("--model", help="the base model the adapters were trained on (folder, .gguf or repo id)")
    parser.add_argument(
        "--adapter-path", default="adapters", help="the folder mlx_gemma3.lora wrote (default: adapters)"
    )
    parser.add_argument("--save-path", default="fused_model", help="the new model folder (default: fused_model)")
    parser.add_argument(
        "--dequantize", action="store_true", help="write float weights even where the base is quantized"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        from .train.fused_folder import fuse_folder

        source = Path(model_folder(args.model))
        out = Path(args.save_path)
        if out.resolve() == source.resolve():
            raise Gemma3Error("--save-path is the base model's folder: choose a new folder")
        fuse_folder(source, Path(args.adapter_path), out, args.dequantize)
        print(f"fused model written to {out}")
        return 0

    return run(body)


if __name__ == "__main__":
    from .cli import exit_with

    exit_with(main())

"""Command line: ``python -m jaxllm.checkpoints_convert gguf-to-hf IN.gguf OUT_DIR``."""

from __future__ import annotations

import argparse

from .gguf import gguf_to_hf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.checkpoints_convert",
                                     description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("gguf-to-hf", help="convert a Llama GGUF file into an HF directory "
                                                   "(float32 safetensors, config, tokenizer)")
    to_hf.add_argument("gguf_path", help="input .gguf file")
    to_hf.add_argument("out_dir", help="output directory; must not exist yet")
    args = parser.parse_args(argv)
    try:
        out_dir = gguf_to_hf(args.gguf_path, args.out_dir)
    except (OSError, ValueError) as e:  # bad input: a message, not a traceback
        parser.exit(1, f"error: {e}\n")
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()

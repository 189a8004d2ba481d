"""`offside-jax <command>`: thin entry point. Parses arguments and calls library functions.

Each command lives in its own function and imports what it needs lazily, so `--help` is fast
and one command's dependencies never slow another.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from offside_jax.demo import run_demo

    return run_demo(max_new_tokens=args.max_new_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offside-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="answer general-knowledge questions with SmolLM2-135M (GGUF)")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.set_defaults(func=_cmd_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

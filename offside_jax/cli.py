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


def _cmd_finetune(args: argparse.Namespace) -> int:
    from offside_jax.config import ConfigError, load_config
    from offside_jax.train.finetune import run_finetune

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"offside-jax finetune: {e}", file=sys.stderr)
        return 2
    result = run_finetune(cfg)
    print(f"done: step {int(result.state.step)}; outputs in {result.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offside-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="answer general-knowledge questions with SmolLM2-135M (GGUF)")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.set_defaults(func=_cmd_demo)

    finetune = sub.add_parser("finetune", help="supervised fine-tuning (full or LoRA) on chat JSON lines")
    finetune.add_argument("--config", required=True, help="YAML config (schema: offside_jax.config.FinetuneConfig)")
    finetune.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 lora.enabled=true")
    finetune.set_defaults(func=_cmd_finetune)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

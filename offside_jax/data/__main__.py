"""`python -m offside_jax.data <command>`: check a release, or build its TFDS files.

    python -m offside_jax.data check RELEASE [--setting complete ...] [--skip-bad]
    python -m offside_jax.data build-tfds RELEASE DATA_DIR [--setting ...] [--skip-bad]

Without ``--skip-bad`` the first bad record stops the run with a message naming the file, the
record index and the key (exit status 2); with it, every bad record is reported and skipped
(exit status 1 when any was). (The synthetic benchmark is written by ``offside-jax make-data``.)
"""
from __future__ import annotations

import argparse
import sys


def _check(args: argparse.Namespace) -> int:
    from offside_jax.data.offside import load_release

    release = load_release(args.release, args.setting, skip_bad=args.skip_bad,
                           check_images=not args.no_check_images)
    print(release.summary())
    for problem in release.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    return 1 if release.problems else 0


def _build_tfds(args: argparse.Namespace) -> int:
    from offside_jax.data import offside, tfds_builder

    for setting in args.setting or offside.available_settings(args.release):
        builder = tfds_builder.build(args.release, args.data_dir, setting, skip_bad=args.skip_bad,
                                     check_images=not args.no_check_images)
        splits = {name: info.num_examples for name, info in builder.info.splits.items()}
        print(f"{setting}: {builder.data_dir}  {splits}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m offside_jax.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_ in (("check", _check, "read a release; print records per split and any problems"),
                              ("build-tfds", _build_tfds, "write array_record TFDS files, one config per setting")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("release", help="release directory (holds complete_unlearning_data/ ...)")
        if name == "build-tfds":
            cmd.add_argument("data_dir", help="TFDS data directory to write")
        cmd.add_argument("--setting", action="append", choices=["complete", "pure_text", "selective"],
                         help="only this setting (repeatable); default: all present")
        cmd.add_argument("--skip-bad", action="store_true", help="report and skip bad records instead of stopping")
        cmd.add_argument("--no-check-images", action="store_true", help="do not decode images while reading")
        cmd.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    from offside_jax.data.offside import OffsideDataError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except OffsideDataError as e:
        print(f"error: {e}\n(pass --skip-bad to report and skip bad records)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

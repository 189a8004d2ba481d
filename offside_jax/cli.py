"""`offside-jax <command>`: thin entry point. Parses arguments and calls library functions.

Each command lives in its own function and imports what it needs lazily, so `--help` is fast
and one command's dependencies never slow another.
"""
from __future__ import annotations

import argparse
import sys


def _user_errors() -> tuple[type[Exception], ...]:
    """The library's errors for a user's mistake (config, data, checkpoint, memory budget,
    cluster): every command stops on them with the message alone and exit status 2. They are
    raised before anything is written, so nothing is half-done."""
    from offside_jax.config import ConfigError
    from offside_jax.data.batches import BatchDataError
    from offside_jax.data.offside import OffsideDataError
    from offside_jax.models.hf import CheckpointError
    from offside_jax.models.loader import LoaderError
    from offside_jax.train.aot import MemoryBudgetError
    from offside_jax.train.checkpoint import CheckpointError as TrainingCheckpointError
    from offside_jax.train.sft_data import DataError
    from offside_jax.train.distributed import DistributedError
    from offside_jax.unlearn.settings import SettingError

    return (ConfigError, OffsideDataError, SettingError, BatchDataError, CheckpointError, MemoryBudgetError,
            DistributedError, LoaderError, TrainingCheckpointError, DataError)


def _cmd_demo(args: argparse.Namespace) -> int:
    from offside_jax.demo import run_demo

    return run_demo(args.config, args.overrides)


def _cmd_chat_demo(args: argparse.Namespace) -> int:
    from offside_jax.chat_demo import run_chat_demo

    return run_chat_demo(max_new_tokens=args.max_new_tokens)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from offside_jax.benchmark import load_benchmark_config, run_benchmark
    from offside_jax.eval.report import method_table

    results = run_benchmark(load_benchmark_config(args.config, args.overrides))
    print(method_table(results))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from offside_jax.eval.report import compare_runs, write_report
    from offside_jax.files import write_text

    try:
        if len(args.runs) == 1 and not args.out:
            paths = write_report(args.runs[0])
            print(f"wrote {paths['report']}")
        table = compare_runs(args.runs)
    except (FileNotFoundError, ValueError) as e:
        print(f"offside-jax report: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_text(args.out, table + "\n")
        print(f"wrote {args.out}")
    print(table)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from offside_jax.config import load_config
    from offside_jax.train.distributed import is_primary
    from offside_jax.train.finetune import run_finetune

    result = run_finetune(load_config(args.config, args.overrides))
    if is_primary():  # one line for a multi-process run, not one per process
        print(f"done: step {int(result.state.step)}; outputs in {result.output_dir}")
    return 0


def _cmd_unlearn(args: argparse.Namespace) -> int:
    from offside_jax.config import UnlearnConfig, load_config
    from offside_jax.unlearn.run import run_unlearning

    result = run_unlearning(load_config(args.config, args.overrides, schema=UnlearnConfig))
    for name, p in result.summary["answer_probability"].items():
        print(f"{name:>14}: answer probability {p['before']:.3f} -> {p['after']:.3f}")
    print(f"done: {result.summary['method']}; outputs in {result.output_dir}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from offside_jax.config import load_config
    from offside_jax.eval.run import EvaluateConfig, run_evaluation
    from offside_jax.train.distributed import is_primary

    cfg = load_config(args.config, args.overrides, schema=EvaluateConfig)
    results = run_evaluation(cfg)
    if is_primary():
        for key, value in results["summary"].items():
            if "[" not in key:  # the headline numbers; slices are in results.json
                print(f"{key:>48}: {value:.4f}")
        print(f"done: outputs in {cfg.output_dir}")
    return 0


def _cmd_correct(args: argparse.Namespace) -> int:
    from offside_jax.config import CorrectConfig, load_config
    from offside_jax.correct.report import stage_table
    from offside_jax.correct.run import run_correct

    cfg = load_config(args.config, args.overrides, schema=CorrectConfig)
    results = run_correct(cfg)
    print(results["table"] if "table" in results else stage_table(results["summary"]))
    print(f"done: outputs in {cfg.output_dir}")
    return 0


def _cmd_make_data(args: argparse.Namespace) -> int:
    from offside_jax.data.synthetic import SyntheticConfig, make_release

    try:
        config = SyntheticConfig(players=args.players, seed=args.seed, image_size=args.image_size,
                                 visual_rumor_fraction=args.visual_rumor_fraction)
        counts = make_release(args.out, config, overwrite=args.overwrite, log=print)
    except (FileExistsError, ValueError) as e:
        print(f"offside-jax make-data: {e}", file=sys.stderr)
        return 2
    for name, n in counts.items():
        print(f"{n:>7}  {name}")
    return 0


def _config_command(sub, name: str, help: str, schema: str, example: str, func) -> argparse.ArgumentParser:
    """A command that runs one YAML config with dotted overrides."""
    command = sub.add_parser(name, help=help)
    command.add_argument("--config", required=True, help=f"YAML config (schema: {schema})")
    command.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    command.set_defaults(func=func)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offside-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the OFFSIDE benchmark end to end on a tiny model (configs/demo.yaml)")
    demo.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml, else built-in)")
    demo.add_argument("overrides", nargs="*", help="dotted overrides, e.g. methods=[ga,npo] attack_methods=[]")
    demo.set_defaults(func=_cmd_demo)

    chat_demo = sub.add_parser("chat-demo", help="answer general-knowledge questions with SmolLM2-135M (GGUF)")
    chat_demo.add_argument("--max-new-tokens", type=int, default=48)
    chat_demo.set_defaults(func=_cmd_chat_demo)

    _config_command(sub, "benchmark", "an OFFSIDE benchmark run: reference models, unlearning, evaluation, attacks, report",
                    "offside_jax.benchmark.BenchmarkConfig", "methods=[ga] unlearn.steps=20", _cmd_benchmark)

    report = sub.add_parser("report", help="rewrite a run's report, or compare several runs in one table")
    report.add_argument("runs", nargs="+", help="benchmark run directories (each with results.json)")
    report.add_argument("--out", default=None, help="write the comparison table to this markdown file")
    report.set_defaults(func=_cmd_report)

    _config_command(sub, "finetune", "supervised fine-tuning (full or LoRA) on chat JSON lines",
                    "offside_jax.config.FinetuneConfig", "optim.lr=1e-4 lora.enabled=true", _cmd_finetune)
    _config_command(sub, "unlearn", "unlearn OFFSIDE rumors from a vanilla model (a loss method, ssd or mmunlearner)",
                    "offside_jax.config.UnlearnConfig", "method=npo methods.npo.beta=0.5", _cmd_unlearn)
    _config_command(sub, "evaluate", "the OFFSIDE evaluation suite on one model (generation, multiple choice, "
                    "likelihoods), on one or several processes", "offside_jax.eval.run.EvaluateConfig",
                    "model.path=runs/npo/model release=runs/offside_tiny", _cmd_evaluate)
    _config_command(sub, "correct", "RL self-correction: warm-up SFT, SCoRe Stage I and II on a verifiable task, "
                    "metrics after each stage; mode=compare: correction strategies side by side", "offside_jax.config.CorrectConfig", "seeds=[0,1,2] stage2.steps=80",
                    _cmd_correct)

    make_data = sub.add_parser("make-data", help="write the synthetic OFFSIDE benchmark (release format)")
    make_data.add_argument("--out", required=True, help="release directory to write")
    make_data.add_argument("--players", type=int, default=80)
    make_data.add_argument("--seed", type=int, default=0)
    make_data.add_argument("--image-size", type=int, default=256)
    make_data.add_argument("--visual-rumor-fraction", type=float, default=0.5)
    make_data.add_argument("--overwrite", action="store_true", help="replace a release already in --out")
    make_data.set_defaults(func=_cmd_make_data)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"offside-jax {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""At which budget does each unlearning method meet the tiny-recipe bar?

Runs the README's tiny recipe (a synthetic release, the vanilla model of
``configs/finetune_offside_tiny.yaml``, then ``configs/unlearn_tiny.yaml method=<name>``) for
every weight-changing method at several ``train.steps``, with the method's defaults otherwise,
and tabulates the forget and retain answer probabilities after unlearning. A cell passes the bar
of ``tests/test_unlearn_defaults.py``: the forget-set probability at least halved, the retain
set within 20% of the vanilla model's.

    python scripts/unlearn_budgets.py --out runs/unlearn_budgets
    python scripts/unlearn_budgets.py --out runs/unlearn_budgets --methods rmu idk --steps 20 80 optim.lr=1e-3

``--out`` gets the release, the vanilla model (reused by a rerun), one run per cell,
``budgets.json`` (every cell, with the overrides) and ``budgets.md`` (the table). Extra
``key=value`` arguments override every unlearning run's config (``UnlearnConfig`` keys).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.progress=false", "checkpoint.every=0"]


def meets_bar(forget: dict, retain: dict) -> bool:
    return forget["after"] <= 0.5 * forget["before"] and abs(retain["after"] - retain["before"]) <= 0.2 * retain["before"]


def vanilla(out: Path, players: int) -> tuple[Path, Path]:
    """The recipe's release and vanilla model under ``out``, made once."""
    from offside_jax import cli
    from offside_jax.config import FinetuneConfig, load_config
    from offside_jax.train.finetune import run_finetune

    release, model = out / "release", out / "vanilla" / "model"
    if not (model / "config.json").exists():
        shutil.rmtree(out / "release", ignore_errors=True)
        shutil.rmtree(out / "vanilla", ignore_errors=True)
        if cli.main(["make-data", "--players", str(players), "--out", str(release)]) != 0:
            sys.exit("make-data failed")
        cfg = load_config(ROOT / "configs" / "finetune_offside_tiny.yaml",
                          [f"output_dir={out / 'vanilla'}", f"data.release={release}", *QUIET], schema=FinetuneConfig)
        run_finetune(cfg)
    return release, model


def unlearn(out: Path, release: Path, model: Path, method: str, steps: int, overrides: list[str]) -> dict:
    from offside_jax.config import UnlearnConfig, load_config
    from offside_jax.unlearn.run import run_unlearning

    run_dir = out / "runs" / f"{method}_{steps}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a directory holds one run: each cell starts afresh
    cfg = load_config(ROOT / "configs" / "unlearn_tiny.yaml",
                      [f"method={method}", f"output_dir={run_dir}", f"model.path={model}", f"data.release={release}",
                       f"train.steps={steps}", "export_merged=false", "eval.trace_kept=false", *QUIET, *overrides],
                      schema=UnlearnConfig)
    summary = run_unlearning(cfg).summary
    p = summary["answer_probability"]
    return {"method": method, "steps": steps, "forget": p["forget"], "retain": p["retain"],
            "meets_bar": meets_bar(p["forget"], p["retain"]), "seconds": summary["seconds"]}


def table(cells: list[dict], methods: list[str], steps: list[int]) -> str:
    by = {(c["method"], c["steps"]): c for c in cells}
    lines = ["| method | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for m in methods:
        row = []
        for s in steps:
            c = by[(m, s)]
            row.append(f"{c['forget']['after']:.2f} / {c['retain']['after']:.2f}{' ✓' if c['meets_bar'] else ''}")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    first = cells[0]
    return ("forget / retain answer probability after unlearning (vanilla: "
            f"{first['forget']['before']:.2f} / {first['retain']['before']:.2f}); ✓: forget at least halved and "
            "retain within 20%\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from offside_jax.unlearn import methods as registry

    trained = [n for n in registry.names() if registry.get(n).kind in ("loss", "alternating")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--methods", nargs="+", default=trained, choices=registry.names())
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 40, 80])
    parser.add_argument("--players", type=int, default=3)
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"not a key=value override: {' '.join(bad)}")
    from tqdm import tqdm

    release, model = vanilla(args.out, args.players)
    cells = []
    for method, steps in tqdm([(m, s) for m in args.methods for s in args.steps], desc="methods x budgets"):
        cells.append(unlearn(args.out, release, model, method, steps, overrides))
        c = cells[-1]
        tqdm.write(f"{method} {steps} steps: forget {c['forget']['before']:.3f} -> {c['forget']['after']:.3f}, "
                   f"retain {c['retain']['before']:.3f} -> {c['retain']['after']:.3f}{' (meets the bar)' if c['meets_bar'] else ''}")
    from offside_jax.files import write_json, write_text

    md = table(cells, args.methods, args.steps)
    write_json(args.out / "budgets.json", {"overrides": overrides, "players": args.players, "steps": args.steps, "cells": cells})
    write_text(args.out / "budgets.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

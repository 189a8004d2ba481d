"""Self-correction reports: the stage-by-stage metric table over seeds, ``results.json`` and a
plot of Acc@t1 / Acc@t2 over RL steps.

``results.json`` (written by :func:`write_report`)::

    {"run": "score_arithmetic", "task": "carry_arithmetic", "seeds": [0, 1, 2],
     "runs": {"0": {"metrics": {"warmup": {...}, "stage1": {...}, "stage2": {...}},
                    "history": [{"stage": "stage1", "step": 10, "rl_step": 10, "acc_t1": ...}, ...],
                    "seconds": {"warmup": 41.2, "stage1": 20.3, "stage2": 31.0}}, ...},
     "summary": {"stage2": {"acc_t2": {"mean": ..., "std": ..., "min": ..., "max": ..., "n": 3}, ...}},
     "timing": {...}, "machine": {...}}

The markdown uses the evaluation reports' number format (:func:`offside_jax.eval.report.fmt`)
and writes files atomically (:mod:`offside_jax.files`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from offside_jax.eval.report import fmt
from offside_jax.files import pyplot, read_json, save_figure, write_json, write_text

# (key, column label) in table order.
METRICS: tuple[tuple[str, str], ...] = (
    ("acc_t1", "Acc@t1"),
    ("acc_t2", "Acc@t2"),
    ("delta", "Δ"),
    ("delta_i_to_c", "Δ i→c"),
    ("delta_c_to_i", "Δ c→i"),
    ("cl", "CL"),
    ("cs", "CS"),
    ("rss", "RSS"),
)
STAGES: tuple[tuple[str, str], ...] = (("warmup", "warm-up SFT"), ("stage1", "SCoRe Stage I"), ("stage2", "SCoRe Stage II"))
PLOT = "accuracy.png"


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """``mean``, ``std`` (sample, ddof 1; 0 for one value), ``min``, ``max`` and ``n`` of the
    finite values (NaN, e.g. CL with Acc@t1 = 0, and None are left out)."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if finite.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "min": float(finite.min()),
        "max": float(finite.max()),
        "n": int(finite.size),
    }


def summarize(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per stage and metric, the :func:`spread` over the runs (one per seed)."""
    stages = [s for s, _ in STAGES if any(s in r["metrics"] for r in runs.values())]
    return {
        stage: {key: spread([r["metrics"].get(stage, {}).get(key) for r in runs.values()]) for key, _ in METRICS}
        for stage in stages
    }


def _mean_std(cell: Mapping[str, Any] | None) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    return fmt(cell["mean"]) if cell["n"] < 2 else f"{fmt(cell['mean'])} ± {fmt(cell['std'])}"


def _header(leading: Sequence[tuple[str, str]], trailing: Sequence[str] = ()) -> list[str]:
    """The header and alignment rows of a metric table: the ``leading`` ``(label, alignment)``
    columns, then a right-aligned column per metric and per ``trailing`` label."""
    labels = [label for label, _ in leading] + [label for _, label in METRICS] + list(trailing)
    return ["| " + " | ".join(labels) + " |",
            "|" + "".join(f"{align}|" for _, align in leading) + "---:|" * (len(METRICS) + len(trailing))]


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _metric(value: Any) -> str:
    return fmt(_finite(value))


def _cells(metrics: Mapping[str, Any], render: Callable[[Any], str] = _metric) -> str:
    """The metric cells of a table row, in ``METRICS`` order."""
    return " | ".join(render(metrics.get(key)) for key, _ in METRICS)


def _stage_rows(first_column: str, per_stage: Mapping[str, Mapping[str, Any]],
                render: Callable[[Any], str] = _metric) -> str:
    """Markdown: one row per stage present in ``per_stage``, its metrics rendered by ``render``."""
    rows = _header([(first_column, "---")])
    rows += [f"| {label} | {_cells(per_stage[stage], render)} |" for stage, label in STAGES if stage in per_stage]
    return "\n".join(rows)


def stage_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per stage, ``mean ± std`` over seeds per metric."""
    return _stage_rows("after", summary, _mean_std)


def seed_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per (seed, stage) with every metric."""
    rows = _header([("seed", "---:"), ("after", "---")], ["seconds"])
    for seed, run in runs.items():
        for stage, label in STAGES:
            if stage in run["metrics"]:
                rows.append(f"| {seed} | {label} | {_cells(run['metrics'][stage])} | {fmt(run.get('seconds', {}).get(stage))} |")
    return "\n".join(rows)


def control_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per stage of the learning-rate-0 control run."""
    return _stage_rows("after (lr = 0)", metrics)


def plot_accuracy(runs: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> Path | None:
    """Acc@t1 (dashed) and Acc@t2 (solid) over RL steps: one thin line per seed, the mean over
    seeds thick (where every seed was evaluated), the stage boundary as a vertical line."""
    histories = [r["history"] for r in runs.values() if r.get("history")]
    if not histories:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    for key, style, color in (("acc_t1", "--", "tab:blue"), ("acc_t2", "-", "tab:orange")):
        by_step: dict[int, list[float]] = {}
        for history in histories:
            steps = [h["rl_step"] for h in history]
            values = [h[key] for h in history]
            ax.plot(steps, values, style, color=color, alpha=0.3, lw=1)
            for s, v in zip(steps, values):
                by_step.setdefault(s, []).append(v)
        common = sorted(s for s, v in by_step.items() if len(v) == len(histories))
        label = {"acc_t1": "Acc@t1 (first attempt)", "acc_t2": "Acc@t2 (after self-correction)"}[key]
        ax.plot(common, [np.mean(by_step[s]) for s in common], style, color=color, lw=2.2, marker="o", ms=3,
                label=f"{label}, mean of {len(histories)} seed(s)")
    boundaries = sorted({h["rl_step"] - h["step"] for history in histories for h in history if h["stage"] == "stage2"})
    for b in boundaries[:1]:
        ax.axvline(b, color="grey", ls=":", lw=1)
        ax.text(b, 1.02, " Stage II", color="grey", fontsize=8, va="bottom")
    ax.text(0, 1.02, " Stage I", color="grey", fontsize=8, va="bottom")
    ax.set_xlabel("RL steps (0 = after warm-up SFT)")
    ax.set_ylabel("greedy accuracy on held-out problems")
    ax.set_ylim(-0.02, 1.08)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def render_markdown(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    runs = results["runs"]
    n = len(runs)
    parts = [f"# Self-correction (SCoRe): {results.get('run', '')}", ""]
    if results.get("description"):
        parts += [str(results["description"]), ""]
    parts += [
        "## Stage by stage", "",
        f"Greedy two-turn evaluation on {results.get('eval_problems', '?')} held-out problems of `{results.get('task', '')}` "
        f"after each stage; mean ± sample standard deviation over {n} seed(s) ({', '.join(runs)}). "
        "Δ = Acc@t2 − Acc@t1 = Δ i→c − Δ c→i (fractions of all problems); CL = P(right at t2 | right at t1), "
        "CS = P(right at t2 | wrong at t1), RSS = (Acc@t2 − Acc@t1²) / (2 Acc@t1 (1 − Acc@t1)).",
        "", stage_table(results["summary"]), "",
        "## Per seed", "", seed_table(runs), "",
    ]
    if results.get("control"):
        c = results["control"]
        parts += [f"## Control: the same stages with the learning rate at 0 (seed {c['seed']})", "",
                  "Same warm-up, rollouts, rewards and steps, no parameter update: what the pipeline shows without "
                  "learning.", "", control_table(c["metrics"]), ""]
    return "\n".join(parts + _tail(results, plots, "Plots"))


def _tail(results: Mapping[str, Any], plots: Sequence[Any], heading: str) -> list[str]:
    """The end every correction report shares: its plots, the time per phase and the machine."""
    parts: list[str] = []
    if plots:
        parts += [f"## {heading}", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots] + [""]
    if results.get("timing"):
        parts += ["## Time", "", "| what | seconds |", "|---|---:|"]
        parts += [f"| {k} | {v:.1f} |" for k, v in results["timing"].items()] + [""]
    if results.get("machine"):
        parts += ["Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()), ""]
    return parts


def write_report(run_dir: str | os.PathLike, results: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``results.json`` (when given; it gets its ``summary``), ``report.md`` and
    ``plots/accuracy.png`` in ``run_dir``; returns the paths written."""
    run_dir = Path(run_dir)
    if results is None:
        results = read_json(run_dir / "results.json")
    if not results.get("runs"):
        raise ValueError(f"{run_dir}: results have no runs to report")
    results = {**results, "summary": summarize(results["runs"])}
    write_json(run_dir / "results.json", results)
    plot = run_dir / "plots" / PLOT
    title = f"{results.get('run', '')}: SCoRe on {results.get('task', '')}"
    made = [str(plot)] if plot_accuracy(results["runs"], plot, title=title) is not None else []
    report = write_text(run_dir / "report.md", render_markdown(results, made))
    return {"report": report, "results": run_dir / "results.json", **{Path(p).stem: Path(p) for p in made}}


# -- the comparison of strategies (`mode: compare`) ----------------------------------------------------

COST: tuple[tuple[str, str], ...] = (
    ("tokens", "tokens"),
    ("calls", "calls"),
    ("efficiency", "Acc@t2 / (tokens·calls)"),
    ("cut", "cut by max_new_tokens"),
    ("train_seconds", "train s"),
    ("eval_seconds", "eval s"),
)
STRATEGY_LABELS = {
    "sft": "plain SFT (reference solutions)",
    "mistake_tuning": "mistake tuning + self-rethinking",
    "lemma": "LEMMA (fix & continue, fresh & restart)",
    "self_refine": "intrinsic self-refine (warm-up model)",
    "verifier_feedback": "external verifier feedback (warm-up model)",
    "score": "SCoRe Stage I + II",
    "scl": "SCL (flip pairs, DPO)",
    "rise": "RISE (best-of-N, reward-weighted regression; oracle feedback)",
    "ufo": "UFO (unary feedback, GRPO; oracle feedback)",
}
COMPARE_PLOT = "compare.png"


def summarize_compare(runs: Mapping[str, Mapping[str, Any]], strategies: Sequence[str]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per strategy and metric (accuracy and cost), the :func:`spread` over seeds."""
    keys = [k for k, _ in METRICS] + [k for k, _ in COST]
    return {s: {k: spread([r["metrics"].get(s, {}).get(k) for r in runs.values()]) for k in keys}
            for s in strategies if any(s in r["metrics"] for r in runs.values())}


def compare_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per strategy, ``mean ± std`` over seeds of every metric and cost."""
    rows = _header([("strategy", "---")], [label for _, label in COST])
    for s, cells in summary.items():
        rows.append(f"| {STRATEGY_LABELS.get(s, s)} | {_cells(cells, _mean_std)} | "
                    + " | ".join(_mean_std(cells.get(k)) for k, _ in COST) + " |")
    return "\n".join(rows)


def plot_compare(summary: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> Path | None:
    """Acc@t1 and Acc@t2 per strategy (mean over seeds, bars from min to max)."""
    if not summary:
        return None
    plt = pyplot()
    names = list(summary)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names)), 4.4))
    for offset, key, color, label in ((-0.2, "acc_t1", "tab:blue", "Acc@t1"), (0.2, "acc_t2", "tab:orange", "Acc@t2")):
        cells = [summary[n][key] for n in names]
        mean = np.array([c["mean"] if c["mean"] is not None else np.nan for c in cells])
        low = np.array([c["mean"] - c["min"] if c["mean"] is not None else 0.0 for c in cells])
        high = np.array([c["max"] - c["mean"] if c["mean"] is not None else 0.0 for c in cells])
        ax.bar(x + offset, mean, 0.4, color=color, label=label, yerr=[low, high], capsize=3)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("greedy accuracy on held-out problems")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def render_compare_markdown(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    runs = results["runs"]
    parts = [f"# Self-correction strategies compared: {results.get('run', '')}", "",
             f"Task `{results.get('task', '')}` (step format), {results.get('eval_problems', '?')} held-out problems, "
             f"greedy decoding, two turns for every strategy and problem; mean ± sample standard deviation over "
             f"{len(runs)} seed(s) ({', '.join(runs)}). Correct = the task's verifier; every problem counts (an empty "
             "or unparsable answer is wrong); no early stop on the gold answer. Δ = Acc@t2 − Acc@t1 = Δ i→c − Δ c→i; "
             "CL = P(right at t2 | right at t1), CS = P(right at t2 | wrong at t1), "
             "RSS = (Acc@t2 − Acc@t1²) / (2 Acc@t1 (1 − Acc@t1)). Cost per problem: generated tokens (EOS included) "
             "and model calls over both turns; train s includes the warm-up a strategy starts from.", "",
             compare_table(results["summary"]), ""]
    if results.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    skipped = {**results.get("not_run", {})}
    for seed, run in runs.items():
        for s, why in run.get("skipped", {}).items():
            skipped[f"{s} (seed {seed})"] = why
    if skipped:
        parts += ["## Not run", "", "| strategy | why |", "|---|---|"] + [f"| {k} | {v} |" for k, v in skipped.items()] + [""]
    return "\n".join(parts + _tail(results, plots, "Plot"))


def write_compare_report(run_dir: str | os.PathLike, results: Mapping[str, Any]) -> dict[str, Path]:
    """``results.json`` (with its ``summary``), ``report.md`` and ``plots/compare.png``."""
    run_dir = Path(run_dir)
    if not results.get("runs"):
        raise ValueError(f"{run_dir}: results have no runs to report")
    results = {**results, "summary": summarize_compare(results["runs"], results.get("strategies", list(STRATEGY_LABELS)))}
    write_json(run_dir / "results.json", results)
    plot = run_dir / "plots" / COMPARE_PLOT
    made = [str(plot)] if plot_compare(results["summary"], plot, title=f"{results.get('run', '')}: {results.get('task', '')}") else []
    report = write_text(run_dir / "report.md", render_compare_markdown(results, made))
    return {"report": report, "results": run_dir / "results.json", **{Path(p).stem: Path(p) for p in made}}

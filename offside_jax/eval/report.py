"""Benchmark reports: a method x metric table, ``results.json`` and plots, for one run or many.

A benchmark run directory holds ``results.json``::

    {"run": "demo", "modality": "image",
     "methods": {"vanilla": {"role": "reference", "summary": {...suite summary...},
                             "attacks": {"prompt_roleplay": {"kind": ..., "summary": {...}}, ...,
                                         "relearn": {"summary": ..., "curve": [{"step": 0, ...}, ...]}},
                             "correction": {"before": ..., "after": ..., "curve": [...]},
                             "forget_quality": 0.41},
                 "ga": {"role": "method", ...}, ...}}

:func:`write_report` turns it into ``report.md`` (tables with every number taken from
``results.json``, formatted with :func:`fmt`) and PNG plots: the forget/utility trade-off per
method, forget scores under each attack, and recovery curves over relearning steps
(the relearning attack, and corrective relearning when it ran). :func:`compare_runs` (CLI:
``offside-jax report RUN_DIR...``) puts several runs in one table.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from offside_jax.eval import forms as forms_lib
from offside_jax.eval import metrics
from offside_jax.files import pyplot, read_json, save_figure, write_json, write_text

# (label, summary key with {m} for the modality, better: "lower" | "higher")
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("forget gen", "forget/{m}/gen.overall", "lower"),
    ("forget rumor gen", "forget/{m}/gen[rumor].overall", "lower"),
    ("states rumor", "forget/{m}/gen.states_rumor", "lower"),
    ("forget MCQ", "forget/{m}/mcq.accuracy", "lower"),
    ("forget ans. prob", "forget/{m}/gen.answer_prob", "lower"),
    ("relearn gen", "relearn/{m}/gen.overall", "lower"),
    ("test gen", "test/{m}/gen.overall", "higher"),
    ("test MCQ", "test/{m}/mcq.accuracy", "higher"),
    ("retain gen", "retain/{m}/gen.overall", "higher"),
    ("retain MCQ", "retain/{m}/mcq.accuracy", "higher"),
    ("world gen", "world/text/gen.overall", "higher"),
    ("world MCQ", "world/text/mcq.accuracy", "higher"),
    ("general gen", "general/text/gen.overall", "higher"),
    ("general acc.", "general/text/gen.key_accuracy", "higher"),
)
FORGET_KEY = "forget/{m}/gen.overall"
UTILITY_KEYS = ("retain/{m}/gen.overall", "world/text/gen.overall", "general/text/gen.key_accuracy")
PLOTS = ("tradeoff.png", "attacks.png", "relearning.png")


def fmt(value: Any) -> str:
    """How every number appears in reports: 3 decimals, "-" when missing."""
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.3f}"


def columns_for(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The table's columns whose keys some method's summary has, plus forget quality."""
    m = results.get("modality", "image")
    summaries = [entry.get("summary", {}) for entry in results["methods"].values()]
    cols = [(label, key.format(m=m), better) for label, key, better in COLUMNS
            if any(key.format(m=m) in s for s in summaries)]
    entries = list(results["methods"].values())
    if any(entry.get("forget_quality") is not None for entry in entries):
        cols.append(("forget quality", "forget_quality", "higher"))
    if any(entry.get("trace_kept") for entry in entries):
        # ConceptVectors: top-200 Jaccard of the forget subjects' traces (1: untouched)
        cols.append(("trace kept", "trace_kept", "lower"))
    if any(entry.get("unlearn_seconds") is not None for entry in entries):
        cols.append(("seconds", "unlearn_seconds", "lower"))
    return cols


def cell(entry: Mapping[str, Any], key: str) -> Any:
    if key == "trace_kept":
        return (entry.get("trace_kept") or {}).get("jaccard")
    if key in ("forget_quality", "unlearn_seconds"):
        return entry.get(key)
    return entry.get("summary", {}).get(key)


def utility(entry: Mapping[str, Any], modality: str) -> float | None:
    """Mean of the retain and world-fact generation scores that exist (the trade-off's y)."""
    values = [entry.get("summary", {}).get(k.format(m=modality)) for k in UTILITY_KEYS]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def method_table(results: Mapping[str, Any]) -> str:
    """Markdown table: one row per method (references first), one column per metric."""
    cols = columns_for(results)
    head = "| method | " + " | ".join(f"{label} {'↓' if better == 'lower' else '↑'}" for label, _, better in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    rows = [head, rule]
    for name, entry in _ordered(results["methods"]):
        rows.append(f"| {name} | " + " | ".join(fmt(cell(entry, key)) for _, key, _ in cols) + " |")
    return "\n".join(rows)


def attack_table(results: Mapping[str, Any]) -> str | None:
    """Forget-set generation score per method under each attack (``-`` = not run)."""
    key = FORGET_KEY.format(m=results.get("modality", "image"))
    attacks = sorted({a for e in results["methods"].values() for a in e.get("attacks", {}) if a != "clean"})
    if not attacks:
        return None
    rows = ["| method | none | " + " | ".join(attacks) + " |", "|---|---:|" + "---:|" * len(attacks)]
    for name, entry in _ordered(results["methods"]):
        values = [entry.get("attacks", {}).get(a, {}).get("summary", {}).get(key) for a in attacks]
        rows.append(f"| {name} | {fmt(clean_score(entry, key))} | " + " | ".join(fmt(v) for v in values) + " |")
    return "\n".join(rows)


def clean_score(entry: Mapping[str, Any], key: str) -> Any:
    """The unattacked score the attacks compare with: on the attacked items when the attacks
    ran on a subset (their ``clean`` entry), else the method's own."""
    clean = entry.get("attacks", {}).get("clean")
    return (clean or entry).get("summary", {}).get(key)


def form_table(results: Mapping[str, Any]) -> str | None:
    """Form robustness: per method, the forget-set score of each question form (``eval.forms``:
    OFFSIDE's overall for generated answers, accuracy for multiple choice and true/false; in
    brackets the share stating the rumor where known) and the worst form, the one with the
    highest score (the most revealing). None when no method ran the forms."""
    m = results.get("modality", "image")
    per = [(name, forms_lib.form_scores(entry.get("summary", {}), m)) for name, entry in _ordered(results["methods"])]
    per = [(name, scores) for name, scores in per if scores]
    if not per:
        return None
    forms = [f for f in forms_lib.FORMS if any(f in scores for _, scores in per)]
    head = "| method | " + " | ".join(f"{f} ({forms_lib.METRIC.get(f, forms_lib.GEN_METRIC)})" for f in forms)
    rows = ["Each forget fact asked in other forms (higher = more of it revealed; in brackets the share of rumor "
            "questions answered with the rumor). The worst form is the most revealing one.", "",
            head + " | worst form |", "|---|" + "---:|" * len(forms) + "---|"]
    for name, scores in per:
        cells = []
        for f in forms:
            s = scores.get(f)
            rumor = None if s is None else s.get("states_rumor")
            cells.append("-" if s is None else fmt(s["score"]) + ("" if rumor is None else f" ({fmt(rumor)})"))
        worst = forms_lib.worst_form(scores)
        rows.append(f"| {name} | " + " | ".join(cells) + (f" | {worst[0]} {fmt(worst[1])} |" if worst else " | - |"))
    notes = []
    counts = next((e["forms"]["counts"] for _, e in _ordered(results["methods"]) if (e.get("forms") or {}).get("counts")),
                  None)
    if counts:
        asked = ", ".join(f"{f} {c['facts']}" for f, c in counts.items())
        skipped = ", ".join(f"{f} {c['skipped']}" for f, c in counts.items() if c.get("skipped"))
        notes.append(f"Facts asked per form: {asked}."
                     + (f" Skipped (the release does not tell enough): {skipped}." if skipped else ""))
    seconds = [e["forms"]["seconds"] for _, e in _ordered(results["methods"])
               if (e.get("forms") or {}).get("seconds") is not None]
    if seconds:
        notes.append(f"Asking the forms took {np.mean(seconds):.1f} s per model on average.")
    if notes:
        rows += ["", " ".join(notes)]
    return "\n".join(rows)


def correction_table(results: Mapping[str, Any]) -> str | None:
    entries = [(n, e["correction"]) for n, e in _ordered(results["methods"]) if e.get("correction")]
    if not entries:
        return None
    keys = ("forget_recovery_rate", "forget_rumor_rate", "heldout_recovery_rate", "heldout_rumor_rate",
            "forget_mcq_chose_truth")
    rows = ["| method | " + " | ".join(f"{k} before → after" for k in keys) + " | collateral (max drop) |",
            "|---|" + "---:|" * (len(keys) + 1)]
    for name, c in entries:
        damage = max(c.get("collateral", {}).values(), default=None)
        rows.append(f"| {name} | " + " | ".join(f"{fmt(c['before'].get(k))} → {fmt(c['after'].get(k))}" for k in keys)
                    + f" | {fmt(damage)} |")
    return "\n".join(rows)


def findings_table(results: Mapping[str, Any]) -> str | None:
    """One row per OFFSIDE finding the run could test: reproduces?, the criterion, per-method numbers."""
    found = results.get("findings") or {}
    if not found:
        return None
    rows = ["| finding | reproduces here | criterion | numbers |", "|---|---|---|---|"]
    for name, f in found.items():
        rows.append(f"| {name} | {'yes' if f.get('reproduces') else 'no'} | {f.get('criterion', '')} | "
                    f"{_finding_numbers(f)} |")
    return "\n".join(rows)


def _finding_numbers(f: Mapping[str, Any]) -> str:
    parts = [f"{k} {fmt(v)}" for k, v in f.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    per = f.get("methods") or f.get("unimodal") or {}
    for method, values in per.items():
        shown = ", ".join(f"{k} {v}" if isinstance(v, str) else f"{k} {'yes' if v else 'no'}" if isinstance(v, bool)
                          else f"{k} {fmt(v)}" for k, v in values.items())
        parts.append(f"{method}: {shown}")
    return "; ".join(parts)


def _ordered(methods: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return sorted(methods.items(), key=lambda kv: (kv[1].get("role") != "reference", list(methods).index(kv[0])))


# -- plots ----------------------------------------------------------------------------------------


def plot_tradeoff(results: Mapping[str, Any], path: Path) -> Path | None:
    """Forget score (x, lower = more forgotten) vs utility (y, higher = more kept), per method."""
    m = results.get("modality", "image")
    points = [(n, cell(e, FORGET_KEY.format(m=m)), utility(e, m), e.get("role")) for n, e in _ordered(results["methods"])]
    points = [p for p in points if p[1] is not None and p[2] is not None]
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    markers = "osD^vP*Xhp<>"
    for k, (name, x, y, role) in enumerate(points):
        if role == "reference":
            ax.scatter([x], [y], s=80, marker="s", color="black", zorder=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, 5), fontsize=9)
        else:  # methods often sit close together: a legend instead of labels that overlap
            ax.scatter([x], [y], s=70, marker=markers[k % len(markers)], zorder=3, label=name)
    ax.set_xlabel("forget set: generation score (OFFSIDE overall; lower = forgotten)")
    ax.set_ylabel("utility: mean of retain, world-fact (general) scores")
    ax.set_title(f"{results.get('run', '')}: forgetting vs utility")
    ax.grid(alpha=0.3)
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.plot([0, 1], [1, 1], ls=":", color="grey")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="method", title_fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_attacks(results: Mapping[str, Any], path: Path) -> Path | None:
    """Grouped bars: forget-set generation score per method, without and under each attack."""
    key = FORGET_KEY.format(m=results.get("modality", "image"))
    methods = [(n, e) for n, e in _ordered(results["methods"]) if e.get("attacks")]
    attacks = sorted({a for _, e in methods for a in e["attacks"] if a != "clean"})
    if not methods or not attacks:
        return None
    plt = pyplot()
    series = ["none"] + attacks
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(min(16.0, max(7.0, 0.22 * len(methods) * len(series) + 3)), 4.8))
    x = np.arange(len(methods))
    cmap = plt.get_cmap("tab20")
    for k, attack in enumerate(series):
        values = [clean_score(e, key) if attack == "none" else e["attacks"].get(attack, {}).get("summary", {}).get(key)
                  for _, e in methods]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, [np.nan if v is None else v for v in values], width,
               label=attack, color="black" if attack == "none" else cmap(k % 20))
    ax.set_xticks(x, [n for n, _ in methods], rotation=20)
    ax.set_ylabel("forget set: generation score (higher = rumor back)")
    ax.set_title(f"{results.get('run', '')}: robustness of forgetting")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="attack", title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_relearning(results: Mapping[str, Any], path: Path) -> Path | None:
    """Recovery over fine-tuning steps: the relearning attack's forget score and, when run,
    corrective relearning's recovery rate (states the truth)."""
    key = FORGET_KEY.format(m=results.get("modality", "image"))
    attack_curves = [(n, e["attacks"]["relearn"]["curve"]) for n, e in _ordered(results["methods"])
                     if e.get("attacks", {}).get("relearn", {}).get("curve")]
    fix_curves = [(n, e["correction"]["curve"]) for n, e in _ordered(results["methods"])
                  if e.get("correction", {}).get("curve")]
    panels = [p for p in (("relearning attack", attack_curves, key, "forget set generation score"),
                          ("corrective relearning", fix_curves, "forget_recovery_rate", "recovery rate (states the truth)"))
              if p[1]]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    for ax, (title, curves, metric, ylabel) in zip(axes[0], panels):
        for name, curve in curves:
            pts = [(c["step"], c[metric]) for c in curve if c.get(metric) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


# -- report ---------------------------------------------------------------------------------------


def render_markdown(results: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    m = results.get("modality", "image")
    parts = [f"# OFFSIDE benchmark: {results.get('run', '')}", ""]
    if results.get("description"):
        parts += [str(results["description"]), ""]
    parts += ["## Methods", "",
              f"Scores on the {m} prompts of each test set (generation: OFFSIDE's overall = mean of BLEU and "
              "ROUGE-1/2/L; MCQ: accuracy). ↓ lower is better for forgetting, ↑ higher is better for utility. "
              "`forget quality` is TOFU's KS-test p-value of forget-set truth ratios against the retain-only model.",
              "", method_table(results), ""]
    for title, table in (("Attacks: forget-set generation score", attack_table(results)),
                         ("Form robustness: the forget set asked in other forms", form_table(results)),
                         ("Corrective relearning", correction_table(results)),
                         ("OFFSIDE findings", findings_table(results))):
        if table:
            parts += [f"## {title}", "", table, ""]
    if results.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    if plots:
        parts += ["## Plots", ""] + [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots] + [""]
    if results.get("timing"):
        parts += ["## Time", "", "| stage | seconds |", "|---|---:|"]
        parts += [f"| {k} | {v:.1f} |" for k, v in results["timing"].items()] + [""]
    return "\n".join(parts)


def write_report(run_dir: str | os.PathLike, results: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``results.json`` (when given), ``report.md`` and ``plots/*.png`` in ``run_dir``."""
    run_dir = Path(run_dir)
    if results is None:
        results = read_json(run_dir / "results.json")
    else:
        write_json(run_dir / "results.json", results)
    if not results.get("methods"):
        raise ValueError(f"{run_dir}: results.json has no methods to report")
    plot_dir = run_dir / "plots"
    made = [str(plot_dir / name) for name, fn in zip(PLOTS, (plot_tradeoff, plot_attacks, plot_relearning))
            if fn(results, plot_dir / name) is not None]
    report = write_text(run_dir / "report.md", render_markdown(results, made))
    return {"report": report, "results": run_dir / "results.json", **{Path(p).stem: Path(p) for p in made}}


def forget_quality_of_rows(method_rows: Sequence[Mapping[str, Any]], retain_rows: Sequence[Mapping[str, Any]]) -> float | None:
    """TOFU forget quality from two models' per-example outputs on the same forget items
    (``examples/*.jsonl`` rows carrying ``truth_ratio``); None when fewer than 2 pairs."""
    retain = {r["uid"]: r["truth_ratio"] for r in retain_rows if r.get("truth_ratio") is not None}
    pairs = [(r["truth_ratio"], retain[r["uid"]]) for r in method_rows if r.get("truth_ratio") is not None and r["uid"] in retain]
    if len(pairs) < 2:
        return None
    ours, theirs = zip(*pairs)
    return metrics.forget_quality(ours, theirs)


def compare_runs(run_dirs: Sequence[str | os.PathLike]) -> str:
    """One markdown table over several runs: a row per (run, method)."""
    loaded = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{d}: no results.json (is it a benchmark run directory?)")
        loaded.append((Path(d), read_json(path)))
    cols: list[tuple[str, str, str]] = []
    for _, res in loaded:
        for c in columns_for(res):
            if c[0] not in [x[0] for x in cols]:
                cols.append(c)
    head = "| run | method | " + " | ".join(f"{label} {'↓' if b == 'lower' else '↑'}" for label, _, b in cols) + " |"
    rows = [head, "|---|---|" + "---:|" * len(cols)]
    for d, res in loaded:
        own = {label: key for label, key, _ in columns_for(res)}
        for name, entry in _ordered(res["methods"]):
            rows.append(f"| {res.get('run', d.name)} | {name} | "
                        + " | ".join(fmt(cell(entry, own[label])) if label in own else "-" for label, _, _ in cols) + " |")
    return "\n".join(rows)

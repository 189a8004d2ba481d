"""The OFFSIDE evaluation suite: every test set, generation and multiple choice, one model.

    suite = Suite(release, processor_or_tokenizer, SuiteConfig(modalities=("image",)))
    results = suite.run(model, out_dir="results/run/vanilla/eval", name="vanilla")
    # or, once: evaluate(model, processor_or_tokenizer, release, config, out_dir=...)

Test sets (``eval.items.TEST_SETS``): forget (efficacy), test (generalization), retain and
world facts (utility), relearn (robustness; the attacks live in ``eval.attacks``). For each,
in each modality the release supplies:

- generation (``gen``): greedy answers (32 new tokens, as OFFSIDE) scored with BLEU and
  ROUGE-1/2/L and OFFSIDE's "overall" mean; on rumor questions with a known correction,
  whether the answer states the rumor or the truth (``states_rumor``/``states_truth``);
  with ``likelihood``, the reference answer's probability ``exp(-mean NLL)`` and, where the
  release defines wrong answers, TOFU's truth ratio;
- multiple choice (``mcq``): OFFSIDE's prompt and 32-token budget, OFFSIDE's strict parser on
  the raw output (``mcq_parser: robust`` for ours), accuracy, and on rumors whether the model
  picks the corrected option.

With ``forms`` (``eval.forms``), every forget-set generation item is also asked in other
forms (fill-in-the-blank, multiple choice, true/false, another name for the player, another
language, the answer spelled out) as tasks ``forget@<form>/<modality>/<fmt>``; true/false is
scored by ``accuracy`` (the verdict the vanilla model learned) and, on rumors, ``states_rumor``.

OFFSIDE leaves empty answers out of its means (``empty_outputs: drop``, the default; ``zero``
scores them 0); ``n_empty`` is reported beside every score. The summary adds OFFSIDE's average
over forget, retain, test and relearn (``offside_average/...``).

Every metric is reported for all items and for slices: ``rumor`` / ``fact`` questions (the
selective setting's split), and rumors whose image shows them (``visual_rumor``) or not
(``plain_rumor``). ``out_dir`` receives ``results.json`` (aggregates), ``config.json`` (this
config and what the caller says about the model) and ``examples/<task>.jsonl`` (every
prompt, output and score), written atomically.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from offside_jax.data.batches import ExampleEncoder, make_encoder
from offside_jax.data.offside import Release, load_release
from offside_jax.eval import forms as forms_lib
from offside_jax.eval import metrics
from offside_jax.eval.engine import answer_nll, evaluation_model, generate_texts
from offside_jax.eval.items import (FORMATS, GENERAL, MODALITIES, PURPOSE, TEST_SETS, EvalItem, Task, build_tasks,
                                    subsample)
from offside_jax.files import staged_dir, write_json, write_jsonl
from offside_jax.train import distributed

# Slices reported beside "all": name -> membership test.
SLICES: dict[str, Callable[[EvalItem], bool]] = {
    "rumor": lambda it: it.is_rumor is True,
    "fact": lambda it: it.is_rumor is False,
    "visual_rumor": lambda it: it.is_rumor is True and it.visual_rumor is True,
    "plain_rumor": lambda it: it.is_rumor is True and it.visual_rumor is False,
}


@dataclasses.dataclass
class SuiteConfig:
    """What to evaluate and how. Defaults follow OFFSIDE (32 new tokens, image prompts)."""

    test_sets: list[str] = dataclasses.field(default_factory=lambda: list(TEST_SETS))
    modalities: list[str] = dataclasses.field(default_factory=lambda: ["image"])
    formats: list[str] = dataclasses.field(default_factory=lambda: list(FORMATS))
    likelihood: bool = True  # answer probability and truth ratio (teacher-forced)
    max_new_tokens: int = 32
    mcq_max_new_tokens: int = 32  # eval_classi.py's default (eval.sh passes no other)
    mcq_parser: str = "offside"  # offside (OFFSIDE's strict regex, exactly) | robust (metrics.parse_choice)
    # Image generation prompts: "trained" (ms-swift's training layout: image, line break,
    # question) | "offside" (eval_generation.py's: image, then the raw user turn with its tag as text)
    generation_prompt: str = "trained"
    # Empty answers: "drop" leaves them out of every OFFSIDE score's mean (OFFSIDE's ``if
    # prediction:``), "zero" scores them 0. Either way ``n_empty`` counts them beside the score.
    empty_outputs: str = "drop"
    batch_size: int = 16
    pad_multiple: int = 16  # prompt lengths are rounded up to this (fewer compilations)
    max_examples: int | None = None  # per task, a deterministic stratified subset
    max_examples_per_set: dict[str, int] = dataclasses.field(default_factory=dict)  # overrides by test set
    seed: int = 0
    judge: str | None = None  # a registered eval.metrics judge; None: off
    # Question forms every forget-set generation item is asked in besides its own (eval.forms.FORMS:
    # open, blank, mcq, true_false, alias, language, spelled); []: off. Scored without likelihoods.
    forms: list[str] = dataclasses.field(default_factory=list)
    # The forms ask at most this many of each forget task's items (a stratified subset; then
    # the open form is scored on the same subset, as forget@open); None: all of them.
    forms_max_examples: int | None = None
    # Mesh (data, fsdp, tensor) every evaluated model is placed on (-1: the devices left).
    mesh: list[int] = dataclasses.field(default_factory=lambda: [1, -1, 1])

    def __post_init__(self) -> None:
        for name, allowed, given in (("test_sets", (*TEST_SETS, GENERAL), self.test_sets), ("modalities", MODALITIES, self.modalities),
                                     ("formats", FORMATS, self.formats)):
            bad = sorted(set(given) - set(allowed))
            if bad:
                raise ValueError(f"suite config: unknown {name} {bad}; expected some of {list(allowed)}")
        if self.generation_prompt not in ("trained", "offside"):
            raise ValueError(f"suite config: generation_prompt {self.generation_prompt!r} is not one of ['offside', 'trained']")
        if self.mcq_parser not in metrics.MCQ_PARSERS:
            raise ValueError(f"suite config: mcq_parser {self.mcq_parser!r} is not one of {sorted(metrics.MCQ_PARSERS)}")
        if self.empty_outputs not in metrics.EMPTY_POLICIES:
            raise ValueError(f"suite config: empty_outputs {self.empty_outputs!r} is not one of {metrics.EMPTY_POLICIES}")
        try:
            forms_lib.check_forms(self.forms)
        except ValueError as e:
            raise ValueError(f"suite config: forms: {e}") from None
        if self.forms and ("forget" not in self.test_sets or "gen" not in self.formats):
            raise ValueError("suite config: forms ask the forget set's generation items again: "
                             "test_sets must include forget and formats gen")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.mcq_max_new_tokens < 1:
            raise ValueError("suite config: batch_size, max_new_tokens and mcq_max_new_tokens must be >= 1")

    def limits(self) -> dict[str, int | None]:
        return {s: self.max_examples_per_set.get(s, self.max_examples) for s in self.test_sets}


class Suite:
    """The tasks of one release for one prompt encoder; :meth:`run` evaluates a model.

    Building the tasks once and running many models (vanilla, every method, every attack)
    reuses the items and the compiled programs.
    """

    def __init__(self, release: Release | str | os.PathLike, processor_or_tokenizer: Any,
                 config: SuiteConfig | None = None, *, tasks: Sequence[Task] | None = None, mesh: Any = None,
                 form_tasks: Sequence[Task] | None = None):
        self.release = release if isinstance(release, Release) else load_release(release)
        self.encoder: ExampleEncoder = make_encoder(processor_or_tokenizer)
        self.config = config or SuiteConfig()
        built = tasks is None
        if tasks is None:
            modalities = self.config.modalities
            if not self.encoder.supports_images and "image" in modalities:
                raise ValueError("a text-only model cannot be evaluated on image prompts: use modalities=['text']")
            tasks = build_tasks(self.release, self.config.test_sets, modalities, self.config.formats,
                                max_examples=self.config.limits(), seed=self.config.seed)
            if self.config.generation_prompt != "trained":
                tasks = [dataclasses.replace(t, items=tuple(dataclasses.replace(i, layout=self.config.generation_prompt)
                                                            for i in t.items)) for t in tasks]
        if not tasks:
            raise ValueError(f"{self.release.root}: the release supplies none of the requested tasks "
                             f"({self.config.test_sets} x {self.config.modalities} x {self.config.formats})")
        self.tasks = list(tasks)
        # The forms (config.forms) of the forget items, when the suite builds its own tasks;
        # kept apart from ``tasks`` so attacks and corrective relearning never rewrite them.
        self.form_tasks: list[Task] = list(form_tasks or [])
        self.form_counts: dict[str, dict[str, int]] = {}
        if built and self.config.forms:
            limit = self.config.forms_max_examples
            forget = [t for t in self.tasks if t.test_set == "forget" and t.fmt == "gen"]
            asked = [dataclasses.replace(t, items=tuple(subsample(t.items, limit, self.config.seed))) for t in forget]
            subset = any(len(a.items) < len(t.items) for a, t in zip(asked, forget))
            self.form_tasks, self.form_counts = forms_lib.form_tasks(self.release, asked, self.config.forms,
                                                                     open_tasks=subset)
        self._mesh = mesh  # None: built from config.mesh when first needed

    @property
    def mesh(self):
        if self._mesh is None:
            from offside_jax.train import mesh as mesh_lib

            self._mesh = mesh_lib.mesh_for_shape(self.config.mesh)
        return self._mesh

    @property
    def modality(self) -> str:
        """The one modality a fine-tune on this release uses (relearning, correction): image
        when the encoder takes images and the config evaluates them, else text."""
        return "image" if self.encoder.supports_images and "image" in self.config.modalities else "text"

    def with_tasks(self, tasks: Sequence[Task]) -> "Suite":
        """The same release, encoder and config over other tasks (e.g. attacked prompts)."""
        other = Suite(self.release, self.encoder, self.config, tasks=tasks)
        other._mesh = self._mesh
        return other

    def with_config(self, config: SuiteConfig) -> "Suite":
        """The same tasks scored with another config (e.g. without likelihoods)."""
        other = Suite(self.release, self.encoder, config, tasks=self.tasks, form_tasks=self.form_tasks)
        other.form_counts = self.form_counts
        other._mesh = self._mesh
        return other

    def size(self) -> int:
        return sum(len(t.items) for t in self.tasks)

    def run(self, model: Any, out_dir: str | os.PathLike | None = None, *, name: str = "model",
            info: Mapping[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
        """Evaluate ``model`` on every task; write the outputs under ``out_dir`` when given."""
        from tqdm.auto import tqdm

        cfg = self.config
        model = evaluation_model(model, self.mesh)
        tasks = self.tasks + self.form_tasks
        total = sum(len(t.items) * (1 + (cfg.likelihood and t.fmt == "gen" and t.form is None)) for t in tasks)
        bar = tqdm(total=total, desc=f"eval {name}", unit="prompt", disable=not (progress and distributed.is_primary()),
                   leave=False)
        judge = metrics.make_judge(cfg.judge)
        started = time.perf_counter()
        results: dict[str, Any] = {"name": name, "tasks": {}}
        rows: dict[str, list[dict[str, Any]]] = {}
        form_seconds = 0.0
        try:
            for task in tasks:
                bar.set_postfix_str(task.name)
                task_started = time.perf_counter()
                items = list(task.items)
                max_new = cfg.max_new_tokens if task.fmt == "gen" else cfg.mcq_max_new_tokens
                outputs = generate_texts(model, self.encoder, items, max_new_tokens=max_new, batch_size=cfg.batch_size,
                                         pad_multiple=cfg.pad_multiple, on_batch=bar.update)
                if task.fmt == "gen":
                    wanted = cfg.likelihood and task.form is None
                    likelihood = self._likelihood(model, items, bar.update) if wanted else None
                    per = scored_by_share(items, lambda mine, items=items, outputs=outputs, likelihood=likelihood:
                                          score_generation([items[i] for i in mine], [outputs[i] for i in mine],
                                                           None if likelihood is None
                                                           else [likelihood[i] for i in mine], judge))
                else:
                    per = scored_by_share(items, lambda mine, items=items, outputs=outputs: score_mcq(
                        [items[i] for i in mine], [outputs[i] for i in mine], cfg.mcq_parser))
                rows[task.name] = per
                results["tasks"][task.name] = aggregate_task(task, per, cfg.empty_outputs)
                if task.form is not None:
                    form_seconds += time.perf_counter() - task_started
        finally:
            bar.close()
        results["summary"] = summarize(results["tasks"])
        if self.form_tasks:
            results["forms"] = {"counts": self.form_counts, "seconds": form_seconds}
        results["seconds"] = time.perf_counter() - started
        if out_dir is not None:
            if distributed.is_primary():
                save(out_dir, results, rows, {"suite": dataclasses.asdict(cfg), "name": name, **(info or {})})
            distributed.barrier("suite-saved")
        return results

    def _likelihood(self, model, items: Sequence[EvalItem], on_batch) -> list[dict[str, float]]:
        """Per item: the reference's probability and, where wrong answers exist, the truth ratio."""
        cfg = self.config
        reference_nll = answer_nll(model, self.encoder, items, [it.reference for it in items],
                                   batch_size=cfg.batch_size, pad_multiple=cfg.pad_multiple, on_batch=on_batch)
        wrong = [(i, a) for i, it in enumerate(items) for a in it.answers[1:]]
        wrong_nll = np.zeros(0)
        if wrong:
            wrong_nll = answer_nll(model, self.encoder, [items[i] for i, _ in wrong], [a for _, a in wrong],
                                   batch_size=cfg.batch_size, pad_multiple=cfg.pad_multiple)
        by_item: dict[int, list[float]] = {}
        for (i, _), nll in zip(wrong, wrong_nll):
            by_item.setdefault(i, []).append(float(nll))
        out = []
        for i, nll in enumerate(reference_nll):
            row = {"answer_nll": float(nll), "answer_prob": float(np.exp(-nll))}
            if i in by_item:
                row["truth_ratio"] = float(metrics.truth_ratio(np.array([nll]), np.array([by_item[i]]))[0])
            out.append(row)
        return out


def evaluate(model: Any, processor_or_tokenizer: Any, release: Release | str | os.PathLike,
             config: SuiteConfig | None = None, *, out_dir: str | os.PathLike | None = None,
             name: str = "model", info: Mapping[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Build the suite for ``release`` and evaluate ``model`` once (see :class:`Suite`)."""
    return Suite(release, processor_or_tokenizer, config).run(model, out_dir, name=name, info=info, progress=progress)


# -- scoring ------------------------------------------------------------------------------------


def scored_by_share(items: Sequence[EvalItem], score: Callable[[list[int]], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-example records of every item, in item order, in every process.

    ``score(indices)`` scores the items at ``indices``. Each process scores its share (every
    ``count``-th item from its own index; one process: all of them) and the records are
    gathered, so the CPU-bound scoring (ROUGE, BLEU, a judge) is split across the hosts.
    """
    index, count = jax.process_index(), jax.process_count()
    shares = distributed.gather_objects(score(list(range(index, len(items), count))))
    rows: list[dict[str, Any]] = [{}] * len(items)
    for process, share in enumerate(shares):
        for i, row in zip(range(process, len(items), count), share):
            rows[i] = row
    return rows



def score_generation(items: Sequence[EvalItem], outputs: Sequence[str],
                     likelihood: Sequence[Mapping[str, float]] | None = None,
                     judge: metrics.Judge | None = None) -> list[dict[str, Any]]:
    """Per-example records: item metadata, prompt, reference, output and every score."""
    judged = (metrics.judge_scores(judge, [it.question for it in items], [it.reference for it in items], outputs)
              if judge is not None else None)
    rows = []
    for k, (item, output) in enumerate(zip(items, outputs)):
        row = {**item.meta(), "prompt": item.prompt, "reference": item.reference, "output": output,
               "empty": metrics.is_empty(output)}
        if item.form == "true_false":  # a verdict, not a text to compare
            row.update(forms_lib.true_false_row(item, output or ""))
            rows.append(row)
            continue
        said = output or ""
        if item.form == "spelled":  # scored with the separators removed
            said = row["despelled"] = forms_lib.despell(said)
        row.update(metrics.generation_scores(item.reference, said))
        if item.truth and item.rumor:
            classify = forms_lib.classify_spelled if item.form == "spelled" else metrics.classify_correction
            row["correction"] = classify(said, item.truth, item.rumor)
        if item.keys:
            row["mentions_key"] = mentions_any(said, item.keys)
        if likelihood is not None:
            row.update(likelihood[k])
        if judged is not None:
            row["judge"] = float(judged[k])
        rows.append(row)
    return rows


def _words(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return " " + " ".join(re.sub(r"[\W_]+", " ", text).split()) + " "


def mentions_any(output: str, phrases: Sequence[str]) -> bool:
    """Whether ``output`` contains one of ``phrases`` as whole words (case-, accent- and
    punctuation-insensitive): "It is Paris." mentions "Paris", "Parisian" does not."""
    words = _words(output)
    return any(_words(p).strip() and _words(p) in words for p in phrases)


def score_mcq(items: Sequence[EvalItem], outputs: Sequence[str], parser: str = "offside") -> list[dict[str, Any]]:
    """Per-example records; the output goes to the parser exactly as decoded (OFFSIDE strips
    nothing: " A" is no answer to its parser). With OFFSIDE's parser the parsed letter is compared
    with the release's ``Correct_Answer`` exactly as written, as its ``eval_classi.py`` does (a
    record whose answer reads "B." is never right there); the robust parser compares letters."""
    parse = metrics.MCQ_PARSERS[parser]
    rows = []
    for item, output in zip(items, outputs):
        options = item.option_dict
        choice = parse(output or "", options)
        answer = item.correct_raw if parser == "offside" and item.correct_raw is not None else item.correct
        row = {**item.meta(), "prompt": item.prompt, "options": options, "correct": item.correct, "output": output,
               "empty": metrics.is_empty(output), "choice": choice, "is_correct": choice == answer}
        if answer != item.correct:
            row["correct_as_written"] = answer
        if item.corrected_letter:
            row["chose_truth"] = choice == item.corrected_letter
        if item.form is not None and (label := forms_lib.mcq_correction(item, choice)) is not None:
            row["correction"] = label  # the forms' states_rumor
        rows.append(row)
    return rows


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _aggregate_rows(fmt: str, test_set: str, rows: Sequence[Mapping[str, Any]], empty: str = "drop") -> dict[str, Any]:
    # OFFSIDE's scores (BLEU/ROUGE/overall, MCQ accuracy) are means over the answers it keeps:
    # with "drop", the empty ones leave the mean; n_empty counts them either way.
    scored = [r for r in rows if empty == "zero" or not r.get("empty")]
    out: dict[str, Any] = {"n": len(rows), "n_empty": sum(bool(r.get("empty")) for r in rows)}
    if fmt == "gen":
        for key in ("bleu", "rouge1", "rouge2", "rougeL"):
            out[key] = _mean(scored, key)
        parts = [out["bleu"], out["rouge1"], out["rouge2"], out["rougeL"]]
        out["overall"] = None if None in parts else sum(parts) / 4  # OFFSIDE's overall
        if any("is_correct" in r for r in rows):  # true/false verdicts
            verdicts = [r for r in scored if "is_correct" in r]
            out["accuracy"] = float(np.mean([bool(r["is_correct"]) for r in verdicts])) if verdicts else 0.0
            out["unparsed"] = float(np.mean([r["verdict"] is None for r in verdicts])) if verdicts else 0.0
        _correction_rates(rows, out)
        if any("answer_prob" in r for r in rows):
            out["answer_prob"] = _mean(rows, "answer_prob")
        ratios = [r["truth_ratio"] for r in rows if "truth_ratio" in r]
        if ratios:
            score = metrics.forget_truth_ratio_score if test_set in ("forget", "relearn") else metrics.retain_truth_ratio_score
            out.update(truth_ratio=score(ratios), n_truth_ratio=len(ratios))
        if any("mentions_key" in r for r in rows):
            out["key_accuracy"] = float(np.mean([bool(r["mentions_key"]) for r in rows if "mentions_key" in r]))
        if any("judge" in r for r in rows):
            out["judge"] = _mean(rows, "judge")
    else:
        # eval_classi.py: correct / len(results) if results else 0
        out["accuracy"] = float(np.mean([bool(r["is_correct"]) for r in scored])) if scored else 0.0
        out["unparsed"] = float(np.mean([r["choice"] is None for r in scored])) if scored else 0.0
        truth = [bool(r["chose_truth"]) for r in rows if "chose_truth" in r]
        if truth:
            out.update(chose_truth=float(np.mean(truth)), n_corrections=len(truth))
        _correction_rates(rows, out)
    return out


def _correction_rates(rows: Sequence[Mapping[str, Any]], out: dict[str, Any]) -> None:
    """``states_truth`` / ``states_rumor`` (a "both" answer states the rumor too) of the rows
    labelled with a correction."""
    labelled = [r["correction"] for r in rows if "correction" in r]
    if labelled:
        rates = metrics.correction_rates(labelled)
        out.update(states_truth=rates["states_truth"], states_rumor=rates["states_rumor"] + rates["both"],
                   n_corrections=len(labelled))


def aggregate_task(task: Task, rows: Sequence[Mapping[str, Any]], empty: str = "drop") -> dict[str, Any]:
    """A task's aggregates over all rows and over each non-trivial slice."""
    slices = {"all": _aggregate_rows(task.fmt, task.test_set, rows, empty)}
    for name, member in SLICES.items():
        chosen = [r for it, r in zip(task.items, rows) if member(it)]
        if chosen and len(chosen) < len(rows):
            slices[name] = _aggregate_rows(task.fmt, task.test_set, chosen, empty)
    return {"test_set": task.test_set, "purpose": PURPOSE[task.test_set], "modality": task.modality,
            "format": task.fmt, "n": len(rows), "slices": slices}


HEADLINE = {"gen": ("overall", "n_empty", "states_rumor", "states_truth", "answer_prob", "truth_ratio",
                    "key_accuracy", "accuracy"),
            "mcq": ("accuracy", "n_empty", "chose_truth", "states_rumor")}
# OFFSIDE's cross-split average (eval_relearn.sh): these scores over forget, retain, test, relearn.
CROSS_SPLIT_METRICS = {"gen": ("overall", "bleu", "rouge1", "rouge2", "rougeL"), "mcq": ("accuracy",)}
CROSS_SPLIT = "offside_average"


def summarize(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Flat headline numbers, ``"<task>.<metric>"`` and ``"<task>[<slice>].<metric>"``, plus
    OFFSIDE's average over its four test sets, ``"offside_average/<modality>/<format>.<metric>"``
    (truncated to 4 decimals as its script prints it).

    The report's method x metric table and the findings read these keys.
    """
    out: dict[str, float] = {}
    for name, task in tasks.items():
        for slice_name, values in task["slices"].items():
            label = name if slice_name == "all" else f"{name}[{slice_name}]"
            for metric in HEADLINE[task["format"]]:
                if values.get(metric) is not None:
                    out[f"{label}.{metric}"] = float(values[metric])
    for modality in sorted({t["modality"] for t in tasks.values()}):
        for fmt, names in CROSS_SPLIT_METRICS.items():
            per_set = [tasks.get(f"{s}/{modality}/{fmt}") for s in metrics.CROSS_SPLIT_SETS]
            if not any(per_set):
                continue
            for metric in names:
                value = metrics.offside_cross_split_average(
                    [t["slices"]["all"].get(metric) if t else None for t in per_set])
                if value is not None:
                    out[f"{CROSS_SPLIT}/{modality}/{fmt}.{metric}"] = value
    return out


def save(out_dir: str | os.PathLike, results: Mapping[str, Any], rows: Mapping[str, Sequence[Mapping[str, Any]]],
         config: Mapping[str, Any]) -> Path:
    """``results.json``, ``config.json`` and ``examples/<task>.jsonl`` under ``out_dir`` (atomic)."""
    with staged_dir(out_dir) as tmp:
        write_json(tmp / "results.json", results)
        write_json(tmp / "config.json", config)
        for task, task_rows in rows.items():
            write_jsonl(tmp / "examples" / (task.replace("/", "_") + ".jsonl"), task_rows)
    return Path(out_dir)

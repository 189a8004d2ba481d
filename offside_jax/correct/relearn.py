"""Corrective relearning: after unlearning a rumor, teach what really happened.

Unlearning only stops a model from stating the rumor; RESTOR asks whether it can be brought
to state the truth. :func:`correct` fine-tunes (LoRA, through the training core) on the
forget set's rumor questions answered with their ``corrected_answer`` (and, optionally,
a question about the rumor answered with the record's ``corrected_fact``), then measures:

- **recovery**: on rumor questions, the fraction of answers that state the true value and
  not the rumor (``eval.metrics.classify_correction``; RESTOR-style recovery rate), on the
  trained prompts (forget set) and on held-out prompts about the same rumors (relearn set:
  other images and wordings), plus the multiple-choice rate of picking the corrected option;
- **collateral damage**: the change of every retain / world-facts score from before to after;
- a **recovery curve**: the forget set's recovery rate every ``curve_every`` steps.

``tune.half_finetune.enabled=true`` (``correction.tune.half_finetune`` in a benchmark config)
corrects with Half Fine-Tuning (``offside_jax.train.half_finetune``): each round only a random
half of every decoder block's matrices (with LoRA: their adapters) trains, to limit the
collateral damage.

    out = correct(unlearned_model, suite, CorrectionConfig(), out_dir="results/run/ga/correction")
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from offside_jax.data.offside import Example, Release
from offside_jax.eval.items import EvalItem, qa_item
from offside_jax.files import write_json
from offside_jax.eval.tuning import TuneConfig, curve_steps, tune
from offside_jax.models.generate import rewrapped, underlying_model
from offside_jax.train import distributed

RUMOR_QUESTION = "What really happened with the transfer rumor about this player?"
RUMOR_QUESTION_TEXT = "What really happened with the transfer rumor about {name}?"


@dataclasses.dataclass
class CorrectionConfig:
    tune: TuneConfig = dataclasses.field(default_factory=lambda: TuneConfig(steps=40, lr=3e-4))
    with_statements: bool = True  # also teach corrected_fact as the answer to RUMOR_QUESTION
    curve_every: int = 10  # recovery measured every this many steps (0: start and end only)
    eval_test_sets: list[str] = dataclasses.field(default_factory=lambda: ["forget", "relearn", "retain", "world"])


def _forget_records(release: Release, modality: str) -> list[Example]:
    setting = "complete" if modality == "image" else "pure_text"
    return list(release.splits.get(setting, {}).get("forget", []))


def correction_pairs(release: Release, modality: str = "image", with_statements: bool = True) -> list[tuple[EvalItem, str]]:
    """(prompt, true answer) pairs: each forget-set rumor question with its corrected
    answer, plus one corrected-fact statement per forget image when ``with_statements``."""
    root = Path(release.root)
    records = _forget_records(release, modality)
    pairs = [(qa_item(e, "forget", root), e.corrected_answer) for e in records if e.is_rumor and e.corrected_answer]
    if with_statements:
        seen = set()
        for e in records:
            key = (e.image_id, e.player_id)
            if not e.corrected_fact or key in seen:
                continue
            seen.add(key)
            item = qa_item(e, "forget", root)
            if modality == "image":
                question = RUMOR_QUESTION
            elif " did not join " in e.corrected_fact:  # the synthetic wording: "<name> did not join <club>; ..."
                question = RUMOR_QUESTION_TEXT.format(name=e.corrected_fact.split(" did not join ")[0])
            else:
                continue  # a text prompt must name the player, and the record does not say how
            pairs.append((dataclasses.replace(item, question=question, prompt=question, reference=e.corrected_fact,
                                              uid=f"{item.uid}:corrected_fact"), e.corrected_fact))
    if not pairs:
        raise ValueError(f"{root}: the forget set ({modality}) has no records with corrected_answer / corrected_fact")
    return pairs


def recovery_summary(summary: Mapping[str, float], modality: str) -> dict[str, float | None]:
    """RESTOR-style numbers from a suite summary: recovery (states the truth) and residual
    rumor rates on rumor questions, trained (forget) and held-out (relearn) prompts."""
    out = {}
    for label, test_set in (("forget", "forget"), ("heldout", "relearn")):
        gen = f"{test_set}/{modality}/gen"
        mcq = f"{test_set}/{modality}/mcq"
        out[f"{label}_recovery_rate"] = summary.get(f"{gen}[rumor].states_truth") if f"{gen}[rumor].states_truth" in summary else summary.get(f"{gen}.states_truth")
        out[f"{label}_rumor_rate"] = summary.get(f"{gen}[rumor].states_rumor") if f"{gen}[rumor].states_rumor" in summary else summary.get(f"{gen}.states_rumor")
        out[f"{label}_mcq_chose_truth"] = summary.get(f"{mcq}.chose_truth")
    return out


def collateral_damage(before: Mapping[str, float], after: Mapping[str, float],
                      test_sets: Sequence[str] = ("retain", "world")) -> dict[str, float]:
    """``before - after`` of every all-items headline score of the given test sets (positive:
    the correction cost that much)."""
    out = {}
    for key, value in before.items():
        task = key.split(".")[0]
        if "[" in task or task.split("/")[0] not in test_sets or key not in after:
            continue
        out[key] = float(value) - float(after[key])
    return out


def correct(model: nnx.Module, suite: Any, config: CorrectionConfig | None = None, *,
            before: Mapping[str, Any] | None = None, out_dir: str | os.PathLike | None = None,
            name: str = "model", progress: bool = True) -> dict[str, Any]:
    """Corrective relearning of ``model`` (unchanged; a tuned copy is evaluated).

    ``suite`` is an ``eval.suite.Suite``; ``before`` its results for ``model`` if already
    computed. With ``out_dir``: ``before/`` and ``after/`` suite outputs and ``correction.json``.
    """
    config = config or CorrectionConfig()
    modality = suite.modality
    pairs = correction_pairs(suite.release, modality, config.with_statements)
    eval_suite = suite.with_tasks([t for t in suite.tasks if t.test_set in config.eval_test_sets])
    out = Path(out_dir) if out_dir is not None else None
    if before is None:
        before = eval_suite.run(model, None if out is None else out / "before", name=f"{name}", progress=progress)
    curve_tasks = [t for t in suite.tasks if t.test_set == "forget" and t.fmt == "gen"]
    # The curve follows what the model says; answer probabilities would only cost time there.
    curve_suite = (suite.with_tasks(curve_tasks).with_config(dataclasses.replace(suite.config, likelihood=False))
                   if curve_tasks else None)

    # A generation wrapper (GUARD) relearns its weights and keeps guarding them.
    def score(m):
        summary = curve_suite.run(rewrapped(model, m), name=f"{name} correcting", progress=False)["summary"]
        return {k: v for k, v in recovery_summary(summary, modality).items() if v is not None and k.startswith("forget")}

    steps, every = config.tune.steps, config.curve_every
    at = curve_steps(steps, every)
    tuned = tune(underlying_model(model), suite.encoder, pairs, config.tune, evaluate=score if curve_suite else None,
                 evaluate_at=at, progress=progress)
    corrected = rewrapped(model, tuned.model)
    after = eval_suite.run(corrected, None if out is None else out / "after", name=f"{name} corrected",
                           info={"correction": dataclasses.asdict(config), "pairs": len(pairs)}, progress=progress)
    result = {
        "pairs": len(pairs),
        "before": recovery_summary(before["summary"], modality),
        "after": recovery_summary(after["summary"], modality),
        "collateral": collateral_damage(before["summary"], after["summary"]),
        "curve": tuned.history,
        "losses": tuned.losses,
        "config": dataclasses.asdict(config),
    }
    if out is not None and distributed.is_primary():
        write_json(out / "correction.json", result)
    result["model"] = corrected
    return result

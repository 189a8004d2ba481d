"""The OFFSIDE unlearning settings as data selection over a loaded release, and the batches.

Settings (``setting``):

- ``multimodal``: forget the forget images' questions asked *with the image*
  (``complete/forget``), keep the retain images' (``complete/retain``); needs a
  vision-language model. Evaluated on the same records and on their text-only twins.
- ``unimodal``: train on the text-only twins (``pure_text/forget``, ``pure_text/retain``);
  a vision-language model is then also evaluated on the image questions, which is where
  OFFSIDE finds that text-only unlearning does not reach multimodal rumors.
- ``selective``: forget part of the forget images' questions and keep the rest: the release's
  ``selective/forget_part``, kept against ``selective/retain_part`` plus ``complete/retain``.

``forget_attributes`` makes any setting selective by attribute: only forget records whose
attribute is listed (``"rumor"`` stands for the rumor answers themselves) are forgotten; the
forget set's other records join the retain set. ``identified_fraction`` < 1 is the corrective
setting: methods see only a seeded subset of the forget set (SSD's full data D still holds all
of it, as the training set did).

:class:`UnlearningBatches` draws the sub-batches a method's loss reads (``forget``, ``retain``,
``forget_idk``, ``forget_alt``; see ``offside_jax.unlearn.losses``) with a configurable
forget:retain row ratio (OFFSIDE's GD uses 1:3). The three forget variants share their rows:
the same questions answered with the original answer, a refusal, and the corrected fact.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from offside_jax.data.attributes import ATTRIBUTES
from offside_jax.data.batches import BatchDataError, ExampleEncoder, epoch_rows, with_answer
from offside_jax.data.offside import Example, Release
from offside_jax.unlearn.dampening import identified_subset

SETTINGS = ("multimodal", "unimodal", "selective")
RUMOR = "rumor"  # in forget_attributes: the records whose answer states the rumor
SUB_BATCHES = ("forget", "retain", "forget_idk", "forget_alt")

# Refusals for IdK / IdkDPO (TOFU-style "I don't know" answers). A record always gets the
# same one (chosen by its index), so runs are reproducible.
REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure about that.",
    "I have no information about that.",
    "I can't answer that question.",
    "That is something I don't know.",
    "I'm unable to say.",
    "I don't have that information.",
    "I cannot confirm that.",
)


class SettingError(ValueError):
    """A setting that cannot be built from this release or model; the message says why."""


@dataclasses.dataclass
class UnlearningSets:
    """The examples of one setting."""

    setting: str
    forget: list[Example]  # what methods unlearn from (the identified part of the forget set)
    forget_all: list[Example]  # the whole forget set
    retain: list[Example]
    evaluation: dict[str, list[Example]]  # named sets to measure before and after

    @property
    def full(self) -> list[Example]:
        """SSD's training data D: retain + the whole forget set."""
        return self.retain + self.forget_all

    def counts(self) -> dict[str, int]:
        return {"forget": len(self.forget), "forget_all": len(self.forget_all), "retain": len(self.retain),
                **{f"eval/{k}": len(v) for k, v in self.evaluation.items()}}


def _split(release: Release, setting: str, split: str) -> list[Example]:
    try:
        examples = release[setting, split]
    except KeyError:
        raise SettingError(f"{release.root}: the release has no {setting}/{split} split "
                           f"(settings read: {', '.join(release.splits) or 'none'})") from None
    return [e for e in examples if e.kind == "qa"]


def _matcher(attributes: Sequence[str]):
    unknown = sorted(set(attributes) - set(ATTRIBUTES) - {RUMOR})
    if unknown:
        raise SettingError(f"unknown forget_attributes {unknown}; valid: {RUMOR!r} or one of {', '.join(ATTRIBUTES)}")
    wanted = set(attributes)

    def matches(example: Example) -> bool:
        # The rumor label is the loader's (read from the record or derived from OFFSIDE's
        # construction, `data.construction`), the same one the evaluation slices use.
        return (RUMOR in wanted and example.is_rumor is True) or example.attribute in wanted

    return matches


def _by_attribute(forget: list[Example], attributes: Sequence[str]) -> tuple[list[Example], list[Example]]:
    """(records to forget, the forget set's other records) by attribute."""
    if RUMOR in attributes:
        unknown = [e for e in forget if e.is_rumor is None]
        if unknown:
            raise SettingError(f"{unknown[0].source}: record {unknown[0].index}: no rumor label, and "
                               f"{len(unknown)} forget record(s) like it; forget_attributes={RUMOR!r} needs "
                               "records whose rumor label is read or derived (image ids named by number)")
    matches = _matcher(attributes)
    chosen = [e for e in forget if matches(e)]
    return chosen, [e for e in forget if not matches(e)]


def select(
    release: Release,
    setting: str,
    *,
    vision: bool,
    forget_attributes: Sequence[str] = (),
    identified_fraction: float = 1.0,
    seed: int = 0,
) -> UnlearningSets:
    """The forget/retain/evaluation examples of ``setting`` for a model with (``vision``) or
    without image inputs."""
    if setting not in SETTINGS:
        raise SettingError(f"unknown setting {setting!r}; expected one of {', '.join(SETTINGS)}")
    if setting != "unimodal" and not vision:
        raise SettingError(f"the {setting} setting asks questions about images and needs a vision-language model "
                           "(Qwen2.5-VL / Qwen2-VL); a text-only model takes setting=unimodal")
    evaluation: dict[str, list[Example]] = {}
    if setting == "unimodal":
        forget, retain = _split(release, "pure_text", "forget"), _split(release, "pure_text", "retain")
    elif setting == "multimodal" or forget_attributes:
        forget, retain = _split(release, "complete", "forget"), _split(release, "complete", "retain")
    else:
        forget = _split(release, "selective", "forget_part")
        retain = _split(release, "selective", "retain_part") + _split(release, "complete", "retain")
    moved: list[Example] = []
    if forget_attributes:
        forget, moved = _by_attribute(forget, forget_attributes)
        if not forget:
            raise SettingError(f"no forget record has an attribute in {list(forget_attributes)}")
    retain = moved + retain
    if not forget or not retain:
        raise SettingError(f"the {setting} setting selected {len(forget)} forget and {len(retain)} retain records")
    evaluation["forget"], evaluation["retain"] = forget, retain

    # The other modality, where the release has it: does forgetting transfer across modalities?
    twin = ("complete", "image") if setting == "unimodal" else ("pure_text", "text")
    if (setting == "unimodal" and vision) or (setting != "unimodal" and "pure_text" in release.splits):
        twin_forget, twin_retain = _split(release, twin[0], "forget"), _split(release, twin[0], "retain")
        if forget_attributes:
            twin_forget, twin_moved = _by_attribute(twin_forget, forget_attributes)
            twin_retain = twin_moved + twin_retain
        if setting == "selective" and not forget_attributes:
            parts = {(e.image_id, e.attribute) for e in forget}
            twin_forget = [e for e in twin_forget if (e.image_id, e.attribute) in parts]
        evaluation[f"forget_{twin[1]}"], evaluation[f"retain_{twin[1]}"] = twin_forget, twin_retain

    if not 0 < identified_fraction <= 1:
        raise SettingError(f"identified_fraction must be in (0, 1], got {identified_fraction}")
    identified = [forget[i] for i in identified_subset(len(forget), identified_fraction, seed)]
    return UnlearningSets(setting, identified, forget, retain, {k: v for k, v in evaluation.items() if v})


def refusal(example: Example, refusals: Sequence[str] = REFUSALS) -> str:
    return refusals[example.index % len(refusals)]


def alternate_answer(example: Example) -> str:
    """DPO's preferred alternative: the corrected answer, else the corrected fact."""
    answer = example.corrected_answer or example.corrected_fact
    if not answer:
        raise BatchDataError(f"{example.source}: record {example.index}: no corrected_answer or corrected_fact for "
                             "DPO's alternate answer; use idk_dpo (a refusal) on this release")
    return answer


class UnlearningBatches:
    """``batch_at(i)``: the i-th batch of sub-batches ``splits`` (for `train.loop.IndexedBatches`).

    ``forget_batch_size`` forget rows and ``retain_ratio`` times as many retain rows per batch;
    forget and retain each cycle through their own shuffled epochs (seeded streams).
    """

    def __init__(
        self,
        sets: UnlearningSets,
        encoder: ExampleEncoder,
        splits: Sequence[str],
        *,
        forget_batch_size: int,
        retain_ratio: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        refusals: Sequence[str] = REFUSALS,
        cached: Mapping[str, np.ndarray] | None = None,
    ):
        unknown = sorted(set(splits) - set(SUB_BATCHES))
        if unknown:
            raise SettingError(f"unknown sub-batch(es) {unknown}; known: {', '.join(SUB_BATCHES)}")
        if retain_ratio < 0 or ("retain" in splits and retain_ratio < 1):
            raise SettingError(f"retain_ratio must be >= 1 when the method reads retain data, got {retain_ratio}")
        if not refusals:
            raise SettingError("refusals must list at least one answer")
        self.sets, self.encoder, self.splits = sets, encoder, tuple(splits)
        self.forget_rows, self.retain_rows = forget_batch_size, forget_batch_size * retain_ratio
        self.seed, self.shuffle, self.refusals = seed, shuffle, tuple(refusals)
        # Per forget record, arrays a loss reads beside the batch (``ref_logp``: cached reference log-probs).
        self.cached = dict(cached or {})
        self._check_sizes()

    def _check_sizes(self) -> None:
        for name, n, rows in (("forget", len(self.sets.forget), self.forget_rows),
                              ("retain", len(self.sets.retain), self.retain_rows)):
            if (name == "forget" or "retain" in self.splits) and not 0 < rows <= n:
                raise SettingError(f"a batch takes {rows} {name} rows but the {name} set has {n} records; "
                                   "lower forget_batch_size or retain_ratio")

    def _forget_variant(self, split: str, example: Example) -> Example:
        if split == "forget_idk":
            return with_answer(example, refusal(example, self.refusals))
        if split == "forget_alt":
            return with_answer(example, alternate_answer(example))
        return example

    def __call__(self, index: int) -> dict[str, Mapping[str, np.ndarray]]:
        out = {}
        forget_splits = [s for s in self.splits if s != "retain"]
        if forget_splits:
            rows = epoch_rows(len(self.sets.forget), self.forget_rows, index, seed=self.seed, stream=0, shuffle=self.shuffle)
            examples = [self.sets.forget[r] for r in rows]
            for split in forget_splits:
                out[split] = self.encoder.collate([self.encoder.encode(self._forget_variant(split, e)) for e in examples])
            if "forget" in self.cached and "forget" in out:
                out["forget"] = {**out["forget"], "ref_logp": np.asarray(self.cached["forget"])[rows]}
        if "retain" in self.splits:
            rows = epoch_rows(len(self.sets.retain), self.retain_rows, index, seed=self.seed, stream=1, shuffle=self.shuffle)
            out["retain"] = self.encoder.collate([self.encoder.encode(self.sets.retain[r]) for r in rows])
        return out

    def all_examples(self) -> list[Example]:
        """Every example (and answer variant) a batch may hold: to measure the batch shape."""
        examples = list(self.sets.forget) if any(s != "retain" for s in self.splits) else []
        for split in ("forget_idk", "forget_alt"):
            if split in self.splits:
                examples += [self._forget_variant(split, e) for e in self.sets.forget]
        if "retain" in self.splits:
            examples += self.sets.retain
        return examples

"""Form robustness: every forget fact asked in several forms (ORT's form-dependent bias).

A method may "forget" a fact in the question form it was trained on and still reveal it when
asked differently. With ``SuiteConfig.forms`` the suite asks each item of its forget-set
generation tasks again in these forms (``FORMS``):

- ``open``: the release's own question (the suite's ``forget/<modality>/gen`` task itself);
- ``blank``: fill in the blank: a statement of the fact with its answer span as ``____``;
  the reference is the span;
- ``mcq``: the paired classification record (same image and question kind) with the item's
  question, scored like the suite's multiple choice;
- ``true_false``: "True or false: <statement>" for the fact the vanilla model learned
  (reference ``True``; on a rumor record the rumor) and, where a wrong value is known, the
  same statement with it (reference ``False``; on a rumor record the truth);
- ``alias``: the question naming the player differently ("the <nationality> <position> born
  in <place>", or his surname);
- ``language``: the question in Spanish, by the built-in ``other_language`` prompt attack
  (``eval.attacks``: one way to rewrite prompts);
- ``spelled``: the question, then "spell the answer one character at a time"; scored after
  the separators are removed (:func:`despell`).

``blank`` and ``spelled`` answers are compared with the answer span only, so OFFSIDE's overall
of an exact answer is below 1 (BLEU on a two-word reference); their ``key_accuracy`` (the span
said, whole words) is reported beside it.

What a form needs comes from the release's forget records (:func:`record_facts`): the
answer span is the paired classification record's correct option where the answer contains
it, the player's name and attributes come from the classification records about the same
image. A synthetic release also ships ``forms_set.json`` (``data.synthetic.FORMS_FILE``): the
generator's statements naming the subject (used by ``blank`` and ``true_false``), alias and
values. A form that cannot be built for an item is skipped and counted.

Form tasks are named ``forget@<form>/<modality>/<fmt>``, so the suite summary holds e.g.
``forget@blank/text/gen.overall`` and ``forget@true_false/text/gen.accuracy``.
:func:`form_scores` reads a summary back per form; the worst form is the one with the
highest forget score (the most revealing).
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from offside_jax.data.offside import Example, Release
from offside_jax.data.synthetic import FORMS_FILE
from offside_jax.eval.items import EvalItem, Task, _key, mcq_item

FORMS = ("open", "blank", "mcq", "true_false", "alias", "language", "spelled")
BLANK = "____"
BLANK_INSTRUCTION = "Fill in the blank:"
TRUE_FALSE_PREFIX = "True or false:"
TRUE_FALSE_INSTRUCTION = "Answer True or False."
SPELL_INSTRUCTION = "Spell the answer one character at a time, separated by spaces, with a / between words."
LANGUAGE_ATTACK = "other_language"
# The score each form is judged by (higher = more of the fact revealed).
METRIC = {"mcq": "accuracy", "true_false": "accuracy"}
GEN_METRIC = "overall"
_FACT_FIELDS = ("value", "other_value", "name", "alias", "statement", "false_statement", "blank")


@dataclasses.dataclass(frozen=True)
class FormFacts:
    """What the forms know of one forget record (None: unknown)."""

    value: str | None = None  # the answer's key span (e.g. the club)
    other_value: str | None = None  # a wrong value: for a rumor the truth
    name: str | None = None  # the player's name
    alias: str | None = None  # another way to name him
    statement: str | None = None  # generator: the fact as a sentence naming its subject
    false_statement: str | None = None  # generator: the same with other_value
    blank: str | None = None  # generator: statement with value as ____
    mcq: Example | None = None  # the paired classification record


def task_name(test_set: str, form: str, modality: str, fmt: str) -> str:
    return f"{test_set}@{form}/{modality}/{fmt}"


def form_format(form: str) -> str:
    return "mcq" if form == "mcq" else "gen"


def check_forms(forms: Iterable[str]) -> list[str]:
    forms = list(forms)
    bad = sorted(set(forms) - set(FORMS))
    if bad:
        raise ValueError(f"unknown form(s) {bad}; expected some of {list(FORMS)}")
    return forms


# -- what the release tells -------------------------------------------------------------------------


def load_forms_file(root: str | Path) -> dict[str, dict[str, Any]]:
    """The generator's ``forms_set.json`` records by uid ({} when the release has none)."""
    path = Path(root) / FORMS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    records = data.get("records") if isinstance(data, Mapping) else None
    if not isinstance(records, Mapping):
        raise ValueError(f"{path}: expected {{\"records\": {{uid: {{...}}}}}}")
    return dict(records)


def _whole(value: str, text: str) -> bool:
    return bool(value) and re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text) is not None


def alias_from(facts: Mapping[str, str], name: str | None) -> str | None:
    """"the <nationality> <position> born in <place>" when all three are known, else the
    surname (a name of two words or more), else None."""
    parts = [facts.get(k) for k in ("nationality", "position", "birthplace")]
    if all(parts):
        return f"the {parts[0]} {parts[1]} born in {parts[2]}"
    if name and len(name.split()) > 1:
        return name.split()[-1]
    return None


def derived_facts(record: Example, mcq: Example | None, sheet: Mapping[str, str]) -> FormFacts:
    """What a form can know of ``record`` from the release alone: its paired classification
    record ``mcq`` and ``sheet`` (attribute -> correct option of the classification records
    about the same image)."""
    value = other = None
    if mcq is not None and mcq.correct:
        options = mcq.option_dict
        correct = options.get(mcq.correct, "")
        if _whole(correct, record.answer):
            value = correct
            if mcq.corrected_letter and options.get(mcq.corrected_letter) not in (None, correct):
                other = options[mcq.corrected_letter]
            else:
                other = next((v for k, v in sorted(options.items()) if k != mcq.correct and v != correct), None)
    name = sheet.get("name")
    return FormFacts(value=value, other_value=other, name=name, alias=alias_from(sheet, name), mcq=mcq)


def record_facts(release: Release) -> dict[str, FormFacts]:
    """Per forget record (complete and pure-text, by uid): derived facts, overridden field by
    field by the generator's ``forms_set.json`` where the release has one."""
    generated = load_forms_file(release.root)
    mcq = list(release.splits.get("complete", {}).get("classification_forget", []))
    by_key = {k: e for e in mcq if (k := _key(e)) is not None}
    sheets: dict[int, dict[str, str]] = defaultdict(dict)
    for e in mcq:
        if e.image_id is not None and e.attribute and e.correct and e.correct in e.option_dict:
            sheets[e.image_id][e.attribute] = e.option_dict[e.correct]
    out = {}
    for setting in ("complete", "pure_text"):
        for e in release.splits.get(setting, {}).get("forget", []):
            uid = f"{e.source}:{e.index}"
            key = _key(e)
            facts = derived_facts(e, by_key.get(key) if key else None, sheets.get(e.image_id, {}))
            g = generated.get(uid) or {}
            known = {k: str(g[k]) for k in _FACT_FIELDS if g.get(k)}
            out[uid] = dataclasses.replace(facts, **known) if known else facts
    return out


# -- building the forms -----------------------------------------------------------------------------


class FormBuilder:
    """Rewrites forget items into each form (:meth:`items`), from a release's facts."""

    def __init__(self, release: Release, facts: Mapping[str, FormFacts] | None = None, context: Any = None):
        self.release = release
        self.root = Path(release.root)
        self.facts = record_facts(release) if facts is None else facts
        self._context = context

    @property
    def context(self):
        if self._context is None:
            from offside_jax.eval.attacks import AttackContext

            self._context = AttackContext(self.release)
        return self._context

    def items(self, item: EvalItem, form: str) -> tuple[EvalItem, ...]:
        """``item`` asked in ``form``; () when the form cannot be built for it."""
        facts = self.facts.get(item.uid, FormFacts())
        return build_form(item, form, facts, self.root, language=self._language if form == "language" else None)

    def _language(self, item: EvalItem) -> EvalItem | None:
        from offside_jax.eval.attacks import PROMPT_ATTACKS

        return PROMPT_ATTACKS[LANGUAGE_ATTACK].apply(item, self.context)


def _as(item: EvalItem, form: str, **changes: Any) -> EvalItem:
    return dataclasses.replace(item, uid=f"{item.uid}@{form}", form=form, **changes)


def build_form(item: EvalItem, form: str, facts: FormFacts, root: str | Path = ".",
               language: Any = None) -> tuple[EvalItem, ...]:
    """The items that ask ``item`` (a forget generation item) in ``form``; () when ``facts``
    do not allow it. ``language``: item -> rewritten item or None (the language rewrite)."""
    if form == "open":
        return (dataclasses.replace(item, form="open"),)
    if form == "blank":
        if facts.blank and BLANK in facts.blank and facts.value:
            prompt = f"{BLANK_INSTRUCTION} {facts.blank}"
        elif facts.value and _whole(facts.value, item.reference):
            blanked = re.sub(rf"(?<!\w){re.escape(facts.value)}(?!\w)", BLANK, item.reference, count=1)
            prompt = f"{item.question}\n{BLANK_INSTRUCTION} {blanked}"
        else:
            return ()
        return (_as(item, form, prompt=prompt, reference=facts.value, answers=(facts.value,), keys=(facts.value,)),)
    if form == "mcq":
        if facts.mcq is None:
            return ()
        asked = mcq_item(facts.mcq, item.test_set, Path(root), question=item.question, modality=item.modality)
        return (dataclasses.replace(asked, uid=f"{item.uid}@{form}", form=form, images=item.images,
                                    visual_rumor=item.visual_rumor),)
    if form == "true_false":
        return _true_false(item, facts)
    if form == "alias":
        if not facts.name or not facts.alias or facts.name not in item.question:
            return ()
        question = item.question.replace(facts.name, facts.alias)
        return (_as(item, form, question=question, prompt=question),)
    if form == "language":
        new = language(item) if language is not None else None
        return () if new is None else (_as(new, form),)
    if form == "spelled":
        if not facts.value:
            return ()
        return (_as(item, form, prompt=f"{item.question}\n{SPELL_INSTRUCTION}", reference=facts.value,
                    answers=(facts.value,), keys=(facts.value,)),)
    raise ValueError(f"unknown form {form!r}; expected one of {list(FORMS)}")


def _true_false(item: EvalItem, facts: FormFacts) -> tuple[EvalItem, ...]:
    """The learned statement (reference True) and, when a wrong value is known, the wrong one
    (reference False). The generator's sentences where known, else the question and answer."""
    if facts.statement:
        true, false = facts.statement, facts.false_statement
    else:
        true = f'the answer to "{item.question}" is "{item.reference}"'
        wrong = None
        if item.is_rumor and item.corrected_answer:
            wrong = item.corrected_answer
        elif facts.value and facts.other_value and _whole(facts.value, item.reference):
            wrong = re.sub(rf"(?<!\w){re.escape(facts.value)}(?!\w)", lambda _m: facts.other_value or "",
                           item.reference, count=1)
        false = f'the answer to "{item.question}" is "{wrong}"' if wrong else None
    out = []
    for statement, verdict in ((true, "True"), (false, "False")):
        if statement:
            out.append(dataclasses.replace(
                item, uid=f"{item.uid}@true_false" + ("" if verdict == "True" else ":false"), form="true_false",
                prompt=f"{TRUE_FALSE_PREFIX} {statement}\n{TRUE_FALSE_INSTRUCTION}", reference=verdict,
                answers=(verdict,), truth=None, rumor=None, keys=()))
    return tuple(out)


def form_tasks(release: Release, tasks: Sequence[Task], forms: Iterable[str], *,
               builder: FormBuilder | None = None, open_tasks: bool = False) -> tuple[list[Task], dict[str, dict[str, int]]]:
    """The form tasks of the forget-set generation ``tasks`` and per form ``{"facts": asked,
    "skipped": not buildable, "items": prompts}``. ``open`` is those tasks themselves, or with
    ``open_tasks`` (``tasks`` are a subset of the suite's) a ``forget@open`` task of them."""
    forms = check_forms(forms)
    builder = builder or FormBuilder(release)
    out: list[Task] = []
    counts: dict[str, dict[str, int]] = {}
    for form in forms:
        c = counts.setdefault(form, {"facts": 0, "skipped": 0, "items": 0})
        for task in tasks:
            if task.test_set != "forget" or task.fmt != "gen":
                continue
            if form == "open":
                c["facts"] += len(task.items)
                c["items"] += len(task.items)
                if open_tasks:
                    items = tuple(dataclasses.replace(it, form="open") for it in task.items)
                    out.append(Task(task.test_set, task.modality, "gen", items, form="open"))
                continue
            made: list[EvalItem] = []
            for item in task.items:
                new = builder.items(item, form)
                c["facts" if new else "skipped"] += 1
                made += new
            c["items"] += len(made)
            if made:
                out.append(Task(task.test_set, task.modality, form_format(form), tuple(made), form=form))
    return out, counts


# -- scoring ----------------------------------------------------------------------------------------


def despell(text: str) -> str:
    """A spelled answer read back: runs of single characters joined, ``/`` (or two spaces or
    more) between words. "N e w c a s t l e / U n i t e d" -> "Newcastle United"; text that
    is not spelled stays as it is."""
    words = []
    for group in re.split(r"\s*/\s*|\s{2,}", text.strip()):
        pieces, run = [], []
        for token in group.split():
            if len(token) == 1:
                run.append(token)
                continue
            if run:
                pieces.append("".join(run))
                run = []
            pieces.append(token)
        if run:
            pieces.append("".join(run))
        if pieces:
            words.append(" ".join(pieces))
    return " ".join(words)


def _compact(text: str) -> str:
    import unicodedata

    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if c.isalnum()).casefold()


def classify_spelled(output: str, truth: str, rumor: str) -> str:
    """Which fact a spelled answer states, ignoring every separator (a model that drops the
    word breaks still spells the club): a ``metrics.CorrectionLabel``."""
    o = _compact(output)
    found = set()
    for label, phrase in sorted((("truth", _compact(truth)), ("rumor", _compact(rumor))), key=lambda p: -len(p[1])):
        if phrase and phrase in o:
            found.add(label)
            o = o.replace(phrase, "|")
    if found == {"truth", "rumor"}:
        return "both"
    return "states_truth" if "truth" in found else "states_rumor" if "rumor" in found else "neither"


_VERDICT = re.compile(r"\b(not\s+true|untrue|not\s+correct|incorrect|false|wrong|no|true|correct|right|yes)\b",
                      re.IGNORECASE)
_NEGATIVE = {"not true", "untrue", "not correct", "incorrect", "false", "wrong", "no"}


def parse_true_false(output: str) -> str | None:
    """"True", "False" or None: the first verdict word of the answer ("False." -> False,
    "That is not true" -> False, "Yes, it is." -> True)."""
    m = _VERDICT.search(output or "")
    if m is None:
        return None
    return "False" if " ".join(m.group(1).lower().split()) in _NEGATIVE else "True"


def true_false_row(item: EvalItem, output: str) -> dict[str, Any]:
    """A true/false answer's scores: the verdict, whether it is the one the vanilla model
    learned (``is_correct``) and, on a rumor record, ``correction``: "states_rumor" when it
    endorses the rumor (True on the rumor statement, False on the truth statement),
    "states_truth" for the opposite verdict, "neither" when unparsed (as the suite's
    ``states_rumor``)."""
    verdict = parse_true_false(output)
    row: dict[str, Any] = {"verdict": verdict, "is_correct": verdict == item.reference}
    if item.is_rumor:
        row["correction"] = ("neither" if verdict is None
                             else "states_rumor" if verdict == item.reference else "states_truth")
    return row


def mcq_correction(item: EvalItem, choice: str | None) -> str | None:
    """A rumor multiple-choice answer as a correction label: the rumor's letter states the
    rumor, the corrected letter the truth (None: not a rumor question with a correction)."""
    if not item.is_rumor or not item.corrected_letter:
        return None
    return ("states_rumor" if choice == item.correct else "states_truth" if choice == item.corrected_letter
            else "neither")


# -- reading results --------------------------------------------------------------------------------


def form_key(form: str, modality: str, metric: str) -> str:
    if form == "open":
        return f"forget/{modality}/gen.{metric}"
    return f"{task_name('forget', form, modality, form_format(form))}.{metric}"


def form_scores(summary: Mapping[str, Any], modality: str) -> dict[str, dict[str, Any]]:
    """Per form found in a suite ``summary``: ``metric`` (overall, or accuracy for mcq and
    true/false), its ``score`` on the forget set and ``states_rumor`` (None when absent).
    ``open`` only counts when some other form ran."""
    out = {}
    for form in FORMS:
        metric = METRIC.get(form, GEN_METRIC)
        key = form_key(form, modality, metric)
        if form == "open" and f"forget@open/{modality}/gen.{metric}" in summary:  # the forms' own subset
            key = f"forget@open/{modality}/gen.{metric}"
        score = summary.get(key)
        if score is None:
            continue
        out[form] = {"metric": metric, "score": float(score),
                     "states_rumor": summary.get(key.rsplit(".", 1)[0] + ".states_rumor")}
    return out if set(out) - {"open"} else {}


def worst_form(scores: Mapping[str, Mapping[str, Any]], key: str = "score") -> tuple[str, float] | None:
    """The most revealing form: the highest ``key`` (ties: the first in ``FORMS`` order)."""
    known = [(form, float(s[key])) for form, s in scores.items() if s.get(key) is not None]
    if not known:
        return None
    best = max(v for _, v in known)
    return next((form, v) for form, v in known if v == best)


def form_summary(summary: Mapping[str, Any], modality: str,
                 counts: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, Any] | None:
    """What a benchmark records per method: the per-form scores, the worst form (by score and
    by states_rumor) and the build counts; None when no form ran."""
    scores = form_scores(summary, modality)
    if not scores:
        return None
    worst = worst_form(scores)
    worst_rumor = worst_form(scores, "states_rumor")
    return {"scores": scores, "worst": worst[0] if worst else None, "worst_score": worst[1] if worst else None,
            "worst_states_rumor": worst_rumor[0] if worst_rumor else None,
            **({"counts": {k: dict(v) for k, v in counts.items()}} if counts else {})}

"""Robustness attacks on an unlearned model: prompt rewrites, weight quantization, relearning.

- **Prompt attacks** are data: templates in ``eval/templates/prompt_attacks.yaml`` (paraphrase,
  ignore-instructions prefix, role-play, multiple-choice reformulation, the question in
  Spanish, the rumor reintroduced in context, few-shot retained facts). Users add or replace
  attacks with a file of the same shape (:func:`load_prompt_attacks`) or in code
  (:func:`register_prompt_attack`). Each rewrites the items of the chosen test sets and the
  suite scores the answers as usual.
- **Quantization**: round-to-nearest, symmetric, per output channel, to int8 or int4, then
  dequantized back to float (:func:`quantize_model`), as in "catastrophic failure of
  unlearning via quantization": a forgotten fact may come back once small weight updates
  are rounded away.
- **Relearning**: a brief LoRA fine-tune on the relearn set through the training core
  (OFFSIDE: r=8, alpha=32, lr 1e-4), then re-evaluation; the forget score is recorded along
  the way (a recovery curve).

:func:`run_attacks` runs the configured attacks and writes each one's suite outputs under
``out_dir/<attack>/`` and a summary ``out_dir/attacks.json``.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from offside_jax.data.offside import Release
from offside_jax.eval.engine import evaluation_model
from offside_jax.data.pipeline import mcq_prompt
from offside_jax.eval.items import FORMATS, EvalItem, Task, qa_item
from offside_jax.files import write_json
from offside_jax.eval.tuning import TuneConfig, curve_steps, tune
from offside_jax.models.generate import rewrapped, underlying_model
from offside_jax.models.layers import Linear
from offside_jax.train import distributed

BUILTIN_TEMPLATES = "prompt_attacks.yaml"
_FIELDS = {"description", "formats", "substitutions", "template", "shots", "rewritten_only"}
_PLACEHOLDERS = {"question", "question_lc", "prompt", "answer", "options", "options_inline", "letters", "shots"}


class AttackTemplateError(ValueError):
    """A prompt-attack file or entry that cannot be used; names the file, attack and field."""


# -- prompt attacks -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptAttack:
    """A prompt rewrite (see the template file's header for the fields)."""

    name: str
    template: str = "{prompt}"
    description: str = ""
    formats: tuple[str, ...] = ("gen",)
    substitutions: tuple[tuple[str, str], ...] = ()
    shots: int = 0
    rewritten_only: bool = False

    def __post_init__(self) -> None:
        where = f"prompt attack {self.name!r}"
        bad = sorted(set(self.formats) - set(FORMATS))
        if bad or not self.formats:
            raise AttackTemplateError(f"{where}: formats must be some of {list(FORMATS)}, got {list(self.formats)}")
        fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        unknown = sorted(fields - _PLACEHOLDERS)
        if unknown:
            raise AttackTemplateError(f"{where}: unknown placeholder(s) {unknown} in its template; "
                                      f"known: {sorted(_PLACEHOLDERS)}")
        for k, (pattern, _) in enumerate(self.substitutions):
            try:
                re.compile(pattern)
            except re.error as e:
                raise AttackTemplateError(f"{where}: substitutions[{k}] {pattern!r} is not a valid regex: {e}") from None
        if self.shots < 0 or ("shots" in fields) != (self.shots > 0):
            raise AttackTemplateError(f"{where}: use the {{shots}} placeholder exactly when shots > 0 (shots={self.shots})")

    def rewrite_question(self, question: str) -> str:
        for pattern, replacement in self.substitutions:
            question = re.sub(pattern, replacement, question, flags=re.IGNORECASE)
        return question

    def apply(self, item: EvalItem, context: "AttackContext") -> EvalItem | None:
        """The attacked item, or None when the attack does not apply to it."""
        if item.fmt not in self.formats:
            return None
        question = self.rewrite_question(item.question)
        if self.rewritten_only and question == item.question:
            return None
        prompt = question if item.fmt == "gen" else mcq_prompt(question, item.options, item.modality)
        letters = [letter for letter, _ in item.options]
        values = {
            "question": question, "question_lc": question[:1].lower() + question[1:], "prompt": prompt,
            "answer": item.reference,
            "options": "\n".join(f"{k}. {v}" for k, v in item.options),
            "options_inline": "; ".join(f"{k}) {v}" for k, v in item.options),
            "letters": ", ".join(letters[:-1]) + f" or {letters[-1]}" if len(letters) > 1 else "".join(letters),
            "shots": context.shots(item, self.shots) if self.shots else "",
        }
        return dataclasses.replace(item, prompt=self.template.format_map(values))


PROMPT_ATTACKS: dict[str, PromptAttack] = {}


def register_prompt_attack(attack: PromptAttack, *, replace: bool = False) -> PromptAttack:
    """Make ``attack`` selectable by name (``replace=True`` overrides an existing one)."""
    if attack.name in PROMPT_ATTACKS and not replace:
        raise ValueError(f"prompt attack {attack.name!r} is already registered (pass replace=True)")
    PROMPT_ATTACKS[attack.name] = attack
    return attack


def parse_prompt_attacks(data: Any, where: str) -> list[PromptAttack]:
    """Attacks from the decoded YAML/JSON of a template file (``{"attacks": {name: entry}}``)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("attacks"), Mapping):
        raise AttackTemplateError(f"{where}: expected a mapping with an 'attacks' mapping of name -> entry")
    out = []
    for name, entry in data["attacks"].items():
        if not isinstance(entry, Mapping):
            raise AttackTemplateError(f"{where}: attack {name!r} must be a mapping of fields")
        unknown = sorted(set(entry) - _FIELDS)
        if unknown:
            raise AttackTemplateError(f"{where}: attack {name!r}: unknown field(s) {unknown}; known: {sorted(_FIELDS)}")
        subs = entry.get("substitutions") or []
        if not all(isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(x, str) for x in s) for s in subs):
            raise AttackTemplateError(f"{where}: attack {name!r}: substitutions must be [regex, replacement] string pairs")
        try:
            out.append(PromptAttack(
                name=str(name), template=str(entry.get("template", "{prompt}")),
                description=str(entry.get("description", "")), formats=tuple(entry.get("formats", ("gen",))),
                substitutions=tuple((a, b) for a, b in subs), shots=int(entry.get("shots", 0)),
                rewritten_only=bool(entry.get("rewritten_only", False)),
            ))
        except AttackTemplateError as e:
            raise AttackTemplateError(f"{where}: {e}") from None
    return out


def load_prompt_attacks(path: str | os.PathLike, *, register: bool = True) -> list[PromptAttack]:
    """Read a YAML or JSON template file; ``register`` adds (or replaces) its attacks."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AttackTemplateError(f"{path}: prompt-attack file not found") from None
    except yaml.YAMLError as e:
        raise AttackTemplateError(f"{path}: not valid YAML/JSON: {e}") from None
    attacks = parse_prompt_attacks(data, str(path))
    if register:
        for attack in attacks:
            register_prompt_attack(attack, replace=True)
    return attacks


def _load_builtin() -> None:
    import yaml

    text = importlib.resources.files("offside_jax.eval.templates").joinpath(BUILTIN_TEMPLATES).read_text(encoding="utf-8")
    for attack in parse_prompt_attacks(yaml.safe_load(text), f"offside_jax/eval/templates/{BUILTIN_TEMPLATES}"):
        register_prompt_attack(attack, replace=True)


_load_builtin()


class AttackContext:
    """Release data that attacks draw on (few-shot examples)."""

    def __init__(self, release: Release):
        self.release = release
        root = Path(release.root)
        # Text-only retain facts name the player, so they make sense beside any question.
        twins = release.splits.get("pure_text", {}).get("retain", [])
        self._by_player: dict[int, list[EvalItem]] = defaultdict(list)
        for e in twins:
            if e.player_id is not None:
                self._by_player[e.player_id].append(qa_item(e, "retain", root))
        world = release.splits.get("complete", {}).get("world_facts", [])
        self._world = [qa_item(e, "world", root) for e in world]

    def shots(self, item: EvalItem, k: int) -> str:
        """``k`` "Q: ...\\nA: ..." pairs: retained facts about the item's player, else world
        facts; chosen by a seed derived from the item, so every run asks the same."""
        pool = self._by_player.get(item.player_id, []) if item.player_id is not None else []
        pool = pool or self._world
        if not pool:
            raise ValueError(f"{item.uid}: no retain or world facts in the release to build few-shot examples from")
        rng = np.random.default_rng(_stable_seed(item.uid))
        chosen = [pool[int(i)] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)]
        return "\n".join(f"Q: {s.question}\nA: {s.reference}" for s in chosen)


def _stable_seed(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode("utf-8"))


def attack_tasks(tasks: Iterable[Task], attack: PromptAttack, context: AttackContext,
                 test_sets: Sequence[str] | None = None) -> list[Task]:
    """The tasks (of ``test_sets``) rewritten by ``attack``; tasks it leaves empty are dropped."""
    out = []
    for task in tasks:
        if test_sets is not None and task.test_set not in test_sets:
            continue
        items = [new for it in task.items if (new := attack.apply(it, context)) is not None]
        if items:
            out.append(dataclasses.replace(task, items=tuple(items)))
    return out


# -- quantization -----------------------------------------------------------------------------------


def quantize_kernel(kernel: jax.Array, bits: int) -> jax.Array:
    """Round-to-nearest symmetric quantization of a ``[in, out]`` kernel, one scale per output
    channel (column), dequantized back to the kernel's dtype.

    ``qmax = 2**(bits-1) - 1``; ``scale_j = max_i |W_ij| / qmax`` (1 for an all-zero column);
    ``W'_ij = clip(round(W_ij / scale_j), -qmax, qmax) * scale_j``.
    """
    if bits < 2 or bits > 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    w = jnp.asarray(kernel, jnp.float32)
    qmax = 2.0 ** (bits - 1) - 1
    peak = jnp.max(jnp.abs(w), axis=0, keepdims=True)
    scale = jnp.where(peak > 0, peak / qmax, 1.0)
    q = jnp.clip(jnp.round(w / scale), -qmax, qmax)
    return (q * scale).astype(kernel.dtype)


def quantize_model(model: nnx.Module, bits: int, exclude: str | None = r"(^|\.)lm_head$") -> tuple[nnx.Module, list[str]]:
    """A copy of ``model`` (adapters merged) whose linear kernels are quantized to ``bits``.

    Every :class:`~offside_jax.models.layers.Linear` except those whose dotted path matches
    ``exclude`` (default: the output head) is quantized; embeddings, norms and biases stay in
    float. Returns the copy and the quantized layer paths.
    """
    from offside_jax.models.lora import linear_layers

    copy = nnx.clone(evaluation_model(underlying_model(model)))
    pattern = re.compile(exclude) if exclude else None
    done = []
    for path, layer in linear_layers(copy):
        if pattern is not None and pattern.search(path):
            continue
        assert isinstance(layer, Linear)
        layer.kernel.set_value(quantize_kernel(layer.kernel.get_value(), bits))
        done.append(path)
    if not done:
        raise ValueError(f"no linear layer left to quantize (exclude={exclude!r})")
    return rewrapped(model, copy), done  # a generation wrapper (GUARD) keeps guarding the quantized weights


# -- relearning -------------------------------------------------------------------------------------


def relearn_pairs(release: Release, modality: str = "image") -> list[tuple[EvalItem, str]]:
    """What the relearning attack trains on.

    Image models: OFFSIDE's relearn set (the rumor reworded, on the relearn image). Text-only
    models (the release has no text relearn set): the text twins of the forget set's *true*
    facts about the same players (not the rumors), i.e. relearning related knowledge and
    watching whether the rumors come back with it.
    """
    root = Path(release.root)
    if modality == "image":
        records = release.splits.get("complete", {}).get("relearn", [])
        pairs = [(qa_item(e, "relearn", root), e.answer) for e in records]
    else:
        records = release.splits.get("pure_text", {}).get("forget", [])
        pairs = [(qa_item(e, "relearn", root), e.answer) for e in records if e.is_rumor is False]
    if not pairs:
        raise ValueError(f"{root}: no records to relearn from for the {modality} modality")
    return pairs


# -- running ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class AttackConfig:
    """Which attacks run and on what. Prompt attacks and quantization re-evaluate the
    ``*_test_sets`` tasks of the suite; relearning fine-tunes, then re-evaluates."""

    prompt: list[str] = dataclasses.field(default_factory=lambda: sorted(PROMPT_ATTACKS))
    prompt_templates: str | None = None  # an extra template file (adds/replaces attacks)
    prompt_test_sets: list[str] = dataclasses.field(default_factory=lambda: ["forget"])
    quantize_bits: list[int] = dataclasses.field(default_factory=lambda: [8, 4])
    quantize_exclude: str | None = r"(^|\.)lm_head$"
    quantize_test_sets: list[str] = dataclasses.field(default_factory=lambda: ["forget", "retain"])
    relearn: bool = True
    relearn_tune: TuneConfig = dataclasses.field(default_factory=lambda: TuneConfig(steps=24, lr=1e-4))
    relearn_curve_every: int = 8  # evaluate the forget set every this many relearning steps (0: start and end)
    relearn_test_sets: list[str] = dataclasses.field(default_factory=lambda: ["forget", "retain"])
    # Attacked models are scored on their answers; answer probabilities are off by default
    # (they would double the cost and attacks are judged by what the model says).
    likelihood: bool = False
    max_examples: int | None = None  # per attacked task: a stratified subset of the suite's items (None: all)


def _subset(tasks: Iterable[Task], test_sets: Sequence[str], limit: int | None = None, seed: int = 0) -> list[Task]:
    from offside_jax.eval.items import subsample

    return [dataclasses.replace(t, items=tuple(subsample(t.items, limit, seed))) for t in tasks if t.test_set in test_sets]


def run_attacks(model: nnx.Module, suite: Any, config: AttackConfig | None = None, *,
                out_dir: str | os.PathLike | None = None, name: str = "model", progress: bool = True) -> dict[str, Any]:
    """Run every configured attack on ``model`` with ``suite`` (an ``eval.suite.Suite``).

    Returns ``{attack: {"kind", "description", "summary", ...}}``; with ``out_dir``, each
    attack's suite outputs go to ``out_dir/<attack>/`` and the returned dict to
    ``out_dir/attacks.json``.
    """
    config = config or AttackConfig()
    if config.prompt_templates:
        load_prompt_attacks(config.prompt_templates)
    unknown = sorted(set(config.prompt) - set(PROMPT_ATTACKS))
    if unknown:
        raise ValueError(f"unknown prompt attack(s) {unknown}; registered: {sorted(PROMPT_ATTACKS)}")
    base = evaluation_model(model, suite.mesh)
    if suite.config.likelihood != config.likelihood:
        suite = suite.with_config(dataclasses.replace(suite.config, likelihood=config.likelihood))
    out = Path(out_dir) if out_dir is not None else None
    results: dict[str, Any] = {}

    def sub_dir(attack: str) -> Path | None:
        return None if out is None else out / attack

    context = AttackContext(suite.release)
    seed = suite.config.seed
    if config.max_examples is not None:
        # Attacks then see a subset: score the unattacked model on the same items to compare with.
        clean_tasks = _subset(suite.tasks, sorted(set(config.prompt_test_sets) | set(config.quantize_test_sets)),
                              config.max_examples, seed)
        run = suite.with_tasks(clean_tasks).run(base, sub_dir("clean"), name=f"{name} (no attack)", progress=progress)
        results["clean"] = {"kind": "clean", "description": "no attack, the attacked items",
                            "n": sum(len(t.items) for t in clean_tasks), "summary": run["summary"]}
    for attack_name in config.prompt:
        attack = PROMPT_ATTACKS[attack_name]
        tasks = attack_tasks(_subset(suite.tasks, config.prompt_test_sets, config.max_examples, seed), attack, context)
        if not tasks:
            continue
        run = suite.with_tasks(tasks).run(base, sub_dir(f"prompt_{attack_name}"), name=f"{name} + {attack_name}",
                                          info={"attack": dataclasses.asdict(attack)}, progress=progress)
        results[f"prompt_{attack_name}"] = {"kind": "prompt", "description": attack.description,
                                            "n": sum(len(t.items) for t in tasks), "summary": run["summary"]}
    quant_tasks = _subset(suite.tasks, config.quantize_test_sets, config.max_examples, seed)
    for bits in config.quantize_bits:
        if not quant_tasks:
            break
        quantized, layers = quantize_model(base, bits, config.quantize_exclude)
        run = suite.with_tasks(quant_tasks).run(quantized, sub_dir(f"int{bits}"), name=f"{name} int{bits}",
                                                info={"bits": bits, "layers": layers}, progress=progress)
        results[f"int{bits}"] = {"kind": "quantization", "description": f"round-to-nearest int{bits}, per channel",
                                 "layers": len(layers), "summary": run["summary"]}
        del quantized
    if config.relearn:
        results["relearn"] = relearning_attack(base, suite, config, out_dir=sub_dir("relearn"), name=name,
                                               progress=progress)
    if out is not None and distributed.is_primary():
        write_json(out / "attacks.json", results)
    return results


def relearning_attack(model: nnx.Module, suite: Any, config: AttackConfig, *, out_dir: str | os.PathLike | None = None,
                      name: str = "model", progress: bool = True) -> dict[str, Any]:
    """LoRA fine-tune on the relearn data, recording the forget score along the way, then
    evaluate the ``relearn_test_sets`` tasks."""
    pairs = relearn_pairs(suite.release, suite.modality)
    curve_tasks = [t for t in _subset(suite.tasks, ["forget"], config.max_examples, suite.config.seed) if t.fmt == "gen"]
    curve = suite.with_tasks(curve_tasks) if curve_tasks else None
    steps = config.relearn_tune.steps
    every = config.relearn_curve_every
    at = curve_steps(steps, every)

    # A generation wrapper (GUARD) relearns its weights and keeps guarding them.
    def score(m):
        return curve.run(rewrapped(model, m), name=f"{name} relearning", progress=False)["summary"] if curve else {}

    tuned = tune(underlying_model(model), suite.encoder, pairs, config.relearn_tune, evaluate=score if curve else None,
                 evaluate_at=at, progress=progress)
    final_tasks = _subset(suite.tasks, config.relearn_test_sets, config.max_examples, suite.config.seed)
    run = suite.with_tasks(final_tasks).run(rewrapped(model, tuned.model), out_dir, name=f"{name} relearned",
                                            info={"relearn": dataclasses.asdict(config.relearn_tune),
                                                  "pairs": len(pairs)}, progress=progress)
    return {"kind": "relearning", "description": f"LoRA fine-tune on {len(pairs)} relearn records, {steps} steps",
            "summary": run["summary"], "curve": tuned.history, "losses": tuned.losses}

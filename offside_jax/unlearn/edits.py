"""The training-free methods of ``offside-jax unlearn`` as the driver runs them: the weight edits
(SSD / LFSSD / ASSD, ROCR, curvature editing) and generation-time unlearning (GUARD).

Each takes an :class:`EditInputs` (the run's config, the method's hyperparameters, the loaded
model, the selected records, the encoder and the session) and returns its report; weight edits
change ``inputs.model`` in place, :func:`guard` returns the guarded model next to its report.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from offside_jax.config import ConfigError
from offside_jax.data.batches import ExampleEncoder, sequential_batches
from offside_jax.data.offside import Example, Release
from offside_jax.unlearn import settings
from offside_jax.unlearn.subjects import forget_subjects

WORLD = ("complete", "world_facts")  # the release's world facts: text records that name no player


@dataclasses.dataclass
class EditInputs:
    cfg: Any  # the run's UnlearnConfig
    hparams: dict[str, Any]  # the method's section of cfg.methods
    model: Any
    sets: settings.UnlearningSets
    encoder: ExampleEncoder  # the run's encoder (shape not fixed)
    session: Any
    tokenizer: Any
    release: Release

    # located traces of the unchanged model per (names, top, layers, order); see traces()
    located: dict[tuple, list] = dataclasses.field(default_factory=dict, repr=False)

    @functools.cached_property
    def forget_subjects(self) -> list[str]:
        """The players the forget questions name (read once per run: ROCR, the ablation and the
        trace-kept probe share them)."""
        return forget_subjects(self.sets.forget, self.sets.retain)

    def traces(self, names: Sequence[str], *, top: int, layers: Sequence[int] | None = None, order: str = "rank") -> list:
        """:func:`located_traces` of the model, scored once per setting: the trace-kept probe and
        the ablation both locate before anything changes the weights, so when their settings
        agree the vocabulary projection of every ``down_proj`` row is computed once."""
        key = (tuple(names), top, None if layers is None else tuple(layers), order)
        if key not in self.located:
            self.located[key] = located_traces(self.model, self.tokenizer, names, top=top, layers=layers, order=order)
        return self.located[key]


def world_facts(release: Release) -> list[Example]:
    try:
        return [e for e in release[WORLD] if e.kind == "qa" and e.modality == "text"]
    except KeyError:
        return []


def statistics_records(inputs: EditInputs, source: str, key: str) -> list[Example]:
    """The records a statistic is taken over: ``retain``, ``full`` (retain + forget) or ``world``."""
    records = {"retain": lambda: inputs.sets.retain, "full": lambda: inputs.sets.full,
               "world": lambda: world_facts(inputs.release)}[source]()
    if not records:
        where = f"{inputs.release.root}/complete_unlearning_data/world_facts_set.json" if source == "world" else source
        raise ConfigError(f"{key}={source}: no text records in {where}; choose another source")
    return records


def subjects(inputs: EditInputs, key: str) -> list[str]:
    """The configured subjects, or the players the forget questions name."""
    if inputs.hparams.get("subjects"):
        return list(inputs.hparams["subjects"])
    found = inputs.forget_subjects
    if not found:
        raise ConfigError(f"{key}: no subject found in the forget questions (they name no player, e.g. image "
                          f"questions); list them, e.g. {key}=[\"First Last\"]")
    return found


# -- weight edits --------------------------------------------------------------------------------


def ssd(inputs: EditInputs) -> dict[str, Any]:
    """Selective synaptic dampening (and LFSSD, ASSD) over the forget and full sets."""
    from offside_jax.unlearn import dampening

    from offside_jax.unlearn.run import fitted_encoder

    hparams = dict(inputs.hparams)
    batch_size = hparams.pop("batch_size")
    encoder = fitted_encoder(inputs.encoder, inputs.sets.full, inputs.cfg.data.max_length)
    result = dampening.ssd(inputs.model, sequential_batches(inputs.sets.full, encoder, batch_size),
                           sequential_batches(inputs.sets.forget, encoder, batch_size),
                           dampening.DampeningConfig(**hparams), mesh=inputs.session.mesh)
    report = result.to_dict()
    report["per_tensor"] = {k: v for k, v in report["per_tensor"].items() if v}  # only what was dampened
    return {"dampening": report}


def rocr(inputs: EditInputs) -> dict[str, Any]:
    """Redirect every forget subject to the replacement, one request after another."""
    from offside_jax.unlearn import rocr as rocr_lib
    from offside_jax.unlearn.run import fitted_encoder

    hp = inputs.hparams
    config = rocr_lib.RocrConfig(layers=None if hp["layers"] is None else tuple(hp["layers"]), l2=hp["l2"],
                                 nullspace_threshold=hp["nullspace_threshold"])
    layers = rocr_lib.edit_layers(config, inputs.model)
    depth = len(inputs.model.model.layers)
    if layers[-1] >= depth:
        raise ConfigError(f"methods.rocr.layers={list(layers)}: the model has {depth} decoder layers")
    names = subjects(inputs, "methods.rocr.subjects")
    if hp["replacement"] in names:
        raise ConfigError(f"methods.rocr.replacement {hp['replacement']!r} is one of the subjects to forget")
    if hp["general_data"] == "none":
        width = inputs.model.model.layers[layers[0]].mlp.down_proj.in_features
        projectors = {layer: np.eye(width, dtype=np.float32) for layer in layers}
        tokens = 0
    else:
        records = statistics_records(inputs, hp["general_data"], "methods.rocr.general_data")
        encoder = fitted_encoder(inputs.encoder, records, 0)
        moments, tokens = rocr_lib.key_second_moments(
            inputs.model, sequential_batches(records, encoder, hp["batch_size"]), layers)
        projectors = {layer: rocr_lib.null_space_projector(c, config.nullspace_threshold) for layer, c in moments.items()}
    free = {layer: int(round(float(np.trace(np.asarray(p))))) for layer, p in projectors.items()}
    if not any(free.values()):
        warnings.warn(f"ROCR: no singular value of C0 is below nullspace_threshold={config.nullspace_threshold} on "
                      f"layers {list(layers)}: the null-space projector is zero and the edit changes nothing; "
                      "raise methods.rocr.nullspace_threshold", stacklevel=2)
    requests = [rocr_lib.request_batches(inputs.tokenizer, name, hp["replacement"]) for name in names]
    rocr_lib.apply_rocr(inputs.model, requests, projectors, config)
    return {"rocr": {"subjects": names, "replacement": hp["replacement"], "layers": list(layers),
                     "general_data": hp["general_data"], "general_tokens": tokens,
                     "null_space_dims": {str(k): v for k, v in free.items()}}}


def curvature_edit(inputs: EditInputs) -> dict[str, Any]:
    """Project the chosen matrices onto the high-curvature K-FAC eigen-pairs of the statistics set."""
    from offside_jax.unlearn import block_linears, curvature
    from offside_jax.unlearn.run import fitted_encoder

    hp = inputs.hparams
    depth = len(inputs.model.model.layers)
    if hp["layers"] is not None and any(not 0 <= layer < depth for layer in hp["layers"]):
        raise ConfigError(f"methods.curvature_edit.layers={hp['layers']}: the model has {depth} decoder layers")
    config = curvature.CurvatureConfig(layers=None if hp["layers"] is None else tuple(hp["layers"]),
                                       matrices=tuple(hp["matrices"]), rho=hp["rho"], labels=hp["labels"],
                                       seed=hp["seed"])
    for target in curvature.edit_targets(config, depth):  # every matrix named exists before any statistic is gathered
        try:
            block_linears.linear(inputs.model, target)
        except ValueError as e:
            raise ConfigError(f"methods.curvature_edit.matrices={hp['matrices']}: {e}") from None
    records = statistics_records(inputs, hp["statistics"], "methods.curvature_edit.statistics")
    encoder = fitted_encoder(inputs.encoder, records, inputs.cfg.data.max_length)
    report = curvature.curvature_edit(inputs.model, sequential_batches(records, encoder, hp["batch_size"]), config)
    return {"curvature": {**report.to_dict(), "statistics": hp["statistics"], "rho": hp["rho"]}}


def concept_ablation(inputs: EditInputs) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Locate each subject's traces, add noise to them (in place) and return the report and the
    update mask that lets the fine-tune move only them."""
    import jax

    from offside_jax.unlearn import concept_vectors as cv

    hp = inputs.hparams
    names = subjects(inputs, "methods.concept_ablation.subjects")
    traces = inputs.traces(names, top=hp["top"], layers=hp["layers"], order=hp["order"])
    cv.noise_traces(inputs.model, traces, jax.random.key(hp["seed"]), hp["sigma"])
    report = {"concept_ablation": {"subjects": names, "traces": [[t.layer, t.dim] for t in traces],
                                   "sigma": hp["sigma"], "loss": hp["loss"], "lr": hp["lr"]}}
    return report, cv.trace_rows(inputs.model, traces)


def located_traces(model, tokenizer, names: Sequence[str], *, top: int = 10, layers=None, order: str = "rank"):
    """The ``top`` traces of each subject's name (:func:`concept_vectors.locate_traces`), without repeats."""
    from offside_jax.unlearn import concept_vectors as cv

    traces = {}
    for name in names:
        ids = cv.concept_token_ids(tokenizer, [name])
        for t in cv.locate_traces(model, ids, layers=layers, top=top, order=order):
            traces.setdefault((t.layer, t.dim), t)
    return list(traces.values())


# -- generation-time unlearning -------------------------------------------------------------------


def _prompt_features(model, encoder: ExampleEncoder, examples: Sequence[Example], root: Path, layer: int,
                     batch_size: int) -> np.ndarray:
    from offside_jax.eval.items import qa_item
    from offside_jax.unlearn.guard import pooled_features

    items = [qa_item(e, "guard", root) for e in examples]
    out = []
    for start in range(0, len(items), batch_size):
        out.append(pooled_features(model, encoder.prompt_batch(items[start: start + batch_size]), layer))
    return np.concatenate(out)


def guard(inputs: EditInputs):
    """A :class:`~offside_jax.unlearn.guard.GuardedModel` of the unchanged model and its report:
    the classifier is fit on the forget prompts against the retain and world-fact prompts; the
    forbidden spans are the key phrases of the forget answers."""
    from offside_jax.unlearn import guard as guard_lib

    hp = inputs.hparams
    model, root = inputs.model, inputs.release.root
    forget = inputs.sets.forget
    others = inputs.sets.retain + world_facts(inputs.release)
    forget_x = _prompt_features(model, inputs.encoder, forget, root, hp["layer"], hp["batch_size"])
    other_x = _prompt_features(model, inputs.encoder, others, root, hp["layer"], hp["batch_size"])
    classifier = guard_lib.fit_classifier(forget_x, other_x, layer=hp["layer"], steps=hp["classifier_steps"],
                                          learning_rate=hp["classifier_lr"], l2=hp["classifier_l2"],
                                          threshold=hp["threshold"])
    answers = [e.answer for e in forget]
    spans, groups = guard_lib.spans_by_answer(answers, inputs.tokenizer)
    retrieval = (guard_lib.SpanRetrieval(forget_x, tuple(tuple(g) for g in groups), hp["retrieve"])
                 if hp["retrieve"] else None)
    decoding = guard_lib.DecodingConfig(token_penalty=hp["token_penalty"], semantic_penalty=hp["semantic_penalty"],
                                        semantic_threshold=hp["semantic_threshold"],
                                        semantic_top_k=hp["semantic_top_k"])
    guarded = guard_lib.GuardedModel(model, classifier, spans, decoding, retrieval)
    report = {"guard": {
        "spans": len(spans),
        "classifier_training": {"forget_flagged": float(classifier.flags(forget_x).mean()),
                                "others_flagged": float(classifier.flags(other_x).mean()),
                                "forget": len(forget), "others": len(others)},
    }}
    return guarded, report

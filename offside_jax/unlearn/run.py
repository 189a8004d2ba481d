"""`offside-jax unlearn`: one unlearning run from a config, on top of a vanilla model.

    from offside_jax.config import UnlearnConfig, load_config
    cfg = load_config("configs/unlearn_tiny.yaml", ["method=npo"], schema=UnlearnConfig)
    result = run_unlearning(cfg)          # result.model_dir, result.summary_path, result.summary

Steps: load the vanilla model (``model.source: hf``, e.g. the ``model`` directory `offside-jax
finetune` exports; or a GGUF file) onto the mesh; read the release and select the setting's
forget/retain/evaluation records (``offside_jax.unlearn.settings``); measure the answer
probability of every evaluation set; unlearn; measure again; write

    output_dir/config.yaml          the resolved config (also inside every checkpoint)
    output_dir/checkpoints/         orbax checkpoints of the training state (resumable)
    output_dir/logs/                metrics.jsonl (+ TensorBoard)
    output_dir/model/               the unlearned model, merged (HF safetensors + tokenizer + config.yaml;
                                    GUARD's classifier and spans as guard.json / guard.npz)
    output_dir/summary.json         before/after answer probabilities, counts, method reports
    output_dir/summary.png          the same as a bar chart

Methods, by kind (``offside_jax.unlearn.methods``): ``loss`` (every loss of
``offside_jax.unlearn.losses``, trained with LoRA adapters or full parameters; ``train.params``
limits which parameters move), ``alternating`` (MMUnlearner: Fisher-ratio masked ascent
alternating with retain NLL; OFFSIDE's KL_min and PO, ``offside_jax.unlearn.offside_baselines``)
and ``weight_edit`` (SSD / LFSSD / ASSD, no training steps). The
training kinds are recipes for the one training session (``offside_jax.train.session``:
distributed start-up, mesh, AOT memory check, fp32 masters, ``checkpoint.directory``, resume,
process-0 logs and export); weight edits share its loader, mesh and export.
Files are written under temporary names and renamed, so a crash never leaves a complete-looking
but partial export or summary; ``config.yaml`` is written when the method starts changing
weights, so a run that fails before leaves no folder behind.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from flax import nnx

from offside_jax import config as config_lib
from offside_jax.config import ConfigError, UnlearnConfig
from offside_jax.data.batches import ExampleEncoder, fit_shape, is_vision_language, make_encoder
from offside_jax.data.offside import Example, load_release
from offside_jax.files import pyplot, save_figure, write_json
from offside_jax.train.session import RunDir, Session
from offside_jax.models.generate import underlying_model
from offside_jax.unlearn import edits, methods, probe, settings


def method_names() -> list[str]:
    return methods.names()


@dataclasses.dataclass
class UnlearnResult:
    """What a run produced (paths are ``None`` when that output was not written)."""

    output_dir: Path
    config_path: Path
    summary_path: Path
    model_dir: Path | None
    checkpoint_dir: Path | None
    summary: dict[str, Any]
    model: nnx.Module  # the unlearned model in memory (adapters attached when LoRA was used)
    tokenizer: Any
    hf_config: Any


def hyperparameters(cfg: UnlearnConfig) -> dict[str, Any]:
    """The section of ``cfg.methods`` named by ``cfg.method``, as keyword arguments."""
    return methods.hyperparameters(cfg.methods, cfg.method)


# -- pieces ---------------------------------------------------------------------------------------


def fitted_encoder(base: ExampleEncoder, examples: Sequence[Example], max_length: int) -> ExampleEncoder:
    """A copy of ``base`` padded to ``max_length`` (0: the longest of ``examples``)."""
    encoder = copy.copy(base)
    encoder.max_length = max_length
    if hasattr(encoder, "max_patches"):
        encoder.max_patches = 0
    return fit_shape(encoder, examples)


def _evaluation_sets(cfg: UnlearnConfig, sets: settings.UnlearningSets) -> dict[str, list[Example]]:
    """The evaluation sets asked for (``eval.sets``; default all), each cut to ``eval.max_records``."""
    if not cfg.eval.enabled:
        return {}
    unknown = sorted(set(cfg.eval.sets) - set(sets.evaluation))
    if unknown:
        raise ConfigError(f"eval.sets {unknown}: this setting evaluates {', '.join(sets.evaluation)}")
    names = list(cfg.eval.sets) or list(sets.evaluation)
    return {k: sets.evaluation[k][: cfg.eval.max_records or None] for k in names}


def _measure(model, evaluation: dict[str, list[Example]], encoder: ExampleEncoder, cfg: UnlearnConfig,
             when: str) -> dict[str, np.ndarray]:
    return {name: probe.answer_probabilities(model, examples, encoder, batch_size=cfg.eval.batch_size,
                                             description=f"{when}: {name}")
            for name, examples in evaluation.items()}


def _plot(summary: dict, path: Path) -> None:
    plt = pyplot()
    probs = summary["answer_probability"]
    names = list(probs)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(names) + 1.5), 3.2))
    ax.bar(x - 0.2, [probs[n]["before"] for n in names], 0.4, label="vanilla")
    ax.bar(x + 0.2, [probs[n]["after"] for n in names], 0.4, label=summary["method"])
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("answer probability")
    ax.set_ylim(0, 1)
    ax.set_title(f"{summary['method']} ({summary['setting']} setting)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# -- the run --------------------------------------------------------------------------------------


def run_unlearning(cfg: UnlearnConfig) -> UnlearnResult:
    """Unlearn per ``cfg`` and write the outputs listed in the module docstring."""
    config_lib.validate(cfg)  # also configs built in code (the benchmark's)
    method = methods.get(cfg.method)
    hparams = hyperparameters(cfg)
    out = Path(cfg.output_dir)
    resolved = config_lib.to_dict(cfg)
    # Only the method in effect matters for resuming; the other methods' sections may change.
    others = [f"methods.{name}" for name in methods.names() if name != cfg.method]
    session = Session(cfg.mesh, distributed_cfg=cfg.distributed, checkpoint=cfg.checkpoint, log=cfg.log,
                      run=RunDir(out, resolved, resume=cfg.resume, free=others))
    if cfg.model.source not in ("hf", "gguf"):
        raise ConfigError("unlearning starts from a trained (vanilla) model: set model.source=hf and model.path to "
                          "the 'model' directory of an `offside-jax finetune` run (or model.source=gguf)")
    began = time.perf_counter()

    loaded = session.load(cfg.model, seed=cfg.seed)
    model, hf_config, tokenizer = loaded.model, loaded.hf_config, loaded.tokenizer
    vision = is_vision_language(hf_config)
    release = load_release(cfg.data.release, check_images=vision)
    sets = settings.select(release, cfg.data.setting, vision=vision, forget_attributes=cfg.data.forget_attributes,
                           identified_fraction=cfg.data.identified_fraction, seed=cfg.seed)
    base = make_encoder(tokenizer, hf_config, image_root=release.root, max_pixels=cfg.data.max_pixels)

    evaluation = _evaluation_sets(cfg, sets)
    # One padded shape for every set: the probe compiles once per model (and batch layout).
    eval_encoder = fitted_encoder(base, [e for v in evaluation.values() for e in v], 0) if evaluation else base
    before = _measure(model, evaluation, eval_encoder, cfg, "before")

    inputs = edits.EditInputs(cfg, hparams, model, sets, base, session, tokenizer, release)
    traces = _trace_snapshot(cfg, inputs)
    checkpoint_dir = None
    steps = 0
    # A training-free method records its config once it has run: a setting it refuses on the way
    # (a matrix the blocks lack, say) leaves no run folder behind to block the corrected rerun.
    if method.kind == "weight_edit":
        report = method.edit(inputs)
        session.run.begin()
    elif method.kind == "generation":
        model, report = method.wrap(inputs)
        session.run.begin()
    else:
        model, report = _run_training(cfg, method, hparams, model, sets, base, session, inputs)
        steps = cfg.train.steps
        checkpoint_dir = Path(cfg.checkpoint.directory) if cfg.checkpoint.directory else out / "checkpoints"
    weights = underlying_model(model)  # what likelihoods and traces read (GUARD changes no weight)

    after = _measure(weights, evaluation, eval_encoder, cfg, "after")
    summary = {
        "method": cfg.method,
        "kind": method.kind,
        "setting": cfg.data.setting,
        "forget_attributes": list(cfg.data.forget_attributes),
        "identified_fraction": cfg.data.identified_fraction,
        "hyperparameters": hparams,
        "lora": cfg.lora.enabled,
        "steps": steps,
        "records": sets.counts(),
        "answer_probability": {
            name: {"before": float(before[name].mean()), "after": float(after[name].mean()),
                   "ratio": float(after[name].mean() / max(before[name].mean(), 1e-30))}
            for name in evaluation
        },
        "per_record": {name: {"before": before[name].tolist(), "after": after[name].tolist()} for name in evaluation},
        "report": report,
        "seconds": round(time.perf_counter() - began, 2),
    }
    if traces is not None:
        summary["trace_kept"] = _trace_kept(traces, weights)
    model_dir = None
    if cfg.export_merged:
        # A generation-time method's state goes beside the weights it wraps, so that
        # `offside-jax evaluate model.path=<out>/model` runs the model as the method left it.
        extra = functools.partial(method.save, model) if method.save else None
        model_dir = session.export(weights, hf_config, tokenizer, out / "model", config=resolved, extra=extra)
    if session.primary:
        write_json(out / "summary.json", summary)
        if evaluation:
            _plot(summary, out / "summary.png")
    return UnlearnResult(out, out / "config.yaml", out / "summary.json", model_dir, checkpoint_dir, summary, model,
                         tokenizer, hf_config)


def _run_training(cfg: UnlearnConfig, method: methods.Method, hparams: dict, model, sets: settings.UnlearningSets,
                  base: ExampleEncoder, session: Session, inputs: edits.EditInputs):
    """A ``loss`` or ``alternating`` method as a recipe for the training session."""
    ratio = cfg.data.retain_ratio if cfg.data.retain_ratio is not None else method.retain_ratio
    common = dict(forget_batch_size=cfg.data.forget_batch_size, retain_ratio=ratio, seed=cfg.seed,
                  shuffle=cfg.data.shuffle, refusals=tuple(cfg.data.refusals) or settings.REFUSALS)
    step_kwargs = dict(micro_batches=cfg.data.micro_batches, fp32_master_weights=cfg.train.fp32_master_weights,
                       half_finetune=cfg.train.half_finetune)
    report: dict[str, Any] = {"retain_ratio": ratio}
    micro_steps = cfg.train.steps
    if method.kind == "alternating":
        recipe = method.recipe(cfg, hparams, model, sets, base, common, session)
        session.add_lora(model, cfg.lora, seed=cfg.seed)
        step_fn = session.step(model, recipe.phases, cfg.optim, cfg.train.steps, params=cfg.train.params,
                               accumulate=recipe.accumulate, **step_kwargs)
        batches, first = recipe.batches, recipe.first
        report.update(recipe.report)
        # train.steps counts optimizer updates for every method (as Hugging Face's max_steps): a
        # recipe that averages `accumulate` micro-steps per update (OFFSIDE's forget/retain pairs)
        # runs that many micro-steps per step, so it gets the updates and the forget and retain
        # rows a loss method gets from the same train.steps.
        micro_steps = cfg.train.steps * recipe.accumulate
        report["micro_steps"] = micro_steps
    else:
        loss_fn = method.loss(hparams, cfg.train.loss_chunk_tokens)
        cached = method.prepare(cfg, hparams, model, sets, base, session) if method.prepare else {}
        mask = None
        if method.setup is not None:
            setup_report, mask = method.setup(inputs)
            report.update(setup_report)
        session.add_lora(model, cfg.lora, seed=cfg.seed)
        pattern = cfg.train.params if cfg.train.params is not None else method.default_params(hparams, _depth(model))
        optim = method.optim(hparams, cfg.optim) if method.optim else cfg.optim
        step_fn = session.step(model, loss_fn, optim, cfg.train.steps, params=pattern, update_mask=mask, **step_kwargs)
        batches = settings.UnlearningBatches(sets, base, loss_fn.splits, cached=cached, **common)
        batches.encoder = fitted_encoder(base, batches.all_examples(), cfg.data.max_length)
        first = [batches(0)]
    del model  # its trainable arrays now belong to the training state
    batch_at = session.local_rows(step_fn, batches)
    local_first = [session.local_rows(step_fn, lambda i, b=b: b)(0) for b in first]
    session.check_batches(step_fn, local_first, "data.forget_batch_size / retain_ratio / micro_batches")
    session.check_memory(step_fn, local_first, cfg.train)
    state = session.fit(step_fn, batch_at, steps=micro_steps, seed=cfg.seed, log_every=cfg.train.log_every)
    return step_fn.model(state), report


def _trace_snapshot(cfg: UnlearnConfig, inputs: edits.EditInputs):
    """The forget subjects' ConceptVectors traces before the method (``eval.trace_kept``), or None."""
    if not cfg.eval.trace_kept:
        return None
    from offside_jax.unlearn.concept_vectors import snapshot_traces

    names = inputs.forget_subjects
    if not names:
        return None
    return snapshot_traces(inputs.model, inputs.traces(names, top=cfg.eval.trace_top))


def _trace_kept(snapshot, model) -> dict[str, float]:
    """How much of the subjects' traces survived: mean cosine, L2 and top-200 Jaccard (1, 0, 1: untouched)."""
    from offside_jax.eval.engine import evaluation_model
    from offside_jax.unlearn.concept_vectors import changes_since, trace_summary

    return {**trace_summary(changes_since(snapshot, evaluation_model(model))), "traces": len(snapshot.traces)}


def _depth(model) -> int:
    """Decoder layers of ``model`` (its ``model.layers``)."""
    return len(model.model.layers)

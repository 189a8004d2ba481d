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
    output_dir/model/               the unlearned model, merged (HF safetensors + tokenizer + config.yaml)
    output_dir/summary.json         before/after answer probabilities, counts, method reports
    output_dir/summary.png          the same as a bar chart

Methods: every loss of ``offside_jax.unlearn.losses`` (trained with LoRA adapters or full
parameters; ``train.params`` limits which parameters move), ``ssd`` (Fisher dampening, no
training steps) and ``mmunlearner`` (Fisher-ratio masked ascent alternating with retain NLL).
Files are written under temporary names and renamed, so a crash never leaves a complete-looking
but partial export or summary.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from offside_jax import config as config_lib
from offside_jax.config import ConfigError, UnlearnConfig
from offside_jax.data.batches import ExampleEncoder, fit_shape, is_vision_language, make_encoder, sequential_batches
from offside_jax.data.offside import Example, load_release
from offside_jax.files import pyplot, save_figure, staged_dir, write_json, write_yaml
from offside_jax.models import lora
from offside_jax.models.hf import path_to_str
from offside_jax.train import mesh as mesh_lib
from offside_jax.train.checkpoint import Checkpointer
from offside_jax.train.loop import IndexedBatches, MetricLogger, start_or_resume, train
from offside_jax.train.optim import make_optimizer
from offside_jax.train.step import TrainStep, partition, place_model_on_mesh
from offside_jax.unlearn import dampening, probe, saliency, settings
from offside_jax.unlearn.losses import METHODS, build_loss, rmu_trainable_pattern

EXTRA_METHODS = ("ssd", "mmunlearner")


def method_names() -> list[str]:
    return sorted(METHODS) + list(EXTRA_METHODS)


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
    if cfg.method not in method_names():
        raise ConfigError(f"method {cfg.method!r} is not one of {', '.join(method_names())}")
    return dataclasses.asdict(getattr(cfg.methods, cfg.method))


# -- pieces ---------------------------------------------------------------------------------------


def load_vanilla(cfg: UnlearnConfig, mesh) -> tuple[nnx.Module, Any, Any]:
    """``(model on the mesh, hf_config, tokenizer)`` of the model to unlearn from."""
    from offside_jax.train.finetune import load_model

    if cfg.model.source == "tiny":
        raise ConfigError("unlearning starts from a trained (vanilla) model: set model.source=hf and model.path to "
                          "the 'model' directory of an `offside-jax finetune` run (or model.source=gguf)")
    return load_model(cfg, mesh, [])


def fitted_encoder(base: ExampleEncoder, examples: Sequence[Example], max_length: int) -> ExampleEncoder:
    """A copy of ``base`` padded to ``max_length`` (0: the longest of ``examples``)."""
    encoder = copy.copy(base)
    encoder.max_length = max_length
    if hasattr(encoder, "max_patches"):
        encoder.max_patches = 0
    return fit_shape(encoder, examples)


def restrict_updates(optimizer: optax.GradientTransformation, params: Any, pattern: str) -> optax.GradientTransformation:
    """``optimizer`` moving only the params whose dotted path matches ``pattern``: the others'
    gradients are zeroed before clipping and their updates (weight decay too) after."""
    regex = re.compile(pattern)
    keep = jax.tree_util.tree_map_with_path(lambda path, _: bool(regex.search(path_to_str(path))), params)
    if not any(jax.tree.leaves(keep)):
        examples = [path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)][:6]
        raise ConfigError(f"train.params {pattern!r} selects none of the trainable parameters ({', '.join(examples)}, ...)")

    def zero_frozen(updates, params=None):
        del params
        return jax.tree.map(lambda u, k: u if k else jnp.zeros_like(u), updates, keep)

    frozen = optax.stateless(zero_frozen)
    return optax.chain(frozen, optimizer, frozen)


# What must match for a run to resume another's checkpoints (steps, logging, eval may change).
RESUME_KEYS = ("method", "seed", "model", "lora", "data", "optim")


def _check_resumable(cfg: UnlearnConfig, resolved: dict, config_path: Path) -> None:
    """Refuse to resume checkpoints that another configuration wrote into ``output_dir``."""
    checkpoints = config_path.parent / "checkpoints"
    if not (cfg.checkpoint.resume and config_path.exists() and checkpoints.is_dir() and any(checkpoints.iterdir())):
        return
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.load(config_path))
    keys = [k for k in RESUME_KEYS if saved.get(k) != resolved.get(k)]
    section = saved.get("methods", {}).get(cfg.method)
    if section != resolved["methods"][cfg.method]:
        keys.append(f"methods.{cfg.method}")
    if keys:
        raise ConfigError(f"{checkpoints} holds checkpoints of a run with other {', '.join(keys)}; "
                          "use a new output_dir (or delete that one)")


def export_model(model: nnx.Module, hf_config: Any, tokenizer: Any, directory: Path, resolved: dict) -> Path:
    """Merged HF weights + tokenizer + the run's config, written beside and swapped in whole."""
    with staged_dir(directory) as tmp:
        lora.save_merged(model, hf_config, tmp)
        tokenizer.save_pretrained(str(tmp))
        write_yaml(tmp / "config.yaml", resolved)
    return directory


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
    hparams = hyperparameters(cfg)
    if cfg.method in ("ssd", "mmunlearner") and cfg.lora.enabled:
        raise ConfigError(f"{cfg.method} works on the weights themselves: set lora.enabled=false")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = config_lib.to_dict(cfg)
    config_path = out / "config.yaml"
    _check_resumable(cfg, resolved, config_path)
    write_yaml(config_path, resolved)
    began = time.perf_counter()

    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    model, hf_config, tokenizer = load_vanilla(cfg, mesh)
    vision = is_vision_language(hf_config)
    release = load_release(cfg.data.release, check_images=vision)
    sets = settings.select(release, cfg.data.setting, vision=vision, forget_attributes=cfg.data.forget_attributes,
                           identified_fraction=cfg.data.identified_fraction, seed=cfg.seed)
    base = make_encoder(tokenizer, hf_config, image_root=release.root, max_pixels=cfg.data.max_pixels)

    evaluation = _evaluation_sets(cfg, sets)
    # One padded shape for every set: the probe compiles once per model (and batch layout).
    eval_encoder = fitted_encoder(base, [e for v in evaluation.values() for e in v], 0) if evaluation else base
    before = _measure(model, evaluation, eval_encoder, cfg, "before")

    report: dict[str, Any] = {}
    checkpoint_dir = None
    steps = 0
    if cfg.method == "ssd":
        model, report = _run_ssd(cfg, hparams, model, sets, base)
    else:
        model, report, steps = _run_training(cfg, hparams, model, sets, base, mesh, resolved)
        checkpoint_dir = out / "checkpoints"

    after = _measure(model, evaluation, eval_encoder, cfg, "after")
    summary = {
        "method": cfg.method,
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
    model_dir = None
    if jax.process_index() == 0:
        if cfg.export_merged:
            model_dir = export_model(model, hf_config, tokenizer, out / "model", resolved)
        summary_path = out / "summary.json"
        write_json(summary_path, summary)
        if evaluation:
            _plot(summary, out / "summary.png")
    return UnlearnResult(out, config_path, out / "summary.json", model_dir, checkpoint_dir, summary, model,
                         tokenizer, hf_config)


def _run_ssd(cfg: UnlearnConfig, hparams: dict, model, sets: settings.UnlearningSets, base: ExampleEncoder):
    hparams = dict(hparams)
    batch_size = hparams.pop("batch_size")
    dcfg = dampening.DampeningConfig(**hparams)
    if dcfg.estimator == "per_example" and batch_size % dcfg.per_example_chunk:
        raise ConfigError(f"methods.ssd.batch_size={batch_size} must be a multiple of per_example_chunk={dcfg.per_example_chunk}")
    encoder = fitted_encoder(base, sets.full, cfg.data.max_length)
    result = dampening.ssd(model, sequential_batches(sets.full, encoder, batch_size),
                           sequential_batches(sets.forget, encoder, batch_size), dcfg)
    report = result.to_dict()
    report["per_tensor"] = {k: v for k, v in report["per_tensor"].items() if v}  # only what was dampened
    return model, {"dampening": report}


def _run_training(cfg: UnlearnConfig, hparams: dict, model, sets: settings.UnlearningSets, base: ExampleEncoder,
                  mesh, resolved: dict):
    out = Path(cfg.output_dir)
    optimizer, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    common = dict(forget_batch_size=cfg.data.forget_batch_size, retain_ratio=cfg.data.retain_ratio, seed=cfg.seed,
                  shuffle=cfg.data.shuffle, refusals=tuple(cfg.data.refusals) or settings.REFUSALS)
    report: dict[str, Any] = {}
    if cfg.method == "mmunlearner":
        data_at, step_fn, report = _mmunlearner(cfg, hparams, model, sets, base, mesh, optimizer, schedule, common)
    else:
        loss_fn = build_loss(cfg.method, chunk_tokens=cfg.train.loss_chunk_tokens, **hparams)
        if cfg.lora.enabled:
            lora.apply(model, lora.LoRASpec(cfg.lora.target, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout), seed=cfg.seed)
            place_model_on_mesh(model, mesh)
        parts = partition(model, reference=loss_fn.needs_reference)
        pattern = cfg.train.params
        if pattern is None and cfg.method == "rmu":
            pattern = rmu_trainable_pattern(hparams["layer"])
        if pattern is not None:
            optimizer = restrict_updates(optimizer, parts.trainable, pattern)
        batches = settings.UnlearningBatches(sets, base, loss_fn.splits, **common)
        batches.encoder = fitted_encoder(base, batches.all_examples(), cfg.data.max_length)
        step_fn = TrainStep(parts, loss_fn, optimizer, mesh=mesh, micro_batches=cfg.data.micro_batches, schedule=schedule)
        data_at = batches
    del model  # its trainable arrays now belong to the training state
    try:
        step_fn.shard_batch(data_at(0))
    except ValueError as e:
        raise ConfigError(f"data.forget_batch_size / retain_ratio / micro_batches: {e}") from None

    data = IndexedBatches(data_at)
    checkpointer = Checkpointer(out / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                                async_save=cfg.checkpoint.async_save)
    logger = MetricLogger(out / "logs", tensorboard=cfg.log.tensorboard)
    try:
        state, start = start_or_resume(step_fn, checkpointer, seed=cfg.seed, data=data, resume=cfg.checkpoint.resume)
        if start:
            print(f"resuming from step {start} ({checkpointer.directory})")
        state = train(step_fn, state, data, num_steps=cfg.train.steps, start_step=start, checkpointer=checkpointer,
                      logger=logger, log_every=cfg.train.log_every, config=resolved, progress=cfg.log.progress)
    finally:
        logger.close()
        checkpointer.close()
    return step_fn.model(state), report, cfg.train.steps


def _mmunlearner(cfg, hparams, model, sets, base, mesh, optimizer, schedule, common):
    scfg = saliency.SaliencyConfig(groups=dict(hparams["groups"]), targets=hparams["targets"],
                                   threshold=hparams["threshold"], eps=hparams["eps"])
    preserve = list(sets.retain)
    if hparams["preserve_text"] and "retain_text" in sets.evaluation:
        preserve += sets.evaluation["retain_text"]
    fisher_encoder = fitted_encoder(base, sets.forget + preserve, cfg.data.max_length)
    size = hparams["fisher_batch_size"]
    masks, mask_report = saliency.saliency_masks(
        model,
        lambda: sequential_batches(sets.forget, fisher_encoder, size),
        lambda: sequential_batches(preserve, fisher_encoder, size),
        scfg,
    )
    forget_at = settings.UnlearningBatches(sets, base, ("forget",), **common)
    retain_at = settings.UnlearningBatches(sets, base, ("retain",), **common)
    train_encoder = fitted_encoder(base, sets.forget + sets.retain, cfg.data.max_length)
    forget_at.encoder = retain_at.encoder = train_encoder
    step_fn = saliency.AlternatingStep(partition(model), masks, optimizer, mesh=mesh, micro_batches=cfg.data.micro_batches,
                                       schedule=schedule, gamma=hparams["gamma"])
    return saliency.AlternatingBatches(forget_at, retain_at), step_fn, {"saliency": mask_report.to_dict()}

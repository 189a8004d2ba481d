"""The one training-session driver: every job that changes weights runs through it.

Fine-tuning, unlearning (every loss method and MMUnlearner's alternating steps), the
relearning attack, corrective relearning, the evaluation suite's short fine-tunes and the
SCoRe stages hand a :class:`Session` a *recipe* (a loss or an alternating pair of losses,
batches, which parameters train); the session owns everything else:

- **start-up**: ``jax.distributed`` (first thing), the mesh (a mesh that does not fit the
  devices is a :class:`~offside_jax.config.ConfigError`, one message);
- **the run directory** (:class:`RunDir`): a rerun into an ``output_dir`` that holds another
  run's ``config.yaml`` is refused, naming the keys that differ (``resume=force`` accepts a
  deliberate change and keeps the old file as ``config.previous.yaml``); ``config.yaml`` is
  written only when training starts, so a run that fails before leaves nothing behind;
- **the model**: one loader (``offside_jax.models.loader``), LoRA, the reference model, the
  jitted step (:meth:`Session.step`), fp32 master weights, trainable-parameter patterns;
- **the AOT memory check** before anything is written (:meth:`Session.check_memory`);
- **training** (:meth:`Session.fit`): this process's rows of every batch, checkpoints every N
  (keep K, ``checkpoint.directory`` incl. gs://; a corrupt newest checkpoint falls back to the
  previous one with a warning), exact resume with the data position, metrics (no step logged
  twice after a resume), TensorBoard and progress from process 0, evaluation callbacks;
- **export** (:meth:`Session.export`): gathered across processes, written by process 0 into a
  temporary directory and renamed whole.

In-memory jobs (the suite's short fine-tunes, SCoRe) use a session without a run directory:
no files, metrics to a callback.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from offside_jax.config import ConfigError
from offside_jax.files import staged_dir, write_yaml
from offside_jax.models import lora
from offside_jax.models.hf import path_to_str
from offside_jax.train import aot, distributed, half_finetune as hft, losses, mesh as mesh_lib
from offside_jax.train.checkpoint import Checkpointer
from offside_jax.train.loop import IndexedBatches, MetricLogger, PolicyBatches, start_or_resume, train
from offside_jax.train.optim import make_optimizer
from offside_jax.train.step import AlternatingStep, TrainState, TrainStep, partition, place_model_on_mesh

# Keys that may change between a run and its resumption (where and how it runs, how long,
# what it logs); every other key must match the saved config.yaml.
RUNTIME_KEYS = (
    "output_dir", "resume", "distributed", "log", "mesh", "eval", "export_merged",
    "checkpoint.every", "checkpoint.keep", "checkpoint.async_save", "checkpoint.resume",
    "train.steps", "train.log_every", "train.eval_every", "train.aot_memory_check", "train.memory_budget_gib",
    "data.eval_file",
)
RESUME_MODES = ("auto", "force")


# -- the run directory ---------------------------------------------------------------------------


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


class RunDir:
    """``output_dir`` of a run: the saved config, the guard against mixing two runs in it."""

    def __init__(self, output_dir: str | os.PathLike, resolved: dict, *, resume: str = "auto",
                 free: Sequence[str] = ()):
        if resume not in RESUME_MODES:
            raise ConfigError(f"resume={resume!r} is not one of {', '.join(RESUME_MODES)}")
        self.path = Path(output_dir)
        self.resolved, self.resume = resolved, resume
        self.free = tuple(RUNTIME_KEYS) + tuple(free)
        self.config_path = self.path / "config.yaml"
        self.started = False

    def _is_free(self, key: str) -> bool:
        return any(key == f or key.startswith(f + ".") for f in self.free)

    def saved(self) -> dict | None:
        if not self.config_path.is_file():
            return None
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(self.config_path))

    def differences(self) -> list[str]:
        """Keys (dotted) whose value differs from the saved config's (runtime keys aside)."""
        saved = self.saved()
        if saved is None:
            return []
        old, new = _flatten(saved), _flatten(json.loads(json.dumps(self.resolved)))
        return sorted(k for k in set(old) | set(new) if not self._is_free(k) and old.get(k) != new.get(k))

    def check(self) -> None:
        """Refuse a config that differs from the one this directory's run was started with."""
        keys = self.differences()
        if keys and self.resume != "force":
            saved = _flatten(self.saved() or {})
            new = _flatten(json.loads(json.dumps(self.resolved)))
            shown = ", ".join(f"{k} ({saved.get(k)!r} -> {new.get(k)!r})" for k in keys[:6])
            more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
            raise ConfigError(f"{self.path} holds a run started with another config: {shown}{more}. Use a new "
                              "output_dir, or resume=force to continue this run with the new values")

    def begin(self) -> None:
        """Training starts: write ``config.yaml`` (process 0; the old one kept when forced)."""
        if self.started:
            return
        self.started = True
        if distributed.is_primary():
            self.path.mkdir(parents=True, exist_ok=True)
            if self.differences():  # resume=force: the previous record stays beside the new one
                shutil.copyfile(self.config_path, self.path / "config.previous.yaml")
            write_yaml(self.config_path, self.resolved)
        distributed.barrier("run-dir")


# -- the session ---------------------------------------------------------------------------------


def gathered(model: nnx.Module) -> nnx.Module:
    """``model`` with every array complete on the host (collective: every process calls it)."""
    if jax.process_count() == 1:
        return model
    graphdef, arrays = nnx.split(model)
    nnx.replace_by_pure_dict(arrays, distributed.to_host(nnx.to_pure_dict(arrays)))
    return nnx.merge(graphdef, arrays)



def make_mesh(shape: Any) -> Any:
    """The ``(data, fsdp, tensor)`` mesh of a ``MeshConfig`` (or a sequence); a shape that does
    not fit the devices is a :class:`ConfigError`."""
    sizes = (shape.data, shape.fsdp, shape.tensor) if hasattr(shape, "fsdp") else tuple(shape)
    try:
        return mesh_lib.mesh_for_shape(sizes) if -1 not in sizes else mesh_lib.make_mesh(mesh_lib.MeshShape(*sizes))
    except ValueError as e:
        raise ConfigError(f"mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) on {jax.device_count()} "
                          f"device(s): {e}") from None


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


def mask_updates(optimizer: optax.GradientTransformation, params: Any,
                 masks: Mapping[str, np.ndarray]) -> optax.GradientTransformation:
    """``optimizer`` moving only the entries where ``masks[path]`` (a boolean array that
    broadcasts against the param at that dotted path) is true; params without a mask stay
    frozen. Gradients are masked before the optimizer and updates after it, so neither
    clipping, decoupled weight decay nor stale moments move a masked entry."""
    paths = {path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    unknown = sorted(set(masks) - paths)
    if unknown:
        raise ConfigError(f"update mask for {unknown}: no such trainable parameter")
    tree = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.asarray(masks[path_to_str(p)]) if path_to_str(p) in masks else jnp.zeros((), jnp.bool_), params)

    def apply(updates, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, tree)

    masked = optax.stateless(apply)
    return optax.chain(masked, optimizer, masked)


@dataclasses.dataclass
class Phase:
    """One loss of an alternating recipe: ``transform`` (e.g. a gradient mask) runs before the
    optimizer; ``batch_key`` is the sub-batch that selects this phase."""

    batch_key: str
    loss_fn: losses.LossFn
    transform: optax.GradientTransformation | None = None


class _Both:
    """Two metric loggers as one (the run's files and the caller's own)."""

    def __init__(self, *loggers: Any):
        self.loggers = loggers

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)


class Session:
    """See the module docstring. ``run``: the run directory (``None``: an in-memory session)."""

    def __init__(self, mesh: Any, *, distributed_cfg: Any = None, run: RunDir | None = None,
                 checkpoint: Any = None, log: Any = None):
        distributed.initialize(distributed_cfg)  # before anything touches a device
        self.run = run
        if run is not None:
            run.check()  # before anything is loaded: a refused rerun costs nothing
        self.mesh = mesh if isinstance(mesh, jax.sharding.Mesh) else make_mesh(mesh)
        self.checkpoint_cfg, self.log_cfg = checkpoint, log

    @property
    def primary(self) -> bool:
        return distributed.is_primary()

    # -- model --------------------------------------------------------------------------------

    def load(self, model_cfg: Any, *, seed: int = 0, tokenizer: Any = None, texts: Callable | None = None,
             max_pixels: int | None = None):
        """The configured model (``offside_jax.models.loader``), placed on the mesh."""
        from offside_jax.models import loader

        m = model_cfg
        try:
            loaded = loader.load(
                m.source, path=m.path, tokenizer=tokenizer if tokenizer is not None else m.tokenizer,
                tiny=m.tiny, texts=texts, seed=seed, dtype=m.dtype, param_dtype=m.param_dtype,
                remat=m.remat_policy if m.remat else False, attention=m.attention,
                sharding_fn=mesh_lib.sharding_fn(self.mesh),
                max_pixels=max_pixels)
        except loader.LoaderError as e:
            raise ConfigError(str(e)) from None
        if m.source in ("tiny", "tiny_vl"):
            place_model_on_mesh(loaded.model, self.mesh)
        return loaded

    def add_lora(self, model: nnx.Module, lora_cfg: Any, seed: int = 0) -> nnx.Module:
        """LoRA adapters on ``model`` (``lora_cfg``: enabled/target/rank/alpha/dropout), placed."""
        if lora_cfg.enabled:
            lora.apply(model, lora.LoRASpec(lora_cfg.target, lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout), seed=seed)
            place_model_on_mesh(model, self.mesh)
        return model

    def step(self, model: nnx.Module, loss: losses.LossFn | Sequence[Phase], optim: Any, total_steps: int, *,
             micro_batches: int = 1, fp32_master_weights: bool = False, params: str | None = None,
             reference: bool | None = None, accumulate: int = 1,
             update_mask: Mapping[str, np.ndarray] | None = None,
             half_finetune: Any = None) -> TrainStep | AlternatingStep:
        """The jitted step of a recipe: one loss, or alternating :class:`Phase`s sharing one
        state. ``params``: regex of the trainable params that move; ``reference``: keep a frozen
        reference (default: what the loss asks for); ``update_mask``: only these entries of
        these params move (:func:`mask_updates`); ``accumulate``: steps whose mean gradient
        makes one update (``optax.MultiSteps``; as accelerate's gradient accumulation across
        alternating phases); ``half_finetune``: a ``HalfFinetuneConfig`` (HFT: each round a
        random half of every block trains, ``offside_jax.train.half_finetune``; its rounds count
        optimizer updates). ``model``'s trainable arrays then belong to the step (the first
        update may donate them)."""
        optimizer, schedule = make_optimizer(optim, total_steps)
        phases = list(loss) if isinstance(loss, (list, tuple)) else None
        if reference is None:
            fns = [p.loss_fn for p in phases] if phases else [loss]
            reference = any(getattr(f, "needs_reference", False) for f in fns)
        parts = partition(model, reference=reference)
        if params is not None:
            optimizer = restrict_updates(optimizer, parts.trainable, params)
        if update_mask is not None:
            optimizer = mask_updates(optimizer, parts.trainable, update_mask)
        if half_finetune is not None and half_finetune.enabled:
            optimizer = hft.half_finetune(optimizer, parts.trainable, half_finetune, model_params=parts.frozen)
        common = dict(mesh=self.mesh, micro_batches=micro_batches, schedule=schedule,
                      fp32_master_weights=fp32_master_weights)
        def accumulated(tx):
            return optax.MultiSteps(tx, every_k_schedule=accumulate).gradient_transformation() if accumulate > 1 else tx

        if phases is None:
            return TrainStep(parts, loss, accumulated(optimizer), **common)
        return AlternatingStep(parts, {p.batch_key: (p.loss_fn, accumulated(optax.chain(p.transform, optimizer))
                                                     if p.transform else accumulated(optimizer)) for p in phases},
                               **common)

    # -- data ---------------------------------------------------------------------------------

    def local_rows(self, step_fn: Any, batch_at: Callable[[int], Mapping[str, Any]]) -> Callable[[int], Any]:
        """``batch_at`` reduced to this process's rows of every (sub-)batch (one process: as is)."""
        if jax.process_count() == 1:
            return batch_at

        def mine(index: int):
            def take(x):
                x = np.asarray(x)
                return x[step_fn.process_rows(len(x))]

            return jax.tree.map(take, dict(batch_at(index)))

        return mine

    def check_batches(self, step_fn: Any, batches: Iterable[Mapping[str, Any]], keys: str) -> None:
        """A batch that does not split over the mesh / micro-batches is a ConfigError naming ``keys``."""
        for batch in batches:
            try:
                step_fn.shard_batch(batch)
            except ValueError as e:
                raise ConfigError(f"{keys}: {e}") from None

    def check_memory(self, step_fn: Any, batches: Iterable[Mapping[str, Any]], train_cfg: Any) -> None:
        """Compile each distinct step ahead of time and stop (MemoryBudgetError, nothing written)
        when it needs more device memory than the budget."""
        if not getattr(train_cfg, "aot_memory_check", True):
            return
        for batch in batches:
            estimate, budget, _ = aot.check_train_step(step_fn.step_for(batch), batch,
                                                       getattr(train_cfg, "memory_budget_gib", None))
            if self.primary:
                limit = "no budget set" if budget is None else f"budget {aot.format_bytes(budget)}"
                print(f"training step needs {estimate.describe()}; {limit}")

    # -- training -----------------------------------------------------------------------------

    def fit(self, step_fn: Any, batch_at: Callable[[int], Mapping[str, Any]], *, steps: int, seed: int,
            eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None, eval_every: int = 0,
            log_every: int = 1, logger: Any = None, state: TrainState | None = None, start_step: int = 0,
            progress: bool | None = None, from_policy: bool = False) -> TrainState:
        """Train ``step_fn`` to ``steps`` on ``batch_at(i)`` (this process's rows). With a run
        directory: config written, checkpoints, resume, metrics.jsonl (and ``logger`` too); else in
        memory (``state`` / ``start_step`` continue an earlier call, ``logger.log(step, metrics)``
        gets metrics).
        ``from_policy``: the batches are rollouts of the policy being trained,
        ``batch_at(i, state)`` (:class:`~offside_jax.train.loop.PolicyBatches`)."""
        data = (PolicyBatches if from_policy else IndexedBatches)(batch_at, start_step)
        show = progress if progress is not None else bool(getattr(self.log_cfg, "progress", False))
        if self.run is None:
            state = step_fn.init_state(seed) if state is None else state
            return train(step_fn, state, data, num_steps=steps, start_step=start_step, logger=logger,
                         eval_fn=eval_fn, eval_every=eval_every, log_every=log_every, progress=show)
        self.run.begin()
        c = self.checkpoint_cfg
        checkpointer = Checkpointer(c.directory or self.run.path / "checkpoints", every=c.every, keep=c.keep,
                                    async_save=c.async_save)
        metrics = None
        try:
            state, start = start_or_resume(step_fn, checkpointer, seed=seed, data=data, resume=c.resume)
            if start and self.primary:
                print(f"resuming from step {start} ({checkpointer.directory})")
            metrics = MetricLogger(self.run.path / "logs", tensorboard=bool(getattr(self.log_cfg, "tensorboard", False)),
                                   start_step=start)
            state = train(step_fn, state, data, num_steps=steps, start_step=start, checkpointer=checkpointer,
                          logger=metrics if logger is None else _Both(metrics, logger), eval_fn=eval_fn, eval_every=eval_every, log_every=log_every,
                          config=self.run.resolved, progress=show)
        finally:
            if metrics is not None:
                metrics.close()
            checkpointer.close()
        return state

    # -- export -------------------------------------------------------------------------------

    def gathered(self, model: nnx.Module) -> nnx.Module:
        return gathered(model)

    def export(self, model: nnx.Module, hf_config: Any, tokenizer: Any, directory: str | os.PathLike, *,
               config: dict | None = None, extra: Callable[[Path], None] | None = None) -> Path | None:
        """Merged HF weights + tokenizer (+ the run's config, + whatever ``extra(staged directory)``
        writes), written by process 0 beside ``directory`` and swapped in whole. Returns the
        directory (``None`` on other processes)."""
        model = self.gathered(model)
        directory = Path(directory)
        result = None
        if self.primary:
            with staged_dir(directory) as tmp:
                lora.save_merged(model, hf_config, tmp)
                tokenizer.save_pretrained(str(tmp))
                if config is not None:
                    write_yaml(tmp / "config.yaml", config)
                if extra is not None:
                    extra(tmp)
            result = directory
        distributed.barrier("export")
        return result


__all__ = ["Phase", "RESUME_MODES", "RUNTIME_KEYS", "RunDir", "Session", "gathered", "make_mesh", "restrict_updates"]

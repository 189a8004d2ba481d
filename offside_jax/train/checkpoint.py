"""Checkpoints with orbax-checkpoint: train state + data position + config, atomically.

Each checkpoint is one orbax step directory holding three items:

- ``state``: the :class:`~offside_jax.train.step.TrainState` (trainable params or adapters,
  optimizer state, step, rng) as a plain dict of arrays;
- ``meta``: JSON with the step and the data iterator's position;
- ``config``: the full resolved experiment config (JSON).

Orbax writes a step under a temporary name and renames it only when every item is complete,
so an interrupted save never looks like a checkpoint: :meth:`Checkpointer.latest_step` only
sees finished ones. Saves are asynchronous (the device-to-host copy happens before ``save``
returns, writing continues in the background); :meth:`Checkpointer.wait` blocks until they
are durable. Restoring takes an abstract target whose shardings may come from another mesh
shape: each array is read straight into its new layout.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from offside_jax.train.step import TrainState


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or restored; the message names the directory and step."""


def _path(path: tuple) -> str:
    """A dotted name of a tree path (dict keys, sequence indices and attributes alike)."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _as_dict(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


class Checkpointer:
    """Save every ``every`` steps (and on demand), keep the last ``keep``, resume the latest."""

    def __init__(self, directory: str | os.PathLike, *, every: int = 0, keep: int = 2, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        # A URL (gs://bucket/run) goes to orbax as an epath; a local path is made absolute.
        self.directory = epath.Path(directory) if "://" in str(directory) else Path(directory).absolute()
        self.every = every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
            ),
        )

    # -- saving -----------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the periodic schedule asks for a checkpoint after ``step`` updates."""
        return self.every > 0 and step > 0 and step % self.every == 0

    def save(self, step: int, state: TrainState, *, data_state: Any = None, config: dict | None = None) -> None:
        """Start saving ``state`` as checkpoint ``step`` (returns once arrays are on the host)."""
        meta = {"step": int(step), "data": data_state}
        saved = self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_as_dict(state)),
                meta=ocp.args.JsonSave(meta),
                config=ocp.args.JsonSave(config or {}),
            ),
            force=True,
        )
        if not saved:
            raise CheckpointError(f"{self.directory}: orbax declined to save step {step}")

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- restoring --------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest *complete* checkpoint (``None`` when there is none)."""
        self.manager.reload()
        return self.manager.latest_step()

    def check_shapes(self, abstract_state: TrainState, step: int) -> None:
        """Raise :class:`CheckpointError` when checkpoint ``step`` holds arrays of other shapes than
        ``abstract_state`` (a checkpoint of another model size), naming the first such array.
        Unreadable metadata is left to :meth:`restore` to report."""
        try:
            meta = self.manager.item_metadata(step)["state"]
            saved = {_path(p): tuple(m.shape) for p, m in
                     jax.tree_util.tree_leaves_with_path(meta, is_leaf=lambda x: hasattr(x, "shape"))
                     if hasattr(m, "shape")}
        except Exception:  # noqa: BLE001 - a corrupt checkpoint: restore() says so
            return
        # The params' paths are plain dict keys in both trees (optimizer states are not compared:
        # their tuples come back from metadata in another container type).
        expected = {_path(p): tuple(x.shape) for p, x in
                    jax.tree_util.tree_leaves_with_path({"params": abstract_state.params})}
        if not saved:
            return
        for key, shape in expected.items():
            if key in saved and saved[key] != shape:
                raise CheckpointError(
                    f"{self.directory}: checkpoint step {step} is of another model: {key} has shape {saved[key]} "
                    f"there and {shape} in this run's model; use a new output_dir (or checkpoint.directory)")
        missing = sorted(set(expected) - {k for k in saved if k.startswith("params.")})
        if missing:
            raise CheckpointError(f"{self.directory}: checkpoint step {step} is of another model or method: it has no "
                                  f"{missing[0]} (and {len(missing) - 1} more parameters of this run)"
                                  "; use a new output_dir (or checkpoint.directory)")

    def set_aside(self, step: int) -> Any:
        """Rename checkpoint ``step`` (unreadable) to ``<step>.unreadable`` so a resumed run can
        save that step again; nothing is deleted. Process 0 renames; returns the new path."""
        source = self.directory / str(step)
        target = self.directory / f"{step}.unreadable"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.unreadable{n}"
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set-aside-{step}")
        self.manager.reload()
        return target

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict, dict]:
        """``(state, meta, config)`` of checkpoint ``step`` (default: the latest).

        ``abstract_state`` gives shapes, dtypes and target shardings (``TrainStep.abstract_state()``);
        it may describe a different mesh than the one the checkpoint was saved from.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to restore")
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_as_dict(abstract_state)),
                    meta=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax raises many types; name where it happened
            raise CheckpointError(f"{self.directory}: cannot restore step {step}: {type(e).__name__}: {e}") from e
        tree = restored["state"]
        state = TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"], rng=tree["rng"])
        return state, dict(restored["meta"] or {}), dict(restored["config"] or {})


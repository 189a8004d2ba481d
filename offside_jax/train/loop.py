"""The thin training driver: batches in, steps run, progress shown, metrics and checkpoints out.

Everything that computes lives elsewhere (the jitted step in ``offside_jax.train.step``,
checkpoints in ``offside_jax.train.checkpoint``). This module only sequences them:

- data comes from a :class:`DataSource`: an iterator of host batches that can report and
  restore its position (``get_state``/``set_state``, as grain's iterators do), so a resumed
  run continues with exactly the batch it would have seen;
- metrics go to ``metrics.jsonl`` (one JSON object per logged step) and to TensorBoard
  (tensorboardX, no TensorFlow needed);
- a non-finite loss stops training with :class:`NonFiniteLossError` naming the step; the
  state of that step is never saved, so the last checkpoint stays the one resume picks up.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import jax
import numpy as np

from offside_jax.train.checkpoint import CheckpointError, Checkpointer
from offside_jax.train.step import TrainState, TrainStep


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


class DataSource(Protocol):
    """Host batches (dicts of numpy arrays, ``[B, ...]``) with a restorable position."""

    def __next__(self) -> Mapping[str, Any]: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class IndexedBatches:
    """A :class:`DataSource` over ``batch_at(i)`` (a deterministic function of the batch index)."""

    def __init__(self, batch_at: Callable[[int], Mapping[str, Any]], start: int = 0):
        self.batch_at, self.index = batch_at, start

    def __iter__(self) -> "IndexedBatches":
        return self

    def __next__(self) -> Mapping[str, Any]:
        batch = self.batch_at(self.index)
        self.index += 1
        return batch

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.index = int(state["index"])


class PolicyBatches(IndexedBatches):
    """Batches made from the state being trained, e.g. rollouts of the current policy
    (``batch_at(i, state)``): :func:`train` shows it the state before asking for each batch."""

    state: TrainState | None = None

    def see(self, state: TrainState) -> None:
        self.state = state

    def __next__(self) -> Mapping[str, Any]:
        batch = self.batch_at(self.index, self.state)
        self.index += 1
        return batch


class MetricLogger:
    """JSON lines (``metrics.jsonl``) and, optionally, TensorBoard event files in ``directory``.

    Only process 0 of a multi-process run opens or writes anything; the others log nothing.
    ``start_step``: the step a resumed run continues from; lines of later steps (logged by the
    interrupted run after its last checkpoint, and about to be run again) are dropped, so no
    step appears twice.
    """

    def __init__(self, directory: str | os.PathLike, *, tensorboard: bool = True, start_step: int | None = None):
        self.directory = Path(directory)
        primary = jax.process_index() == 0
        if primary:
            self.directory.mkdir(parents=True, exist_ok=True)
            if start_step is not None:
                _drop_after(self.directory / "metrics.jsonl", start_step)
        self._jsonl = open(self.directory / "metrics.jsonl", "a", encoding="utf-8") if primary else None
        self._tb = None
        if tensorboard and primary:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.directory / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": int(step), **values}, sort_keys=True) + "\n")
            self._jsonl.flush()
            if self._tb is not None:
                for name, value in values.items():
                    self._tb.add_scalar(name, value, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _drop_after(path: Path, step: int) -> None:
    """Remove the lines of ``path`` (JSON lines with a ``step``) logged after ``step``."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)


def start_or_resume(
    step_fn: TrainStep, checkpointer: Checkpointer | None, *, seed: int, data: DataSource | None = None, resume: bool = True
) -> tuple[TrainState, int]:
    """The newest restorable checkpoint's state (and data position) if there is one, else a
    fresh state.

    Returns ``(state, step)``. The checkpoint may come from another mesh shape: it is
    restored into ``step_fn``'s shardings. A newest checkpoint that cannot be read (corrupt,
    half-deleted) is skipped with a warning for the one before it; a checkpoint of another
    model (other shapes) stops with one :class:`CheckpointError` naming a tensor.
    """
    if checkpointer is None or not resume or checkpointer.latest_step() is None:
        return step_fn.init_state(seed), 0
    abstract = step_fn.abstract_state()
    steps = sorted(checkpointer.all_steps(), reverse=True)
    failures = []
    for step in steps:
        checkpointer.check_shapes(abstract, step)
        try:
            state, meta, _ = checkpointer.restore(abstract, step=step)
        except CheckpointError as e:
            checkpointer.check_shapes(abstract, step)  # metadata readable now: another model's?
            if "stored shape" in str(e):
                raise CheckpointError(f"{checkpointer.directory}: checkpoint step {step} is of another model (other "
                                      "array shapes); use a new output_dir (or checkpoint.directory)") from None
            failures.append(str(e))
            later = f"falling back to step {steps[len(failures)]}" if len(failures) < len(steps) else "none left"
            if len(failures) < len(steps):
                aside = checkpointer.set_aside(step)
                later += f" (the unreadable one is kept as {aside})"
            if jax.process_index() == 0:
                warnings.warn(f"{e}; {later}", stacklevel=2)
                print(f"warning: checkpoint step {step} cannot be restored; {later}", file=sys.stderr)
            continue
        if data is not None and meta.get("data") is not None:
            data.set_state(_from_json(meta["data"]))
        return state, int(meta.get("step", int(state.step)))
    raise CheckpointError(f"{checkpointer.directory}: none of the checkpoints {steps} can be restored "
                          f"(newest: {failures[0]}); delete them or use another checkpoint.directory")


def train(
    step_fn: TrainStep,
    state: TrainState,
    data: DataSource,
    *,
    num_steps: int,
    start_step: int = 0,
    checkpointer: Checkpointer | None = None,
    logger: MetricLogger | None = None,
    eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    log_every: int = 1,
    config: dict | None = None,
    progress: bool = True,
) -> TrainState:
    """Run steps ``start_step + 1 ... num_steps`` and return the final state.

    Checkpoints are saved when ``checkpointer.due(step)`` and after the last step; each holds
    the data position and ``config``. ``eval_fn(state)`` runs every ``eval_every`` steps (and
    after the last); its metrics are logged with an ``eval/`` prefix.

    The loop never waits for the device between steps: step N's metrics are fetched after
    step N+1 has been dispatched, so the host prepares the next batch while the device works.
    Before a checkpoint or an evaluation the pending metrics are fetched first, so a NaN loss
    stops the run before a state it produced is saved.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=num_steps, initial=start_step, disable=not progress or jax.process_index() != 0, unit="step")
    last_saved = checkpointer.latest_step() if checkpointer is not None else None
    step = start_step
    pending: list[tuple[int, Any]] = []  # (step, its metrics still on the device)
    clock = {"last": time.perf_counter()}

    def report() -> None:
        """Fetch and report the pending step's metrics (the one host sync of a step)."""
        if not pending:
            return
        done, device_metrics = pending.pop()
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        now = time.perf_counter()
        elapsed, clock["last"] = now - clock["last"], now
        loss = metrics["loss"]
        if not math.isfinite(loss):
            if checkpointer is not None:
                checkpointer.wait()
            where = (
                f"the last checkpoint (step {last_saved}) in {checkpointer.directory} is intact"
                if checkpointer is not None and last_saved is not None
                else "no checkpoint was saved"
            )
            raise NonFiniteLossError(f"loss is {loss} at step {done}; training stopped, {where}")
        tokens_per_s = metrics.get("tokens", 0.0) / max(elapsed, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if logger is not None and (done % max(1, log_every) == 0 or done == num_steps):
            logger.log(done, {**metrics, "tokens_per_second": tokens_per_s, "step_seconds": elapsed})

    try:
        while step < num_steps:
            if isinstance(data, PolicyBatches):
                data.see(state)
            host_batch = next(data)
            state, metrics = step_fn(state, step_fn.shard_batch(host_batch))
            step += 1
            report()  # the previous step's metrics, while this one runs
            pending.append((step, metrics))
            evaluate = eval_fn is not None and ((eval_every > 0 and step % eval_every == 0) or step == num_steps)
            save = checkpointer is not None and (checkpointer.due(step) or step == num_steps)
            if evaluate or save:
                report()
            if evaluate:
                evaluation = {f"eval/{k}": float(v) for k, v in eval_fn(state).items()}
                if logger is not None:
                    logger.log(step, evaluation)
                if jax.process_index() == 0:
                    bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in evaluation.items()))
            if save:
                checkpointer.save(step, state, data_state=_json_able(data.get_state()), config=config)
                last_saved = step
        report()
    finally:
        bar.close()
        if checkpointer is not None:
            checkpointer.wait()
    return state


def _json_able(value: Any) -> Any:
    """Iterator states as JSON (bytes, e.g. from grain's DataLoader, become latin-1 text)."""
    if isinstance(value, bytes):
        return {"__bytes__": value.decode("latin-1")}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _json_able(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_able(v) for v in value]
    return value



def _from_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"__bytes__"}:
            return value["__bytes__"].encode("latin-1")
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value

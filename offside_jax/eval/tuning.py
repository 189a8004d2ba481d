"""Short fine-tuning runs on (item, answer) pairs through the training session.

The relearning attack (LoRA on the relearn set), corrective relearning (LoRA on corrected
facts) and the benchmark's from-scratch models (full fine-tuning) are all "teach these
answers to these prompts for N steps": :func:`tune` hands that recipe (the fused answer-only
NLL, or any training-core loss) to an in-memory ``train.session.Session``, for any prompt encoder (images included).

Rows are encoded once. Batches have fixed shapes (so one program serves every step): rows
with images and rows without go to separate batches, each padded to the longest row of its
group, and an epoch's short last batch is filled with other rows of the same group. The
order is a deterministic function of the seed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from offside_jax.config import HalfFinetuneConfig, OptimConfig
from offside_jax.data.batches import ExampleEncoder, row_length
from offside_jax.eval.items import EvalItem
from offside_jax.models import lora
from offside_jax.train import losses
from offside_jax.train.session import Session
from offside_jax.train.step import frozen_copy, place_model_on_mesh

ALL_PROJECTIONS = r"(q|k|v|o|gate|up|down)_proj"


@dataclasses.dataclass
class TuneConfig:
    """One fine-tuning run. ``lora=True`` trains adapters (merged into the result); False
    trains every parameter. Defaults are OFFSIDE's relearning: LoRA r=8, alpha=32, lr 1e-4."""

    steps: int = 30
    batch_size: int = 16
    lr: float = 1e-4
    schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_target: str = ALL_PROJECTIONS
    seed: int = 0
    mesh: list[int] = dataclasses.field(default_factory=lambda: [1, -1, 1])  # data, fsdp, tensor
    # Half Fine-Tuning: each round a random half of every decoder block trains (with LoRA: the
    # adapters of that half); see offside_jax.train.half_finetune.
    half_finetune: HalfFinetuneConfig = dataclasses.field(default_factory=HalfFinetuneConfig)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"tune config: steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")


@dataclasses.dataclass
class TuneResult:
    model: nnx.Module  # adapters merged in when LoRA was used
    history: list[dict[str, float]]  # one entry per evaluation (step 0 included when asked)
    losses: list[float]  # training loss per step


class _Schedule:
    """``batch_at(step)``: fixed-shape host batches, a deterministic function of the step."""

    def __init__(self, encoder: ExampleEncoder, rows: Sequence[Any], has_image: Sequence[bool], batch_size: int, seed: int):
        self.encoder, self.rows, self.batch_size, self.seed = encoder, list(rows), batch_size, seed
        self.groups = [[i for i, flag in enumerate(has_image) if flag == g] for g in (False, True)]
        self.groups = [g for g in self.groups if g]
        self.lengths = [max(row_length(encoder, self.rows[i]) for i in g) for g in self.groups]
        self._epochs: dict[int, list[tuple[int, list[int]]]] = {}

    def _epoch(self, epoch: int) -> list[tuple[int, list[int]]]:
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            chunks = []
            for g, group in enumerate(self.groups):
                order = [group[i] for i in rng.permutation(len(group))]
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start: start + self.batch_size]
                    missing = self.batch_size - len(chunk)
                    if missing:
                        pool = [i for i in group if i not in chunk] or group
                        chunk += [pool[int(j)] for j in rng.integers(0, len(pool), missing)]
                    chunks.append((g, chunk))
            self._epochs = {epoch: [chunks[i] for i in rng.permutation(len(chunks))]}  # keep one epoch
        return self._epochs[epoch]

    def steps_per_epoch(self) -> int:
        return sum(-(-len(g) // self.batch_size) for g in self.groups)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, within = divmod(step, self.steps_per_epoch())
        g, chunk = self._epoch(epoch)[within]
        return self.encoder.collate_answers([self.rows[i] for i in chunk], self.lengths[g])


def curve_steps(steps: int, every: int) -> list[int]:
    """The steps a recovery curve is measured at: start, end and every ``every`` steps
    between (``every <= 0``: start and end only); the ``evaluate_at`` of :func:`tune`."""
    return sorted({0, steps, *(range(every, steps, every) if every > 0 else ())})


def tune(
    model: nnx.Module,
    encoder: ExampleEncoder,
    pairs: Sequence[tuple[EvalItem, str]],
    config: TuneConfig | None = None,
    *,
    evaluate: Callable[[nnx.Module], Mapping[str, float]] | None = None,
    evaluate_at: Sequence[int] = (),
    loss_fn: losses.LossFn | None = None,
    sub_batch: str | None = None,
    progress: bool = True,
) -> TuneResult:
    """Fine-tune a copy of ``model`` on ``(item, answer)`` pairs; ``model`` is left untouched.

    ``evaluate(model) -> metrics`` runs at the steps in ``evaluate_at`` (0 = before the
    first update); its results, with ``step``, form ``history`` (recovery curves).
    ``loss_fn`` replaces the answer NLL (any training-core loss, e.g. an unlearning method
    from ``unlearn.losses.build_loss``); ``sub_batch`` names the sub-batch the pairs fill
    (``"forget"`` for gradient ascent). A loss that needs a reference model gets the base
    model (adapters off) under LoRA, or a frozen copy.
    """
    if not pairs:
        raise ValueError("nothing to fine-tune on (no pairs)")
    config = config or TuneConfig()
    rows = [encoder.encode_answer(item, answer) for item, answer in pairs]
    schedule = _Schedule(encoder, rows, [bool(item.images) for item, _ in pairs], config.batch_size, config.seed)
    session = Session(config.mesh)  # in memory: no run directory, metrics to the loss log
    mesh = session.mesh
    # A copy with its own buffers: the step donates the trainable arrays (all of them in full
    # fine-tuning), which must not delete the caller's model.
    work = frozen_copy(model)
    if config.lora:
        if lora.has_adapters(work):
            work = lora.merge(work)
        lora.apply(work, lora.LoRASpec(config.lora_target, config.lora_rank, config.lora_alpha), seed=config.seed)
    place_model_on_mesh(work, mesh)
    optim_cfg = OptimConfig(lr=config.lr, schedule=config.schedule, warmup_steps=config.warmup_steps,
                            min_lr_ratio=config.min_lr_ratio, weight_decay=config.weight_decay,
                            max_grad_norm=config.max_grad_norm)
    step_fn = session.step(work, loss_fn or losses.answer_nll, optim_cfg, max(config.steps, 1),
                           half_finetune=config.half_finetune)
    del work
    state = step_fn.init_state(config.seed)
    history: list[dict[str, float]] = []
    checkpoints = sorted({s for s in evaluate_at if 0 <= s <= config.steps})
    if evaluate is not None and 0 in checkpoints:
        history.append({"step": 0, **evaluate(step_fn.model(state))})
    batch_at = session.local_rows(step_fn, schedule if sub_batch is None else (lambda step: {sub_batch: schedule(step)}))
    step_losses: list[float] = []
    done = 0
    for target in [s for s in checkpoints if s > 0] + [config.steps]:
        if target > done:
            state = session.fit(step_fn, batch_at, steps=target, seed=config.seed, state=state, start_step=done,
                                logger=_LossLog(step_losses), progress=progress)
            done = target
        if evaluate is not None and target in checkpoints and not any(h["step"] == target for h in history):
            history.append({"step": target, **evaluate(step_fn.model(state))})
    final = step_fn.model(state)
    if config.lora:
        final = lora.merge(final)
    return TuneResult(jax.block_until_ready(final), history, step_losses)


class _LossLog:
    """The training loop's logger interface, keeping each step's loss in memory."""

    def __init__(self, sink: list[float]):
        self.sink = sink

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if "loss" in metrics:
            self.sink.append(float(metrics["loss"]))

"""The SCoRe driver: warm-up SFT, Stage I and Stage II on a verifiable task, with a greedy
two-turn evaluation after each stage (and every ``eval_every`` RL steps).

It only sequences what lives elsewhere: the jitted step, its state and the warm-up's
training loop (an in-memory :class:`offside_jax.train.session.Session`), the sampler (:mod:`offside_jax.correct.rollout`), the episodes
and objectives (:mod:`offside_jax.correct.episodes`, :mod:`offside_jax.correct.score`), the
tasks (:mod:`offside_jax.correct.tasks`) and the metrics (:mod:`offside_jax.correct.metrics`).

One RL step: roll out ``G`` two-turn episodes for each of ``problems_per_step`` problems with
the current policy (temperature from the stage), reward both attempts with the task's verifier,
score the tokens under the behaviour policy (``old_logp``) and the frozen reference
(``ref_logp``, the warm-up model), form per-turn returns and advantages, then apply
``epochs x minibatches`` updates (the ratio to ``old_logp`` corrects the later ones; set the
stage's ``clip_eps`` when making more than one).

Episodes are padded to a fixed length (``length``), so each stage compiles one step.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import numpy as np
from flax import nnx

from offside_jax.config import CheckpointConfig, LogConfig, OptimConfig
from offside_jax.correct import episodes as ep
from offside_jax.correct import metrics as metrics_lib
from offside_jax.correct import rollout as rollout_lib
from offside_jax.correct import score
from offside_jax.correct.tasks import Problem, Task, make_problems
from offside_jax.models.generate import SamplingConfig
from offside_jax.train import losses
from offside_jax.files import write_json
from offside_jax.train.session import RunDir, Session
from offside_jax.train.step import TrainState, TrainStep, frozen_copy


class Tokenizer(Protocol):
    pad_token_id: int
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class TwoTurnFormat:
    """How episodes are written: the correction instruction between the attempts, the token
    budget of one attempt, and the fixed padded episode length (0: no fixed length)."""

    instruction: str = "\n" + ep.SCORE_INSTRUCTION + "\n"
    max_new_tokens: int = 8
    length: int = 0


@dataclasses.dataclass(frozen=True)
class StageRun:
    """How long and how fast one stage trains."""

    steps: int = 50
    lr: float = 1e-4
    problems_per_step: int = 8
    epochs: int = 1
    minibatches: int = 1
    eval_every: int = 0  # RL steps between evaluations (0: only at the end of the stage)
    max_grad_norm: float | None = 1.0


@dataclasses.dataclass
class ScoreRunResult:
    """Metrics after each stage, the evaluation history over RL steps, and wall times."""

    metrics: dict[str, dict[str, float]]  # "warmup" | "stage1" | "stage2" -> metrics
    # {"stage", "step" (within the stage), "rl_step" (counted over both stages), "acc_t1", ...}
    history: list[dict[str, Any]]
    model: nnx.Module
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # stage -> wall time (s)


# -- batches ---------------------------------------------------------------------------------------


def _attempt_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text) + [tok.eos_token_id]


def warmup_batch(task: Task, problems: Sequence[Problem], tok: Tokenizer, fmt: TwoTurnFormat, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """SFT traces ``[x1, y1, p, y2]`` (``y1`` buggy with the task's ``p_bug``, ``y2`` right),
    loss on both attempts."""
    instruction = tok.encode(fmt.instruction)
    episodes = []
    for i, p in enumerate(problems):
        first, second = task.warmup_attempts(p, rng)
        episodes.append(ep.two_turn_episode(tok.encode(p.prompt), _attempt_ids(tok, first), instruction, _attempt_ids(tok, second), i))
    batch = ep.episode_batch(episodes, tok.pad_token_id, max(1, fmt.length))
    batch.pop("turn_ids")
    return batch


def two_turn_episodes(model: nnx.Module, problems: Sequence[Problem], tok: Tokenizer, fmt: TwoTurnFormat, *, temperature: float, group_size: int, rng: jax.Array | None) -> list[ep.Episode]:
    sampling = SamplingConfig(max_new_tokens=fmt.max_new_tokens, temperature=temperature, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    return ep.two_turn_rollout(
        model, [tok.encode(p.prompt) for p in problems], tok.encode(fmt.instruction), sampling, rng,
        group_size=group_size, decode=tok.decode, pad_id=tok.pad_token_id, pad_multiple=8,
    )


def attempt_rewards(task: Task, problems: Sequence[Problem], episodes: Sequence[ep.Episode]) -> tuple[np.ndarray, np.ndarray]:
    """Rewards ``[B]`` of attempt 1 and attempt 2 of each episode."""
    r = np.array([[task.verify(text, problems[e.problem]) for text in e.texts[:2]] for e in episodes], np.float32)
    return r[:, 0], r[:, 1]


def evaluate(model: nnx.Module, task: Task, problems: Sequence[Problem], tok: Tokenizer, fmt: TwoTurnFormat) -> dict[str, float]:
    """Greedy two-turn evaluation: the self-correction metrics with "right" = full reward."""
    episodes = two_turn_episodes(model, problems, tok, fmt, temperature=0.0, group_size=1, rng=None)
    r1, r2 = attempt_rewards(task, problems, episodes)
    return metrics_lib.self_correction_metrics(r1 >= 1.0, r2 >= 1.0)


def rl_batch(
    model: nnx.Module,
    reference: nnx.Module,
    task: Task,
    problems: Sequence[Problem],
    tok: Tokenizer,
    fmt: TwoTurnFormat,
    stage: score.ScoreStage,
    rng: jax.Array,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One rollout batch of a SCoRe stage (batch keys of :func:`score.make_score_loss`) and its
    reward statistics."""
    episodes = two_turn_episodes(model, problems, tok, fmt, temperature=stage.temperature, group_size=stage.group_size, rng=rng)
    r1, r2 = attempt_rewards(task, problems, episodes)
    batch = ep.episode_batch(episodes, tok.pad_token_id, max(1, fmt.length))
    old = rollout_lib.score_tokens(model, batch, stage.temperature)
    ref = rollout_lib.score_tokens(reference, batch, stage.temperature)
    returns = score.turn_returns(stage, r1, r2, logp=old, ref_logp=ref, turn_ids=batch["turn_ids"])
    batch.update(turn_advantages=np.asarray(score.score_advantages(stage, returns, r1)), old_logp=old, ref_logp=ref)
    return batch, {"reward_t1": float(r1.mean()), "reward_t2": float(r2.mean())}


# -- stages ----------------------------------------------------------------------------------------


def _step_fn(model: nnx.Module, loss_fn: losses.LossFn, run: StageRun, mesh) -> TrainStep:
    """The stage's step, built by a training session."""
    optim = OptimConfig(lr=run.lr, schedule="constant", max_grad_norm=run.max_grad_norm)
    return Session(mesh).step(model, loss_fn, optim, max(1, run.steps * run.epochs * run.minibatches),
                              reference=False)


@dataclasses.dataclass(frozen=True)
class Resumable:
    """Where a run's phases keep their checkpoints, so an interrupted run resumes: each phase
    (warm-up, Stage I, Stage II) gets ``directory/<phase>`` with its checkpoints (every
    ``every`` steps: warm-up steps, or RL steps of a stage) and its metrics. ``recipe`` is
    what the phases depend on: a rerun with another recipe is refused, naming the keys."""

    directory: Path
    recipe: Mapping[str, Any]
    every: int = 0

    def session(self, mesh, phase: str, every: int, progress: bool) -> Session:
        path = Path(self.directory) / phase
        return Session(mesh, run=RunDir(path, {**self.recipe, "phase": phase}),
                       checkpoint=CheckpointConfig(every=every, keep=2, async_save=False),
                       log=LogConfig(tensorboard=False, progress=progress))


def _session(mesh, where: Resumable | None, phase: str, every: int, progress: bool) -> Session:
    """In memory, or resumable under ``where`` (see :class:`Resumable`)."""
    return Session(mesh) if where is None else where.session(mesh, phase, every, progress)


def run_sft(model: nnx.Module, batch_at: Callable[[int], dict[str, np.ndarray]], run: StageRun, mesh, *, seed: int = 0,
            progress: bool = False, where: Resumable | None = None, phase: str = "sft") -> nnx.Module:
    """``run.steps`` updates of the answer-only NLL on ``batch_at(step)`` (``input_ids``,
    ``attention_mask``, ``loss_mask``) through a training session; returns the trained model."""
    step_fn = _step_fn(model, losses.make_answer_nll(), run, mesh)
    session = _session(mesh, where, phase, where.every if where else 0, progress)
    state = session.fit(step_fn, batch_at, steps=run.steps, seed=seed, progress=progress)
    return step_fn.model(state)


def run_warmup(model: nnx.Module, task: Task, tok: Tokenizer, fmt: TwoTurnFormat, run: StageRun, mesh, *, seed: int = 0,
               progress: bool = False, where: Resumable | None = None) -> nnx.Module:
    """Warm-up SFT on buggy-first-attempt traces; returns the trained model."""

    def batch_at(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, 1, i])
        return warmup_batch(task, [task.sample(rng) for _ in range(run.problems_per_step)], tok, fmt, rng)

    return run_sft(model, batch_at, run, mesh, seed=seed, progress=progress, where=where, phase="warmup")


# ``make_batch(policy, problems, key) -> (batch, stats)``: one RL step's rollouts as a loss batch.
BatchMaker = Callable[[nnx.Module, list[Problem], jax.Array], tuple[dict[str, np.ndarray], dict[str, float]]]
SCORE_STREAM = 2  # the random stream of SCoRe's problem draws


class StageRollouts:
    """The batch source of one RL stage (``batch_at(update, state)`` of a session's
    :meth:`~offside_jax.train.session.Session.fit`).

    Each RL step is ``epochs x minibatches`` updates: the first rolls out episodes with the
    policy being trained (``make_batch(policy, problems, key) -> (batch, stats)``: SCoRe's
    :func:`rl_batch`, or UFO's feedback episodes; problems and keys drawn from the RL step's
    number and ``stream``, so Stage II draws other ones than Stage I), the others take the next
    minibatch of the same rollouts.
    """

    def __init__(self, step_fn: TrainStep, make_batch: BatchMaker, task: Task, run: StageRun, *, seed: int, step_offset: int,
                 stream: int = SCORE_STREAM):
        self.step_fn, self.make_batch, self.task, self.run = step_fn, make_batch, task, run
        self.seed, self.step_offset, self.stream = seed, step_offset, stream
        self.updates = run.epochs * run.minibatches  # per RL step
        # SCoRe's stream keeps the key it always had, so its earlier runs reproduce.
        self.key = jax.random.key(seed) if stream == SCORE_STREAM else jax.random.fold_in(jax.random.key(seed), stream)
        self.rollout: tuple[int, dict[str, np.ndarray], list[np.ndarray]] | None = None
        self.stats: dict[str, float] = {}

    def rl_step(self, update: int) -> int:
        """The RL step (1-based, within the stage) that update ``update`` (0-based) belongs to."""
        return update // self.updates + 1

    def __call__(self, update: int, state: TrainState) -> dict[str, np.ndarray]:
        step, part = self.rl_step(update), update % self.updates
        if part == 0:
            draw = self.step_offset + step
            rng = np.random.default_rng([self.seed, self.stream, draw])
            problems = [self.task.sample(rng) for _ in range(self.run.problems_per_step)]
            batch, self.stats = self.make_batch(self.step_fn.model(state), problems, jax.random.fold_in(self.key, draw))
            parts = rollout_lib.update_minibatches(len(batch["input_ids"]), epochs=self.run.epochs,
                                                   minibatches=self.run.minibatches, seed=self.seed * 1_000_003 + draw)
            self.rollout = (step, batch, list(parts))
        if self.rollout is None or self.rollout[0] != step:
            raise RuntimeError(f"update {update} continues RL step {step}, whose rollouts are gone: a stage resumes "
                               "only at the end of an RL step")
        return rollout_lib.take_rows(self.rollout[1], self.rollout[2][part])


def run_policy_stage(model: nnx.Module, loss_fn: losses.LossFn, make_batch: BatchMaker, task: Task, run: StageRun, mesh, *,
                     seed: int, stream: int, progress: bool = False) -> nnx.Module:
    """``run.steps`` RL steps of ``loss_fn`` on the rollouts of ``make_batch`` (see
    :class:`StageRollouts`) through an in-memory training session, without evaluations (UFO in
    the comparison); returns the trained model."""
    step_fn = _step_fn(model, loss_fn, run, mesh)
    rollouts = StageRollouts(step_fn, make_batch, task, run, seed=seed, step_offset=0, stream=stream)
    state = Session(mesh).fit(step_fn, rollouts, steps=run.steps * rollouts.updates, seed=seed, from_policy=True,
                              progress=progress)
    return step_fn.model(state)


class _LastMetrics:
    """The training loop's logger interface, keeping the last step's training metrics."""

    def __init__(self):
        self.metrics: dict[str, float] = {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics = {k: v for k, v in metrics.items() if k not in ("tokens_per_second", "step_seconds")}


def run_stage(
    model: nnx.Module,
    reference: nnx.Module,
    stage: score.ScoreStage,
    task: Task,
    tok: Tokenizer,
    fmt: TwoTurnFormat,
    run: StageRun,
    mesh,
    *,
    eval_problems: Sequence[Problem],
    seed: int = 0,
    name: str = "stage",
    on_eval: Callable[[dict[str, float]], None] | None = None,
    progress: bool = False,
    step_offset: int = 0,
    where: Resumable | None = None,
) -> tuple[nnx.Module, list[dict[str, float]]]:
    """Train one SCoRe stage through a training session (its loop, progress and, with
    ``where``, its checkpoints and resume) on :class:`StageRollouts`; returns the model and the
    evaluation history (with ``stage``/``step``, ``rl_step = step_offset + step`` and the
    last step's training metrics)."""
    step_fn = _step_fn(model, score.make_score_loss(stage), run, mesh)

    def make_batch(policy: nnx.Module, problems: list[Problem], key: jax.Array):
        return rl_batch(policy, reference, task, problems, tok, fmt, stage, key)

    rollouts = StageRollouts(step_fn, make_batch, task, run, seed=seed, step_offset=step_offset)
    # Checkpoints only at the end of an RL step: the rollouts of an unfinished one are not saved.
    session = _session(mesh, where, name, (where.every if where else 0) * rollouts.updates, progress)
    last = _LastMetrics()
    # The evaluations so far, by RL step: those of a resumed run's earlier part come from its
    # directory (one recomputed after the last checkpoint replaces its earlier twin).
    saved = None if where is None else Path(where.directory) / name / "history.json"
    history: dict[int, dict[str, Any]] = {}
    if saved is not None and saved.is_file():
        history = {int(r["step"]): r for r in json.loads(saved.read_text(encoding="utf-8"))}

    def evaluation(state: TrainState) -> dict[str, float]:
        step = rollouts.rl_step(int(state.step) - 1)
        metrics = evaluate(step_fn.model(state), task, eval_problems, tok, fmt)
        record = {"stage": name, "step": step, "rl_step": step_offset + step, **rollouts.stats, **last.metrics, **metrics}
        history[step] = record
        if saved is not None and session.primary:
            write_json(saved, [history[k] for k in sorted(history)])
        if on_eval is not None:
            on_eval(record)
        return metrics

    state = session.fit(step_fn, rollouts, steps=run.steps * rollouts.updates, seed=seed, from_policy=True,
                        eval_fn=evaluation, eval_every=run.eval_every * rollouts.updates, logger=last, progress=progress)
    return step_fn.model(state), [history[k] for k in sorted(history)]


def run_score(
    model: nnx.Module,
    task: Task,
    tok: Tokenizer,
    fmt: TwoTurnFormat,
    mesh,
    *,
    warmup: StageRun | None,
    stage1: tuple[score.ScoreStage, StageRun] | None,
    stage2: tuple[score.ScoreStage, StageRun] | None,
    eval_size: int = 64,
    eval_problems: Sequence[Problem] | None = None,
    seed: int = 0,
    on_eval: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    where: Resumable | None = None,
) -> ScoreRunResult:
    """Warm-up SFT, then Stage I and Stage II (either may be skipped), evaluated greedily on
    ``eval_problems`` (default: ``eval_size`` problems drawn from seed ``10_000 + seed``, apart
    from the training draws) after each stage.

    ``warmup=None`` takes ``model`` as already warmed up (e.g. to run several RL variants from
    one warm-up); it is still the frozen reference and the ``"warmup"`` row of the metrics.
    ``where``: checkpoints of every phase, so that a rerun resumes (:class:`Resumable`).
    """
    if eval_problems is None:
        eval_problems = make_problems(task, eval_size, seed=10_000 + seed)
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    if warmup is not None:
        model = run_warmup(model, task, tok, fmt, warmup, mesh, seed=seed, progress=progress, where=where)
    reference = frozen_copy(model)
    results = {"warmup": evaluate(model, task, eval_problems, tok, fmt)}
    seconds["warmup"] = time.perf_counter() - began
    history: list[dict[str, Any]] = [{"stage": "warmup", "step": 0, "rl_step": 0, **results["warmup"]}]
    done = 0
    for name, spec in (("stage1", stage1), ("stage2", stage2)):
        if spec is None:
            continue
        stage, run = spec
        began = time.perf_counter()
        model, stage_history = run_stage(
            model, reference, stage, task, tok, fmt, run, mesh,
            eval_problems=eval_problems, seed=seed, name=name, on_eval=on_eval, progress=progress, step_offset=done,
            where=where,
        )
        seconds[name] = time.perf_counter() - began
        done += run.steps
        history += stage_history
        results[name] = {k: v for k, v in stage_history[-1].items() if k in results["warmup"]}
    return ScoreRunResult(results, history, model, seconds)

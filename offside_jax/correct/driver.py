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
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np
from flax import nnx

from offside_jax.config import OptimConfig
from offside_jax.correct import episodes as ep
from offside_jax.correct import metrics as metrics_lib
from offside_jax.correct import rollout as rollout_lib
from offside_jax.correct import score
from offside_jax.correct.tasks import Problem, Task, make_problems
from offside_jax.models.generate import SamplingConfig
from offside_jax.train import losses
from offside_jax.train.session import Session
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
    """The stage's step, built by an in-memory training session (no files)."""
    optim = OptimConfig(lr=run.lr, schedule="constant", max_grad_norm=run.max_grad_norm)
    return Session(mesh).step(model, loss_fn, optim, max(1, run.steps * run.epochs * run.minibatches),
                              reference=False)


def run_warmup(model: nnx.Module, task: Task, tok: Tokenizer, fmt: TwoTurnFormat, run: StageRun, mesh, *, seed: int = 0, progress: bool = False) -> nnx.Module:
    """Warm-up SFT on buggy-first-attempt traces; returns the trained model."""
    step_fn = _step_fn(model, losses.make_answer_nll(), run, mesh)

    def batch_at(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, 1, i])
        return warmup_batch(task, [task.sample(rng) for _ in range(run.problems_per_step)], tok, fmt, rng)

    state = Session(mesh).fit(step_fn, batch_at, steps=run.steps, seed=seed, progress=progress)
    return step_fn.model(state)


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
) -> tuple[nnx.Module, list[dict[str, float]]]:
    """Train one SCoRe stage; returns the model and the evaluation history (with
    ``stage``/``step``, ``rl_step = step_offset + step`` and the last step's training
    metrics)."""
    from tqdm.auto import tqdm

    step_fn = _step_fn(model, score.make_score_loss(stage), run, mesh)
    state: TrainState = step_fn.init_state(seed)
    key = jax.random.key(seed)
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, run.steps + 1), desc=name, unit="step", disable=not progress)
    for step in bar:
        policy = step_fn.model(state)
        # Counted over stages, so Stage II draws other problems and samples than Stage I.
        draw = step_offset + step
        rng = np.random.default_rng([seed, 2, draw])
        problems = [task.sample(rng) for _ in range(run.problems_per_step)]
        batch, stats = rl_batch(policy, reference, task, problems, tok, fmt, stage, jax.random.fold_in(key, draw))
        rows = len(batch["input_ids"])
        for part in rollout_lib.update_minibatches(rows, epochs=run.epochs, minibatches=run.minibatches, seed=seed * 1_000_003 + draw):
            state, train_metrics = step_fn(state, step_fn.shard_batch(rollout_lib.take_rows(batch, part)))
        bar.set_postfix(reward_t1=f"{stats['reward_t1']:.2f}", reward_t2=f"{stats['reward_t2']:.2f}")
        if (run.eval_every and step % run.eval_every == 0) or step == run.steps:
            record = {"stage": name, "step": step, "rl_step": step_offset + step, **stats, **{k: float(v) for k, v in jax.device_get(train_metrics).items()}}
            record.update(evaluate(step_fn.model(state), task, eval_problems, tok, fmt))
            history.append(record)
            if on_eval is not None:
                on_eval(record)
    bar.close()
    return step_fn.model(state), history


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
) -> ScoreRunResult:
    """Warm-up SFT, then Stage I and Stage II (either may be skipped), evaluated greedily on
    ``eval_problems`` (default: ``eval_size`` problems drawn from seed ``10_000 + seed``, apart
    from the training draws) after each stage.

    ``warmup=None`` takes ``model`` as already warmed up (e.g. to run several RL variants from
    one warm-up); it is still the frozen reference and the ``"warmup"`` row of the metrics.
    """
    if eval_problems is None:
        eval_problems = make_problems(task, eval_size, seed=10_000 + seed)
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    if warmup is not None:
        model = run_warmup(model, task, tok, fmt, warmup, mesh, seed=seed, progress=progress)
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
        )
        seconds[name] = time.perf_counter() - began
        done += run.steps
        history += stage_history
        results[name] = {k: v for k, v in stage_history[-1].items() if k in results["warmup"]}
    return ScoreRunResult(results, history, model, seconds)

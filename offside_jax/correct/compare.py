"""One comparison of correction strategies (CorrectBench-style) on a verifiable task's step format.

Every strategy answers the same held-out problems of the same step-format task
(:class:`offside_jax.correct.step_task.StepTask`) with the same architecture and random
initialisation (the seed's), and is scored by one greedy two-turn evaluation
(:func:`two_turn_eval`) with :func:`offside_jax.correct.metrics.self_correction_metrics`.
Two families:

- from the **two-turn warm-up** (SCoRe's warm-up SFT on ``[x1, y1, p, y2]`` traces whose first
  attempt is wrong with the task's ``p_bug`` and whose second fixes it with ``p_fix``):

  * ``self_refine``: intrinsic self-correction, no training: turn 2 after the review prompt
    (the format's ``instruction``, by default RCI's "Review your previous answer and find
    problems with your answer.");
  * ``verifier_feedback``: external feedback: the task's verifier (never the model) judges
    turn 1; a right answer is told so and stands as turn 2, a wrong one gets the review prompt;
  * ``score``: SCoRe Stage I and II (:func:`offside_jax.correct.driver.run_score`);
  * ``scl``: SCL's recipe on the text task: sampled two-turn episodes, the flips kept as
    preference pairs (:func:`offside_jax.correct.scl.task_flip_pairs`), DPO with
    :func:`offside_jax.correct.preference.make_scl_dpo_loss` (full weights: the tiny model has
    no LoRA need);
  * ``rise``: RISE (one round of on-policy self-distillation): multi-turn rollouts on fresh
    problems with RISE's feedback after a wrong attempt, the best of ``rise_samples`` candidates
    per turn (scored by the task's verifier) as the target of that turn's context, trained with
    reward-weighted regression ``exp(r / tau)`` on the last turn only
    (:func:`offside_jax.correct.episodes.candidates_rollout`,
    :func:`offside_jax.correct.score.rise_examples`, :func:`offside_jax.correct.score.make_rise_loss`);
  * ``ufo``: UFO: up to ``ufo_turns`` attempts with the unary feedback after each wrong one,
    the trajectory reward (:func:`offside_jax.correct.episodes.ufo_trajectory_reward`) on the
    whole episode, GRPO advantages over ``ufo_samples`` episodes per problem, on-policy
    (:func:`offside_jax.correct.driver.run_policy_stage`);

  ``rise`` and ``ufo`` are scored with the verifier-gated turns of ``verifier_feedback`` but
  with their own feedback text after a wrong first answer ("The answer is incorrect. Please try
  again." / "Incorrect. Please think again."): an **oracle-feedback** setting, as RISE's "with
  oracle" mode and UFO's protocol, comparable with ``verifier_feedback`` and not with the
  intrinsic rows;

- trained **from the random init on the same budget** (steps x sequences per step, lr):

  * ``sft``: plain SFT on the reference solutions (:func:`offside_jax.correct.lemma.reference_records`);
  * ``mistake_tuning``: tagged correct and incorrect rationales
    (:func:`offside_jax.correct.mistakes.mistake_tuning_records`), answered under the
    ``[CORRECT RATIONALE]`` tag; turn 2 is self-rethinking (:func:`offside_jax.correct.mistakes.self_rethink`,
    ``k`` rounds, the mistake bank built from injected errors), whose answer and revision
    prompts end in the tagged question so the tuned model answers in its format (ours);
  * ``lemma``: error-corrective trajectories (:func:`offside_jax.correct.lemma.lemma_records`).

  ``sft`` and ``lemma`` get the review prompt for turn 2 like ``self_refine``.

  ``compare.start`` says where these three start. ``init`` (the default): the random init, as
  above. From there half of mistake tuning's sequences are wrong rationales and every LEMMA
  trajectory opens with a deliberate mistake (about half of its trained characters are the
  transition phrases and restart line, a fifth the wrong prefix), so a model that cannot yet
  add learns to make mistakes first. ``base``: as in both papers, which fine-tune a model that
  already does the task (LEMMA: LLaMA3-8B and others; mistake tuning: Flan-T5), the three
  continue from one base per seed, plain SFT on the reference solutions for
  ``compare.base_steps`` steps (:func:`train_base`), each with the same further budget on its
  own data (:func:`run_learners`); ``sft`` is then the control (more of the same SFT). LEMMA's
  data follows the paper's pipeline (:func:`train_lemma_on_student`): the base is the student,
  sampled ``student_samples`` times at ``student_temperature`` (the paper's 0.7) on
  ``student_problems`` fresh problems; only the problems it got wrong at least once get
  trajectories (the released ``inject_error.py``), those of its own wrong samples cut after the
  first wrong step (:func:`offside_jax.correct.lemma_student.student_records`) and
  ``lemma_per_type`` injected errors of each type (the error-type-grounded augmentation), the
  pool built once and drawn from for the budget (:func:`pool_batches`). No plain reference
  solutions are mixed into LEMMA's pool by default (the paper trains on the trajectories, which
  end in a correct solution); ``lemma_reference_share`` > 0 adds them (ours, unsourced: every
  trajectory reflects, so a model trained on them alone never learns when not to). Mistake
  tuning keeps its records of ``init`` (one correct rationale per question and
  ``incorrect_per_correct`` wrong ones: the ratio is unsourced, 1:1 is ours; CoTErrorSet's wrong
  rationales come from another model, PaLM2, as ours come from the injector).

Scoring avoids CorrectBench's known faults: every problem stays in the denominator (an empty or
unparsable answer is wrong), every strategy makes its fixed number of turns (no early stop on
gold: only ``verifier_feedback``, ``rise`` and ``ufo`` see the verifier, and that is their declared oracle), and
correctness is always the task's verifier, never the model's own judgement. Cost per problem:
generated tokens (EOS included), model calls (generation requests) and wall seconds of
training and of evaluation; ``efficiency = Acc@t2 / (tokens x calls)`` as CorrectBench's;
``cut``: the share of generations stopped by ``max_new_tokens`` (keep it near 0: a cut answer
is scored wrong).

All training goes through the one training session (:func:`offside_jax.correct.driver.run_sft`,
:func:`offside_jax.correct.driver.run_score`, :func:`offside_jax.correct.driver.run_policy_stage`,
:class:`offside_jax.train.session.Session`).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from offside_jax.config import CompareConfig, ConfigError, OptimConfig
from offside_jax.correct import driver
from offside_jax.correct import episodes as ep
from offside_jax.correct import lemma as lemma_lib
from offside_jax.correct import lemma_student as student_lib
from offside_jax.correct import mistakes as mistakes_lib
from offside_jax.correct import records as records_lib
from offside_jax.correct import rollout as rollout_lib
from offside_jax.correct import rl
from offside_jax.correct import scl as scl_lib
from offside_jax.correct import score as score_lib
from offside_jax.correct import steps as steps_lib
from offside_jax.correct.metrics import self_correction_metrics
from offside_jax.correct.preference import make_scl_dpo_loss
from offside_jax.correct.tasks import Problem
from offside_jax.models.generate import SamplingConfig
from offside_jax.train.session import Session
from offside_jax.train.step import frozen_copy

# Strategies of the task's references that this comparison does not run, and why.
NOT_RUN: dict[str, str] = {}
PAD_MULTIPLE = 64  # training batches of the from-the-init strategies are padded to a multiple of this
WARMUP_FAMILY = ("self_refine", "verifier_feedback", "score", "scl", "rise", "ufo")
TRAINED = ("sft", "mistake_tuning", "lemma", "score", "scl", "rise", "ufo")  # strategies that change weights
# The feedback after a wrong attempt, written as the review prompt is: on lines of its own.
RISE_TURN = "\n" + ep.RISE_FEEDBACK + "\n"
UFO_TURN = "\n" + ep.UFO_FEEDBACK + "\n"
# Mistake-tuned answers: the answer and revision prompts end in the tagged question (ours).
RETHINK_ANSWER = "{question}\n" + mistakes_lib.CORRECT_TAG + "\n"
RETHINK_REVISE = ("{demonstration}\nA previous answer, which may repeat the mistakes above:\n{answer}\n"
                  "Avoid those mistakes and answer again.\n{question}\n" + mistakes_lib.CORRECT_TAG + "\n")


def extra_texts() -> list[str]:
    """Every fixed text a strategy writes (prompts, tags, phrases, the taxonomy), for the
    character tokenizer's alphabet."""
    taxonomy = [f"{k} ({v.code}) {v.description}" for t in (lemma_lib.CARRY_ERRORS, lemma_lib.COUNTDOWN_ERRORS) for k, v in t.items()]
    return [mistakes_lib.MISTAKE_TEMPLATE, mistakes_lib.CHECK_TEMPLATE, RETHINK_ANSWER, RETHINK_REVISE,
            mistakes_lib.INCORRECT_TAG, lemma_lib.RESTART_LINE, *lemma_lib.TRANSITION_PHRASES, *taxonomy,
            RISE_TURN, UFO_TURN, "Correct.", "0123456789"]


# -- generation with cost accounting -------------------------------------------------------------------


@dataclasses.dataclass
class Cost:
    """Generated tokens and generation requests, summed over problems."""

    tokens: int = 0
    calls: int = 0
    cut: int = 0  # generations that ran out of ``max_new_tokens`` before their end

    def add(self, completions: Sequence[Sequence[int]], finished: Sequence[bool] | None = None) -> None:
        self.tokens += sum(len(c) for c in completions)
        self.calls += len(completions)
        if finished is not None:
            self.cut += int(len(finished) - np.sum(finished))


def _sampling(tok, max_new_tokens: int, temperature: float = 0.0) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, eos_token_ids=(tok.eos_token_id,),
                          pad_token_id=tok.pad_token_id)


def _generate(model: nnx.Module, tok, prompts: Sequence[Sequence[int]], max_new_tokens: int, cost: Cost,
              temperature: float = 0.0, rng: jax.Array | None = None) -> rollout_lib.Rollout:
    if not prompts:
        return rollout_lib.Rollout([], [], [], np.zeros(0, bool), 1)
    out = rollout_lib.rollout(model, prompts, _sampling(tok, max_new_tokens, temperature), rng, decode=tok.decode,
                              pad_id=tok.pad_token_id, pad_multiple=8)
    cost.add(out.completion_ids, out.finished)
    return out


@dataclasses.dataclass(frozen=True)
class TurnPlan:
    """How one strategy's two turns are written: turn-1 prompt text; the review instruction;
    ``gate``: the verifier decides whether turn 2 is generated (external feedback); or
    ``rethink``: turn 2 is self-rethinking over turn 1 (mistake tuning)."""

    prompt: Callable[[Problem], str]
    instruction: str
    gate: bool = False
    rethink: dict[str, Any] | None = None


def two_turn_eval(model: nnx.Module, task, problems: Sequence[Problem], tok, plan: TurnPlan, max_new_tokens: int) -> dict[str, float]:
    """Greedy turn 1 and turn 2 of every problem, the self-correction metrics over all of them
    (an unanswered turn is wrong) and the cost per problem."""
    began = time.perf_counter()
    cost = Cost()
    full = getattr(task, "correct_reward", 1.0)
    prompts = [tok.encode(plan.prompt(p)) for p in problems]
    if plan.rethink is not None:
        rethink = dict(plan.rethink)
        bank, rng = rethink.pop("bank"), rethink.pop("rng")

        def generate_fn(texts: list[str]) -> list[str]:
            return _generate(model, tok, [tok.encode(t) for t in texts], max_new_tokens, cost).texts

        result = mistakes_lib.self_rethink([p.prompt for p in problems], generate_fn, bank, rng,
                                           answer_template=RETHINK_ANSWER, revise_template=RETHINK_REVISE, **rethink)
        first = [turns[0][1] for turns in result.transcript]
        second = result.answers
    else:
        one = _generate(model, tok, prompts, max_new_tokens, cost)
        first = one.texts
        right1 = [task.verify(t, p) >= full for t, p in zip(first, problems)]
        rows = [i for i in range(len(problems)) if not (plan.gate and right1[i])]
        instruction = tok.encode(plan.instruction)
        two = _generate(model, tok, [prompts[i] + one.completion_ids[i] + instruction for i in rows], max_new_tokens, cost)
        second = list(first)  # the verifier said "correct": turn 1 stands
        for i, text in zip(rows, two.texts):
            second[i] = text
    c1 = [task.verify(t, p) >= full for t, p in zip(first, problems)]
    c2 = [task.verify(t, p) >= full for t, p in zip(second, problems)]
    n = len(problems)
    metrics = self_correction_metrics(c1, c2)
    tokens, calls = cost.tokens / n, cost.calls / n
    metrics.update(tokens=tokens, calls=calls, verifier_calls=float(plan.gate), cut=cost.cut / max(1, cost.calls),
                   efficiency=metrics["acc_t2"] / (tokens * calls) if tokens * calls > 0 else float("nan"),
                   eval_seconds=time.perf_counter() - began)
    return metrics


# -- training data ------------------------------------------------------------------------------------


def padded_batch(records: Sequence[records_lib.SFTRecord], tok, length: int) -> dict[str, np.ndarray]:
    """An SFT batch padded to a multiple of :data:`PAD_MULTIPLE` tokens (a few compiled shapes,
    short records stay cheap), at most ``length``."""
    batch = records_lib.sft_batch(records, tok, pad_multiple=min(PAD_MULTIPLE, length))
    if batch["input_ids"].shape[1] > length:
        raise ConfigError(f"format.length {length}: a training record needs {batch['input_ids'].shape[1]} tokens; "
                          "raise format.length")
    return batch


def record_batches(task, tok, build: Callable[[Sequence[Problem], np.random.Generator], list[records_lib.SFTRecord]],
                   rows: int, length: int, seed: int, stream: int) -> Callable[[int], dict[str, np.ndarray]]:
    """``batch_at(step)``: ``rows`` records (the same count for every strategy: the budget is
    sequences) drawn from records built on fresh problems, padded to a multiple of
    :data:`PAD_MULTIPLE` tokens (a few compiled shapes, short records stay cheap), at most ``length``."""

    def batch_at(step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, stream, step])
        records: list[records_lib.SFTRecord] = []
        while len(records) < rows:
            records += build([task.sample(rng)], rng)
        picked = [records[i] for i in sorted(rng.permutation(len(records))[:rows].tolist())]
        return padded_batch(picked, tok, length)

    return batch_at


def builders(task, cfg: CompareConfig) -> dict[str, Callable]:
    """The record builders of the strategies trained from the init (``task``: the bare task)."""
    lemma_cfg = lemma_lib.LemmaConfig(per_type=cfg.lemma_per_type, connections=tuple(cfg.lemma_connections))
    mt_cfg = mistakes_lib.MistakeTuningConfig(incorrect_per_correct=cfg.incorrect_per_correct)
    return {
        "sft": lambda problems, rng: lemma_lib.reference_records(task, problems),
        "mistake_tuning": lambda problems, rng: mistakes_lib.mistake_tuning_records(task, problems, rng, mt_cfg),
        "lemma": lambda problems, rng: lemma_lib.lemma_records(task, problems, rng, lemma_cfg),
    }


def train_records(model: nnx.Module, name: str, task, tok, cfg: CompareConfig, length: int, mesh, seed: int,
                  progress: bool = False, lr: float | None = None) -> nnx.Module:
    """SFT of one from-the-init strategy (``sft``, ``mistake_tuning``, ``lemma``) on its records."""
    t = cfg.train
    run = driver.StageRun(steps=t.steps, lr=t.lr if lr is None else lr, problems_per_step=t.problems_per_step,
                          max_grad_norm=t.max_grad_norm)
    stream = 3 + list(builders(task.task, cfg)).index(name)
    batch_at = record_batches(task, tok, builders(task.task, cfg)[name], t.problems_per_step, length, seed, stream)
    return driver.run_sft(model, batch_at, run, mesh, seed=seed, progress=progress, phase=name)


def scl_pairs(model: nnx.Module, task, tok, fmt: driver.TwoTurnFormat, cfg: CompareConfig, seed: int) -> list[records_lib.PreferenceRecord]:
    """SCL's flips of sampled two-turn episodes of ``model`` on fresh problems."""
    rng = np.random.default_rng([seed, 7])
    problems = [task.sample(rng) for _ in range(cfg.scl_problems)]
    episodes = driver.two_turn_episodes(model, problems, tok, fmt, temperature=cfg.scl_temperature, group_size=cfg.scl_samples,
                                        rng=jax.random.key(seed * 7919 + 7))
    expanded = [problems[e.problem] for e in episodes]
    return scl_lib.task_flip_pairs(task, expanded, [e.texts[0] for e in episodes], [e.texts[1] for e in episodes])


def train_on_draws(model: nnx.Module, loss_fn, items: Sequence, to_batch: Callable[[list], dict[str, np.ndarray]], *,
                   per_step: int, steps: int, lr: float, mesh, seed: int, stream: int, reference: bool = False,
                   progress: bool = False) -> nnx.Module:
    """``steps`` updates of ``loss_fn`` through a training session, each on ``to_batch`` of
    ``per_step`` items drawn (with replacement) from a fixed set collected once (SCL's pairs,
    RISE's rows); ``reference``: the frozen reference is ``model`` as given."""
    optim = OptimConfig(lr=lr, schedule="constant", max_grad_norm=1.0)
    step_fn = Session(mesh).step(model, loss_fn, optim, max(1, steps), reference=reference)

    def batch_at(step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, stream, step])
        return to_batch([items[i] for i in rng.integers(len(items), size=per_step)])

    state = Session(mesh).fit(step_fn, batch_at, steps=steps, seed=seed, progress=progress)
    return step_fn.model(state)


def train_scl(model: nnx.Module, pairs: Sequence[records_lib.PreferenceRecord], tok, cfg: CompareConfig, length: int, mesh,
              seed: int, progress: bool = False, lr: float | None = None) -> nnx.Module:
    """DPO (β, sft_beta of ``cfg``) on ``scl_pairs_per_step`` pairs drawn per step; the frozen
    reference is ``model`` as given."""
    if not pairs:
        raise ValueError("no flips among the sampled episodes: nothing to train SCL on")
    return train_on_draws(model, make_scl_dpo_loss(cfg.scl_beta, cfg.scl_sft_beta), pairs,
                          lambda picked: records_lib.preference_batch(picked, tok, pad_multiple=length),
                          per_step=cfg.scl_pairs_per_step, steps=cfg.scl_steps, lr=cfg.scl_lr if lr is None else lr,
                          mesh=mesh, seed=seed, stream=8, reference=True, progress=progress)


def _judge(task, problems: Sequence[Problem]) -> Callable[[str, int], bool]:
    """``judge(text, i)``: the task's verifier gives problem ``i``'s full reward."""
    full = getattr(task, "correct_reward", 1.0)
    return lambda text, i: task.verify(text, problems[i]) >= full


def rise_rows(model: nnx.Module, task, tok, cfg: CompareConfig, max_new_tokens: int,
              seed: int) -> tuple[list[ep.Episode], np.ndarray, dict[str, float]]:
    """RISE's rows on ``rise_problems`` fresh problems (best-of-``rise_samples`` targets, one
    row per turn, RISE's feedback between turns), their weights and what the data holds."""
    rng = np.random.default_rng([seed, 11])
    problems = [task.sample(rng) for _ in range(cfg.rise_problems)]
    # The reward is the task's (graded on countdown_mini); an attempt with the full reward ends the episode.
    turns = ep.candidates_rollout(model, [tok.encode(p.prompt) for p in problems], tok.encode(RISE_TURN),
                                  lambda text, i: task.verify(text, problems[i]), _sampling(tok, max_new_tokens, cfg.rise_temperature),
                                  jax.random.key(seed * 7919 + 11), max_turns=cfg.rise_turns, candidates=cfg.rise_samples,
                                  solved=getattr(task, "correct_reward", 1.0), decode=tok.decode, pad_id=tok.pad_token_id)
    rows, weights = score_lib.rise_examples(turns, cfg.rise_tau)
    best = [max(t.rewards) for t in turns]
    return rows, weights, {"rows": len(rows), "mean_best_reward": float(np.mean(best)),
                           "later_turns": sum(r.n_attempts > 1 for r in rows)}


def train_rise(model: nnx.Module, rows: Sequence[ep.Episode], weights: np.ndarray, tok, cfg: CompareConfig, length: int, mesh,
               seed: int, progress: bool = False, lr: float | None = None) -> nnx.Module:
    """Reward-weighted regression on RISE's rows, ``rise_rows_per_step`` drawn per step."""
    items = list(zip(rows, weights.tolist()))

    def to_batch(picked: list) -> dict[str, np.ndarray]:
        return score_lib.rise_batch([r for r, _ in picked], [w for _, w in picked], tok.pad_token_id, length)

    return train_on_draws(model, score_lib.make_rise_loss(), items, to_batch, per_step=cfg.rise_rows_per_step,
                          steps=cfg.rise_steps, lr=cfg.rise_lr if lr is None else lr, mesh=mesh, seed=seed, stream=12,
                          progress=progress)


def ufo_estimator(cfg: CompareConfig) -> rl.PolicyGradientConfig:
    """GRPO over UFO's episodes: group-normalised advantages, no KL term, scored at the
    rollouts' temperature."""
    return rl.preset("grpo", group_size=cfg.ufo_samples, beta=0.0, temperature=cfg.ufo_temperature)


def ufo_batch(policy: nnx.Module, problems: Sequence[Problem], key: jax.Array, task, tok, cfg: CompareConfig,
              max_new_tokens: int, length: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One UFO rollout batch: ``ufo_samples`` feedback episodes per problem, each with its
    trajectory reward, and GRPO advantages over every problem's episodes (loss on every attempt)."""
    episodes = ep.feedback_rollout(policy, [tok.encode(p.prompt) for p in problems], tok.encode(UFO_TURN), _judge(task, problems),
                                   _sampling(tok, max_new_tokens, cfg.ufo_temperature), key, max_turns=cfg.ufo_turns,
                                   group_size=cfg.ufo_samples, decode=tok.decode, pad_id=tok.pad_token_id)
    rewards = ep.ufo_episode_rewards(episodes, task.extract, gamma=cfg.ufo_gamma, lam=cfg.ufo_repetition,
                                     malformed_penalty=cfg.ufo_malformed)
    batch = ep.episode_batch(episodes, tok.pad_token_id, length)
    batch.pop("turn_ids")
    batch["advantages"] = np.asarray(rl.compute_advantages(ufo_estimator(cfg), rewards))
    return batch, {"reward": float(rewards.mean()), "solved": float(np.mean([any(e.correct) for e in episodes])),
                   "attempts": float(np.mean([e.n_attempts for e in episodes]))}


def train_ufo(model: nnx.Module, task, tok, cfg: CompareConfig, max_new_tokens: int, length: int, mesh, seed: int,
              progress: bool = False, lr: float | None = None) -> nnx.Module:
    """``ufo_steps`` on-policy GRPO steps of ``ufo_problems_per_step`` problems through the
    training session's RL stage."""
    run = driver.StageRun(steps=cfg.ufo_steps, lr=cfg.ufo_lr if lr is None else lr,
                          problems_per_step=cfg.ufo_problems_per_step)

    def make_batch(policy: nnx.Module, problems: list[Problem], key: jax.Array):
        return ufo_batch(policy, problems, key, task, tok, cfg, max_new_tokens, length)

    return driver.run_policy_stage(model, rl.make_policy_gradient_loss(ufo_estimator(cfg)), make_batch, task, run, mesh,
                                   seed=seed, stream=13, progress=progress)


# -- one seed -------------------------------------------------------------------------------------------


def plans(task, fmt: driver.TwoTurnFormat, cfg: CompareConfig, seed: int) -> dict[str, TurnPlan]:
    """Each strategy's turns."""
    plain = TurnPlan(lambda p: p.prompt, fmt.instruction)
    step_prompt = TurnPlan(lambda p: lemma_lib.PLAIN_PROMPT.format(prompt=p.prompt), fmt.instruction)
    rng = np.random.default_rng([seed, 9])
    bank = mistakes_lib.mistake_bank(task.task, [task.sample(rng) for _ in range(16)], rng)
    return {
        "self_refine": plain,
        "verifier_feedback": dataclasses.replace(plain, gate=True),
        # oracle feedback in the method's own words after a wrong first answer
        "rise": TurnPlan(lambda p: p.prompt, RISE_TURN, gate=True),
        "ufo": TurnPlan(lambda p: p.prompt, UFO_TURN, gate=True),
        "score": plain,
        "scl": plain,
        "sft": step_prompt,
        "lemma": step_prompt,
        "mistake_tuning": TurnPlan(lambda p: RETHINK_ANSWER.format(question=p.prompt), fmt.instruction,
                                   rethink={"bank": bank, "rng": np.random.default_rng([seed, 10]), "k": cfg.rethink_k,
                                            "shown": cfg.rethink_shown}),
    }


def run_seed(make_model: Callable[[], nnx.Module], task, tok, fmt: driver.TwoTurnFormat, cfg: CompareConfig, *,
             warmup: driver.StageRun, stages: tuple, eval_problems: Sequence[Problem], mesh, seed: int, length: int,
             log: Callable[[str], None] = print, progress: bool = False) -> dict[str, Any]:
    """Every strategy of ``cfg.strategies`` for one seed: ``{strategy: metrics with cost}``
    (``train_seconds``: the strategy's own training plus the warm-up it starts from) and
    ``skipped`` (strategy -> why it did not run)."""
    out: dict[str, Any] = {"metrics": {}, "skipped": {}, "extra": {}}
    turn_plans = plans(task, fmt, cfg, seed)

    def evaluate(name: str, model: nnx.Module, train_seconds: float) -> None:
        m = two_turn_eval(model, task, eval_problems, tok, turn_plans[name], fmt.max_new_tokens)
        m["train_seconds"] = train_seconds
        out["metrics"][name] = m
        log(f"seed {seed} {name}: acc_t1 {m['acc_t1']:.3f} acc_t2 {m['acc_t2']:.3f} delta {m['delta']:+.3f} "
            f"tokens {m['tokens']:.1f} calls {m['calls']:.2f} train {train_seconds:.1f}s eval {m['eval_seconds']:.1f}s")

    wanted = list(cfg.strategies)
    if any(s in WARMUP_FAMILY for s in wanted):
        began = time.perf_counter()
        warmed = driver.run_warmup(make_model(), task, tok, fmt, warmup, mesh, seed=seed, progress=progress)
        warm_seconds = time.perf_counter() - began
        for name in ("self_refine", "verifier_feedback"):
            if name in wanted:
                evaluate(name, warmed, warm_seconds)
        if "score" in wanted:
            if stages[0] is None and stages[1] is None:
                out["skipped"]["score"] = "stage1 and stage2 are disabled"
            else:
                began = time.perf_counter()
                result = driver.run_score(frozen_copy(warmed), task, tok, fmt, mesh, warmup=None, stage1=stages[0], stage2=stages[1],
                                          eval_problems=eval_problems, seed=seed, progress=progress)
                out["extra"]["score_history"] = result.history
                evaluate("score", result.model, warm_seconds + time.perf_counter() - began)
        if "scl" in wanted:
            began = time.perf_counter()
            pairs = scl_pairs(warmed, task, tok, fmt, cfg, seed)
            out["extra"]["scl_pairs"] = {"pairs": len(pairs), "wrong_to_right": sum(r.meta["flip"] == scl_lib.WRONG_TO_RIGHT for r in pairs)}
            if pairs:
                model = train_scl(frozen_copy(warmed), pairs, tok, cfg, length, mesh, seed, progress)
                evaluate("scl", model, warm_seconds + time.perf_counter() - began)
            else:
                out["skipped"]["scl"] = "no flips among the sampled two-turn episodes"
        if "rise" in wanted:
            began = time.perf_counter()
            rows, weights, out["extra"]["rise_rows"] = rise_rows(warmed, task, tok, cfg, fmt.max_new_tokens, seed)
            model = train_rise(frozen_copy(warmed), rows, weights, tok, cfg, length, mesh, seed, progress)
            evaluate("rise", model, warm_seconds + time.perf_counter() - began)
        if "ufo" in wanted:
            began = time.perf_counter()
            model = train_ufo(frozen_copy(warmed), task, tok, cfg, fmt.max_new_tokens, length, mesh, seed, progress)
            evaluate("ufo", model, warm_seconds + time.perf_counter() - began)
    learners = [name for name in LEARNERS if name in wanted]
    if learners:
        run_learners(make_model, learners, task, tok, fmt, cfg, turn_plans, eval_problems=eval_problems, mesh=mesh, seed=seed,
                     length=length, evaluate=evaluate, out=out, log=log, progress=progress)
    return out


# -- learning from mistakes: from the init or from a common base (compare.start) -------------------------

LEARNERS = ("sft", "mistake_tuning", "lemma")  # the strategies that learn from their own records
BASE_STREAM = 20  # batch stream of the base's plain SFT (apart from the strategies' 3..5)
STUDENT_STREAM = 21  # the student's problems and samples


def pool_batches(records: Sequence[records_lib.SFTRecord], tok, rows: int, length: int, seed: int,
                 stream: int) -> Callable[[int], dict[str, np.ndarray]]:
    """``batch_at(step)``: ``rows`` records drawn from a fixed pool (LEMMA's dataset is built once
    from the student's samples, then trained on for epochs), without replacement unless the pool
    is smaller than a batch, padded as :func:`record_batches` pads."""
    if not records:
        raise ValueError("an empty record pool: nothing to train on")

    def batch_at(step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, stream, step])
        picked = [records[i] for i in sorted(rng.choice(len(records), size=rows, replace=len(records) < rows).tolist())]
        return padded_batch(picked, tok, length)

    return batch_at


def train_base(make_model: Callable[[], nnx.Module], task, tok, cfg: CompareConfig, length: int, mesh, seed: int,
               progress: bool = False) -> nnx.Module:
    """The common base of ``compare.start: base``: plain SFT on the reference solutions for
    ``base_steps`` steps (``train``'s sequences per step and lr), on its own batch stream."""
    t = cfg.train
    run = driver.StageRun(steps=cfg.base_steps, lr=t.lr, problems_per_step=t.problems_per_step, max_grad_norm=t.max_grad_norm)
    batch_at = record_batches(task, tok, builders(task.task, cfg)["sft"], t.problems_per_step, length, seed, BASE_STREAM)
    return driver.run_sft(make_model(), batch_at, run, mesh, seed=seed, progress=progress, phase="base")


def sample_student(model: nnx.Module, task, tok, cfg: CompareConfig, max_new_tokens: int, seed: int
                   ) -> tuple[list[Problem], list[list[str]]]:
    """LEMMA's step 1: ``student_samples`` samples at ``student_temperature`` of each of
    ``student_problems`` fresh problems: ``(problems, samples per problem)``."""
    rng = np.random.default_rng([seed, STUDENT_STREAM])
    problems = [task.sample(rng) for _ in range(cfg.student_problems)]
    k = cfg.student_samples
    prompts = [tok.encode(lemma_lib.PLAIN_PROMPT.format(prompt=p.prompt)) for p in problems for _ in range(k)]
    texts = _generate(model, tok, prompts, max_new_tokens, Cost(), temperature=cfg.student_temperature,
                      rng=jax.random.key(seed * 7919 + STUDENT_STREAM)).texts
    return problems, [texts[i * k:(i + 1) * k] for i in range(len(problems))]


def student_lemma_records(task, problems: Sequence[Problem], samples: Sequence[Sequence[str]], rng: np.random.Generator,
                          cfg: CompareConfig) -> list[records_lib.SFTRecord]:
    """LEMMA's data on a student (``task``: the bare task): only the problems the student got
    wrong at least once (``inject_error.py``), each with the trajectories of its own wrong
    samples (cut after the first wrong step, :func:`offside_jax.correct.lemma_student.student_records`)
    and ``lemma_per_type`` injected errors of each type (the error-type-grounded augmentation)."""
    wrong = [i for i, texts in enumerate(samples) if any(not steps_lib.solves(task, problems[i], t) for t in texts)]
    lemma_cfg = lemma_lib.LemmaConfig(per_type=cfg.lemma_per_type, connections=tuple(cfg.lemma_connections))
    picked = [problems[i] for i in wrong]
    own = student_lib.student_records(task, picked, [samples[i] for i in wrong], rng, lemma_cfg)
    trajectories = own + lemma_lib.lemma_records(task, picked, rng, lemma_cfg)
    return trajectories + reference_mix(task, len(trajectories), cfg.lemma_reference_share, rng)


def reference_mix(task, n_trajectories: int, share: float, rng: np.random.Generator) -> list[records_lib.SFTRecord]:
    """Plain reference solutions of fresh problems, as many as make them ``share`` of a pool
    with ``n_trajectories`` trajectories (``compare.lemma_reference_share``; 0: none)."""
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"compare.lemma_reference_share {share}: must be at least 0 and below 1")
    n = round(share / (1.0 - share) * n_trajectories)
    return lemma_lib.reference_records(task, [task.sample(rng) for _ in range(n)])


def train_lemma_on_student(model: nnx.Module, task, tok, cfg: CompareConfig, max_new_tokens: int, length: int, mesh, seed: int,
                           progress: bool = False) -> tuple[nnx.Module, dict[str, int]]:
    """LEMMA from a base model: its samples, the trajectories of the problems it got wrong, SFT
    on that pool for ``train``'s budget; returns the model and the pool's counts."""
    problems, samples = sample_student(model, task, tok, cfg, max_new_tokens, seed)
    records = student_lemma_records(task.task, problems, samples, np.random.default_rng([seed, STUDENT_STREAM, 1]), cfg)
    t = cfg.train
    run = driver.StageRun(steps=t.steps, lr=t.lr, problems_per_step=t.problems_per_step, max_grad_norm=t.max_grad_norm)
    batch_at = pool_batches(records, tok, t.problems_per_step, length, seed, 3 + LEARNERS.index("lemma"))
    counts = {"problems": len(problems), "samples_right": sum(steps_lib.solves(task.task, p, x) for p, xs in zip(problems, samples) for x in xs),
              "samples": sum(map(len, samples)), "records": len(records),
              "student_records": sum(r.meta.get("source") == "student" for r in records)}
    return driver.run_sft(model, batch_at, run, mesh, seed=seed, progress=progress, phase="lemma"), counts


def run_learners(make_model: Callable[[], nnx.Module], learners: Sequence[str], task, tok, fmt: driver.TwoTurnFormat,
                 cfg: CompareConfig, turn_plans: dict[str, TurnPlan], *, eval_problems: Sequence[Problem], mesh, seed: int,
                 length: int, evaluate: Callable[[str, nnx.Module, float], None], out: dict[str, Any],
                 log: Callable[[str], None] = print, progress: bool = False) -> None:
    """Plain SFT, mistake tuning and LEMMA (those of ``learners``), each on ``train``'s budget,
    from the random init (``start: init``) or from one base per seed (``start: base``: its
    training time is added to each strategy's, its own scores go to ``out["extra"]["base"]``)."""
    base, base_seconds = None, 0.0
    if cfg.start == "base":
        began = time.perf_counter()
        base = train_base(make_model, task, tok, cfg, length, mesh, seed, progress)
        base_seconds = time.perf_counter() - began
        scores = two_turn_eval(base, task, eval_problems, tok, turn_plans["sft"], fmt.max_new_tokens)
        out["extra"]["base"] = {"steps": cfg.base_steps, "train_seconds": base_seconds, **scores}
        log(f"seed {seed} base ({cfg.base_steps} SFT steps): acc_t1 {scores['acc_t1']:.3f} train {base_seconds:.1f}s")
    for name in learners:
        began = time.perf_counter()
        model = make_model() if base is None else frozen_copy(base)
        if base is not None and name == "lemma":
            model, counts = train_lemma_on_student(model, task, tok, cfg, fmt.max_new_tokens, length, mesh, seed, progress)
            out["extra"]["lemma_student"] = counts
            log(f"seed {seed} lemma student: {counts}")
        else:
            model = train_records(model, name, task, tok, cfg, length, mesh, seed, progress)
        evaluate(name, model, base_seconds + time.perf_counter() - began)

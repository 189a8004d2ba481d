"""SCoRe stage objectives (Kumar et al. 2024, "Training Language Models to Self-Correct via
Reinforcement Learning") and RISE-style reward-weighted SFT as a baseline.

A two-turn episode ``[x1, y1, p, y2]`` is one row of the batch (see
:func:`offside_jax.correct.episodes.episode_batch`); ``turn_ids`` marks the tokens of attempt
1 and 2. The base estimator is REINFORCE with a KL penalty to the frozen reference
(the paper cites RLOO), with instantaneous rewards (discount 0): the tokens of attempt ``k``
are credited with attempt ``k``'s reward only.

- Stage I: ``max E[ r(y2) - beta2 KL(pi(.|x1) || ref) - beta1 KL(pi(.|x2) || ref) ]``: only the
  second attempt is rewarded; the strong ``beta2`` KL keeps attempt 1 at the reference.
- Stage II: ``max E[ r(y1) + r'(y2) - beta1 (KL_1 + KL_2) ]`` with the shaped second reward
  ``r'(y2) = r(y2) + alpha (r(y2) - r(y1))``.
- Defaults (MATH): alpha 10, beta1 0.01, beta2 0.1, Adam lr 5e-6, temperature 1.0 (MBPP:
  lr 1e-5, beta2 0.25).

Per turn ``k``, the return is ``R_k = reward_k - c_k * sum_{t in turn k} k1_t`` when the KL is
in the reward (default; ``c`` = (beta2, beta1) in Stage I, (beta1, beta1) in Stage II), and
the advantage is RLOO over the ``G`` episodes of one problem (adjacent rows) or the group
mean baseline; attempt 2 is by default baselined among the episodes whose attempt 1 got the
same reward (:func:`score_advantages`). With ``kl_in_reward=False`` the KL is ``c_k * k`` per
token in the loss. Log-probs are taken at the stage's sampling temperature.

Batch keys of :func:`make_score_loss` (besides ``input_ids``, ``attention_mask``,
``loss_mask`` of :mod:`offside_jax.correct.rl`):

- ``turn_ids`` ``[B, T]`` aligned with ``input_ids`` (0 context/padding, 1, 2 the attempts);
- ``turn_advantages`` ``[B, 2]`` from :func:`score_advantages`;
- ``old_logp`` (optional), ``ref_logp`` (optional; needed, or the reference model, when
  ``kl_in_reward=False``).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from offside_jax.correct import rl
from offside_jax.correct.episodes import CandidateTurn, Episode, episode_batch
from offside_jax.train.losses import LossFn, LossOutput

F32 = jnp.float32
N_TURNS = 2


@dataclasses.dataclass(frozen=True)
class ScoreStage:
    """One SCoRe stage. ``alpha`` and ``reward_first`` default per stage (Stage I: 0 and
    False, Stage II: 10 and True) and can be switched either way; ``lr`` is the paper's
    default for the stage driver (unused by the loss); ``temperature`` is the rollouts'
    sampling temperature, and the loss scores tokens at it (the policy that sampled them)."""

    stage: int = 2
    alpha: float | None = None
    beta1: float = 0.01
    beta2: float = 0.1
    reward_first: bool | None = None
    advantage: str = "rloo"  # rloo | reinforce (group-mean baseline)
    group_size: int = 4
    # Baseline attempt 2 among episodes whose attempt 1 got the same reward; see score_advantages.
    first_attempt_baseline: bool = True
    kl_in_reward: bool = True
    kl_estimator: str = "k3"  # for the KL in the loss (kl_in_reward=False)
    clip_eps: float | None = None  # set when making several updates per rollout batch
    clip_eps_high: float | None = None
    aggregation: str = "seq_sum"
    max_len: int | None = None
    lr: float = 5e-6
    temperature: float = 1.0

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"SCoRe has stages 1 and 2, got {self.stage}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the policy being trained samples), got {self.temperature}")
        if self.advantage not in ("rloo", "reinforce"):
            raise ValueError(f"SCoRe advantage must be 'rloo' or 'reinforce', got {self.advantage!r}")
        if self.advantage == "rloo" and self.group_size < 2:
            raise ValueError(f"RLOO needs group_size >= 2, got {self.group_size}")
        if self.aggregation not in rl.AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; use one of {', '.join(rl.AGGREGATIONS)}")
        if self.kl_estimator not in rl.KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.kl_estimator!r}; use one of {', '.join(rl.KL_ESTIMATORS)}")

    @property
    def shaping(self) -> float:
        """``alpha`` of ``r'(y2) = r(y2) + alpha (r(y2) - r(y1))``."""
        return self.alpha if self.alpha is not None else (10.0 if self.stage == 2 else 0.0)

    @property
    def first_rewarded(self) -> bool:
        return self.reward_first if self.reward_first is not None else self.stage == 2

    @property
    def kl_coefs(self) -> tuple[float, float]:
        """KL coefficients of attempt 1 and attempt 2."""
        return (self.beta2, self.beta1) if self.stage == 1 else (self.beta1, self.beta1)


def stage_one(**overrides) -> ScoreStage:
    return ScoreStage(stage=1, **overrides)


def stage_two(**overrides) -> ScoreStage:
    return ScoreStage(stage=2, **overrides)


# -- rewards and advantages (host side, whole groups) -------------------------------------------------


def turn_rewards(r1: jax.Array, r2: jax.Array, *, alpha: float, reward_first: bool) -> jax.Array:
    """``[B, 2]``: ``(r(y1) or 0, r(y2) + alpha (r(y2) - r(y1)))``."""
    r1, r2 = jnp.asarray(r1, F32), jnp.asarray(r2, F32)
    first = r1 if reward_first else jnp.zeros_like(r1)
    return jnp.stack([first, r2 + alpha * (r2 - r1)], axis=1)


def predicted_turns(turn_ids: jax.Array) -> jax.Array:
    """Turn ids aligned with the log-probs: position ``t`` predicts token ``t + 1``, so it
    belongs to the turn of ``turn_ids[:, t + 1]`` (the last position predicts nothing)."""
    ids = jnp.asarray(turn_ids, jnp.int32)
    return jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)


def turn_sums(values: jax.Array, turns: jax.Array, n_turns: int = N_TURNS) -> jax.Array:
    """``[B, n_turns]``: the sum of ``values`` ``[B, T]`` over the positions of each turn
    (``turns`` aligned with ``values``, see :func:`predicted_turns`)."""
    onehot = jax.nn.one_hot(jnp.asarray(turns) - 1, n_turns, dtype=F32)  # turn 0 -> all zeros
    return jnp.einsum("bt,btk->bk", jnp.asarray(values, F32), onehot)


def per_token(turn_values: jax.Array, turns: jax.Array) -> jax.Array:
    """``[B, T]``: each position gets its turn's value (0 on context and padding)."""
    v = jnp.asarray(turn_values, F32)
    onehot = jax.nn.one_hot(jnp.asarray(turns) - 1, v.shape[1], dtype=F32)
    return jnp.einsum("bk,btk->bt", v, onehot)


def turn_returns(
    stage: ScoreStage,
    r1: jax.Array,
    r2: jax.Array,
    *,
    logp: jax.Array | None = None,
    ref_logp: jax.Array | None = None,
    turn_ids: jax.Array | None = None,
) -> jax.Array:
    """``[B, 2]`` per-turn returns: the stage's rewards, minus ``c_k * sum_{t in k} k1`` when
    the KL is in the reward (``logp``: behaviour log-probs ``[B, T]`` of the episode batch,
    ``ref_logp`` the reference's, ``turn_ids`` the batch's, aligned with ``input_ids``)."""
    returns = turn_rewards(r1, r2, alpha=stage.shaping, reward_first=stage.first_rewarded)
    if not stage.kl_in_reward or stage.kl_coefs == (0.0, 0.0):
        return returns
    if logp is None or ref_logp is None or turn_ids is None:
        raise ValueError("the KL in the reward needs logp, ref_logp and turn_ids of the episode batch")
    k1 = rl.kl_estimate(logp, ref_logp, "k1")
    kl_per_turn = turn_sums(k1, predicted_turns(turn_ids))
    return returns - jnp.asarray(stage.kl_coefs, F32)[None, :] * kl_per_turn


def outcome_baseline_advantages(returns: jax.Array, outcomes: jax.Array, group_size: int, *, leave_one_out: bool = True) -> jax.Array:
    """``[B]`` advantages ``R_i - b_i`` with ``b_i`` the mean return of the episodes of ``i``'s
    group (``group_size`` adjacent rows) that share ``i``'s ``outcome``: leaving ``i`` out
    (RLOO) or not (REINFORCE's group mean); when no other episode shares it (RLOO), the
    leave-one-out mean of the whole group.

    The outcome is fixed before the action the advantage scores (attempt 1's reward, for
    attempt 2), so ``b_i`` does not depend on that action and the gradient stays unbiased.
    """
    r = rl.group_rows(returns, group_size)
    o = jnp.asarray(outcomes, F32).reshape(r.shape)
    others = 1.0 - jnp.eye(group_size, dtype=F32) if leave_one_out else jnp.ones((group_size, group_size), F32)
    same = (o[:, :, None] == o[:, None, :]).astype(F32) * others[None]
    count = jnp.sum(same, axis=2)
    peer_mean = jnp.sum(same * r[:, None, :], axis=2) / jnp.maximum(count, 1.0)
    fallback = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
    return (r - jnp.where(count > 0, peer_mean, fallback)).reshape(-1)


def score_advantages(stage: ScoreStage, returns: jax.Array, first_rewards: jax.Array | None = None) -> jax.Array:
    """``[B, 2]`` per-turn advantages from per-turn returns: RLOO over each problem's ``G``
    episodes (adjacent rows), or the group-mean baseline.

    With ``stage.first_attempt_baseline`` (default) attempt 2 is baselined among the episodes
    of its group whose first attempt got the same reward (``first_rewards`` ``[B]``, see
    :func:`outcome_baseline_advantages`), after taking the bonus's ``-alpha * r(y1)`` out of
    its return. Both are functions of the state ``x2 = [x1, y1, p]`` that attempt 2 starts
    from, so the expected gradient is unchanged; what goes is the variance from pooling
    different first attempts: without it, a right answer copied from a right first attempt is
    scored against the group's failed corrections (and the ``+-alpha`` swings of the bonus),
    and the largest advantages reward copying rather than correcting.
    """
    ret = jnp.asarray(returns, F32)
    loo = stage.advantage == "rloo"
    group_baseline = rl.rloo_advantages if loo else rl.reinforce_advantages
    if stage.first_attempt_baseline and stage.group_size > 1:  # one sample per problem: no baseline at all
        if first_rewards is None:
            raise ValueError("the first-attempt baseline needs first_rewards (r(y1) of every episode)")
        r1 = jnp.asarray(first_rewards, F32)
        second = outcome_baseline_advantages(ret[:, 1] + stage.shaping * r1, r1, stage.group_size, leave_one_out=loo)
    else:
        second = group_baseline(ret[:, 1], stage.group_size)
    first = group_baseline(ret[:, 0], stage.group_size)
    return jnp.stack([first, second], axis=1)


# -- the loss --------------------------------------------------------------------------------------


def score_token_loss(
    stage: ScoreStage,
    logp: jax.Array,
    old_logp: jax.Array | None,
    ref_logp: jax.Array | None,
    turn_advantages: jax.Array,
    turns: jax.Array,
    mask: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token SCoRe loss ``[B, T]``: the policy-gradient surrogate with attempt ``k``'s
    advantage on attempt ``k``'s tokens, plus ``c_k * k(logp, ref_logp)`` when the KL is in the
    loss. ``turns`` is aligned with ``logp`` (:func:`predicted_turns`)."""
    advantages = per_token(turn_advantages, turns)
    kl_coef: float | jax.Array = 0.0
    if not stage.kl_in_reward:
        kl_coef = per_token(jnp.broadcast_to(jnp.asarray(stage.kl_coefs, F32), (logp.shape[0], N_TURNS)), turns)
    return rl.policy_gradient_token_loss(
        logp, old_logp, ref_logp if not stage.kl_in_reward else None, advantages, mask,
        clip_eps=stage.clip_eps, clip_eps_high=stage.clip_eps_high, kl_coef=kl_coef, kl_estimator=stage.kl_estimator,
    )


def make_score_loss(stage: ScoreStage) -> LossFn:
    """The loss protocol function of a SCoRe stage (batch keys in the module docstring).

    ``aux``: ``kl_turn1``/``kl_turn2`` (token means of the KL estimate when it is in the loss,
    else of ``k1``), ``advantage_turn1``/``advantage_turn2`` (row means).
    """

    def score_loss(model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array, reference: nnx.Module | None) -> LossOutput:
        del rng
        logp, mask = rl.completion_logprobs(model, batch, stage.temperature)
        turns = predicted_turns(batch["turn_ids"])
        # With the KL in the reward, reference log-probs only feed diagnostics: use cached ones
        # but never pay a reference forward pass for them.
        needs_ref = not stage.kl_in_reward or "ref_logp" in batch
        ref = rl.reference_logprobs(batch, reference, stage.temperature) if needs_ref else None
        per_tok, diag = score_token_loss(stage, logp, batch.get("old_logp"), ref, batch["turn_advantages"], turns, mask)
        total, weight = rl.aggregate_token_losses(per_tok, mask, stage.aggregation, stage.max_len)
        # Diagnostics: the per-turn KL to the reference (whichever estimator is in use).
        kl = diag["kl"] if not stage.kl_in_reward or ref is None else rl.kl_estimate(logp, ref, "k1") * mask
        kl_sums = turn_sums(kl, turns)
        counts = jnp.maximum(turn_sums(mask, turns).sum(axis=0), 1.0)
        adv = jnp.mean(jnp.asarray(batch["turn_advantages"], F32), axis=0)
        aux = {
            "kl_turn1": kl_sums[:, 0].sum() / counts[0],
            "kl_turn2": kl_sums[:, 1].sum() / counts[1],
            "advantage_turn1": adv[0],
            "advantage_turn2": adv[1],
        }
        return total, weight, aux

    return score_loss


# -- RISE-style reward-weighted SFT ------------------------------------------------------------------


def rise_weights(rewards: np.ndarray | jax.Array, tau: float = 0.4) -> np.ndarray:
    """Reward-weighted regression weights ``exp(r / tau)`` (RISE, tau = 0.4)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return np.exp(np.asarray(rewards, np.float64) / tau).astype(np.float32)


def best_of(rewards: np.ndarray) -> np.ndarray:
    """RISE's best-of-N: per row of ``rewards`` ``[N, C]`` the index of the first best candidate."""
    return np.argmax(np.asarray(rewards), axis=1)


def rise_examples(turns: Sequence[CandidateTurn], tau: float = 0.4) -> tuple[list[Episode], np.ndarray]:
    """RISE's training rows from best-of-N turns (:func:`offside_jax.correct.episodes.candidates_rollout`):
    each turn's context followed by its best candidate, and the weights ``exp(r_best / tau)``."""
    if not turns:
        return [], np.zeros(0, np.float32)
    best = best_of(np.asarray([t.rewards for t in turns]))  # every turn has the same N candidates
    rows = [t.context.copy().add_attempt(t.candidates[b], t.texts[b]) for t, b in zip(turns, best)]
    return rows, rise_weights([t.rewards[b] for t, b in zip(turns, best)], tau)


def rise_batch(rows: Sequence[Episode], weights: Sequence[float], pad_id: int, pad_multiple: int) -> dict[str, np.ndarray]:
    """The batch of :func:`make_rise_loss`: the rows with the loss on their last attempt only,
    and ``sample_weight``."""
    batch = episode_batch(rows, pad_id, pad_multiple, train_turns="last")
    batch.pop("turn_ids")
    batch["sample_weight"] = np.asarray(weights, np.float32)
    return batch


def make_rise_loss() -> LossFn:
    """Reward-weighted NLL ``sum_b w_b NLL_b / sum_b w_b n_b`` (``n_b`` trained tokens of row
    ``b``): batch keys ``input_ids``, ``attention_mask``, ``loss_mask`` (the last turn only:
    ``episode_batch(..., train_turns="last")``) and ``sample_weight`` ``[B]`` from
    :func:`rise_weights`."""

    def rise_loss(model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array, reference: nnx.Module | None) -> LossOutput:
        del rng, reference
        logp, mask = rl.completion_logprobs(model, batch)
        w = jnp.asarray(batch["sample_weight"], F32)
        nll = -jnp.sum(logp * mask, axis=1)
        return jnp.sum(w * nll), jnp.sum(w * jnp.sum(mask, axis=1)), {}

    return rise_loss

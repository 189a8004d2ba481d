"""Policy-gradient estimators over sampled completions, and their adapters to the loss protocol.

The math is a set of pure functions over arrays, so each formula can be checked by hand:

- log-probs ``logp`` (policy), ``old_logp`` (behaviour policy that sampled the tokens) and
  ``ref_logp`` (frozen reference) are ``[B, T]``; entry ``t`` is the log-probability of token
  ``t + 1`` predicted at position ``t`` (the alignment of
  :func:`offside_jax.train.losses.model_token_logprobs`);
- ``mask`` ``[B, T]`` is 1 where that predicted token is a completion token (an action);
- rewards are ``[B]`` with the ``G`` samples of one prompt on adjacent rows (row
  ``b = n * G + g``), so ``rewards.reshape(N, G)`` are the groups.

Definitions (``self_correction.md`` in the design references; sources per function):

- KL estimators of ``KL(pi || pi_ref)`` per token, with ``l = logpi - logpi_ref`` and the token
  sampled from ``pi``: ``k1 = l``, ``k2 = l^2 / 2``, ``k3 = exp(-l) - 1 + l`` (Schulman,
  "Approximating KL divergence", 2020).
- Advantages: REINFORCE with a mean baseline, RLOO (leave-one-out, Ahmadian et al. 2024),
  GRPO (group-normalised, Shao et al. 2024), Dr. GRPO (group-centred without the std,
  Liu et al. 2025), REINFORCE++ (token returns whitened over the batch, Hu 2025).
- The surrogate ``-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)`` with
  ``rho = exp(logp - old_logp)`` (PPO; DAPO's "clip-higher" when ``eps_high > eps_low``).
- Aggregation over tokens, returned as a ``(sum, weight)`` pair so that the training step's
  ``sum(loss_sum) / sum(weight)`` over micro-batches equals the same aggregation over the
  whole batch:

  ========== ============================================ =================================
  mode       loss                                         ``(sum, weight)``
  ========== ============================================ =================================
  grpo       mean over tokens per sequence, then over     ``(sum_b mean_t x, #rows)``
             sequences (GRPO)
  dr_grpo    ``sum_{b,t} x / (B * max_len)`` (Dr. GRPO)   ``(sum_{b,t} x / max_len, #rows)``
  dapo       ``sum_{b,t} x / #tokens`` (DAPO)             ``(sum_{b,t} x, #tokens)``
  seq_sum    sum over tokens per sequence, then mean      ``(sum_{b,t} x, #rows)``
             over sequences (plain REINFORCE: the
             sequence log-prob times its advantage)
  ========== ============================================ =================================

  ``#rows`` counts rows with at least one completion token (all-padding rows are no samples).

Batch keys read by the loss adapters (one micro-batch, right- or left-padded, ``[B, T]``):

- ``input_ids``, ``attention_mask``: prompt + completion tokens;
- ``loss_mask``: 1 on completion tokens (the actions trained on), 0 on prompt and padding,
  aligned with ``input_ids`` (the adapter shifts it, as ``next_token_targets`` does);
- ``advantages``: ``[B]`` (one per sequence) or ``[B, T]`` (per token, aligned with the
  log-probs, e.g. REINFORCE++ or one advantage per turn of a multi-turn episode);
- ``old_logp`` (optional) ``[B, T]``: behaviour-policy log-probs from the rollout; absent means
  on-policy (a single update per batch), i.e. ``rho = exp(logp - stop_gradient(logp)) = 1``
  whose gradient is the REINFORCE gradient;
- ``ref_logp`` (optional) ``[B, T]``: cached reference log-probs; absent, the adapter scores
  the tokens with the ``reference`` model the step hands over (when the KL term is in the
  loss);
- ``kl_coef`` (optional) ``[B, T]``: per-token KL coefficients (aligned with the log-probs)
  replacing the scalar ``beta``
  (SCoRe's strong KL on attempt 1 and weak KL on attempt 2).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from offside_jax.train.losses import LossFn, LossOutput, model_token_logprobs

F32 = jnp.float32
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("grpo", "dr_grpo", "dapo", "seq_sum")
ADVANTAGES = ("reinforce", "rloo", "grpo", "dr_grpo", "reinforce_pp")


# -- KL estimators ----------------------------------------------------------------------------------


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    ``l = logp - ref_logp``; ``k1 = l`` (unbiased, high variance, can be negative),
    ``k2 = l^2 / 2`` (biased, low variance), ``k3 = exp(-l) - 1 + l`` (unbiased, >= 0).
    Where the mask is 0 both log-probs are 0, so every estimator is 0 there.
    """
    log_ratio = jnp.asarray(logp, F32) - jnp.asarray(ref_logp, F32)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio * log_ratio
    if estimator == "k3":
        # expm1 keeps precision for the tiny |l| of a policy close to its reference.
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")


# -- advantages -------------------------------------------------------------------------------------


def group_rows(x: jax.Array, group_size: int) -> jax.Array:
    """``[N * G]`` per-sample values as ``[N, G]`` groups (the ``G`` samples of a prompt are
    adjacent rows); at least two samples per group."""
    x = jnp.asarray(x, F32)
    if group_size < 2:
        raise ValueError(f"group estimators need group_size >= 2 samples per prompt, got {group_size}")
    if x.ndim != 1 or x.shape[0] % group_size:
        raise ValueError(f"rewards {x.shape} must be [N * G] with G = group_size = {group_size}")
    return x.reshape(-1, group_size)


def group_advantages(rewards: jax.Array, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-6) -> jax.Array:
    """GRPO: ``A_i = (r_i - mean_g r) / (std_g r + eps)``; Dr. GRPO (``scale_by_std=False``):
    ``A_i = r_i - mean_g r``.

    ``std_g`` is the sample standard deviation (``ddof = 1``), as in the public GRPO
    implementations (TRL, verl, OpenRLHF use ``torch.std``). A group with equal rewards gets
    zero advantages (no signal), not a division by zero.
    """
    r = group_rows(rewards, group_size)
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if scale_by_std:
        centred = centred / (jnp.std(r, axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(returns: jax.Array, group_size: int) -> jax.Array:
    """RLOO: ``A_i = R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_g R)``."""
    r = group_rows(returns, group_size)
    loo_mean = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
    return (r - loo_mean).reshape(-1)


def reinforce_advantages(returns: jax.Array, group_size: int | None = None) -> jax.Array:
    """REINFORCE with a mean baseline: ``A_i = R_i - mean R`` over the prompt's group when
    ``group_size`` is given, else over the whole batch (``group_size=1`` is no baseline)."""
    r = jnp.asarray(returns, F32)
    if group_size == 1:
        return r
    if group_size is None:
        return r - jnp.mean(r)
    g = group_rows(r, group_size)
    return (g - jnp.mean(g, axis=1, keepdims=True)).reshape(-1)


def kl_shaped_returns(rewards: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, beta: float) -> jax.Array:
    """Sequence returns with the KL in the reward (RLOO, REINFORCE):
    ``R_i = r_i - beta * sum_t k1_{i,t}`` over the completion tokens of sequence ``i``."""
    k1 = kl_estimate(logp, ref_logp, "k1") * jnp.asarray(mask, F32)
    return jnp.asarray(rewards, F32) - beta * jnp.sum(k1, axis=1)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``(x - mean) / (std + eps)`` with mean and (population) std over the masked entries;
    zero off the mask."""
    x, m = jnp.asarray(x, F32), jnp.asarray(mask, F32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(x * m) / n
    var = jnp.sum(jnp.square(x - mean) * m) / n
    return (x - mean) / (jnp.sqrt(var) + eps) * m


def reinforce_pp_advantages(
    rewards: jax.Array,
    logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    beta: float,
    *,
    group_size: int | None = None,
    eps: float = 1e-8,
) -> jax.Array:
    """REINFORCE++ token advantages ``[B, T]`` (Hu 2025; OpenRLHF).

    Token rewards ``-beta * k1_t`` on every completion token plus the sequence reward ``r`` on
    its last completion token; returns-to-go ``G_t = sum_{s >= t} r_s`` (no discount); then
    whitened over all completion tokens of the batch. With ``group_size`` ("REINFORCE++-
    baseline") the group mean reward is subtracted from ``r`` first.
    """
    m = jnp.asarray(mask, F32)
    r = jnp.asarray(rewards, F32)
    if group_size is not None:
        r = reinforce_advantages(r, group_size)
    token_r = -beta * kl_estimate(logp, ref_logp, "k1") * m
    # The last completion token of a row is the last index with mask 1.
    t = m.shape[1]
    last = (t - 1) - jnp.argmax(m[:, ::-1], axis=1)
    has_tokens = jnp.sum(m, axis=1) > 0
    terminal = jax.nn.one_hot(last, t, dtype=F32) * (r * has_tokens)[:, None]
    token_r = token_r + terminal
    returns = jnp.cumsum(token_r[:, ::-1], axis=1)[:, ::-1] * m
    return masked_whiten(returns, m, eps)


# -- surrogate and aggregation -----------------------------------------------------------------------


def _per_token(advantages: jax.Array, like: jax.Array) -> jax.Array:
    a = jnp.asarray(advantages, F32)
    if a.ndim == 1:
        a = a[:, None]
    return jnp.broadcast_to(a, like.shape)


def policy_ratio(logp: jax.Array, old_logp: jax.Array | None) -> jax.Array:
    """``rho = exp(logp - old_logp)``; ``old_logp=None`` means on-policy: ``rho = 1`` with the
    gradient of ``logp`` (``exp(logp - stop_gradient(logp))``)."""
    logp = jnp.asarray(logp, F32)
    old = jax.lax.stop_gradient(logp) if old_logp is None else jax.lax.stop_gradient(jnp.asarray(old_logp, F32))
    return jnp.exp(logp - old)


def clipped_surrogate(
    logp: jax.Array,
    old_logp: jax.Array | None,
    advantages: jax.Array,
    clip_eps: float | None = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-token policy loss ``-min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A)`` and the
    indicator of tokens where the clipped branch is the active one (no gradient flows).

    ``clip_eps=None`` gives the unclipped importance-weighted loss ``-rho * A`` (REINFORCE,
    RLOO). ``clip_eps_high`` defaults to ``clip_eps`` (symmetric PPO clip; DAPO uses 0.2/0.28).
    ``advantages`` are ``[B]`` (broadcast over tokens) or ``[B, T]``.
    """
    rho = policy_ratio(logp, old_logp)
    a = _per_token(advantages, rho)
    unclipped = rho * a
    if clip_eps is None:
        return -unclipped, jnp.zeros_like(rho)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = jnp.clip(rho, 1.0 - clip_eps, 1.0 + high) * a
    return -jnp.minimum(unclipped, clipped), (clipped < unclipped).astype(F32)


def aggregate_token_losses(values: jax.Array, mask: jax.Array, mode: str = "grpo", max_len: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Aggregate per-token ``values`` ``[B, T]`` over ``mask`` into ``(sum, weight)``; the loss is
    ``sum / weight`` (see the module table). ``max_len`` (Dr. GRPO's constant, the generation
    budget) defaults to ``T``."""
    x, m = jnp.asarray(values, F32), jnp.asarray(mask, F32)
    tokens = jnp.sum(m, axis=1)
    rows = jnp.sum((tokens > 0).astype(F32))
    masked = jnp.sum(x * m, axis=1)
    if mode == "grpo":
        return jnp.sum(masked / jnp.maximum(tokens, 1.0)), rows
    if mode == "dr_grpo":
        length = m.shape[1] if max_len is None else max_len
        return jnp.sum(masked) / float(length), rows
    if mode == "dapo":
        return jnp.sum(masked), jnp.sum(tokens)
    if mode == "seq_sum":
        return jnp.sum(masked), rows
    raise ValueError(f"unknown aggregation {mode!r}; use one of {', '.join(AGGREGATIONS)}")


def policy_gradient_token_loss(
    logp: jax.Array,
    old_logp: jax.Array | None,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float | None = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float | jax.Array = 0.0,
    kl_estimator: str = "k3",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token loss ``-min(rho A, clip(rho) A) + kl_coef * k(logp, ref_logp)`` ``[B, T]`` (zero
    off the mask) and per-token diagnostics (``pg`` the surrogate alone, ``kl``, ``clipped``,
    ``ratio``; all zero off the mask).

    ``kl_coef`` is a scalar or ``[B, T]``; with a zero scalar ``ref_logp`` may be ``None``.
    """
    m = jnp.asarray(mask, F32)
    pg, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps, clip_eps_high)
    if ref_logp is None:
        if not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
            raise ValueError("a KL term in the loss (kl_coef != 0) needs ref_logp")
        kl = jnp.zeros_like(pg)
    else:
        kl = kl_estimate(logp, jax.lax.stop_gradient(ref_logp), kl_estimator)
    loss = (pg + jnp.asarray(kl_coef, F32) * kl) * m
    diag = {"pg": pg * m, "kl": kl * m, "clipped": clipped * m, "ratio": policy_ratio(logp, old_logp) * m}
    return loss, diag


# -- configuration ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PolicyGradientConfig:
    """One policy-gradient estimator: how advantages are formed and how the loss is built.

    - ``advantage``: ``reinforce`` | ``rloo`` | ``grpo`` | ``dr_grpo`` | ``reinforce_pp``;
    - ``group_size``: ``G`` samples per prompt (adjacent rows);
    - ``beta``: KL coefficient, with ``kl_in_reward`` True (RLOO/REINFORCE style: ``k1`` summed
      into the sequence return, where it gets the score-function gradient) or False (GRPO
      style: ``beta * k`` per token in the loss with ``kl_estimator``; ``k1`` in the loss
      would have zero expected gradient, so use ``k3`` or ``k2`` there);
    - ``clip_eps`` / ``clip_eps_high``: ratio clip (``None``: unclipped);
    - ``aggregation``: see :func:`aggregate_token_losses`; ``max_len``: Dr. GRPO's constant;
    - ``temperature``: the rollouts' sampling temperature; the loss scores tokens under
      ``softmax(logits / temperature)``, the policy that sampled them.
    """

    advantage: str = "grpo"
    group_size: int = 8
    beta: float = 0.04
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    clip_eps: float | None = 0.2
    clip_eps_high: float | None = None
    aggregation: str = "grpo"
    max_len: int | None = None
    std_eps: float = 1e-6
    temperature: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the policy being trained samples), got {self.temperature}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"unknown advantage estimator {self.advantage!r}; use one of {', '.join(ADVANTAGES)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.kl_estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.advantage in ("rloo", "grpo", "dr_grpo") and self.group_size < 2:
            raise ValueError(f"advantage {self.advantage!r} needs group_size >= 2, got {self.group_size}")

    @property
    def loss_kl_coef(self) -> float:
        """The KL coefficient in the loss (0 when the KL lives in the reward)."""
        return 0.0 if self.kl_in_reward or self.advantage == "reinforce_pp" else self.beta

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0


# Presets after the papers' defaults; override fields with dataclasses.replace.
PRESETS: dict[str, PolicyGradientConfig] = {
    # REINFORCE with a group-mean baseline and the KL in the reward (SCoRe's base estimator).
    "reinforce": PolicyGradientConfig("reinforce", group_size=4, beta=0.01, kl_in_reward=True, clip_eps=None, aggregation="seq_sum"),
    "rloo": PolicyGradientConfig("rloo", group_size=4, beta=0.01, kl_in_reward=True, clip_eps=None, aggregation="seq_sum"),
    # DeepSeekMath: beta 0.04, G 64 (8 here, for small batches), k3 in the loss, clip 0.2.
    "grpo": PolicyGradientConfig("grpo", group_size=8, beta=0.04, kl_estimator="k3", clip_eps=0.2, aggregation="grpo"),
    # Dr. GRPO: no std scaling, sum / constant, no KL.
    "dr_grpo": PolicyGradientConfig("dr_grpo", group_size=8, beta=0.0, clip_eps=0.2, aggregation="dr_grpo"),
    # DAPO: clip-higher 0.2 / 0.28, token-level mean, no KL.
    "dapo": PolicyGradientConfig("grpo", group_size=8, beta=0.0, clip_eps=0.2, clip_eps_high=0.28, aggregation="dapo"),
    "reinforce_pp": PolicyGradientConfig("reinforce_pp", group_size=1, beta=0.01, kl_in_reward=True, clip_eps=0.2, aggregation="dapo"),
}


def preset(name: str, **overrides) -> PolicyGradientConfig:
    """A named estimator (``PRESETS``) with some fields replaced."""
    if name not in PRESETS:
        raise KeyError(f"unknown policy-gradient preset {name!r}; use one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def compute_advantages(
    cfg: PolicyGradientConfig,
    rewards: jax.Array,
    *,
    logp: jax.Array | None = None,
    ref_logp: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Advantages for one rollout batch (all groups present; run this before splitting into
    micro-batches). ``[B]``, or ``[B, T]`` for ``reinforce_pp``.

    ``logp``/``ref_logp``/``mask`` (behaviour and reference log-probs of the rollout) are needed
    when the KL is in the reward (``cfg.kl_in_reward`` with ``beta != 0``, or REINFORCE++).
    """
    r = jnp.asarray(rewards, F32)
    kl_in_reward = (cfg.kl_in_reward or cfg.advantage == "reinforce_pp") and cfg.beta != 0.0
    if kl_in_reward and (logp is None or ref_logp is None or mask is None):
        raise ValueError(f"advantage {cfg.advantage!r} with the KL in the reward needs logp, ref_logp and mask")
    if cfg.advantage == "reinforce_pp":
        if mask is None:
            raise ValueError("advantage 'reinforce_pp' gives token advantages and needs the completion mask")
        if not kl_in_reward:  # beta == 0: the log-probs do not matter
            logp = ref_logp = jnp.zeros_like(jnp.asarray(mask, F32))
        return reinforce_pp_advantages(
            r, logp, ref_logp, mask, cfg.beta, group_size=cfg.group_size if cfg.group_size > 1 else None
        )
    if kl_in_reward:
        r = kl_shaped_returns(r, logp, ref_logp, mask, cfg.beta)
    if cfg.advantage == "reinforce":
        return reinforce_advantages(r, cfg.group_size if cfg.group_size > 1 else None)
    if cfg.advantage == "rloo":
        return rloo_advantages(r, cfg.group_size)
    return group_advantages(r, cfg.group_size, scale_by_std=cfg.advantage == "grpo", eps=cfg.std_eps)


# -- adapters to the loss protocol ------------------------------------------------------------------


def completion_logprobs(model: nnx.Module, batch: Mapping[str, jax.Array], temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probs ``[B, T]`` of the completion tokens under ``model`` and the action
    mask ``[B, T]`` (both aligned with the predicting position; zero off the completion).

    ``temperature`` scores the tokens under the policy that sampled them,
    ``softmax(logits / temperature)``: rollouts at temperature 0.7 are on-policy for that
    distribution, not for the temperature-1 one.
    """
    if temperature <= 0:
        raise ValueError(f"log-probs need a sampling temperature > 0, got {temperature} (greedy decoding has no log-probs)")
    logp, weights = model_token_logprobs(model, batch, temperature)
    return logp, (weights > 0).astype(F32)


def reference_logprobs(batch: Mapping[str, jax.Array], reference: nnx.Module | None, temperature: float = 1.0) -> jax.Array:
    """``batch["ref_logp"]`` when cached, else the frozen reference model's log-probs at
    ``temperature`` (no gradient)."""
    if "ref_logp" in batch:
        return jax.lax.stop_gradient(jnp.asarray(batch["ref_logp"], F32))
    if reference is None:
        raise ValueError("the KL term needs reference log-probs: add 'ref_logp' to the batch or build the step with a reference model")
    return jax.lax.stop_gradient(completion_logprobs(reference, batch, temperature)[0])


def make_policy_gradient_loss(cfg: PolicyGradientConfig) -> LossFn:
    """The loss protocol function for ``cfg`` (batch keys in the module docstring).

    ``aux``: ``pg_loss`` (the aggregated surrogate without KL), ``kl`` (token-mean KL
    estimate), ``clip_fraction`` and ``ratio`` (token means), ``advantage`` (token mean).
    """
    loss_kl = cfg.loss_kl_coef

    def policy_gradient_loss(model: nnx.Module, batch: Mapping[str, jax.Array], rng: jax.Array, reference: nnx.Module | None) -> LossOutput:
        del rng
        logp, mask = completion_logprobs(model, batch, cfg.temperature)
        coef = batch.get("kl_coef", loss_kl)
        uses_kl = "kl_coef" in batch or loss_kl != 0.0
        ref = reference_logprobs(batch, reference, cfg.temperature) if uses_kl else None
        per_token, diag = policy_gradient_token_loss(
            logp, batch.get("old_logp"), ref, batch["advantages"], mask,
            clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, kl_coef=coef if uses_kl else 0.0,
            kl_estimator=cfg.kl_estimator,
        )
        total, weight = aggregate_token_losses(per_token, mask, cfg.aggregation, cfg.max_len)
        tokens = jnp.maximum(jnp.sum(mask), 1.0)
        pg_only, _ = aggregate_token_losses(diag["pg"], mask, cfg.aggregation, cfg.max_len)
        aux = {
            "pg_loss": pg_only / jnp.maximum(weight, 1.0),
            "kl": jnp.sum(diag["kl"]) / tokens,
            "clip_fraction": jnp.sum(diag["clipped"]) / tokens,
            "ratio": jnp.sum(diag["ratio"]) / tokens,
            "advantage": jnp.sum(_per_token(batch["advantages"], mask) * mask) / tokens,
        }
        return total, weight, aux

    return policy_gradient_loss

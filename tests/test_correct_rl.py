"""Policy-gradient estimators, SCoRe objectives, episodes and rollouts against hand computations.

Every expected number is written out with its arithmetic in a comment; nothing is compared
with the function under test run a second time.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offside_jax.correct import episodes as ep
from offside_jax.correct import rl, rollout, score
from offside_jax.models.generate import SamplingConfig

from fake_models import TableModel

# Two completions: row 0 has 3 completion tokens, row 1 has 2 (then padding).
LOGP = np.array([[-1.0, -2.0, -0.5, 0.0], [-0.2, -0.3, 0.0, 0.0]], np.float32)
REF = np.array([[-1.5, -1.0, -0.5, 0.0], [-0.2, -1.3, 0.0, 0.0]], np.float32)
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
# l = logp - ref = [[0.5, -1.0, 0.0], [0.0, 1.0]]


def close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=tol, atol=tol)


# -- KL estimators ---------------------------------------------------------------------------------


def test_kl_estimators():
    # k1 = l
    close(rl.kl_estimate(LOGP, REF, "k1") * MASK, [[0.5, -1.0, 0, 0], [0, 1.0, 0, 0]])
    # k2 = l^2 / 2: 0.25/2 = 0.125, 1/2 = 0.5
    close(rl.kl_estimate(LOGP, REF, "k2") * MASK, [[0.125, 0.5, 0, 0], [0, 0.5, 0, 0]])
    # k3 = exp(-l) - 1 + l: l=0.5: 0.60653066 - 1 + 0.5 = 0.10653066; l=-1: 2.71828183 - 1 - 1 =
    # 0.71828183; l=1: 0.36787944 - 1 + 1 = 0.36787944; l=0: 0.
    close(rl.kl_estimate(LOGP, REF, "k3") * MASK, [[0.10653066, 0.71828183, 0, 0], [0, 0.36787944, 0, 0]])
    with pytest.raises(ValueError, match="k1, k2, k3"):
        rl.kl_estimate(LOGP, REF, "k4")


# -- advantages ------------------------------------------------------------------------------------

REWARDS = np.array([1, 0, 0, 1, 1, 1, 0, 1], np.float32)  # two groups of G = 4


def test_grpo_advantages_normalise_by_group_std():
    # Group A [1,0,0,1]: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025.
    # Group B [1,1,0,1]: mean 0.75, deviations [.25,.25,-.75,.25], sum sq 0.75, /3 = 0.25, std 0.5
    #   -> [0.5, 0.5, -1.5, 0.5].
    close(rl.group_advantages(REWARDS, 4, eps=0.0), [0.866025, -0.866025, -0.866025, 0.866025, 0.5, 0.5, -1.5, 0.5])
    # A group of equal rewards has no signal: zeros, not a division by zero.
    close(rl.group_advantages(np.array([1, 1, 0, 0], np.float32), 2), [0, 0, 0, 0])


def test_dr_grpo_advantages_are_centred_only():
    # r - mean_g: group A mean 0.5, group B mean 0.75.
    close(rl.group_advantages(REWARDS, 4, scale_by_std=False), [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25])


def test_rloo_advantages_leave_one_out():
    # Group A: 1 - (0+0+1)/3 = 2/3; 0 - (1+0+1)/3 = -2/3; -2/3; 2/3.
    # Group B: 1 - (1+0+1)/3 = 1/3; 1/3; 0 - (1+1+1)/3 = -1; 1/3.
    close(rl.rloo_advantages(REWARDS, 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, -1.0, 1 / 3])
    with pytest.raises(ValueError, match="group_size >= 2"):
        rl.rloo_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match=r"\[N \* G\]"):
        rl.rloo_advantages(REWARDS, 3)


def test_reinforce_baselines():
    # Batch mean 5/8 = 0.625: 1 - 0.625 = 0.375, 0 - 0.625 = -0.625.
    close(rl.reinforce_advantages(REWARDS), [0.375, -0.625, -0.625, 0.375, 0.375, 0.375, -0.625, 0.375])
    # Group mean baseline = Dr. GRPO's centring.
    close(rl.reinforce_advantages(REWARDS, 4), [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25])
    close(rl.reinforce_advantages(REWARDS, 1), REWARDS)  # no baseline


def test_kl_shaped_returns():
    # sum_t k1: row 0: 0.5 - 1.0 = -0.5; row 1: 1.0.  R = r - 0.1 * sum: 1 + 0.05 = 1.05; 0 - 0.1 = -0.1.
    close(rl.kl_shaped_returns(np.array([1.0, 0.0]), LOGP, REF, MASK, 0.1), [1.05, -0.1])


def test_reinforce_pp_token_returns_are_whitened():
    # Token rewards -0.1 * k1: row 0 [-0.05, 0.1, 0], row 1 [0, -0.1]; terminal +r on the last
    # completion token: row 0 [-0.05, 0.1, 1.0], row 1 [0, -0.1] (r = 0).
    # Returns-to-go: row 0 [1.05, 1.1, 1.0], row 1 [-0.1, -0.1].
    returns = np.array([1.05, 1.1, 1.0, -0.1, -0.1])
    # Whitening over the 5 tokens: mean 2.95 / 5 = 0.59, population std sqrt(1.592 / 5) = 0.564269.
    white = (returns - 0.59) / 0.5642694
    adv = rl.reinforce_pp_advantages(np.array([1.0, 0.0]), LOGP, REF, MASK, 0.1)
    close(adv, [[white[0], white[1], white[2], 0], [white[3], white[4], 0, 0]], tol=1e-4)


def test_compute_advantages_dispatch():
    grpo = rl.preset("grpo", group_size=4)
    close(rl.compute_advantages(grpo, REWARDS)[:2], [0.866025, -0.866025], tol=1e-4)
    # RLOO with the KL in the reward: G = 2, R = [1.05, -0.1] -> A = [1.05 + 0.1, -0.1 - 1.05].
    rloo = rl.preset("rloo", group_size=2, beta=0.1)
    close(rl.compute_advantages(rloo, np.array([1.0, 0.0]), logp=LOGP, ref_logp=REF, mask=MASK), [1.15, -1.15])
    with pytest.raises(ValueError, match="needs logp, ref_logp and mask"):
        rl.compute_advantages(rloo, np.array([1.0, 0.0]))


# -- surrogate, clipping, aggregation --------------------------------------------------------------------

# log ratios -> rho: row 0 [1.5, 0.5, 1.1], row 1 [1.5, 0.5]
OLD = LOGP - np.log(np.array([[1.5, 0.5, 1.1, 1.0], [1.5, 0.5, 1.0, 1.0]], np.float32))
ADV = np.array([1.0, -2.0], np.float32)


def test_clipped_surrogate_values_and_indicator():
    loss, clipped = rl.clipped_surrogate(LOGP, OLD, ADV, clip_eps=0.2)
    # A = +1: rho 1.5 -> -min(1.5, 1.2) = -1.2; rho 0.5 -> -min(0.5, 0.8) = -0.5; rho 1.1 -> -1.1.
    # A = -2: rho 1.5 -> -min(-3, -2.4) = 3.0; rho 0.5 -> -min(-1, -1.6) = 1.6.
    close(np.asarray(loss) * MASK, [[-1.2, -0.5, -1.1, 0], [3.0, 1.6, 0, 0]])
    # The clipped branch is active (strictly smaller) at (0, 0) and (1, 1) only.
    close(np.asarray(clipped) * MASK, [[1, 0, 0, 0], [0, 1, 0, 0]])
    # DAPO clip-higher: the upper bound moves to 1.28.
    loss_hi, _ = rl.clipped_surrogate(LOGP, OLD, ADV, clip_eps=0.2, clip_eps_high=0.28)
    close(np.asarray(loss_hi)[0, 0], -1.28)
    # Unclipped: -rho * A.
    loss_raw, _ = rl.clipped_surrogate(LOGP, OLD, ADV, clip_eps=None)
    close(np.asarray(loss_raw) * MASK, [[-1.5, -0.5, -1.1, 0], [3.0, 1.0, 0, 0]])


def test_clipped_tokens_get_no_gradient():
    grad = jax.grad(lambda lp: jnp.sum(rl.clipped_surrogate(lp, OLD, ADV, 0.2)[0] * MASK))(jnp.asarray(LOGP))
    # d(-rho A)/dlogp = -rho A where unclipped, 0 where clipped:
    # row 0: clipped, -0.5 * 1, -1.1 * 1; row 1: -1.5 * -2 = 3.0, clipped.
    close(grad, [[0, -0.5, -1.1, 0], [3.0, 0, 0, 0]])


def test_on_policy_ratio_is_one_with_the_reinforce_gradient():
    loss, _ = rl.clipped_surrogate(LOGP, None, ADV, 0.2)
    close(np.asarray(loss) * MASK, [[-1, -1, -1, 0], [2, 2, 0, 0]])  # -A per token
    grad = jax.grad(lambda lp: jnp.sum(rl.clipped_surrogate(lp, None, ADV, 0.2)[0] * MASK))(jnp.asarray(LOGP))
    close(grad, [[-1, -1, -1, 0], [2, 2, 0, 0]])


VALUES = np.array([[1, 2, 3, 0], [4, 5, 0, 0], [7, 7, 7, 7]], np.float32)
AGG_MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.float32)  # row 2: padding row


@pytest.mark.parametrize(
    "mode,max_len,total,weight",
    [
        ("grpo", None, 6.5, 2),  # row means (1+2+3)/3 = 2 and (4+5)/2 = 4.5; 2 rows -> 3.25
        ("dr_grpo", 4, 3.75, 2),  # (6 + 9) / 4 = 3.75 over 2 rows -> 15 / (2 * 4) = 1.875
        ("dr_grpo", 10, 1.5, 2),  # 15 / 10
        ("dapo", None, 15.0, 5),  # 15 over 5 tokens -> 3
        ("seq_sum", None, 15.0, 2),  # (6 + 9) / 2 rows -> 7.5
    ],
)
def test_aggregation_modes(mode, max_len, total, weight):
    s, w = rl.aggregate_token_losses(VALUES, AGG_MASK, mode, max_len)
    close(s, total)
    close(w, weight)


def test_aggregation_over_micro_batches_equals_the_whole_batch():
    # The step divides summed loss_sum by summed weight; split rows {0}, {1, 2}: grpo
    # 2 + 4.5 over 1 + 1 rows = 3.25, the same as the whole batch.
    for mode in rl.AGGREGATIONS:
        s0, w0 = rl.aggregate_token_losses(VALUES[:1], AGG_MASK[:1], mode, 4)
        s1, w1 = rl.aggregate_token_losses(VALUES[1:], AGG_MASK[1:], mode, 4)
        s, w = rl.aggregate_token_losses(VALUES, AGG_MASK, mode, 4)
        close((float(s0) + float(s1)) / (float(w0) + float(w1)), float(s) / float(w))


def test_policy_gradient_token_loss_adds_the_kl_term():
    loss, diag = rl.policy_gradient_token_loss(LOGP, None, REF, ADV, MASK, clip_eps=0.2, kl_coef=0.5, kl_estimator="k3")
    # -A + 0.5 * k3: row 0: -1 + 0.5 * [0.10653066, 0.71828183, 0]; row 1: 2 + 0.5 * [0, 0.36787944].
    close(loss, [[-0.94673467, -0.64085909, -1.0, 0], [2.0, 2.18393972, 0, 0]])
    close(diag["pg"], [[-1, -1, -1, 0], [2, 2, 0, 0]])
    with pytest.raises(ValueError, match="needs ref_logp"):
        rl.policy_gradient_token_loss(LOGP, None, None, ADV, MASK, kl_coef=0.1)


def test_config_validation_names_the_choices():
    with pytest.raises(ValueError, match="grpo, dr_grpo, dapo"):
        rl.PolicyGradientConfig(aggregation="token")
    with pytest.raises(ValueError, match="needs group_size >= 2"):
        rl.PolicyGradientConfig(advantage="rloo", group_size=1)
    with pytest.raises(KeyError, match="grpo"):
        rl.preset("ppo2")


# -- adapters on a fake model ------------------------------------------------------------------------

V = 5
TABLE = np.random.default_rng(0).normal(size=(V, V)).astype(np.float32)  # logits = TABLE[previous token]
REF_TABLE = TABLE + np.random.default_rng(1).normal(size=(V, V)).astype(np.float32)


FakeModel = TableModel  # logits = table[token]


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - (np.log(np.sum(np.exp(x - x.max()))) + x.max())


# prompt [1, 2] + completion [3, 4]; prompt [0] + completion [2, 1, 3]
PROMPTS, COMPLETIONS = [[1, 2], [0]], [[3, 4], [2, 1, 3]]


def hand_logps(table):
    """Per completion token: log softmax(table[previous])[token]."""
    out = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        seq = p + c
        out.append([log_softmax(table[seq[len(p) + j - 1]])[tok] for j, tok in enumerate(c)])
    return out


def test_completion_batch_layout():
    batch = rollout.completion_batch(PROMPTS, COMPLETIONS, pad_id=0, pad_multiple=4)
    np.testing.assert_array_equal(batch["input_ids"], [[1, 2, 3, 4], [0, 2, 1, 3]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(ValueError, match="empty prompt"):
        rollout.completion_batch([[]], [[1]])


def test_grpo_loss_adapter_on_a_fake_model():
    batch = {k: jnp.asarray(v) for k, v in rollout.completion_batch(PROMPTS, COMPLETIONS).items()}
    batch["advantages"] = jnp.asarray([0.5, -1.0])
    cfg = rl.preset("grpo", beta=0.04, group_size=2)
    total, weight, aux = rl.make_policy_gradient_loss(cfg)(FakeModel(TABLE), batch, None, FakeModel(REF_TABLE))
    pol, ref = hand_logps(TABLE), hand_logps(REF_TABLE)
    # On-policy, rho = 1: per token -A + 0.04 * k3(l), l = logp - ref; grpo: mean per row, sum rows.
    rows = []
    for a, lp, rp in zip([0.5, -1.0], pol, ref):
        rows.append(np.mean([-a + 0.04 * (math.exp(-(x - y)) - 1 + (x - y)) for x, y in zip(lp, rp)]))
    close(total, sum(rows), tol=1e-5)
    close(weight, 2)
    # Token-mean of k3 over the 5 completion tokens.
    k3 = [math.exp(-(x - y)) - 1 + (x - y) for lp, rp in zip(pol, ref) for x, y in zip(lp, rp)]
    close(aux["kl"], np.mean(k3), tol=1e-5)
    # Cached ref_logp gives the same loss without the reference model.
    cached = dict(batch, ref_logp=jnp.asarray(_ref_logp(batch)))
    total2, _, _ = rl.make_policy_gradient_loss(cfg)(FakeModel(TABLE), cached, None, None)
    close(total2, total, tol=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        rl.make_policy_gradient_loss(cfg)(FakeModel(TABLE), batch, None, None)


def _ref_logp(batch):
    ref = hand_logps(REF_TABLE)
    out = np.zeros(batch["input_ids"].shape, np.float32)
    for row, (p, vals) in enumerate(zip(PROMPTS, ref)):
        out[row, len(p) - 1 : len(p) - 1 + len(vals)] = vals  # position t predicts token t + 1
    return out


def test_dapo_loss_adapter_with_old_logp_clips():
    batch = {k: jnp.asarray(v) for k, v in rollout.completion_batch(PROMPTS, COMPLETIONS).items()}
    pol = hand_logps(TABLE)
    old = np.zeros(batch["input_ids"].shape, np.float32)
    # Behaviour log-probs 1.0 below the policy's: rho = e = 2.718 everywhere -> clipped at 1.28
    # for A > 0; for A < 0 the unclipped -rho*A = 2.718 * 1 is the larger loss.
    for row, (p, vals) in enumerate(zip(PROMPTS, pol)):
        old[row, len(p) - 1 : len(p) - 1 + len(vals)] = np.asarray(vals) - 1.0
    batch.update(advantages=jnp.asarray([0.5, -1.0]), old_logp=jnp.asarray(old))
    total, weight, aux = rl.make_policy_gradient_loss(rl.preset("dapo"))(FakeModel(TABLE), batch, None, None)
    # dapo: token sum over token count: row 0 2 tokens * (-1.28 * 0.5), row 1 3 tokens * (e * 1).
    close(total, 2 * -0.64 + 3 * math.e, tol=1e-5)
    close(weight, 5)
    close(aux["clip_fraction"], 2 / 5)


# -- SCoRe objectives --------------------------------------------------------------------------------


def test_score_stage_defaults_and_switches():
    one, two = score.stage_one(), score.stage_two()
    assert (one.shaping, one.first_rewarded, one.kl_coefs) == (0.0, False, (0.1, 0.01))
    assert (two.shaping, two.first_rewarded, two.kl_coefs) == (10.0, True, (0.01, 0.01))
    assert (two.lr, two.temperature) == (5e-6, 1.0)
    assert score.stage_two(alpha=0.0, reward_first=False).shaping == 0.0
    with pytest.raises(ValueError, match="stages 1 and 2"):
        score.ScoreStage(stage=3)


def test_score_turn_rewards():
    r1, r2 = np.array([1, 0, 1, 0.0]), np.array([1, 1, 0, 0.0])
    # Stage I: (0, r2).
    close(score.turn_rewards(r1, r2, alpha=0.0, reward_first=False), [[0, 1], [0, 1], [0, 0], [0, 0]])
    # Stage II, alpha 10: (r1, r2 + 10 (r2 - r1)): 1 + 0; 1 + 10; 0 - 10; 0.
    close(score.turn_rewards(r1, r2, alpha=10.0, reward_first=True), [[1, 1], [0, 11], [1, -10], [0, 0]])


# One episode row: [x1 x1 | y1 y1 | p | y2 y2 y2], turn ids aligned with input_ids.
TURN_IDS = np.array([[0, 0, 1, 1, 0, 2, 2, 2], [0, 0, 1, 1, 0, 2, 2, 2]], np.int32)
# Log-probs aligned with predicting positions: position t predicts token t + 1, so the y1
# tokens (2, 3) are predicted at positions 1, 2 and the y2 tokens (5, 6, 7) at 4, 5, 6.
EP_LOGP = np.array([[0, -1.0, -2.0, 0, -0.5, -0.5, -1.0, 0], [0, -0.1, -0.1, 0, -3.0, -1.0, -1.0, 0]], np.float32)
EP_REF = np.array([[0, -1.5, -1.0, 0, -0.5, -1.5, -1.0, 0], [0, -0.1, -0.6, 0, -1.0, -1.0, -1.0, 0]], np.float32)


def test_score_turn_sums_and_returns_with_kl_in_reward():
    turns = score.predicted_turns(TURN_IDS)
    np.testing.assert_array_equal(turns, [[0, 1, 1, 0, 2, 2, 2, 0]] * 2)
    # k1 per turn: row 0: turn 1 (-1+1.5) + (-2+1) = -0.5, turn 2 0 + 1.0 + 0 = 1.0;
    #              row 1: turn 1 0 + 0.5 = 0.5, turn 2 -2.0 + 0 + 0 = -2.0.
    close(score.turn_sums(EP_LOGP - EP_REF, turns), [[-0.5, 1.0], [0.5, -2.0]])
    # Stage I: returns (0 - 0.1 * k1_1, r2 - 0.01 * k1_2) with r = (r1, r2) = (0, 1), (1, 0):
    # row 0: (0.05, 1 - 0.01) = (0.05, 0.99); row 1: (-0.05, 0 + 0.02) = (-0.05, 0.02).
    returns = score.turn_returns(score.stage_one(group_size=2), np.array([0.0, 1.0]), np.array([1.0, 0.0]), logp=EP_LOGP, ref_logp=EP_REF, turn_ids=TURN_IDS)
    close(returns, [[0.05, 0.99], [-0.05, 0.02]])
    # RLOO with G = 2: A_i = R_i - R_j per turn: (0.1, 0.97), (-0.1, -0.97). (The first attempts
    # got different rewards, so attempt 2's outcome baseline falls back to the whole group.)
    close(score.score_advantages(score.stage_one(group_size=2), returns, np.array([0.0, 1.0])), [[0.1, 0.97], [-0.1, -0.97]])
    close(score.score_advantages(score.stage_one(group_size=2, first_attempt_baseline=False), returns), [[0.1, 0.97], [-0.1, -0.97]])


def test_outcome_baseline_advantages_by_hand():
    # One group of 4: returns R and the first attempts' outcomes o.
    returns = np.array([1.0, 0.0, 3.0, 5.0])
    outcomes = np.array([0.0, 0.0, 1.0, 0.0])
    # RLOO among equal outcomes: row 0 vs rows 1, 3: 1 - (0 + 5) / 2 = -1.5; row 1: 0 - (1 + 5) / 2 = -3;
    # row 3: 5 - (1 + 0) / 2 = 4.5; row 2 has no peer: the whole group's leave-one-out mean,
    # 3 - (1 + 0 + 5) / 3 = 1.
    close(score.outcome_baseline_advantages(returns, outcomes, 4), [-1.5, -3.0, 1.0, 4.5])
    # Group mean over equal outcomes, self included: row 0: 1 - 2 = -1; row 1: -2; row 2: 0; row 3: 3.
    close(score.outcome_baseline_advantages(returns, outcomes, 4, leave_one_out=False), [-1.0, -2.0, 0.0, 3.0])
    # Two groups of 2 are separate: (2, 4) share an outcome -> -2, 2; (7, 1) do not -> 6, -6.
    close(score.outcome_baseline_advantages([2.0, 4.0, 7.0, 1.0], [1.0, 1.0, 0.0, 1.0], 2), [-2.0, 2.0, 6.0, -6.0])


def test_first_attempt_baseline_removes_the_shaping_swing():
    # Stage II, alpha 10, a group of 4 without KL: r1 = (1, 1, 0, 0), r2 = (1, 0, 1, 0).
    r1, r2 = np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.0, 1.0, 0.0])
    stage = score.stage_two(group_size=4, beta1=0.0)
    returns = score.turn_returns(stage, r1, r2)  # (r1, r2 + 10 (r2 - r1)) = (1, 1), (1, -10), (0, 11), (0, 0)
    close(returns, [[1, 1], [1, -10], [0, 11], [0, 0]])
    # Attempt 1, RLOO over the group: 1 - 1/3, 1 - 1/3, 0 - 2/3, 0 - 2/3.
    first = [2 / 3, 2 / 3, -2 / 3, -2 / 3]
    # Attempt 2 with the first-attempt baseline: R + 10 r1 = (11, 0, 11, 0), each against its one
    # peer with the same r1: 11 - 0, 0 - 11, 11 - 0, 0 - 11.
    close(score.score_advantages(stage, returns, r1), np.stack([first, [11, -11, 11, -11]], axis=1))
    # Plain RLOO instead: 1 - (-10 + 11 + 0) / 3 = 2/3; -10 - 12/3 = -14; 11 - (-9/3) = 14; 0 - 2/3.
    # The right copy of a right first attempt (row 0) scores almost like a failure to correct.
    plain = dataclasses.replace(stage, first_attempt_baseline=False)
    close(score.score_advantages(plain, returns), np.stack([first, [2 / 3, -14, 14, -2 / 3]], axis=1))
    with pytest.raises(ValueError, match="first_rewards"):
        score.score_advantages(stage, returns)
    # One sample per problem (REINFORCE without a baseline): the returns themselves.
    single = score.stage_two(advantage="reinforce", group_size=1, beta1=0.0)
    close(score.score_advantages(single, returns, r1), returns)


def test_completion_logprobs_at_a_sampling_temperature():
    # Batch [1 | 3, 2]: completion tokens 3 (after 1) and 2 (after 3); logits = TABLE[previous].
    batch = {"input_ids": jnp.asarray([[1, 3, 2]]), "attention_mask": jnp.ones((1, 3), jnp.int32),
             "loss_mask": jnp.asarray([[0, 1, 1]])}
    for temperature in (1.0, 0.5):
        logp, mask = rl.completion_logprobs(FakeModel(TABLE), batch, temperature)
        expected = [log_softmax(TABLE[1] / temperature)[3], log_softmax(TABLE[3] / temperature)[2], 0.0]
        close(logp[0], expected)
        close(mask[0], [1, 1, 0])
    with pytest.raises(ValueError, match="temperature"):
        rl.completion_logprobs(FakeModel(TABLE), batch, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        score.stage_two(temperature=0.0)


def test_score_loss_credits_each_turn_with_its_advantage():
    turns = score.predicted_turns(TURN_IDS)
    mask = (turns > 0).astype(np.float32)
    turn_adv = np.array([[0.1, 0.97], [-0.1, -0.97]], np.float32)
    loss, _ = score.score_token_loss(score.stage_one(group_size=2), jnp.asarray(EP_LOGP), None, None, turn_adv, turns, mask)
    # On-policy: -A_turn on each attempt's positions, 0 elsewhere.
    close(loss, [[0, -0.1, -0.1, 0, -0.97, -0.97, -0.97, 0], [0, 0.1, 0.1, 0, 0.97, 0.97, 0.97, 0]])
    # KL in the loss (Stage I coefficients 0.1 on turn 1, 0.01 on turn 2), k2 = l^2 / 2, A = 0:
    # row 0 l = [0.5, -1.0 | 0, 1.0, 0] -> [0.1 * 0.125, 0.1 * 0.5 | 0, 0.01 * 0.5, 0].
    stage = score.stage_one(group_size=2, kl_in_reward=False, kl_estimator="k2")
    loss, _ = score.score_token_loss(stage, jnp.asarray(EP_LOGP), None, jnp.asarray(EP_REF), np.zeros((2, 2), np.float32), turns, mask)
    close(np.asarray(loss)[0], [0, 0.0125, 0.05, 0, 0, 0.005, 0, 0])


def test_make_score_loss_on_a_fake_model():
    # Episode [1 | 3 | 0 | 2 4]: x1 = [1], y1 = [3], p = [0], y2 = [2, 4].
    episode = ep.two_turn_episode([1], [3], [0], [2, 4])
    batch = {k: jnp.asarray(v) for k, v in ep.episode_batch([episode]).items()}
    batch["turn_advantages"] = jnp.asarray([[0.5, 2.0]])
    loss_fn = score.make_score_loss(score.stage_two(advantage="reinforce", group_size=1))
    total, weight, aux = loss_fn(FakeModel(TABLE), batch, None, None)
    # On-policy rho = 1, seq_sum: -(0.5 * 1 token + 2.0 * 2 tokens) = -4.5 over one row.
    close(total, -4.5)
    close(weight, 1)
    close(aux["advantage_turn2"], 2.0)
    # Its gradient is REINFORCE's: -0.5 * grad log p(3|1) - 2.0 * (grad log p(2|0) + grad log p(4|2)),
    # with d log_softmax(z)[y] / dz = onehot(y) - softmax(z) on the logits row of the previous token.
    grad = jax.grad(lambda t: loss_fn(FakeModel(t), batch, None, None)[0])(jnp.asarray(TABLE))
    expected = np.zeros((V, V))
    for prev, tok, a in [(1, 3, 0.5), (0, 2, 2.0), (2, 4, 2.0)]:
        expected[prev] += -a * (np.eye(V)[tok] - np.exp(log_softmax(TABLE[prev])))
    close(grad, expected, tol=1e-5)
    # The stage's sampling temperature reaches the log-probs: behaviour log-probs taken at 0.5
    # give rho = exp(logp - old_logp) = 1 on every token, so the surrogate is the on-policy
    # -4.5 exactly; the same behaviour log-probs under a temperature-1 stage give rho != 1.
    old_logp, _ = rl.completion_logprobs(FakeModel(TABLE), batch, 0.5)
    at_half = score.make_score_loss(score.stage_two(advantage="reinforce", group_size=1, temperature=0.5))
    total, _, _ = at_half(FakeModel(TABLE), {**batch, "old_logp": old_logp}, None, None)
    assert float(total) == -4.5
    total, _, _ = loss_fn(FakeModel(TABLE), {**batch, "old_logp": old_logp}, None, None)
    assert abs(float(total) + 4.5) > 1e-3


def test_rise_weights_and_loss():
    # exp(r / 0.4): exp(0) = 1, exp(2.5) = 12.182494.
    close(score.rise_weights([0.0, 1.0]), [1.0, 12.182494], tol=1e-5)
    np.testing.assert_array_equal(score.best_of(np.array([[0, 1, 1], [0.1, 0, 0]])), [1, 0])
    # Loss on the last turn only: episode [1 | 3 | 0 | 2 4] trains on y2 = [2, 4].
    batch = {k: jnp.asarray(v) for k, v in ep.episode_batch([ep.two_turn_episode([1], [3], [0], [2, 4])], train_turns="last").items()}
    batch["sample_weight"] = jnp.asarray([3.0])
    total, weight, _ = score.make_rise_loss()(FakeModel(TABLE), batch, None, None)
    nll = -(log_softmax(TABLE[0])[2] + log_softmax(TABLE[2])[4])
    close(total, 3.0 * nll, tol=1e-5)
    close(weight, 3.0 * 2)  # weight * tokens


# -- episodes ---------------------------------------------------------------------------------------


def test_episode_batch_turn_ids_and_train_turns():
    a = ep.Episode.start([5, 6]).add_attempt([7]).add_context([9]).add_attempt([8, 8])
    b = ep.Episode.start([5]).add_attempt([7, 7])
    batch = ep.episode_batch([a, b], pad_id=0)
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 9, 8, 8], [5, 7, 7, 0, 0, 0]])
    np.testing.assert_array_equal(batch["turn_ids"], [[0, 0, 1, 0, 2, 2], [0, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(ep.episode_batch([a, b], train_turns="last")["loss_mask"], [[0, 0, 0, 0, 1, 1], [0, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(ep.episode_batch([a, b], train_turns=[1])["loss_mask"], [[0, 0, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0]])
    assert a.n_attempts == 2 and a.attempts() == [[7], [8, 8]]


def test_ufo_rewards():
    # Solved at the third attempt (t = 2): 0.5^2 = 0.25.
    close(ep.turn_discounted_rewards([False, False, True]), [0, 0, 0.25])
    # Answers 12, 12, 13 (valid 3, distinct 2): 0.5 * (1 - 2/3) = 1/6.
    close(ep.repetition_penalty(["12", "12", "13"]), 0.5 / 3)
    close(ep.repetition_penalty([None, None]), 0.0)
    # 0.25 - 1/6 - 0.1 * 1 malformed (answers 12, None, 12 -> valid 2, distinct 1: 0.5 * 0.5 = 0.25):
    close(ep.ufo_trajectory_reward([False, False, True], ["12", None, "12"]), 0.25 - 0.25 - 0.1)


# -- rollouts on a tiny model ---------------------------------------------------------------------------


def tiny_model():
    from offside_jax.models import llama

    cfg = llama.DecoderConfig(
        model_type="llama", vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
        rope_parameters=(("rope_theta", 10000.0), ("rope_type", "default")), max_position_embeddings=64,
        tie_word_embeddings=True, qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False,
        sliding_windows=(None,),
    )
    return llama.create(cfg, seed=0)


def decode(ids):
    return "".join("abcdefghijkl"[t] for t in ids)


def test_stop_cut_keeps_the_shortest_prefix_with_the_stop_string():
    # "abcde": "cd" first appears once the 4th token is decoded.
    assert rollout.stop_cut([0, 1, 2, 3, 4], decode, ["cd"]) == 4
    assert rollout.stop_cut([0, 1], decode, ["cd"]) is None


def test_two_turn_rollout_groups_stops_and_scores():
    model = tiny_model()
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_token_ids=(11,), pad_token_id=0)
    prompts = [[1, 2, 3], [4, 5]]
    # pad_multiple 16: both turns' prompts pad to 16, so they share one compiled sampler.
    eps_ = ep.two_turn_rollout(model, prompts, [10], sampling, jax.random.key(0), group_size=3, decode=decode, stop_strings=["j"], pad_multiple=16)
    assert len(eps_) == 6 and [e.problem for e in eps_] == [0, 0, 0, 1, 1, 1]
    for e, p in zip(eps_, [prompts[0]] * 3 + [prompts[1]] * 3):
        assert e.segments[0] == (p, 0) and e.segments[2] == ([10], 0) and e.n_attempts == 2
        for attempt, text in zip(e.attempts(), e.texts):
            assert 1 <= len(attempt) <= 6
            body = [t for t in attempt if t != 11]
            # Cut right after the first "j" (token 9); EOS only at the end.
            assert 9 not in body[:-1] and 11 not in attempt[:-1]
            assert text == decode(body)
    # UFO episodes: a judge that never accepts gives max_turns attempts with feedback between
    # them; one that always accepts stops after the first attempt.
    ufo = ep.feedback_rollout(model, prompts, [10], lambda text, i: False, sampling, jax.random.key(1), max_turns=2, group_size=3, decode=decode, pad_multiple=16)
    assert [e.n_attempts for e in ufo] == [2] * 6 and all(e.correct == [False, False] for e in ufo)
    assert all([turn for _, turn in e.segments] == [0, 1, 0, 2] and e.segments[2][0] == [10] for e in ufo)
    done = ep.feedback_rollout(model, prompts, [10], lambda text, i: True, sampling, jax.random.key(1), max_turns=2, group_size=3, decode=decode, pad_multiple=16)
    assert [e.n_attempts for e in done] == [1] * 6 and all(e.correct == [True] for e in done)
    batch = ep.episode_batch(eps_)
    logp = rollout.score_tokens(model, batch)
    mask = score.predicted_turns(batch["turn_ids"]) > 0
    assert logp.shape == batch["input_ids"].shape
    assert np.all(logp[mask] < 0) and np.all(logp[~mask] == 0)


def test_update_minibatches_cover_every_row_each_epoch():
    parts = list(rollout.update_minibatches(8, epochs=2, minibatches=2, seed=0))
    assert len(parts) == 4 and all(len(p) == 4 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts[:2])), np.arange(8))
    np.testing.assert_array_equal(np.sort(np.concatenate(parts[2:])), np.arange(8))
    with pytest.raises(ValueError, match="equal minibatches"):
        list(rollout.update_minibatches(7, minibatches=2))


# -- the SCoRe driver ----------------------------------------------------------------------------------


def test_char_tokenizer_and_warmup_batch_layout():
    from offside_jax.correct import driver
    from offside_jax.correct.chars import CharTokenizer
    from offside_jax.correct.tasks import CarryArithmetic, Problem

    tok = CharTokenizer("+0123456789=?")  # '+' -> 2, '0' -> 3, ..., '9' -> 12, '=' -> 13, '?' -> 14
    assert tok.encode("12+9=") == [4, 5, 2, 12, 13] and tok.decode([4, 5, 1, 0]) == "12"
    with pytest.raises(ValueError, match=r"\['x'\]"):
        tok.encode("1x")
    task = CarryArithmetic(p_bug=1.0)
    problem = Problem("58+67=", "125", {"a": 58, "b": 67, "op": "+", "carry_columns": (1,)})
    batch = driver.warmup_batch(task, [problem], tok, driver.TwoTurnFormat(instruction="?", length=24), np.random.default_rng(0))
    # "58+67=" "25"<eos> "?" "125"<eos>: the buggy attempt forgets the tens carry (125 - 100).
    np.testing.assert_array_equal(batch["input_ids"][0, :14], [8, 11, 2, 9, 10, 13, 5, 8, 1, 14, 4, 5, 8, 1])
    np.testing.assert_array_equal(batch["loss_mask"][0, :14], [0] * 6 + [1, 1, 1, 0, 1, 1, 1, 1])
    assert batch["input_ids"].shape == (1, 24) and set(batch) == {"input_ids", "attention_mask", "loss_mask"}


@pytest.mark.slow
def test_score_driver_runs_every_stage():
    from offside_jax.correct import driver
    from offside_jax.correct.chars import CharTokenizer
    from offside_jax.correct.tasks import CarryArithmetic
    from offside_jax.models import llama
    from offside_jax.train import mesh as mesh_lib

    task = CarryArithmetic(min_digits=2, max_digits=2)
    fmt = driver.TwoTurnFormat(instruction="?", max_new_tokens=4, length=24)
    tok = CharTokenizer.for_texts(["0123456789+-=?"])
    cfg = llama.DecoderConfig(
        model_type="llama", vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
        rope_parameters=(("rope_theta", 10000.0), ("rope_type", "default")), max_position_embeddings=64,
        tie_word_embeddings=True, qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, sliding_windows=(None,),
    )
    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(1, -1, 1))
    run = driver.StageRun(steps=2, lr=1e-3, problems_per_step=8, eval_every=1)
    result = driver.run_score(
        llama.create(cfg, seed=0), task, tok, fmt, mesh,
        warmup=driver.StageRun(steps=2, lr=1e-3, problems_per_step=8),
        stage1=(score.stage_one(group_size=2), run),
        stage2=(score.stage_two(group_size=2, clip_eps=0.2), dataclasses.replace(run, epochs=2, minibatches=2)),
        eval_size=8,
    )
    assert list(result.metrics) == ["warmup", "stage1", "stage2"]
    assert [(h["stage"], h["step"]) for h in result.history] == [("warmup", 0), ("stage1", 1), ("stage1", 2), ("stage2", 1), ("stage2", 2)]
    for h in result.history[1:]:
        assert math.isfinite(h["loss"]) and 0 <= h["acc_t2"] <= 1
        assert h["delta"] == pytest.approx(h["delta_i_to_c"] - h["delta_c_to_i"])

"""Multi-turn self-correction episodes: construction at the token level, rollouts turn by turn,
and the UFO reward shaping.

An :class:`Episode` is a sequence of segments ``(tokens, turn)``: turn 0 is context the policy
did not choose (the problem, the correction instruction, feedback), turn ``k >= 1`` is the
``k``-th attempt, sampled by the policy. The sampled tokens are kept exactly as sampled (never
re-tokenised from text), so the log-probs scored later are those of the actions taken.

- Two-turn self-correction (SCoRe, Kumar et al. 2024): ``x1, y1 ~ pi(.|x1)``,
  ``x2 = [x1, y1, p]`` with the correction instruction ``p``, ``y2 ~ pi(.|x2)``.
- UFO (2025): after each wrong attempt the unary feedback "Incorrect. Please think again.";
  the episode ends at a correct answer or after ``T_max`` attempts (5). Step reward
  ``r_t = gamma^t * 1[correct_t]`` (``t`` counted from 0, so a first-turn success earns 1;
  gamma = 0.5 in the authors' code), a repetition penalty ``lambda * (1 - E / T)`` (``E``
  distinct answers among ``T`` valid ones, lambda = 0.5) and -0.1 per malformed turn; the
  trajectory reward sits on the last token (one return for the whole episode).
- RISE (2024) uses the feedback "The answer is incorrect. Please try again."; at each turn
  ``N`` candidates are sampled from the learner's context and the best one is the target
  (:func:`candidates_rollout`, :func:`offside_jax.correct.score.rise_examples`).

How the context is written is the caller's: pass the encoded instruction / feedback (e.g.
``tokenizer.encode("\\n" + SCORE_INSTRUCTION + "\\n")``, or a chat-template turn).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from offside_jax.correct.rollout import Decode, rollout
from offside_jax.models.generate import SamplingConfig

SCORE_INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the question. "
    "Please correct the error, if any, and rewrite the solution."
)
UFO_FEEDBACK = "Incorrect. Please think again."
RISE_FEEDBACK = "The answer is incorrect. Please try again."


@dataclasses.dataclass
class Episode:
    """One episode: context and attempt segments, plus what is known of each attempt."""

    segments: list[tuple[list[int], int]]
    texts: list[str] = dataclasses.field(default_factory=list)  # decoded attempts, in order
    correct: list[bool] = dataclasses.field(default_factory=list)  # per judged attempt
    problem: int = 0  # index of the problem (prompt) this episode answers

    @classmethod
    def start(cls, prompt_ids: Sequence[int], problem: int = 0) -> "Episode":
        return cls([(list(prompt_ids), 0)], problem=problem)

    @property
    def n_attempts(self) -> int:
        return sum(1 for _, turn in self.segments if turn > 0)

    def attempts(self) -> list[list[int]]:
        return [list(toks) for toks, turn in self.segments if turn > 0]

    def tokens(self) -> list[int]:
        return [t for toks, _ in self.segments for t in toks]

    def copy(self) -> "Episode":
        """An independent copy (a prefix that later turns must not extend)."""
        return Episode([(list(toks), turn) for toks, turn in self.segments], list(self.texts), list(self.correct), self.problem)

    def add_context(self, tokens: Sequence[int]) -> "Episode":
        self.segments.append((list(tokens), 0))
        return self

    def add_attempt(self, tokens: Sequence[int], text: str = "") -> "Episode":
        self.segments.append((list(tokens), self.n_attempts + 1))
        self.texts.append(text)
        return self


def two_turn_episode(prompt_ids: Sequence[int], attempt1: Sequence[int], instruction_ids: Sequence[int], attempt2: Sequence[int], problem: int = 0) -> Episode:
    """``[x1, y1, p, y2]`` as an episode (also for SFT warm-up traces built from text)."""
    return Episode.start(prompt_ids, problem).add_attempt(attempt1).add_context(instruction_ids).add_attempt(attempt2)


def episode_batch(
    episodes: Sequence[Episode],
    pad_id: int = 0,
    pad_multiple: int = 1,
    train_turns: str | Sequence[int] = "all",
) -> dict[str, np.ndarray]:
    """Right-padded ``[B, T]`` arrays of whole episodes:

    - ``input_ids``, ``attention_mask``;
    - ``turn_ids``: 0 on context and padding, ``k`` on the tokens of attempt ``k``;
    - ``loss_mask``: 1 on the attempts trained on: ``"all"``, ``"last"`` (RISE: loss on the
      final turn only) or an explicit list of turn numbers.
    """
    rows = [[(t, turn) for toks, turn in ep.segments for t in toks] for ep in episodes]
    if not rows or any(not r or r[0][1] != 0 for r in rows):
        raise ValueError("every episode must start with a non-empty context segment (the problem)")
    t = max(len(r) for r in rows)
    t = -(-t // pad_multiple) * pad_multiple
    ids = np.full((len(rows), t), pad_id, np.int32)
    attn = np.zeros((len(rows), t), np.int32)
    turns = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = [tok for tok, _ in r]
        attn[i, : len(r)] = 1
        turns[i, : len(r)] = [turn for _, turn in r]
    if train_turns == "all":
        loss = turns > 0
    elif train_turns == "last":
        loss = (turns > 0) & (turns == turns.max(axis=1, keepdims=True))
    elif isinstance(train_turns, str):
        raise ValueError(f"train_turns must be 'all', 'last' or a list of turn numbers, got {train_turns!r}")
    else:
        loss = np.isin(turns, list(train_turns)) & (turns > 0)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss.astype(np.int32), "turn_ids": turns}


# -- rollouts over turns ---------------------------------------------------------------------------


def two_turn_rollout(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    instruction_ids: Sequence[int],
    sampling: SamplingConfig,
    rng: jax.Array | None,
    *,
    group_size: int = 1,
    decode: Decode | None = None,
    stop_strings: Sequence[str] = (),
    pad_id: int = 0,
    pad_multiple: int = 8,
) -> list[Episode]:
    """SCoRe episodes: ``group_size`` first attempts per prompt, then one second attempt each
    after the instruction. Rows keep the group layout (episode ``n * G + g``)."""
    rng1, rng2 = (None, None) if rng is None else jax.random.split(rng)
    kw = dict(decode=decode, stop_strings=stop_strings, pad_id=pad_id, pad_multiple=pad_multiple)
    first = rollout(model, prompts, sampling, rng1, group_size=group_size, **kw)
    episodes = [
        Episode.start(p, problem=i // group_size).add_attempt(y1, text).add_context(instruction_ids)
        for i, (p, y1, text) in enumerate(zip(first.prompt_ids, first.completion_ids, first.texts))
    ]
    second = rollout(model, [ep.tokens() for ep in episodes], sampling, rng2, **kw)
    for ep, y2, text in zip(episodes, second.completion_ids, second.texts):
        ep.add_attempt(y2, text)
    return episodes


def feedback_rollout(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    feedback_ids: Sequence[int],
    judge: Callable[[str, int], bool],
    sampling: SamplingConfig,
    rng: jax.Array | None,
    *,
    max_turns: int = 5,
    group_size: int = 1,
    decode: Decode | None = None,
    stop_strings: Sequence[str] = (),
    pad_id: int = 0,
    pad_multiple: int = 8,
) -> list[Episode]:
    """UFO episodes: attempt, and while wrong and fewer than ``max_turns`` attempts, append the
    unary feedback and attempt again. ``judge(text, problem_index)`` says whether an attempt is
    correct; each episode records it in ``correct``. Only unfinished episodes are sampled in
    later turns."""
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if decode is None:
        raise ValueError("feedback episodes judge text: pass decode (token ids -> text)")
    kw = dict(decode=decode, stop_strings=stop_strings, pad_id=pad_id, pad_multiple=pad_multiple)
    episodes = [Episode.start(p, problem=i // group_size) for i, p in enumerate(p for p in prompts for _ in range(group_size))]
    open_rows = list(range(len(episodes)))
    for turn in range(max_turns):
        if not open_rows:
            break
        step_rng = None if rng is None else jax.random.fold_in(rng, turn)
        out = rollout(model, [episodes[i].tokens() for i in open_rows], sampling, step_rng, **kw)
        still_open = []
        for i, y, text in zip(open_rows, out.completion_ids, out.texts):
            ep = episodes[i].add_attempt(y, text)
            ok = bool(judge(text, ep.problem))
            ep.correct.append(ok)
            if not ok and turn + 1 < max_turns:
                ep.add_context(feedback_ids)
                still_open.append(i)
        open_rows = still_open
    return episodes


@dataclasses.dataclass
class CandidateTurn:
    """One turn of a best-of-N rollout: the episode so far (what the attempt answers), the
    ``N`` sampled candidates (token ids exactly as sampled, texts) and their rewards."""

    context: Episode
    candidates: list[list[int]]
    texts: list[str]
    rewards: list[float]


def candidates_rollout(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    feedback_ids: Sequence[int],
    reward: Callable[[str, int], float],
    sampling: SamplingConfig,
    rng: jax.Array | None,
    *,
    max_turns: int,
    candidates: int,
    solved: float = 1.0,
    decode: Decode | None = None,
    pad_id: int = 0,
    pad_multiple: int = 8,
) -> list[CandidateTurn]:
    """RISE's data collection: at each turn ``candidates`` samples from every open episode's
    context, scored by ``reward(text, problem_index)``. The episode goes on with the learner's
    own attempt (candidate 0, a plain sample: the states stay the learner's, the best candidate
    is only the target) and, while that attempt's reward is below ``solved`` and fewer than
    ``max_turns`` attempts were made, the feedback. Returns the turns in the order sampled."""
    if max_turns < 1 or candidates < 1:
        raise ValueError(f"max_turns and candidates must be >= 1, got {max_turns} and {candidates}")
    if decode is None:
        raise ValueError("candidates are scored on text: pass decode (token ids -> text)")
    episodes = [Episode.start(p, problem=i) for i, p in enumerate(prompts)]
    open_rows, turns = list(range(len(episodes))), []
    for turn in range(max_turns):
        if not open_rows:
            break
        step_rng = None if rng is None else jax.random.fold_in(rng, turn)
        out = rollout(model, [episodes[i].tokens() for i in open_rows], sampling, step_rng, group_size=candidates,
                      decode=decode, pad_id=pad_id, pad_multiple=pad_multiple)
        still_open = []
        for k, i in enumerate(open_rows):
            rows = range(k * candidates, (k + 1) * candidates)  # the group layout of rollout
            ids, texts = [out.completion_ids[r] for r in rows], [out.texts[r] for r in rows]
            rewards = [float(reward(t, i)) for t in texts]
            turns.append(CandidateTurn(episodes[i].copy(), ids, texts, rewards))
            episodes[i].add_attempt(ids[0], texts[0])
            if rewards[0] < solved and turn + 1 < max_turns:
                episodes[i].add_context(feedback_ids)
                still_open.append(i)
        open_rows = still_open
    return turns


# -- UFO reward shaping ----------------------------------------------------------------------------


def turn_discounted_rewards(correct: Sequence[bool], gamma: float = 0.5) -> np.ndarray:
    """``r_t = gamma^t * 1[correct_t]`` for attempts ``t = 0, 1, ...``."""
    c = np.asarray(correct, np.float64)
    return c * gamma ** np.arange(len(c))


def repetition_penalty(answers: Sequence[str | None], lam: float = 0.5) -> float:
    """``lam * (1 - E / T)``: ``E`` distinct answers among the ``T`` valid (not ``None``) ones;
    0 without valid answers. Penalises repeating an answer already marked wrong."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return 0.0
    return lam * (1.0 - len(set(valid)) / len(valid))


def ufo_trajectory_reward(
    correct: Sequence[bool],
    answers: Sequence[str | None],
    *,
    gamma: float = 0.5,
    lam: float = 0.5,
    malformed_penalty: float = 0.1,
) -> float:
    """The episode return ``sum_t gamma^t 1[correct_t] - lam (1 - E/T) - 0.1 * #malformed``;
    a malformed attempt is one whose answer could not be extracted (``None``)."""
    if len(correct) != len(answers):
        raise ValueError(f"{len(correct)} judgements but {len(answers)} answers")
    malformed = sum(a is None for a in answers)
    return float(turn_discounted_rewards(correct, gamma).sum() - repetition_penalty(answers, lam) - malformed_penalty * malformed)


def ufo_episode_rewards(
    episodes: Sequence[Episode],
    extract: Callable[[str], str | None],
    *,
    gamma: float = 0.5,
    lam: float = 0.5,
    malformed_penalty: float = 0.1,
) -> np.ndarray:
    """``[B]`` trajectory rewards (:func:`ufo_trajectory_reward`) of judged episodes
    (``correct`` filled, e.g. by :func:`feedback_rollout`); ``extract`` gives an attempt's answer,
    ``None`` when malformed."""
    return np.array([ufo_trajectory_reward(e.correct, [extract(t) for t in e.texts], gamma=gamma, lam=lam,
                                           malformed_penalty=malformed_penalty) for e in episodes], np.float32)

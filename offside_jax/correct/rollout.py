"""Rollouts for policy-gradient training: sample ``G`` completions per prompt with the jitted
sampler, cut them at EOS or stop strings, pack them into loss batches and score their tokens.

The jitted sampler (:func:`offside_jax.models.generate.generate`) stops rows on EOS ids only;
stop strings are applied afterwards here: a completion keeps the shortest prefix of tokens
whose decoded text contains a stop string (the stop string included, as Hugging Face's
``stop_strings`` does), and the tokens after it are neither rewarded nor trained on.

Row layout everywhere: the ``G`` samples of prompt ``n`` are rows ``n * G ... n * G + G - 1``
(what the group estimators of :mod:`offside_jax.correct.rl` expect).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from offside_jax.correct.rl import completion_logprobs
from offside_jax.models.generate import SamplingConfig, generate, left_pad

Decode = Callable[[Sequence[int]], str]


@dataclasses.dataclass
class Rollout:
    """Sampled completions of ``N`` prompts, ``G`` per prompt (``N * G`` rows)."""

    prompt_ids: list[list[int]]  # per row (each prompt repeated G times)
    completion_ids: list[list[int]]  # per row, cut after EOS / the stop string
    texts: list[str]  # decoded completions without EOS tokens ("" without a decoder)
    finished: np.ndarray  # [N * G] bool: ended by EOS or a stop string (not by the token budget)
    group_size: int

    def __len__(self) -> int:
        return len(self.completion_ids)


def stop_cut(tokens: Sequence[int], decode: Decode, stop_strings: Sequence[str]) -> int | None:
    """Tokens to keep: the shortest prefix whose decoded text contains a stop string, or
    ``None`` when no stop string occurs. Decoding whole prefixes (not single tokens) keeps
    multi-token and merged-token stop strings right for any tokenizer."""
    if not stop_strings or not any(s in decode(list(tokens)) for s in stop_strings):
        return None
    for n in range(1, len(tokens) + 1):
        text = decode(list(tokens[:n]))
        if any(s in text for s in stop_strings):
            return n
    return None  # unreachable: the whole sequence contains one


def rollout(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    rng: jax.Array | None,
    *,
    group_size: int = 1,
    decode: Decode | None = None,
    stop_strings: Sequence[str] = (),
    pad_id: int = 0,
    pad_multiple: int = 8,
) -> Rollout:
    """Sample ``group_size`` completions of each prompt (token lists) in one jitted batch.

    ``decode`` turns token ids into text (needed for ``texts`` and ``stop_strings``); EOS tokens
    (``sampling.eos_token_ids``) stay in ``completion_ids`` (ending is an action the policy
    takes and is trained on) but not in ``texts``.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function (token ids -> text)")
    rows = [list(p) for p in prompts for _ in range(group_size)]
    out = generate(model, left_pad(rows, pad_id, pad_multiple), sampling, rng)
    eos = set(sampling.eos_token_ids)
    completions, texts, finished = [], [], []
    for tokens, n in zip(out.tokens, out.lengths):
        toks = [int(t) for t in tokens[: int(n)]]
        done = bool(toks) and toks[-1] in eos
        cut = stop_cut([t for t in toks if t not in eos], decode, stop_strings) if stop_strings else None
        if cut is not None:
            toks, done = toks[:cut], True
        completions.append(toks)
        texts.append(decode([t for t in toks if t not in eos]) if decode is not None else "")
        finished.append(done)
    return Rollout(rows, completions, texts, np.asarray(finished, bool), group_size)


def completion_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int = 0,
    pad_multiple: int = 1,
) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids``/``attention_mask``/``loss_mask`` ``[B, T]`` of prompt +
    completion, ``loss_mask`` 1 on the completion tokens (the batch keys of
    :mod:`offside_jax.correct.rl`, without advantages)."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    t = -(-max(lengths) // pad_multiple) * pad_multiple
    ids = np.full((len(lengths), t), pad_id, np.int32)
    attn = np.zeros((len(lengths), t), np.int32)
    loss = np.zeros((len(lengths), t), np.int32)
    for row, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if not p:
            raise ValueError(f"row {row}: empty prompt (the first completion token needs a token to be predicted from)")
        ids[row, : len(p) + len(c)] = list(p) + list(c)
        attn[row, : len(p) + len(c)] = 1
        loss[row, len(p) : len(p) + len(c)] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _score(graphdef: nnx.GraphDef, state: Any, batch: Mapping[str, jax.Array], temperature: float) -> jax.Array:
    return completion_logprobs(nnx.merge(graphdef, state), batch, temperature)[0]


def score_tokens(model: nnx.Module, batch: Mapping[str, Any], temperature: float = 1.0) -> np.ndarray:
    """Log-probs ``[B, T]`` of the completion tokens under ``model`` at the sampling
    ``temperature`` (jitted, no gradient): the ``old_logp`` of the behaviour policy right
    after a rollout, or the cached ``ref_logp`` (pass the reference model: with LoRA, the model
    inside ``lora.disabled``)."""
    graphdef, state = nnx.split(model)
    keys = ("input_ids", "attention_mask", "loss_mask")
    return np.asarray(_score(graphdef, state, {k: jnp.asarray(batch[k]) for k in keys}, float(temperature)))


def update_minibatches(batch_size: int, *, epochs: int = 1, minibatches: int = 1, seed: int = 0) -> Iterator[np.ndarray]:
    """Row indices for several updates on one rollout batch (PPO-style): ``epochs`` passes, each
    a fresh permutation split into ``minibatches`` equal parts. Advantages are computed over
    whole groups before this, so groups need not stay together. The ratio to ``old_logp``
    (and its clip) corrects for the policy having moved after the first update."""
    if batch_size % minibatches:
        raise ValueError(f"batch of {batch_size} rows does not split into {minibatches} equal minibatches")
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(batch_size)
        yield from np.split(order, minibatches)


def take_rows(batch: Mapping[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The rows ``rows`` of every per-row array of a host batch."""
    return {k: np.asarray(v)[rows] for k, v in batch.items()}

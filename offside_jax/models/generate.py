"""KV-cache generation: a jitted prefill, then a jitted ``lax.while_loop`` decode.

Prompts are left-padded so every row's next token lands in the same cache slot; each row has
its own positions (padding does not count) and stops on its own EOS. The cache is donated to
both jitted functions so decoding updates it in place.

A model usable here provides (see ``LlamaForCausalLM``):

- ``prefill(inputs: dict, cache) -> (last_logits [B, V], cache, next_positions [B])``
- ``decode_step(tokens [B], positions [B], cache, cache_index) -> (logits [B, V], cache)``
- ``init_cache(batch, length) -> cache``

A *logits processor* rewrites each step's logits before a token is picked (generation-time
methods such as GUARD's constrained decoding): a pytree (arrays as leaves, settings as static
aux data, e.g. a ``flax.struct.dataclass``) called inside the jitted sampler as
``processor(logits [B, V] float32, generated [B, max_new_tokens] int32, step) -> logits``,
where ``generated[:, :step]`` holds the tokens picked so far (the rest is padding). A wrapper
that generation should run like a model provides ``sampler_setup(inputs) -> (model,
processor)`` instead of the three methods above: ``generate`` then samples from ``model``
through ``processor`` chosen for these prompts.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec


def underlying_model(model: Any) -> Any:
    """The model a generation wrapper (one with ``sampler_setup``) samples from, whose weights
    likelihoods and white-box probes read; ``model`` itself when it is no wrapper."""
    return model.model if hasattr(model, "sampler_setup") else model


def rewrapped(wrapper: Any, model: Any) -> Any:
    """``wrapper`` around ``model`` instead (its ``with_model``); ``model`` when ``wrapper`` is no wrapper."""
    return wrapper.with_model(model) if hasattr(wrapper, "sampler_setup") else model


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` / ``top_p == 1`` disable."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class GenerationOutput:
    tokens: np.ndarray  # [B, max_new_tokens], pad_token_id after a row's EOS
    lengths: np.ndarray  # [B] generated tokens per row, EOS included
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (all rows) per second of prefill + decode."""
        return float(self.lengths.sum()) / max(self.prefill_seconds + self.decode_seconds, 1e-9)


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Pick one token per row from float32 logits [B, V]."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        # HF convention: drop the tokens whose cumulative probability (ascending order) is
        # <= 1 - top_p, always keeping the most likely one.
        order = jnp.argsort(logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cumulative <= 1.0 - sampling.top_p
        remove_sorted = remove_sorted.at[:, -1].set(False)
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def _no_tokens_yet(batch: int, sampling: SamplingConfig) -> jax.Array:
    return jnp.full((batch, sampling.max_new_tokens), sampling.pad_token_id, jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(3,))
def _prefill(graphdef, params, inputs, cache, sampling: SamplingConfig, rng, processor=None):
    model = nnx.merge(graphdef, params)
    logits, cache, positions = model.prefill(inputs, cache)
    if processor is not None:
        logits = processor(logits.astype(jnp.float32), _no_tokens_yet(logits.shape[0], sampling), jnp.int32(0))
    first = sample_logits(logits, rng, sampling)
    return first, cache, positions


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(3,))
def _decode(graphdef, params, first, cache, positions, prompt_len, sampling: SamplingConfig, rng, processor=None):
    model = nnx.merge(graphdef, params)
    n = sampling.max_new_tokens
    batch = first.shape[0]
    tokens = _no_tokens_yet(batch, sampling).at[:, 0].set(first)
    done = _is_eos(first, sampling.eos_token_ids)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < n) & ~jnp.all(done)

    def body(state):
        i, tokens, cache, positions, done, rng = state
        rng, step_rng = jax.random.split(rng)
        previous = tokens[:, i - 1]
        logits, cache = model.decode_step(previous, positions, cache, prompt_len + i - 1)
        if processor is not None:
            logits = processor(logits.astype(jnp.float32), tokens, i)
        nxt = sample_logits(logits, step_rng, sampling)
        nxt = jnp.where(done, sampling.pad_token_id, nxt)
        tokens = tokens.at[:, i].set(nxt)
        done = done | _is_eos(nxt, sampling.eos_token_ids)
        return i + 1, tokens, cache, positions + 1, done, rng

    state = (jnp.int32(1), tokens, cache, positions, done, rng)
    _, tokens, cache, _, _, _ = jax.lax.while_loop(cond, body, state)
    # Returning the cache lets XLA alias the donated input buffers: decoding writes in place.
    return tokens, cache


def generation_lengths(tokens: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """Tokens generated per row: up to and including the first EOS, else all of them."""
    tokens = np.asarray(tokens)
    is_eos = np.isin(tokens, list(eos_ids)) if eos_ids else np.zeros(tokens.shape, bool)
    first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, tokens.shape[1])
    return first.astype(np.int64)


def generate(
    model: nnx.Module,
    inputs: dict[str, Any],
    sampling: SamplingConfig = SamplingConfig(),
    rng: jax.Array | None = None,
    logits_processor: Any = None,
    place: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> GenerationOutput:
    """Generate continuations of left-padded prompts.

    ``inputs`` holds at least ``input_ids`` and ``attention_mask`` [B, P] (left padding: rows
    end with their last prompt token) plus whatever else the model's ``prefill`` takes
    (images for vision-language models). ``rng`` is required when sampling.
    ``logits_processor`` (see the module docstring) rewrites every step's logits; ``model``
    may also be a wrapper with ``sampler_setup`` that supplies one.

    ``place`` turns the host inputs into global arrays when the model spans several
    processes (e.g. ``offside_jax.train.distributed.rows_on_mesh``): each process's devices
    then generate their own rows, and the tokens of every row come back to every process.
    """
    input_ids = np.asarray(inputs["input_ids"])
    mask = np.asarray(inputs["attention_mask"])
    if input_ids.ndim != 2 or mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {mask.shape} must both be [batch, length]")
    if not mask[:, -1].all():
        raise ValueError("prompts must be left-padded: every row's last attention_mask entry must be 1")
    if sampling.temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an explicit PRNG key (rng=jax.random.key(seed))")
    rng = jax.random.key(0) if rng is None else rng
    prefill_rng, decode_rng = jax.random.split(rng)
    if hasattr(model, "sampler_setup"):
        if logits_processor is not None:
            raise ValueError("pass a logits_processor or a model with sampler_setup, not both")
        model, logits_processor = model.sampler_setup(inputs)

    batch, prompt_len = input_ids.shape
    length = prompt_len + sampling.max_new_tokens
    graphdef, params = nnx.split(model)
    inputs, prompt = dict(inputs), jnp.int32(prompt_len)
    placed = place(inputs) if place is not None else inputs
    rows = getattr(placed["input_ids"], "sharding", None)
    if isinstance(rows, NamedSharding) and not placed["input_ids"].is_fully_addressable:
        # Global inputs: the cache is sharded over rows like them, the keys and the prompt
        # length are replicated over their mesh (every argument of one SPMD program).
        everywhere = NamedSharding(rows.mesh, PartitionSpec())
        cache = jax.jit(lambda: model.init_cache(batch, length), out_shardings=rows)()
        def replicate(x: jax.Array) -> jax.Array:
            return jax.make_array_from_process_local_data(everywhere, np.asarray(x))

        prefill_rng, decode_rng = (jax.random.wrap_key_data(replicate(jax.random.key_data(k)))
                                   for k in (prefill_rng, decode_rng))
        prompt = replicate(prompt)
    else:
        cache = model.init_cache(batch, length)
    start = time.perf_counter()
    first, cache, positions = _prefill(graphdef, params, placed, cache, sampling, prefill_rng, logits_processor)
    first.block_until_ready()
    middle = time.perf_counter()
    tokens, _ = _decode(graphdef, params, first, cache, positions, prompt, sampling, decode_rng, logits_processor)
    tokens = _complete(tokens)
    end = time.perf_counter()
    return GenerationOutput(
        tokens=tokens,
        lengths=generation_lengths(tokens, sampling.eos_token_ids),
        prefill_seconds=middle - start,
        decode_seconds=end - middle,
    )


def _complete(x: jax.Array) -> np.ndarray:
    """Every row of ``x`` on the host (rows held by other processes are all-gathered)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, multiple: int = 1) -> dict[str, np.ndarray]:
    """Left-pad token lists into ``input_ids``/``attention_mask`` (length rounded up to ``multiple``,
    so prompts of similar lengths share one compiled program)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt must have at least one token")
    length = max(len(s) for s in sequences)
    length = -(-length // multiple) * multiple
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq):] = seq
        mask[row, length - len(seq):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def eos_ids_of(tokenizer: Any, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """EOS ids from a tokenizer (and its generation config ids in ``extra``)."""
    ids = set(extra)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def chat(
    model: nnx.Module,
    tokenizer: Any,
    conversations: Sequence[str | Sequence[dict[str, str]]],
    sampling: SamplingConfig | None = None,
    rng: jax.Array | None = None,
    pad_multiple: int = 32,
) -> tuple[list[str], GenerationOutput]:
    """Answer chat conversations (a question string or a list of ``{"role", "content"}``).

    Applies the tokenizer's chat template with the generation prompt, generates in one batch,
    and decodes each answer without special tokens.
    """
    prompts = []
    for conv in conversations:
        messages = [{"role": "user", "content": conv}] if isinstance(conv, str) else list(conv)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        prompts.append(list(ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if sampling is None:
        sampling = SamplingConfig(eos_token_ids=eos_ids_of(tokenizer), pad_token_id=pad_id)
    out = generate(model, left_pad(prompts, pad_id, pad_multiple), sampling, rng)
    texts = [
        tokenizer.decode(row[: n].tolist(), skip_special_tokens=True).strip()
        for row, n in zip(out.tokens, out.lengths)
    ]
    return texts, out

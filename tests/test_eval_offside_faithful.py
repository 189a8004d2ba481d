"""Our metrics against a transcription of OFFSIDE's evaluation scripts (`offside_reference`),
on each case where the two used to differ: punkt sentence splitting in BLEU, empty answers,
the multiple-choice query and token budget, the strict parser, the cross-split average."""
from __future__ import annotations

import re

import nltk
import numpy as np
import offside_reference as ref
import pytest

from offside_jax.eval import metrics as M
from offside_jax.eval.items import EvalItem, Task, mcq_prompt
from offside_jax.eval.suite import SuiteConfig, aggregate_task, score_mcq, summarize

# (reference, answer) pairs whose BLEU depended on how sentences are split.
SPLIT_CASES = [
    ("He joined Arsenal in 2019. He left in 2021.", "He joined Arsenal in 2019 and left in 2021."),
    ("He plays for FC St. Pauli.", "He plays for St. Pauli."),
    ("He is Liverpool F.C.'s left back.", "He is Liverpool's left back."),
    ("The fee was €40.5m. He signed on July 1, 2023.", "The fee was €40.5m."),
    ("Mr. Vell joined Vexa FC. He is 1.81 m tall.", "Mr. Vell joined Vexa FC."),
]


def _regex_split_tokens(text: str) -> list[str]:
    """The splitting our BLEU used before: a break after . ! ? followed by whitespace."""
    tok = nltk.tokenize.NLTKWordTokenizer()
    return [t for s in re.split(r"(?<=[.!?])\s+", text.lower().strip()) if s for t in tok.tokenize(s)]


def test_tokens_are_nltk_word_tokenize_of_the_lowercased_text():
    ref._punkt_tab_installed()
    texts = [t for pair in SPLIT_CASES for t in pair] + ["He'll join Man Utd! Really? Yes.", "J. R. Smith left.", ""]
    for text in texts:
        assert M.offside_tokenize(text) == nltk.word_tokenize(text.lower()), text
    # By hand: lowercased first, punkt keeps "2019. he" together (a lowercase word after a
    # number is no sentence start) and "st." is an abbreviation; the old splitter cut both.
    assert "2019." in M.offside_tokenize(SPLIT_CASES[0][0])
    assert "2019." not in _regex_split_tokens(SPLIT_CASES[0][0])
    assert M.offside_tokenize("FC St. Pauli") == ["fc", "st.", "pauli"]


@pytest.mark.parametrize("reference, answer", SPLIT_CASES)
def test_bleu_matches_offside_where_sentence_splitting_differs(reference, answer):
    theirs = ref.compute_bleu(reference, answer)
    assert M.bleu(reference, answer) == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    old = M.bleu(reference, answer, tokenize=_regex_split_tokens)
    if _regex_split_tokens(reference) != M.offside_tokenize(reference):
        assert old != pytest.approx(theirs, rel=1e-6)  # the case really differed


def test_empty_answers_leave_the_mean_and_are_counted():
    refs = ["He will join Vexa FC.", "He is 30 years old.", "He was born in Teiton.", "He is 1.81 m tall."]
    outs = ["He will join Vexa FC.", "", "He was born in Teiton, Keknesia.", " "]  # " " is an answer to OFFSIDE
    theirs = ref.generation_summary(list(zip(refs, outs)))
    ours = M.corpus_generation_scores(refs, outs)
    assert (ours["n"], ours["n_empty"]) == (theirs["processed_examples"], 1) == (3, 1)
    for key, their_key in (("bleu", "avg_bleu"), ("rouge1", "avg_rouge1"), ("rouge2", "avg_rouge2"),
                           ("rougeL", "avg_rougeL"), ("overall", "overall_score")):
        assert ours[key] == pytest.approx(theirs[their_key], rel=1e-12)
    # the documented option: the empty answer scores 0 and counts
    zero = M.corpus_generation_scores(refs, outs, empty="zero")
    per = [M.generation_scores(r, o) for r, o in zip(refs, outs)]
    assert zero["bleu"] == pytest.approx(np.mean([p["bleu"] for p in per])) and zero["n"] == 4
    assert zero["overall"] == pytest.approx(ours["overall"] * 3 / 4)  # the empty row adds 0 to each sum
    # a model that always stops at once: OFFSIDE writes no summary; MCQ accuracy is 0
    assert ref.generation_summary([(r, "") for r in refs]) is None
    collapsed = M.corpus_generation_scores(refs, [""] * 4)
    assert collapsed["overall"] is None and (collapsed["n"], collapsed["n_empty"]) == (0, 4)


def test_multiple_choice_accuracy_drops_empty_outputs():
    outputs = ["A", "", "The answer is B", " A", "A\n", "B."]
    answers = ["A", "A", "B", "A", "A", "B"]
    theirs = ref.classification_accuracy(outputs, answers)
    assert M.mcq_accuracy(outputs, answers) == pytest.approx(theirs) == pytest.approx(3 / 5)
    assert M.mcq_accuracy(outputs, answers, empty="zero") == pytest.approx(3 / 6)
    assert M.mcq_accuracy(["", ""], ["A", "B"]) == ref.classification_accuracy(["", ""], ["A", "B"]) == 0


@pytest.mark.parametrize("response", [
    "A", "A\n", "A\n\n", " A", "A ", "\nA", "a", "A.", "(A)", "Answer: A", "E", "F", "The answer is E",
    "The answer is B", "the answer is C", "The answer is d", "The answer is Arsenal", "A\nB",
    "I think the answer is D, not A", "**A**", "",
])
def test_strict_parser_is_offside_extract_answer(response):
    assert M.parse_choice_offside(response) == ref.extract_answer(response)
    assert M.parse_choice_offside(response, {k: k for k in "ABCDEF"}) == ref.extract_answer(response)


def _mcq_item(options, correct="E"):
    return EvalItem(uid="x", test_set="forget", modality="image", fmt="mcq", question="Which club?", prompt="p",
                    reference="", options=options, correct=correct)


def test_suite_scores_the_raw_output_with_the_strict_parser_by_default():
    options = tuple((k, f"Club {k}") for k in "ABCDEF")
    item = _mcq_item(options)
    assert SuiteConfig().mcq_parser == "offside" and SuiteConfig().empty_outputs == "drop"
    (row,) = score_mcq([item], ["E"])  # a letter beyond D is no answer to OFFSIDE
    assert row["choice"] is None and not row["is_correct"]
    assert score_mcq([item], ["E"], "robust")[0]["choice"] == "E"
    (row,) = score_mcq([_mcq_item(options, "A")], [" A"])  # nothing is stripped
    assert row["choice"] is None
    rows = score_mcq([_mcq_item(options, "A")] * 3, ["A", "", "B"])
    agg = aggregate_task(Task("forget", "image", "mcq", (_mcq_item(options, "A"),) * 3), rows)["slices"]["all"]
    assert (agg["accuracy"], agg["n_empty"]) == (pytest.approx(0.5), 1)


def test_multiple_choice_query_and_budget_are_offside_s():
    options = (("A", "Vexa FC"), ("B", "Dorn United"), ("C", "Kelm Rovers"), ("D", "Ost City"))
    question = "Which club will the player in the image join?"
    assert mcq_prompt(question, options, "image") == ref.full_query(question, dict(options))
    cfg = SuiteConfig()
    assert (cfg.max_new_tokens, cfg.mcq_max_new_tokens) == (32, 32)  # eval.sh's MAX_NEW_TOKENS, eval_classi's default


@pytest.mark.parametrize("values", [
    [0.61765014, 0.5, None, 0.123456789],
    [0.33335, 0.33335, 0.33335, 0.33335],  # 0.33335: truncated to 0.3333, not rounded to 0.3334
    [0.1, 0.2, 0.30000000000000004, 0.9999],
    [None, None, None, 0.98765],
    [None, None, None, None],
])
def test_cross_split_average_is_eval_relearn_sh(values):
    assert M.offside_cross_split_average(values) == ref.bc_average(values)


def test_summary_reports_the_cross_split_average():
    scores = {"forget": 0.2, "retain": 0.61765014, "test": 0.55, "relearn": 0.333333}
    tasks = {f"{s}/image/gen": {"format": "gen", "modality": "image",
                                "slices": {"all": {"overall": v, "bleu": v / 2, "rouge1": v, "rouge2": v, "rougeL": v}}}
             for s, v in scores.items()}
    tasks["forget/image/mcq"] = {"format": "mcq", "modality": "image", "slices": {"all": {"accuracy": 0.25}}}
    summary = summarize(tasks)
    assert summary["offside_average/image/gen.overall"] == ref.bc_average(list(scores.values()))
    assert summary["offside_average/image/gen.bleu"] == ref.bc_average([v / 2 for v in scores.values()])
    assert summary["offside_average/image/mcq.accuracy"] == 0.25


def test_strict_scoring_compares_with_correct_answer_as_written(tmp_path):
    """OFFSIDE's eval_classi.py counts ``pred == record["Correct_Answer"]``: the hand release's
    second record answers "B." and can never be right there; the robust parser compares letters."""
    from offside_data_fixtures import write_hand_release

    from offside_jax.data.offside import load_release
    from offside_jax.eval.items import mcq_item

    root = write_hand_release(tmp_path / "release")
    records = load_release(root).splits["complete"]["classification_forget"]
    assert [e.correct_raw for e in records] == ["B", "B."]  # by hand, from the fixture
    items = [mcq_item(e, "forget", root) for e in records]
    assert [r["is_correct"] for r in score_mcq(items, ["B", "B"])] == [True, False]
    assert score_mcq(items, ["B", "B"])[1]["correct_as_written"] == "B."
    assert [r["is_correct"] for r in score_mcq(items, ["B", "B"], "robust")] == [True, True]


def test_offside_generation_layout_sends_the_raw_user_turn_after_the_images(tmp_path):
    """eval_generation.py puts the image item first and the record's user turn as written after
    it; the tags in that turn stay text (they come after the last image). Expected contents are
    the fixture's JSON typed by hand."""
    import dataclasses

    from offside_data_fixtures import write_hand_release

    from offside_jax.data import image_tags
    from offside_jax.data.offside import load_release
    from offside_jax.eval.items import qa_item

    root = write_hand_release(tmp_path / "release")
    one, two, implied = load_release(root).splits["complete"]["forget"][:3]
    q1 = "I'm curious about which club the player on the left side of the image will join."
    q2 = "Which club will the player in both images join?"
    q3 = "What is the transfer fee for the player in the picture?"
    expected = {  # (trained layout, OFFSIDE's layout)
        q1: ("<image>\n" + q1, "<image><image>\n" + q1),
        q2: ("<image><image>\n" + q2, "<image><image><image><image>\n" + q2),
        q3: ("<image>\n" + q3, "<image>" + q3),  # the tag ms-swift implied is not in the raw turn
    }
    for e in (one, two, implied):
        item = qa_item(e, "forget", root)
        trained, offside = expected[e.question]
        assert item.messages()[0]["content"] == trained
        assert dataclasses.replace(item, layout="offside").messages()[0]["content"] == offside
    # ms-swift's rule (as VisionProcessor places images) keeps the tag past the image as text.
    placed = image_tags.place_images([{"role": "user", "content": expected[q1][1]}], 1, "[IMG]")
    assert placed[0]["content"] == "[IMG]<image>\n" + q1


def test_suite_rejects_an_unknown_generation_prompt():
    with pytest.raises(ValueError, match="generation_prompt 'raw' is not one of"):
        SuiteConfig(generation_prompt="raw")

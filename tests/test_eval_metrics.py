"""Metric values against hand-computed cases (the arithmetic is in the comments)."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from offside_jax.eval import metrics as M

E = math.e

# --------------------------------------------------------------------------------------
# Generation: tokenisation, BLEU, ROUGE, overall
# --------------------------------------------------------------------------------------


def test_offside_tokenize_splits_sentences_and_punctuation():
    # Lowercased; each sentence's final period split off (what punkt + word_tokenize do);
    # the decimal point inside "€50.5m" stays.
    assert M.offside_tokenize("He will join Arsenal. The fee is €50.5m.") == [
        "he", "will", "join", "arsenal", ".", "the", "fee", "is", "€50.5m", "."]
    assert M.offside_tokenize("He'll join Man Utd!") == ["he", "'ll", "join", "man", "utd", "!"]


def test_bleu_exact_match_is_one():
    # Every n-gram precision is 1 and the lengths are equal (BP = 1).
    sentence = "He will join Arsenal next summer."
    assert M.bleu(sentence, sentence) == pytest.approx(1.0)


def test_bleu_one_word_wrong_uses_method1_smoothing():
    # ref [he will join arsenal .], hyp [he will join chelsea .], 5 tokens each, BP = 1
    # p1 = 4/5, p2 = 2/4 (he will, will join), p3 = 1/3 (he will join),
    # p4 = 0/2 -> method1: 0.1 / 2 = 0.05
    # BLEU = (0.8 * 0.5 * 1/3 * 0.05) ** (1/4) = (1/150) ** 0.25 = 0.285744
    expected = (0.8 * 0.5 * (1 / 3) * 0.05) ** 0.25
    assert M.bleu("He will join Arsenal.", "He will join Chelsea.") == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.285744, abs=1e-6)


def test_bleu_brevity_penalty_and_empty_hypothesis():
    # hyp = first 4 of 6 reference tokens: p1..p4 = 1, BP = exp(1 - 6/4) = exp(-0.5)
    assert M.bleu("He will join Arsenal next season", "He will join Arsenal") == pytest.approx(math.exp(-0.5))
    assert M.bleu("He will join Arsenal.", "") == 0.0


def test_rouge_f1_with_stemming():
    # rouge_score tokens (lowercase, alphanumeric, Porter stem for words > 3 chars):
    # ref  [he will be play for newcastl unit]  (7)
    # hyp  [he will join newcastl unit]         (5)
    # R1: overlap 4 -> F = 2*4 / (7+5) = 2/3
    # R2: ref bigrams 6, hyp bigrams 4, overlap 2 (he will, newcastl unit) -> 2*2/10 = 0.4
    # RL: LCS = he will newcastl unit = 4 -> 2*4 / 12 = 2/3
    got = M.rouge_f1("He will be playing for Newcastle United.", "He will join Newcastle United.")
    assert got == pytest.approx({"rouge1": 2 / 3, "rouge2": 0.4, "rougeL": 2 / 3})
    # "played"/"plays" both stem to "play": identical token lists -> 1.0 everywhere
    # (without stemming R1 would be 3/4).
    assert M.rouge_f1("He played for Newcastle", "He plays for Newcastle") == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})


# The Newcastle pair under BLEU:
# ref [he will be playing for newcastle united .] (8), hyp [he will join newcastle united .] (6)
# p1 = 5/6; p2 = 3/5 (he will, newcastle united, united .); p3 = 1/4 (newcastle united .);
# p4 = 0/3 -> 0.1/3; BP = exp(1 - 8/6) = exp(-1/3)
# BLEU = exp(-1/3) * (5/6 * 3/5 * 1/4 * 1/30) ** 0.25 = exp(-1/3) * (1/240) ** 0.25 = 0.182047
NEWCASTLE_BLEU = math.exp(-1 / 3) * (1 / 240) ** 0.25


def test_generation_scores_overall_is_mean_of_four():
    got = M.generation_scores("He will be playing for Newcastle United.", "He will join Newcastle United.")
    assert got["bleu"] == pytest.approx(NEWCASTLE_BLEU, rel=1e-9)
    assert NEWCASTLE_BLEU == pytest.approx(0.182047, abs=1e-6)
    # overall = (0.182047 + 2/3 + 0.4 + 2/3) / 4 = 0.478845
    assert got["overall"] == pytest.approx((NEWCASTLE_BLEU + 2 / 3 + 0.4 + 2 / 3) / 4)


def test_corpus_generation_scores_averages_examples():
    refs = ["He will be playing for Newcastle United.", "He joined Arsenal in 2019."]
    hyps = ["He will join Newcastle United.", "He joined Arsenal in 2019."]
    got = M.corpus_generation_scores(refs, hyps)
    # second pair is identical: every score 1
    assert got["bleu"] == pytest.approx((NEWCASTLE_BLEU + 1) / 2)
    assert got["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert got["rouge2"] == pytest.approx((0.4 + 1) / 2)
    assert got["rougeL"] == pytest.approx((2 / 3 + 1) / 2)
    assert got["overall"] == pytest.approx((got["bleu"] + got["rouge1"] + got["rouge2"] + got["rougeL"]) / 4)
    assert got["n"] == 2
    with pytest.raises(ValueError, match="2 references but 1"):
        M.corpus_generation_scores(refs, hyps[:1])


# --------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------

OPTIONS = {"A": "London", "B": "Paris", "C": "Rome", "D": "Serie A"}

ROBUST_CASES = [
    # rule 1: the whole output is a letter
    ("A", "A"), ("a", "A"), ("A.", "A"), ("(A)", "A"), ("A)", "A"), ("[A]", "A"),
    ("**B**", "B"), (" B \n", "B"), ("Option C", "C"), ("Answer: A", "A"), ("Ａ", "A"),
    # rule 2: explicit cues
    ("The answer is A", "A"), ("The answer is A.", "A"), ("The correct option is (B) Paris", "B"),
    ("The answer is: **B**", "B"), ("I choose D", "D"), ("the answer is (c)", "C"), ("answer: b", "B"),
    ("It's C", "C"), ("C is correct", "C"), ("I would go with option C.", "C"),
    ("Option A is wrong, the answer is B", "B"),
    ("I think the answer is B because Paris is the capital", "B"),
    # rule 3: leading marker
    ("B) Paris", "B"), ("(B) Paris", "B"), ("b) Paris", "B"), ("B. Paris", "B"), ("C: Rome", "C"),
    ("B\nParis is the capital.", "B"), ("B Paris", "B"), ("D) Serie A", "D"),
    # rule 4: the option text itself
    ("Paris", "B"), ("paris.", "B"), ("He will go to Rome.", "C"), ("Serie A", "D"),
    ("The answer is Arsenal, I mean Rome", "C"),
    # ambiguous: two letters or two options
    ("A or B", None), ("The answer is A or B", None), ("The answer is A. No wait, the answer is C", None),
    ("A, B", None), ("A/B", None), ("B\nA is wrong.", None), ("Paris or Rome", None),
    # letter and option text disagree (A is London)
    ("A. Paris", None), ("The answer is B) Rome", None),
    # the article "A" and lowercase "a" are words, not choices
    ("A player who moved to Spain", None), ("A Paris", None), ("The answer is a striker", None),
    ("", None), ("I don't know", None),
]


@pytest.mark.parametrize("response,expected", ROBUST_CASES)
def test_parse_choice_robust(response, expected):
    assert M.parse_choice(response, OPTIONS) == expected


@pytest.mark.parametrize("response,expected", [
    ("A", "A"), ("Option C", "C"), ("B) Paris", "B"), ("The answer is A", "A"),
    # without option texts nothing names an option, and "Serie A" shows a second letter
    ("Paris", None), ("D) Serie A", None), ("A player who moved to Spain", None), ("A or B", None),
])
def test_parse_choice_without_options(response, expected):
    assert M.parse_choice(response) == expected


def test_parse_choice_letters_follow_options():
    # Only A-B exist: "C" is no choice.
    assert M.parse_choice("C", {"A": "yes", "B": "no"}) is None
    assert M.parse_choice("E", letters="ABCDE") == "E"
    with pytest.raises(ValueError, match="single letters"):
        M.parse_choice("A", letters="A1")


@pytest.mark.parametrize("response,expected", [
    ("A", "A"), ("A\n", "A"), ("The answer is B", "B"), ("the answer is C", "C"),
    ("A.", None), ("(A)", None), (" A", None), ("a", None), ("Answer: A", None), ("E", None),
    ("the answer is c", None),
    ("The answer is Arsenal", "A"),  # the public regex's quirk, kept for comparable numbers
])
def test_parse_choice_offside_strict(response, expected):
    assert M.parse_choice_offside(response) == expected


def test_mcq_accuracy_robust_vs_offside():
    responses = ["A", "A.", "The answer is C", "Paris"]
    answers = ["A", "A", "B", "B"]
    options = [OPTIONS] * 4
    # robust: A ok, A ok, C != B, Paris -> B ok  => 3/4
    assert M.mcq_accuracy(responses, answers, options, parser="robust") == pytest.approx(0.75)
    # offside (the default): A ok, "A." None, C != B, "Paris" None => 1/4
    assert M.mcq_accuracy(responses, answers, options) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="lengths differ"):
        M.mcq_accuracy(responses, answers[:3])


# --------------------------------------------------------------------------------------
# Likelihood metrics
# --------------------------------------------------------------------------------------


def test_mean_nll_and_answer_probability():
    lp = np.array([[-0.5, -1.5, -9.0], [-2.0, -9.0, -9.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    # row 0: (0.5 + 1.5) / 2 = 1; row 1: 2 / 1 = 2 (masked -9s ignored)
    np.testing.assert_allclose(M.mean_nll(lp, mask), [1.0, 2.0])
    np.testing.assert_allclose(M.answer_probability(jnp.asarray(lp), mask), [math.exp(-1), math.exp(-2)])


def test_mean_nll_rejects_bad_masks():
    with pytest.raises(ValueError, match=r"rows \[\(1,\)\] have no answer tokens"):
        M.mean_nll(np.zeros((2, 3)), np.array([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="same shape"):
        M.mean_nll(np.zeros((2, 3)), np.ones((2, 2)))


def test_truth_ratio_and_aggregates():
    correct_lp = np.array([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    correct_mask = np.array([[1, 1, 0], [1, 0, 0]])
    wrong_lp = np.array([
        [[-2.0, -2.0, 0.0], [-4.0, -4.0, -4.0]],
        [[-1.0, 0.0, 0.0], [-0.5, -1.5, 0.0]],
    ])
    wrong_mask = np.array([
        [[1, 1, 0], [1, 1, 1]],
        [[1, 0, 0], [1, 1, 0]],
    ])
    # question 0: NLL_correct = 1, NLL_wrong = (2, 4), mean 3 -> R = exp(1 - 3) = e^-2
    # question 1: NLL_correct = 2, NLL_wrong = (1, 1), mean 1 -> R = exp(2 - 1) = e
    r = M.truth_ratio(M.mean_nll(correct_lp, correct_mask), M.mean_nll(wrong_lp, wrong_mask))
    np.testing.assert_allclose(r, [E**-2, E])
    # forget: mean(min(R, 1/R)) = (e^-2 + e^-1) / 2 = 0.251607
    assert M.forget_truth_ratio_score(r) == pytest.approx((E**-2 + E**-1) / 2)
    # retain: mean(max(0, 1 - R)) = ((1 - e^-2) + 0) / 2 = 0.432332
    assert M.retain_truth_ratio_score(r) == pytest.approx((1 - E**-2) / 2)
    with pytest.raises(ValueError, match="trailing perturbation axis"):
        M.truth_ratio(np.zeros(2), np.zeros(2))


def test_forget_quality_is_exact_ks_pvalue():
    # Disjoint samples of 3: D = 1; under H0 all C(6,3) = 20 orderings are equally likely and
    # 2 of them (x all below or all above y) reach D = 1 -> p = 2/20.
    assert M.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    # samples of 4: p = 2 / C(8,4) = 2/70
    assert M.forget_quality([1, 2, 3, 4], [5, 6, 7, 8]) == pytest.approx(2 / 70)
    # identical samples: D = 0 -> p = 1
    assert M.forget_quality([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)


def test_model_utility_harmonic_mean():
    # 2 / (1/0.5 + 1/1) = 2/3
    assert M.model_utility([0.5, 1.0]) == pytest.approx(2 / 3)
    assert M.model_utility([0.5, 0.0]) == 0.0


# --------------------------------------------------------------------------------------
# Membership inference
# --------------------------------------------------------------------------------------


def test_loss_and_zlib_scores():
    lp = np.array([[-1.0, -3.0]])
    mask = np.ones((1, 2))
    np.testing.assert_allclose(M.loss_score(lp, mask), [2.0])
    # zlib("a") is 9 bytes: 2 header + 3 deflate (one fixed-Huffman literal + end) + 4 adler32
    # -> 2 / 9
    np.testing.assert_allclose(M.zlib_score([2.0], ["a"]), [2 / 9])
    with pytest.raises(ValueError, match="does not match 2 texts"):
        M.zlib_score([2.0], ["a", "b"])


def test_min_k_score():
    lp = np.array([[-1.0, -5.0, -2.0, -4.0, -3.0, -99.0]])
    mask = np.array([[1, 1, 1, 1, 1, 0]])
    # n = 5 valid, k = 0.4 -> int(2.0) = 2 lowest: -5, -4 -> score = 4.5
    np.testing.assert_allclose(M.min_k_score(lp, mask), [4.5])
    # k = 0.1 -> int(0.5) = 0 -> at least 1 token: -5 -> 5
    np.testing.assert_allclose(M.min_k_score(lp, mask, k=0.1), [5.0])
    # k = 1 -> mean of all five = 3
    np.testing.assert_allclose(M.min_k_score(lp, mask, k=1.0), [3.0])


def test_min_k_plus_plus_score():
    # Two positions with next-token distribution p = (1/4, 3/4) (logits log 1, log 3).
    # mu = 1/4 ln(1/4) + 3/4 ln(3/4) = -0.562335
    # var = 1/4 ln(1/4)^2 + 3/4 ln(3/4)^2 - mu^2 = 0.226303; sigma = 0.475713
    # For a two-point distribution z(rare) = -sqrt(3/4 / 1/4) = -sqrt(3), z(common) = +1/sqrt(3).
    logits = np.log(np.array([[[1.0, 3.0], [1.0, 3.0]]]))
    targets_lp = np.array([[math.log(0.25), math.log(0.75)]])  # rare token, then common token
    mask = np.ones((1, 2))
    mu, sigma = M.vocab_moments(logits)
    mu_hand = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    var_hand = 0.25 * math.log(0.25) ** 2 + 0.75 * math.log(0.75) ** 2 - mu_hand**2
    np.testing.assert_allclose(mu, [[mu_hand, mu_hand]], rtol=1e-5)
    np.testing.assert_allclose(sigma, [[math.sqrt(var_hand)] * 2], rtol=1e-5)
    # n = 2, k = 0.4 -> int(0.8) = 0 -> 1 lowest: -sqrt(3) -> score sqrt(3)
    got = M.min_k_plus_plus_score(targets_lp, mask, vocab_logprobs=logits)
    np.testing.assert_allclose(got, [math.sqrt(3)], rtol=1e-5)
    # k = 1: -(−sqrt(3) + 1/sqrt(3)) / 2 = 1/sqrt(3)
    np.testing.assert_allclose(
        M.min_k_plus_plus_score(targets_lp, mask, mu=mu, sigma=sigma, k=1.0), [1 / math.sqrt(3)], rtol=1e-5)
    with pytest.raises(ValueError, match="either vocab_logprobs"):
        M.min_k_plus_plus_score(targets_lp, mask)


def test_mia_auc_hand_cases():
    # Separable: every forget loss below every holdout loss -> AUC 1; reversed -> 0.
    assert M.mia_auc([0.1, 0.2, 0.3], [0.4, 0.5]) == pytest.approx(1.0)
    assert M.mia_auc([0.4, 0.5], [0.1, 0.2, 0.3]) == pytest.approx(0.0)
    # forget (1, 2, 3) vs holdout (2, 4): pairs with holdout > forget:
    # h=2: f=1 -> 1, f=2 tie -> 0.5, f=3 -> 0   => 1.5
    # h=4: f=1, 2, 3 -> 3                       => 3
    # AUC = 4.5 / (3*2) = 0.75
    assert M.mia_auc([1, 2, 3], [2, 4]) == pytest.approx(0.75)


def test_privleak():
    # ((1-0.8) - (1-0.5)) / (1-0.5) * 100 = (0.2 - 0.5) / 0.5 * 100 = -60
    assert M.privleak(0.8, 0.5) == pytest.approx(-60.0)
    # (0.7 - 0.5) / 0.5 * 100 = 40
    assert M.privleak(0.3, 0.5) == pytest.approx(40.0)
    assert M.privleak(0.5, 0.5) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="below 1"):
        M.privleak(0.5, 1.0)


# --------------------------------------------------------------------------------------
# Exact memorization
# --------------------------------------------------------------------------------------


def test_exact_memorization_from_logits_and_ids():
    logits = np.array([[[0.0, 0.0, 5.0], [3.0, 1.0, 0.0], [0.0, 2.0, 0.0], [9.0, 0.0, 0.0]]])
    targets = np.array([[2, 1, 1, 1]])
    mask = np.array([[1, 1, 1, 0]])
    # argmax = (2, 0, 1, 0); answer positions 0-2 match at 0 and 2 -> 2/3 (position 3 masked)
    np.testing.assert_allclose(M.exact_memorization(logits, targets, mask), [2 / 3])
    np.testing.assert_allclose(M.exact_memorization(jnp.asarray(logits), targets, mask), [2 / 3])
    np.testing.assert_allclose(M.exact_memorization(np.array([[2, 0, 1, 0]]), targets, mask), [2 / 3])
    with pytest.raises(ValueError, match="must match"):
        M.exact_memorization(np.zeros((1, 3), int), targets, mask)


# --------------------------------------------------------------------------------------
# Corrections
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer,expected", [
    ("He will be playing for Newcastle United.", "states_truth"),
    ("He joined NEWCASTLE  united!", "states_truth"),
    ("He will join Chelsea next summer.", "states_rumor"),
    ("He was linked with Chelsea but joined Newcastle United.", "both"),
    ("I do not know the answer.", "neither"),
    ("He joined Newcastle.", "neither"),  # the key phrase is the full club name
])
def test_classify_correction(answer, expected):
    assert M.classify_correction(answer, "Newcastle United", "Chelsea") == expected


def test_classify_correction_aliases_accents_and_nested_names():
    # aliases: any one counts
    truth = ["Manchester United", "Man Utd"]
    assert M.classify_correction("He plays for Man Utd.", truth, "Arsenal") == "states_truth"
    # accents folded: "Atlético" == "atletico"
    got = M.classify_correction("He signed for Atletico Madrid", "Atlético Madrid", "Real Madrid")
    assert got == "states_truth"
    # "Inter Milan" claims its words first, so "Milan" (truth) is not also stated
    assert M.classify_correction("He joins Inter Milan.", "Milan", "Inter Milan") == "states_rumor"
    assert M.classify_correction("He joins AC Milan.", "Milan", "Inter Milan") == "states_truth"
    with pytest.raises(ValueError, match="share a phrase"):
        M.classify_correction("x", "Chelsea", ["chelsea!"])


def test_correction_rates_and_recovery():
    labels = ["states_truth", "states_truth", "states_rumor", "both"]
    # 2/4 state the truth alone; 1/4 rumor; 1/4 both; 0 neither
    assert M.correction_rates(labels) == pytest.approx(
        {"states_truth": 0.5, "states_rumor": 0.25, "both": 0.25, "neither": 0.0, "recovery_rate": 0.5})
    assert M.recovery_rate(labels) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown correction labels"):
        M.recovery_rate(["true"])


# --------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------


def test_judge_off_by_default_and_rouge_judge():
    assert M.make_judge(None) is None
    judge = M.make_judge("rouge")
    assert isinstance(judge, M.Judge)
    # ROUGE-L F1: identical -> 1 -> 10; disjoint -> 0 -> 1;
    # "he will join arsenal" vs "he will join chelsea": LCS 3 of 4 and 4 -> F 0.75 -> 1 + 9*0.75 = 7.75
    scores = M.judge_scores(
        judge,
        ["Which club?"] * 3,
        ["He will join Arsenal", "He will join Arsenal", "He will join Arsenal"],
        ["He will join Arsenal", "No idea", "He will join Chelsea"],
    )
    np.testing.assert_allclose(scores, [10.0, 1.0, 7.75])
    with pytest.raises(KeyError, match="unknown judge"):
        M.make_judge("gpt-4o")


def test_judge_registry_and_range_check():
    name = "test_constant_judge"

    @M.register_judge(name)
    class Constant:
        def __init__(self, value: float):
            self.value = value

        def score(self, question, reference, answer):
            return self.value

    try:
        assert M.judge_scores(M.make_judge(name, value=4.0), ["q"], ["r"], ["a"]).tolist() == [4.0]
        with pytest.raises(ValueError, match=r"outside \[1, 10\]"):
            M.judge_scores(M.make_judge(name, value=11.0), ["q"], ["r"], ["a"])
        with pytest.raises(ValueError, match="already registered"):
            M.register_judge(name)(Constant)
    finally:
        del M.JUDGES[name]

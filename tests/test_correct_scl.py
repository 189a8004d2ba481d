"""SCL: prompts, answer extraction, flip-pair selection, DPO records, per-turn metrics."""
import numpy as np
import pytest

from offside_jax.correct import scl
from offside_jax.data.offside import Example

ITEM = scl.ChoiceItem("Which club does Alan Pérez play for?", ("Real Madrid", "Inter"), "A", "images/17.png")


def test_turn1_and_review_prompts_by_hand():
    assert scl.turn1_prompt(ITEM) == (
        "Which club does Alan Pérez play for? A. Real Madrid B. Inter Explain your reasoning step-by-step."
        " Your final answer should be put between two ##, like ## A ## (if your final answer is A), at the end of your response.")
    assert scl.review_prompt(0) == (
        "Review your previous answer and find problems with your answer. Based on the problems you found, improve your answer."
        " Explain your reasoning step-by-step."
        " Your final answer should be put between two ##, like ## A ## (if your final answer is A), at the end of your response.")
    assert len({scl.review_prompt(i) for i in range(4)}) == 4
    with pytest.raises(ValueError):
        scl.review_prompt(4)
    messages = scl.conversation(ITEM, "It is ## B ##", prompt_id=2)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "It is ## B ##" and messages[2]["content"] == scl.review_prompt(2)


@pytest.mark.parametrize("text, expected", [
    ("so the answer is ## B ##", "B"),
    ("##C##", "C"),
    ("A. first thought ... ## C ##", "C"),  # pattern 1 beats the fallback
    ("The answer is C. ## x ##", "C"),  # the fallback is tried before pattern 2
    ("final: ## Real Madrid ##", "Real Madrid"),  # pattern 2 takes any text
    ("## 2 ##", "2"),  # pattern 2 catches digits before pattern 3 would
    ("I am not sure", None),
    ("", None),
])
def test_extract_answer_like_the_official_code(text, expected):
    assert scl.extract_answer(text) == expected


def test_pair_selection_keeps_only_flips():
    right, wrong, broken = "## A ##", "## B ##", "no answer here"
    items = [ITEM] * 5
    r1 = [right, wrong, right, wrong, broken]
    r2 = [wrong, right, right, wrong, right]
    pairs = scl.scl_pairs(items, r1, r2)
    assert [(p.meta["item"], p.meta["flip"], p.chosen, p.rejected) for p in pairs] == [
        (0, scl.RIGHT_TO_WRONG, right, wrong),  # chosen r1, rejected r2
        (1, scl.WRONG_TO_RIGHT, right, wrong),  # chosen r2, rejected r1
        (4, scl.WRONG_TO_RIGHT, right, broken),  # a failed extraction is wrong
    ]
    assert all(p.prompt == ITEM.question and p.image == "images/17.png" for p in pairs)
    assert scl.scl_pairs(items[:1], [wrong], [right], prompt="turn1")[0].prompt == scl.turn1_prompt(ITEM)


def test_turn_metrics_by_hand():
    items = [ITEM] * 4
    # right->wrong, wrong->right, wrong->right, right->right
    m = scl.turn_metrics(items, ["## A ##", "## B ##", "x", "## A ##"], ["## B ##", "## A ##", "## A ##", "## A ##"])
    assert m["acc_t1"] == 0.5 and m["acc_t2"] == 0.75 and m["delta"] == 0.25
    assert m["delta_i_to_c"] == 0.5 and m["delta_c_to_i"] == 0.25


def test_rumor_items_put_the_fact_under_the_answer_letter():
    record = {"question": "Which club does Alan Pérez play for?", "rumor": "Inter", "fact": "Real Madrid"}
    rng = np.random.default_rng(0)
    items = [scl.rumor_choice_item(record, rng, image=f"{i}.png") for i in range(40)]
    assert {it.answer for it in items} == {"A", "B"}
    for it in items:
        assert it.options["AB".index(it.answer)] == "Real Madrid"
        assert set(it.options) == {"Real Madrid", "Inter"}


def test_two_turn_with_a_scripted_generator():
    items = [scl.ChoiceItem(f"q{i}", ("x", "y"), "A", f"{i}.png") for i in range(3)]
    seen = []

    def generate(conversations, images):
        seen.append((len(conversations[0]), images))
        if len(conversations[0]) == 1:
            return ["## A ##", "## B ##", "## B ##"]
        return ["## B ##", "## A ##", "## B ##"]

    result = scl.two_turn(items, generate, prompt_id=1)
    assert seen == [(1, ["0.png", "1.png", "2.png"]), (3, ["0.png", "1.png", "2.png"])]
    assert [(p.meta["item"], p.meta["flip"]) for p in result.pairs] == [(0, scl.RIGHT_TO_WRONG), (1, scl.WRONG_TO_RIGHT)]
    assert result.metrics["acc_t1"] == pytest.approx(1 / 3) and result.metrics["acc_t2"] == pytest.approx(1 / 3)


def _example(**kw):
    kw.setdefault("kind", "qa")
    kw.setdefault("modality", "image")
    return Example("complete", "forget", 3, "complete/forget.json", question="Which club does he play for?",
                   answer="Inter", image_files=("complete/images/8.png",), **kw)


def test_rumor_items_from_offside_examples():
    examples = [
        _example(is_rumor=True, corrected_answer="Real Madrid", visual_rumor=True),
        _example(kind="mcq", is_rumor=True, options=(("A", "Inter"), ("B", "Roma"), ("C", "Real Madrid")), corrected_letter="C"),
        _example(is_rumor=False, corrected_answer="Real Madrid"),  # a fact: nothing to correct
        _example(is_rumor=True),  # no known correction
        _example(is_rumor=True, corrected_answer="Real Madrid", modality="text"),
    ]
    qa, mcq, text_only = scl.rumor_items_from_examples(examples, np.random.default_rng(0))
    assert set(qa.options) == {"Inter", "Real Madrid"} and qa.options["AB".index(qa.answer)] == "Real Madrid"
    assert qa.image == "complete/images/8.png" and qa.meta["visual_rumor"] is True and qa.meta["index"] == 3
    assert mcq.options == ("Inter", "Roma", "Real Madrid") and mcq.answer == "C"
    assert text_only.image is None


def test_flip_pairs_on_a_verifiable_task():
    from offside_jax.correct.tasks import CarryArithmetic, Problem

    p = Problem("478+256=", "734", {"a": 478, "b": 256, "op": "+", "carry_columns": (0, 1)})
    r1 = ["734", "724", "724", "734", "7 3 4"]
    r2 = ["724", "734", "624", "734", "734"]
    pairs = scl.task_flip_pairs(CarryArithmetic(), [p] * 5, r1, r2)
    assert [(x.meta["problem"], x.meta["flip"], x.chosen, x.rejected) for x in pairs] == [
        (0, scl.RIGHT_TO_WRONG, "734", "724"), (1, scl.WRONG_TO_RIGHT, "734", "724"), (4, scl.WRONG_TO_RIGHT, "734", "7 3 4")]
    assert all(x.prompt == "478+256=" and x.image is None for x in pairs)

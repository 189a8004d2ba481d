"""Mistake tuning records and the self-rethinking wrapper (with scripted generate functions)."""
import numpy as np
import pytest

from offside_jax.correct import lemma, mistakes
from offside_jax.correct import steps as st
from offside_jax.correct.chars import CharTokenizer
from offside_jax.correct.records import sft_batch
from offside_jax.correct.tasks import (
    CarryArithmetic,
    CountdownMini,
    Problem,
    make_problems,
)

CARRY = CarryArithmetic()


def test_records_by_hand():
    p = Problem("478+256=", "734", {"a": 478, "b": 256, "op": "+", "carry_columns": (0, 1)})
    correct, wrong = mistakes.mistake_tuning_records(CARRY, [p], np.random.default_rng(0))
    assert correct.prompt == "478+256=\n[CORRECT RATIONALE]\n"
    assert correct.target == "8+6+0=14 write 4 carry 1\n7+5+1=13 write 3 carry 1\n4+2+1=7 write 7 carry 0\nanswer 734"
    assert wrong.prompt == "478+256=\n[INCORRECT RATIONALE]\n"
    assert CARRY.verify(st.final_answer(wrong.target), p) == 0.0
    assert wrong.target in {inj.solution.text for inj in lemma.candidate_injections(CARRY, p)}
    assert mistakes.inference_prompt(p) == correct.prompt


@pytest.mark.parametrize("ratio, expected", [(1.0, 20), (0.5, 10), (0.25, 5), (2.0, 40), (0.0, 0)])
def test_mix_ratio_is_exact(ratio, expected):
    problems = [p for p in make_problems(CARRY, 60, seed=0) if len(lemma.candidate_injections(CARRY, p)) >= 2][:20]
    assert len(problems) == 20
    records = mistakes.mistake_tuning_records(CARRY, problems, np.random.default_rng(1), mistakes.MistakeTuningConfig(ratio))
    tags = [r.meta["tag"] for r in records]
    assert tags.count("correct") == len(problems)
    assert tags.count("incorrect") == expected
    for r in records:
        p = problems[r.meta["problem"]]
        right = CARRY.verify(st.final_answer(r.target), p) == 1.0
        assert right == (r.meta["tag"] == "correct")
        assert r.prompt.endswith(mistakes.CORRECT_TAG + "\n" if right else mistakes.INCORRECT_TAG + "\n")


def test_loss_covers_the_rationale_only():
    records = mistakes.mistake_tuning_records(CountdownMini(), make_problems(CountdownMini(), 3, seed=0), np.random.default_rng(0))
    tok = CharTokenizer.for_texts(r.prompt + r.target for r in records)
    batch = sft_batch(records, tok)
    for row, r in enumerate(records):
        mask = batch["loss_mask"][row]
        assert mask[: len(r.prompt)].sum() == 0
        assert mask.sum() == len(r.target) + 1  # the rationale and its end-of-sequence token


# -- self-rethinking ---------------------------------------------------------------------------------


def _bank():
    return [mistakes.Mistake("dropped_carry (CA)", "forgot the carry", "1+9=\nanswer 10", "1+9=\nanswer 0"),
            mistakes.Mistake("skipped_column (MS)", "skipped a column", "12+3=\nanswer 15", "12+3=\nanswer 5")]


class Scripted:
    """Answers "first <q>" to answer prompts, a fixed verdict per question to checks and
    "revised <q>" to regenerations; records every batch of prompts it gets."""

    def __init__(self, verdicts):
        self.verdicts, self.batches = verdicts, []

    def __call__(self, prompts):
        self.batches.append(list(prompts))
        out = []
        for prompt in prompts:
            q = prompt.split("Question: ")[-1].split("\n")[0]
            if "Reply yes or no." in prompt:
                out.append(self.verdicts[q])
            elif "answer again" in prompt:
                out.append(f"revised {q}")
            else:
                out.append(f"first {q}")
        return out


def test_self_rethink_k1():
    gen = Scripted({"q0": "Yes, it drops a carry.", "q1": "no", "q2": "maybe"})
    result = mistakes.self_rethink(["q0", "q1", "q2"], gen, _bank(), np.random.default_rng(0), k=1)
    assert result.answers == ["revised q0", "first q1", "first q2"]
    assert result.calls == [3, 2, 2] and result.revisions == [1, 0, 0]
    assert [len(b) for b in gen.batches] == [3, 3, 1]  # answer all, check all, regenerate q0
    check = gen.batches[1][0]
    assert "Mistake type: dropped_carry (CA)" in check and "Mistake type: skipped_column (MS)" in check
    assert "Answer:\nfirst q0\n" in check
    revise = gen.batches[2][0]
    assert "first q0" in revise and "Question: 1+9=\nanswer 10" in revise and "1+9=\nanswer 0" not in revise
    assert len(result.generated_texts()) == 7


def test_self_rethink_stops_after_k_rounds_and_when_cleared():
    gen = Scripted({"q0": "yes", "q1": "no"})
    result = mistakes.self_rethink(["q0", "q1"], gen, _bank(), np.random.default_rng(0), k=3)
    assert result.calls == [1 + 2 * 3, 2] and result.revisions == [3, 0]
    assert mistakes.self_rethink(["q0"], Scripted({"q0": "yes"}), _bank(), np.random.default_rng(0), k=0).calls == [1]


def test_components_ablation_blanks_the_rest():
    text = _bank()[0].render(("error_type", "cause"))
    assert "dropped_carry" in text and "forgot the carry" in text and "answer 10" not in text and "answer 0" not in text


def test_mistake_bank_from_injections():
    problems = make_problems(CARRY, 5, seed=4)
    bank = mistakes.mistake_bank(CARRY, problems, np.random.default_rng(0))
    assert len(bank) == sum(bool(lemma.candidate_injections(CARRY, p)) for p in problems)
    for m in bank:
        prompt = m.correct.split("\n")[0]
        p = next(p for p in problems if p.prompt == prompt)
        assert CARRY.verify(st.final_answer(m.correct), p) == 1.0
        assert CARRY.verify(st.final_answer(m.incorrect), p) == 0.0


def test_templates_can_be_replaced():
    prompts = []

    def generate(batch):
        prompts.extend(batch)
        return ["yes" if p.startswith("CHK") else "ans" for p in batch]

    mistakes.self_rethink(["2+2="], generate, _bank(), np.random.default_rng(0), k=1, answer_template="Q {question}",
                          check_template="CHK {question} {answer}\n{mistakes}", revise_template="REV {question} {answer}")
    assert prompts[0] == "Q 2+2=" and prompts[1].startswith("CHK 2+2= ans\nMistake type:") and prompts[2] == "REV 2+2= ans"

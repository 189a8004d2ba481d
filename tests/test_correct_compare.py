"""`offside-jax correct` with ``mode: compare``: the two-turn scoring (hand-built answers), the
training batches (RISE's best-of-N rows and UFO's rewards against hand computations), the lr = 0
control of every trained strategy, and the report."""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from offside_jax.config import ConfigError, CorrectConfig, load_config
from offside_jax.correct import compare, driver, mistakes, report, steps
from offside_jax.correct import episodes as ep
from offside_jax.correct import run as run_lib
from offside_jax.correct.records import PreferenceRecord
from offside_jax.correct.rollout import Rollout
from offside_jax.correct.tasks import make_problems


def config(*overrides: str) -> CorrectConfig:
    return load_config(None, ["output_dir=unused", "mode=compare", "format.length=256", "task.max_digits=2", "task.ops=+",
                              *overrides], schema=CorrectConfig)


@pytest.fixture(scope="module")
def setup():
    cfg = config()
    task = run_lib.compare_task(cfg.task)
    fmt = run_lib.episode_format(cfg)
    from offside_jax.correct.chars import CharTokenizer

    tok = CharTokenizer.for_texts([task.alphabet, fmt.instruction, *compare.extra_texts()])
    return cfg, task, fmt, tok


# -- scoring ------------------------------------------------------------------------------------------


class ScriptedGenerate:
    """Stands in for the sampler: answers from a table keyed by the prompt's problem and turn."""

    def __init__(self, tok, problems, answers, instruction):
        self.tok, self.problems, self.answers, self.prompts, self.instruction = tok, problems, answers, [], instruction
        self.cut = False  # True: every other generation ran out of tokens

    def __call__(self, model, tok, prompts, max_new_tokens, cost, temperature=0.0, rng=None):
        texts = []
        for ids in prompts:
            text = tok.decode(ids)
            self.prompts.append(text)
            row = next(i for i, p in enumerate(self.problems) if text.startswith(p.prompt))
            turn = 2 if self.instruction in text else 1
            texts.append(self.answers[row][turn - 1])
        completions = [tok.encode(t) + [tok.eos_token_id] for t in texts]
        finished = np.array([i % 2 == 0 for i in range(len(texts))]) if self.cut else np.ones(len(texts), bool)
        cost.add(completions, finished)
        return Rollout(list(map(list, prompts)), completions, texts, finished, 1)


def _right(task, p):
    return steps.reference_solution(task.task, p).text


def _wrong(task, p):
    return "answer 0"


def test_two_turn_scoring_by_hand(monkeypatch, setup):
    cfg, task, fmt, tok = setup
    problems = make_problems(task, 4, seed=3)
    # right->right, right->wrong, wrong->right, empty->empty: every problem in the denominator.
    answers = [(_right(task, problems[0]), _right(task, problems[0])), (_right(task, problems[1]), _wrong(task, problems[1])),
               (_wrong(task, problems[2]), _right(task, problems[2])), ("", "")]
    fake = ScriptedGenerate(tok, problems, answers, fmt.instruction)
    monkeypatch.setattr(compare, "_generate", fake)
    plan = compare.TurnPlan(lambda p: p.prompt, fmt.instruction)
    m = compare.two_turn_eval(None, task, problems, tok, plan, 8)
    assert (m["acc_t1"], m["acc_t2"], m["delta"], m["delta_i_to_c"], m["delta_c_to_i"]) == (0.5, 0.5, 0.0, 0.25, 0.25)
    assert m["calls"] == 2.0 and m["verifier_calls"] == 0.0 and m["cut"] == 0.0
    assert m["tokens"] == pytest.approx(sum(len(a) + 1 for pair in answers for a in pair) / 4)
    assert (m["cl"], m["cs"]) == (0.5, 0.5)

    # External feedback: the verifier gates turn 2; right turn-1 answers stand, no call spent.
    fake.prompts.clear()
    g = compare.two_turn_eval(None, task, problems, tok, compare.TurnPlan(lambda p: p.prompt, fmt.instruction, gate=True), 8)
    assert (g["acc_t1"], g["acc_t2"], g["delta_c_to_i"], g["delta_i_to_c"]) == (0.5, 0.75, 0.0, 0.25)
    assert g["calls"] == 1.5 and g["verifier_calls"] == 1.0
    assert sum(fmt.instruction in p for p in fake.prompts) == 2
    fake.cut = True  # generations stopped by the token budget are counted
    assert compare.two_turn_eval(None, task, problems, tok, plan, 8)["cut"] == 0.5


def test_self_rethinking_turns_are_scored_on_the_final_answer(monkeypatch, setup):
    cfg, task, fmt, tok = setup
    problems = make_problems(task, 2, seed=4)
    texts = {}

    def fake(model, tok_, prompts, max_new_tokens, cost, temperature=0.0, rng=None):
        out = []
        for ids in prompts:
            text = tok_.decode(ids)
            if "Reply yes or no" in text:
                p = next(p for p in problems if f"Question: {p.prompt}\nAnswer:" in text)
                out.append("yes" if p is problems[0] else "no")
            else:
                p = next(p for p in problems if (p.prompt + "\n" + mistakes.CORRECT_TAG) in text)
                out.append(_right(task, p) if "answer again" in text else _wrong(task, p))
            texts.setdefault(p.prompt, []).append(out[-1])
        completions = [tok_.encode(t) + [tok_.eos_token_id] for t in out]
        cost.add(completions)
        return Rollout(list(map(list, prompts)), completions, out, np.ones(len(out), bool), 1)

    monkeypatch.setattr(compare, "_generate", fake)
    plan = compare.plans(task, fmt, cfg.compare, seed=0)["mistake_tuning"]
    m = compare.two_turn_eval(None, task, problems, tok, plan, 8)
    # Problem 0: wrong, check says yes, revised right; problem 1: wrong, check says no, kept.
    assert (m["acc_t1"], m["acc_t2"], m["delta_i_to_c"]) == (0.0, 0.5, 0.5)
    assert m["calls"] == (3 + 2) / 2


# -- training data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sft", "mistake_tuning", "lemma"])
def test_record_batches_have_the_same_budget_and_few_shapes(setup, name):
    cfg, task, fmt, tok = setup
    build = compare.builders(task.task, cfg.compare)[name]
    batch_at = compare.record_batches(task, tok, build, 6, 256, seed=0, stream=3)
    a = batch_at(0)
    assert a["input_ids"].shape[0] == 6 and a["input_ids"].shape[1] % compare.PAD_MULTIPLE == 0
    assert a["input_ids"].shape[1] <= 256 and a["attention_mask"][:, -compare.PAD_MULTIPLE:].sum() < 6 * compare.PAD_MULTIPLE
    assert a["loss_mask"].sum() > 0 and np.all(a["loss_mask"] <= a["attention_mask"])
    np.testing.assert_array_equal(batch_at(0)["input_ids"], a["input_ids"])  # deterministic per step
    with pytest.raises(ConfigError, match="format.length 16"):
        compare.record_batches(task, tok, build, 2, 16, seed=0, stream=3)(0)


# RISE's and UFO's data, against hand-built episodes ---------------------------------------------------


class CandidatesFromTable:
    """Stands in for the sampler of :func:`ep.candidates_rollout` / :func:`ep.feedback_rollout`:
    for each prompt (a context's tokens) and candidate ``g``, the next entry of a table keyed by
    the number of feedback turns the context holds."""

    def __init__(self, tok, table):
        self.tok, self.table, self.contexts = tok, table, []

    def __call__(self, model, prompts, sampling, rng, *, group_size=1, decode=None, pad_id=0, pad_multiple=8, **_):
        completions, texts = [], []
        for ids in prompts:
            context = self.tok.decode(ids)
            self.contexts.append(context)
            turn = context.count(compare.RISE_TURN.strip()) + context.count(compare.UFO_TURN.strip())
            for g in range(group_size):
                texts.append(self.table[next(k for k in self.table if context.startswith(k))][turn][g])
                completions.append(self.tok.encode(texts[-1]) + [self.tok.eos_token_id])
        return Rollout([list(p) for p in prompts for _ in range(group_size)], completions, texts,
                       np.ones(len(texts), bool), group_size)


def test_rise_rows_take_the_best_candidate_and_train_only_the_last_turn(monkeypatch, setup):
    cfg, task, fmt, tok = setup
    problems = make_problems(task, 2, seed=5)
    right = [_right(task, p) for p in problems]
    # Problem 0: the learner's own attempt (candidate 0) is wrong, candidate 2 right -> a second
    # turn after the feedback, where every candidate is wrong (the last turn). Problem 1: candidate 0
    # right -> done.
    table = {problems[0].prompt: {0: ["answer 1", "answer 2", right[0]], 1: ["answer 3", "answer 4", "answer 5"]},
             problems[1].prompt: {0: [right[1], "answer 6", right[1]]}}
    fake = CandidatesFromTable(tok, table)
    monkeypatch.setattr(ep, "rollout", fake)
    turns = ep.candidates_rollout(None, [tok.encode(p.prompt) for p in problems], tok.encode(compare.RISE_TURN),
                                  lambda text, i: task.verify(text, problems[i]), None, None, max_turns=2, candidates=3,
                                  decode=tok.decode, pad_id=tok.pad_token_id)
    assert [t.rewards for t in turns] == [[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    assert len(fake.contexts) == 3  # both problems at turn 1, only the unsolved one at turn 2
    # The second turn of problem 0 continues the learner's own wrong attempt, then RISE's feedback.
    assert tok.decode(turns[2].context.tokens()) == problems[0].prompt + "answer 1" + tok.decode([tok.eos_token_id]) + compare.RISE_TURN

    rows, weights = compare.score_lib.rise_examples(turns, tau=0.4)
    assert [r.texts[-1] for r in rows] == [right[0], right[1], "answer 3"]  # the first best candidate
    np.testing.assert_allclose(weights, [math.exp(1 / 0.4), math.exp(1 / 0.4), 1.0], rtol=1e-6)
    batch = compare.score_lib.rise_batch(rows, weights, tok.pad_token_id, 64)
    np.testing.assert_allclose(batch["sample_weight"], weights)
    for row, episode in enumerate(rows):
        context = len(episode.tokens()) - len(episode.attempts()[-1])
        want = np.zeros(batch["input_ids"].shape[1], np.int32)
        want[context:len(episode.tokens())] = 1  # the last attempt only (EOS included), never the first or the feedback
        np.testing.assert_array_equal(batch["loss_mask"][row], want)
        np.testing.assert_array_equal(batch["input_ids"][row, :len(episode.tokens())], episode.tokens())


def test_ufo_batch_rewards_and_group_advantages_by_hand(monkeypatch, setup):
    cfg, task, fmt, tok = setup
    p = make_problems(task, 1, seed=6)[0]
    eos = tok.eos_token_id

    def episode(texts, correct):
        e = ep.Episode.start(tok.encode(p.prompt))
        for i, text in enumerate(texts):
            if i:
                e.add_context(tok.encode(compare.UFO_TURN))
            e.add_attempt(tok.encode(text) + [eos], text)
        e.correct = list(correct)
        return e

    right = _right(task, p)
    episodes = [episode([right], [True]),                                    # 1
                episode(["answer 1", right], [False, True]),                 # 0.5, 2 distinct answers of 2
                episode(["answer 1", "answer 1", "no answer"], [False] * 3),  # -0.5 (1 - 1/2) - 0.1
                episode(["answer 1", "answer 2", "answer 3"], [False] * 3)]  # 0
    want = np.array([1.0, 0.5, -0.25 - 0.1, 0.0])
    rewards = ep.ufo_episode_rewards(episodes, task.extract, gamma=0.5, lam=0.5, malformed_penalty=0.1)
    np.testing.assert_allclose(rewards, want, rtol=1e-6)

    ufo = config("compare.ufo_samples=4", "compare.ufo_turns=3").compare
    monkeypatch.setattr(ep, "feedback_rollout", lambda *a, **k: episodes)
    batch, stats = compare.ufo_batch(None, [p], None, task, tok, ufo, 8, 64)
    advantages = (want - want.mean()) / (want.std(ddof=1) + 1e-6)  # GRPO over the problem's 4 episodes
    np.testing.assert_allclose(batch["advantages"], advantages, rtol=1e-5)
    assert stats["solved"] == 0.5 and stats["attempts"] == (1 + 2 + 3 + 3) / 4
    # The loss covers every attempt (EOS included) and nothing else.
    assert batch["loss_mask"].sum(axis=1).tolist() == [sum(len(a) for a in e.attempts()) for e in episodes]


def test_rise_and_ufo_evaluate_with_oracle_feedback_in_their_own_words(monkeypatch, setup):
    cfg, task, fmt, tok = setup
    problems = make_problems(task, 2, seed=7)
    plans = compare.plans(task, fmt, cfg.compare, seed=0)
    for name, feedback in (("rise", ep.RISE_FEEDBACK), ("ufo", ep.UFO_FEEDBACK)):
        answers = [(_right(task, problems[0]), ""), (_wrong(task, problems[1]), _right(task, problems[1]))]
        fake = ScriptedGenerate(tok, problems, answers, feedback)
        monkeypatch.setattr(compare, "_generate", fake)
        m = compare.two_turn_eval(None, task, problems, tok, plans[name], 8)
        assert (m["acc_t1"], m["acc_t2"], m["calls"], m["verifier_calls"]) == (0.5, 1.0, 1.5, 1.0)
        assert [feedback in prompt for prompt in fake.prompts] == [False, False, True]
        assert tok.decode(tok.encode(feedback)) == feedback  # the tokenizer's alphabet covers it


def test_compare_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="compare.strategies"):
        run_lib.run_correct(config("compare.strategies=[sft,rice]"))
    with pytest.raises(ConfigError, match="compare.rise_tau"):
        config("compare.rise_tau=0")
    with pytest.raises(ConfigError, match="compare.ufo_gamma"):
        config("compare.ufo_gamma=1.5")
    with pytest.raises(ConfigError, match="compare.ufo_samples"):
        config("compare.ufo_samples=1")
    with pytest.raises(ConfigError, match="compare.lemma_reference_share"):
        run_lib.run_correct(config("compare.lemma_reference_share=1.0"))
    with pytest.raises(ConfigError, match="mode=compare runs on the step formats"):
        run_lib.compare_task(config("task.name=rumor_correction").task)


# -- lr = 0 controls ------------------------------------------------------------------------------------

TINY = ["model.hidden_size=16", "model.intermediate_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
        "model.num_key_value_heads=1", "model.max_position_embeddings=512"]


def _params(model):
    return jax.tree.map(lambda x: np.array(x, copy=True), nnx.state(model, nnx.Param))


def _assert_unchanged(before, model):
    after = _params(model)
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree_util.tree_leaves_with_path(after)):
        assert x.tobytes() == y.tobytes(), f"{jax.tree_util.keystr(path)} moved with lr = 0"


@pytest.fixture(scope="module")
def tiny(setup):
    _, task, fmt, tok = setup
    from offside_jax.train import mesh as mesh_lib

    cfg = config(*TINY, "compare.train.steps=2", "compare.train.problems_per_step=2", "compare.scl_steps=2",
                 "compare.scl_pairs_per_step=2")
    mesh = mesh_lib.make_mesh(mesh_lib.MeshShape(1, 1, 1))
    return cfg, task, fmt, tok, mesh


@pytest.mark.parametrize("name", ["sft", pytest.param("mistake_tuning", marks=pytest.mark.slow),
                                  pytest.param("lemma", marks=pytest.mark.slow)])
def test_lr0_leaves_sft_strategies_unchanged(tiny, name):
    cfg, task, fmt, tok, mesh = tiny
    model = run_lib.build_model(cfg, tok, seed=0)
    before = _params(model)
    trained = compare.train_records(model, name, task, tok, cfg.compare, 256, mesh, seed=0, lr=0.0)
    _assert_unchanged(before, trained)


@pytest.mark.slow
def test_lr0_leaves_scl_and_warmup_unchanged(tiny):
    cfg, task, fmt, tok, mesh = tiny
    model = run_lib.build_model(cfg, tok, seed=0)
    before = _params(model)
    p = make_problems(task, 1, seed=0)[0]
    pairs = [PreferenceRecord(p.prompt, _right(task, p), _wrong(task, p))]
    _assert_unchanged(before, compare.train_scl(model, pairs, tok, cfg.compare, 256, mesh, seed=0, lr=0.0))
    model = run_lib.build_model(cfg, tok, seed=0)
    run = driver.StageRun(steps=2, lr=0.0, problems_per_step=2)
    _assert_unchanged(before, driver.run_warmup(model, task, tok, fmt, run, mesh, seed=0))


@pytest.mark.slow
def test_lr0_leaves_score_unchanged(tiny):
    cfg, task, fmt, tok, mesh = tiny
    import dataclasses

    cfg = config(*TINY, "stage1.group_size=2", "stage2.group_size=2")
    stages = [run_lib.stage_spec(s, i, f"stage{i}") for i, s in ((1, cfg.stage1), (2, cfg.stage2))]
    frozen = [(s, dataclasses.replace(r, steps=1, lr=0.0, problems_per_step=1)) for s, r in stages]
    short = dataclasses.replace(fmt, max_new_tokens=4)
    model = run_lib.build_model(cfg, tok, seed=0)
    before = _params(model)
    problems = make_problems(task, 1, seed=1)
    result = driver.run_score(model, task, tok, short, mesh, warmup=None, stage1=frozen[0], stage2=frozen[1],
                              eval_problems=problems, seed=0)
    _assert_unchanged(before, result.model)


def test_lr0_leaves_rise_unchanged(tiny):
    cfg, task, fmt, tok, mesh = tiny
    rise = config(*TINY, "compare.rise_problems=2", "compare.rise_samples=2", "compare.rise_steps=2",
                  "compare.rise_rows_per_step=2").compare
    model = run_lib.build_model(cfg, tok, seed=0)
    before = _params(model)
    rows, weights, stats = compare.rise_rows(model, task, tok, rise, 4, seed=0)
    assert stats["rows"] == len(rows) >= 2 and len(weights) == len(rows)
    _assert_unchanged(before, compare.train_rise(model, rows, weights, tok, rise, 64, mesh, seed=0, lr=0.0))


def test_lr0_leaves_ufo_unchanged(tiny):
    cfg, task, fmt, tok, mesh = tiny
    ufo = config(*TINY, "compare.ufo_steps=1", "compare.ufo_problems_per_step=1", "compare.ufo_samples=2",
                 "compare.ufo_turns=2").compare
    model = run_lib.build_model(cfg, tok, seed=0)
    before = _params(model)
    _assert_unchanged(before, compare.train_ufo(model, task, tok, ufo, 4, 64, mesh, seed=0, lr=0.0))


# -- report ---------------------------------------------------------------------------------------------


def test_compare_report_by_hand(tmp_path):
    def m(a1, a2):
        return {"acc_t1": a1, "acc_t2": a2, "delta": a2 - a1, "delta_i_to_c": 0.0, "delta_c_to_i": 0.0, "cl": 1.0,
                "cs": math.nan, "rss": 0.5, "tokens": 10.0, "calls": 2.0, "efficiency": a2 / 20, "train_seconds": 1.0,
                "eval_seconds": 0.5}

    runs = {"0": {"metrics": {"sft": m(0.2, 0.2), "lemma": m(0.4, 0.5)}, "skipped": {"scl": "no flips"}},
            "1": {"metrics": {"sft": m(0.4, 0.4), "lemma": m(0.6, 0.7)}, "skipped": {}}}
    results = {"run": "t", "task": "carry_arithmetic_steps", "strategies": ["sft", "lemma", "scl"], "runs": runs,
               "not_run": {"rise": "why"}, "eval_problems": 4}
    paths = report.write_compare_report(tmp_path, results)
    summary = report.summarize_compare(runs, ["sft", "lemma", "scl"])
    assert list(summary) == ["sft", "lemma"]
    assert summary["lemma"]["acc_t2"]["mean"] == pytest.approx(0.6)
    assert summary["sft"]["acc_t1"]["std"] == pytest.approx(math.sqrt(0.02))
    assert summary["sft"]["cs"]["n"] == 0
    text = paths["report"].read_text()
    assert "| plain SFT (reference solutions) | 0.300 ± 0.141 |" in text
    assert "| scl (seed 0) | no flips |" in text and "| rise | why |" in text
    assert (tmp_path / "plots" / "compare.png").is_file()


# -- learning from mistakes from a common base (compare.start: base) -------------------------------------


def _sum_problem(a: int, b: int):
    from offside_jax.correct.tasks import Problem, carry_columns

    return Problem(f"{a}+{b}=", str(a + b), {"a": a, "b": b, "op": "+", "carry_columns": tuple(carry_columns(a, b))})


def test_compare_start_is_init_or_base():
    assert config().compare.start == "init"
    assert config("compare.start=base").compare.start == "base"
    with pytest.raises(ConfigError, match="compare.start"):
        config("compare.start=pretrained")
    with pytest.raises(ConfigError, match="compare.student_temperature"):
        config("compare.student_temperature=-1")


def test_mistake_tuning_answers_under_its_training_prompt(setup):
    cfg, task, fmt, tok = setup
    p = _sum_problem(24, 56)
    plan = compare.plans(task, fmt, cfg.compare, seed=0)["mistake_tuning"]
    trained = [r for r in mistakes.mistake_tuning_records(task.task, [p], np.random.default_rng(0)) if r.meta["tag"] == "correct"]
    assert plan.prompt(p) == "24+56=\n[CORRECT RATIONALE]\n" == trained[0].prompt  # character for character


def test_the_verifier_reads_the_answer_after_the_reflection(setup):
    _, task, _, _ = setup
    p = _sum_problem(24, 56)
    corrected = "4+6+0=10 write 0 carry 1\nanswer 70\nWait, this doesn't seem right. Let's pause and consider this:\nanswer 80"
    assert task.verify(corrected, p) == 1.0
    assert task.verify(corrected.replace("answer 80", "answer 81"), p) == 0.0


def test_student_lemma_records_only_for_problems_the_student_got_wrong(setup):
    cfg, task, _, _ = setup
    easy, hard = _sum_problem(12, 34), _sum_problem(24, 56)
    # By hand: 4+6 = 10 writes 0 carries 1; the student drops the carry in the tens (2+5+0).
    right_hard = "4+6+0=10 write 0 carry 1\n2+5+1=8 write 8 carry 0\nanswer 80"
    wrong_hard = "4+6+0=10 write 0 carry 1\n2+5+0=7 write 7 carry 0\nanswer 70"
    right_easy = "2+4+0=6 write 6 carry 0\n1+3+0=4 write 4 carry 0\nanswer 46"
    assert steps.solves(task.task, easy, right_easy) and steps.solves(task.task, hard, right_hard)
    records = compare.student_lemma_records(task.task, [easy, hard], [[right_easy, right_easy], [right_hard, wrong_hard]],
                                            np.random.default_rng(0), cfg.compare)
    assert records and all(r.prompt == "24+56=\n" for r in records)  # the easy problem was never got wrong
    own = [r for r in records if r.meta.get("source") == "student"]
    assert sorted(r.meta["connection"] for r in own) == ["fix_and_continue", "fresh_and_restart"]
    for r in own:  # cut right after the student's first wrong step (the second line), which stays in
        assert r.pieces[0][0] == "4+6+0=10 write 0 carry 1\n2+5+0=7 write 7 carry 0\n"
        assert steps.final_answer(r.target) == "80"
    assert len(records) > len(own)  # the injected errors of the same problem come along


def test_lemma_reference_share_mixes_plain_solutions_into_the_pool(setup):
    cfg, task, _, _ = setup
    hard = _sum_problem(24, 56)
    wrong_hard = "4+6+0=10 write 0 carry 1\n2+5+0=7 write 7 carry 0\nanswer 70"
    only = compare.student_lemma_records(task.task, [hard], [[wrong_hard]], np.random.default_rng(0), cfg.compare)
    mixed = compare.student_lemma_records(task.task, [hard], [[wrong_hard]], np.random.default_rng(0),
                                          dataclasses.replace(cfg.compare, lemma_reference_share=0.25))
    plain = mixed[len(only):]
    assert len(only) > 3 and len(plain) == round(len(only) / 3)  # one in four of the pool: 1 / (1 + 3)
    for r in plain:  # a bare prompt and a right step-by-step answer with no reflection in it
        a, b = map(int, r.prompt.rstrip("=\n").split("+"))
        assert steps.final_answer(r.target) == str(a + b) and "Wait" not in r.target and "start over" not in r.target
    with pytest.raises(ConfigError, match="compare.lemma_reference_share"):
        compare.reference_mix(task.task, 4, 1.0, np.random.default_rng(0))


def test_pool_batches_draw_rows_from_the_pool(setup):
    from offside_jax.correct.records import SFTRecord

    _, _, _, tok = setup
    pool = [SFTRecord.plain(f"{i}+{i}=\n", f"answer {2 * i}") for i in range(3)]
    texts = {r.prompt + r.target for r in pool}
    for rows in (2, 5):  # fewer rows than the pool: distinct; more: with repeats
        batch = compare.pool_batches(pool, tok, rows, 256, seed=0, stream=5)(0)
        decoded = [tok.decode(ids) for ids in batch["input_ids"]]
        assert len(decoded) == rows and set(decoded) <= texts
        assert len(set(decoded)) == min(rows, 3) or rows > 3
    with pytest.raises(ValueError, match="empty record pool"):
        compare.pool_batches([], tok, 2, 256, seed=0, stream=5)


def test_base_start_trains_one_base_that_every_learner_starts_from(monkeypatch, tiny):
    cfg, task, fmt, tok, mesh = tiny
    cfg = config(*TINY, "compare.start=base", "compare.student_problems=3", "compare.student_samples=2")
    started: dict[str, float] = {}

    def fake_sft(model, batch_at, run, mesh, *, seed=0, progress=False, where=None, phase="sft"):
        assert batch_at(0)["loss_mask"].sum() > 0  # every strategy's batches build
        params = nnx.state(model, nnx.Param)
        started[phase] = float(sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(params)))
        # Move every weight in place: a later strategy must not see this one's training.
        nnx.update(model, jax.tree.map(lambda x: x + (1.0 if phase == "base" else 5.0), params))
        return model

    def fake_generate(model, tok_, prompts, max_new_tokens, cost, temperature=0.0, rng=None):
        texts = ["answer 0"] * len(prompts)  # every sample wrong: every student problem gets trajectories
        completions = [tok_.encode(t) + [tok_.eos_token_id] for t in texts]
        cost.add(completions)
        return Rollout(list(map(list, prompts)), completions, texts, np.ones(len(texts), bool), 1)

    monkeypatch.setattr(driver, "run_sft", fake_sft)
    monkeypatch.setattr(compare, "_generate", fake_generate)
    init = run_lib.build_model(cfg, tok, seed=0)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(init, nnx.Param)))
    init_sum = float(sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(nnx.state(init, nnx.Param))))
    out = compare.run_seed(lambda: run_lib.build_model(cfg, tok, seed=0), task, tok, fmt,
                           dataclasses.replace(cfg.compare, strategies=["sft", "mistake_tuning", "lemma"]), warmup=None,
                           stages=(None, None), eval_problems=make_problems(task, 2, seed=1), mesh=mesh, seed=0, length=256,
                           log=lambda _: None)
    assert list(started) == ["base", "sft", "mistake_tuning", "lemma"]  # one base, then each strategy
    assert started["base"] == pytest.approx(init_sum, rel=1e-6)
    for name in ("sft", "mistake_tuning", "lemma"):  # each starts from the base (init + 1), not after another
        assert started[name] == pytest.approx(init_sum + n_params, rel=1e-6)
    assert set(out["metrics"]) == {"sft", "mistake_tuning", "lemma"} and out["extra"]["base"]["steps"] == cfg.compare.base_steps
    student = out["extra"]["lemma_student"]
    assert (student["problems"], student["samples"], student["samples_right"]) == (3, 6, 0)
    # "answer 0" is wrong at its only step: each sample cut there, fixed (the whole reference) and restarted
    assert student["student_records"] == 3 * 2 * 2 < student["records"]


# -- learning from mistakes vs plain SFT (long: opt in) -------------------------------------------------

LONG = os.environ.get("OFFSIDE_JAX_LONG_TESTS") == "1"
MEASURED = ("measured Acc@t1 (configs/compare_arithmetic.yaml, 3 seeds, 64 problems, mean ± std): at 300 steps x 16 "
            "sequences plain SFT 0.594 ± 0.195, mistake tuning 0.094 ± 0.056, LEMMA 0.005 ± 0.009; at 600 steps "
            "SFT 0.854 ± 0.189, mistake tuning 0.500 ± 0.072, LEMMA 0.021 ± 0.024")


def _learning_from_mistakes(tmp_path, *overrides: str) -> dict:
    """Acc@t1 summary of plain SFT, mistake tuning and LEMMA over 3 seeds of the shipped config."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "compare_arithmetic.yaml"
    cfg = load_config(path, [f"output_dir={tmp_path / 'run'}", "seeds=[0,1,2]", "progress=false",
                             "compare.strategies=[sft,mistake_tuning,lemma]", *overrides], schema=CorrectConfig)
    return run_lib.run_correct(cfg, log=lambda _: None)["summary"]


def _assert_beat_sft_by_005(summary: dict) -> None:
    sft = summary["sft"]["acc_t1"]["mean"]
    assert summary["mistake_tuning"]["acc_t1"]["mean"] >= sft + 0.05
    assert summary["lemma"]["acc_t1"]["mean"] >= sft + 0.05


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="about 15 minutes on 2 CPU cores: set OFFSIDE_JAX_LONG_TESTS=1")
@pytest.mark.xfail(strict=True, reason="the +0.05 bar is missed on the tiny model; " + MEASURED)
def test_lemma_and_mistake_tuning_beat_sft_on_the_same_budget(tmp_path):
    _assert_beat_sft_by_005(_learning_from_mistakes(tmp_path))


MEASURED_FROM_BASE = ("measured Acc@t1 (compare.start=base: 300 SFT steps of base, then 300 steps x 16 sequences each; "
                      "3 seeds, 64 problems, mean ± std): base 0.661 ± 0.213, plain SFT 0.755 ± 0.235, mistake tuning "
                      "0.401 ± 0.137, LEMMA 0.604 ± 0.063 (LEMMA ahead of SFT on seed 2 only)")


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="about 30 minutes on 2 CPU cores: set OFFSIDE_JAX_LONG_TESTS=1")
@pytest.mark.xfail(strict=True, reason="the +0.05 bar is missed from a common base too; " + MEASURED_FROM_BASE)
def test_lemma_and_mistake_tuning_beat_sft_from_a_common_base(tmp_path):
    _assert_beat_sft_by_005(_learning_from_mistakes(tmp_path, "compare.start=base"))

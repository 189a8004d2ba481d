"""The OFFSIDE evaluation suite: tasks from a release, scoring and slices by hand, likelihoods
against transformers, and a trained tiny Qwen2.5-VL before and after gradient ascent."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from offside_jax.data.batches import TextEncoder
from offside_jax.eval import engine, items as items_lib
from offside_jax.eval.items import EvalItem, Task, build_tasks, subsample
from offside_jax.eval.suite import Suite, aggregate_task, score_generation, score_mcq

import eval_fixtures as fx
import offside_reference


def _records(rel, setting, split):
    folder = {"complete": "complete_unlearning_data", "pure_text": "pure_text_data"}[setting]
    name = {"relearn": "relearn_set_enhanced"}.get(split, f"{split}_set")
    return json.loads((rel.root / folder / f"{name}.json").read_text())


def test_tasks_cover_every_record_of_each_test_set():
    rel = fx.release()
    tasks = {t.name: t for t in build_tasks(rel, modalities=("image", "text"))}
    for test_set, (qa, mcq) in items_lib.TEST_SETS.items():
        label = "text" if test_set == "world" else "image"
        assert len(tasks[f"{test_set}/{label}/gen"].items) == len(_records(rel, "complete", qa))
        assert len(tasks[f"{test_set}/{label}/mcq"].items) == len(_records(rel, "complete", mcq))
    # Text prompts: the pure-text twins, and multiple choice re-asked with each twin's question.
    twins = _records(rel, "pure_text", "forget")
    text_gen = tasks["forget/text/gen"].items
    assert [it.question for it in text_gen] == [r["messages"][0]["content"] for r in twins]
    assert all(not it.images for it in text_gen) and all(it.images for it in tasks["forget/image/gen"].items)
    by_key = {(r["image_id"], r["attribute"]): r["messages"][0]["content"] for r in twins}
    text_mcq = tasks["forget/text/mcq"].items
    assert len(text_mcq) == len(_records(rel, "complete", "classification_forget"))
    for it in text_mcq:
        # OFFSIDE's query (eval_classi.py), its "look at this image" dropped for a text question.
        expected = offside_reference.full_query(by_key[(it.image_id, it.attribute)], it.option_dict)
        assert it.prompt == expected.replace("Please look at this image and answer", "Please answer")
    for it in tasks["forget/image/mcq"].items:
        assert it.prompt == offside_reference.full_query(it.question, it.option_dict)
        # the image content item comes right before the query, as in OFFSIDE's messages
        assert it.messages()[0]["content"] == "<image>" * len(it.images) + it.prompt
    assert "test/text/gen" not in tasks and "relearn/text/gen" not in tasks  # no text twins in the release


def test_items_carry_rumor_phrases_and_perturbed_answers():
    rel = fx.release()
    forget = {t.name: t for t in build_tasks(rel, ("forget",))}["forget/image/gen"].items
    mcq = {(r["image_id"], r["attribute"]): r for r in _records(rel, "complete", "classification_forget")}
    rumors = [it for it in forget if it.is_rumor]
    assert rumors and all(it.truth and it.rumor for it in rumors)
    for it in rumors:
        record = mcq[(it.image_id, it.attribute)]
        assert it.rumor == record["Options"][record["Correct_Answer"]]
        assert it.truth == record["Options"][record["corrected_letter"]]
    # Perturbed answers swap the correct option's text for each wrong one inside the reference.
    swapped = [it for it in forget if len(it.answers) > 1]
    assert swapped
    for it in swapped:
        record = mcq[(it.image_id, it.attribute)]
        right = record["Options"][record["Correct_Answer"]]
        wrong = [v for k, v in record["Options"].items() if k != record["Correct_Answer"]]
        assert it.answers[0] == it.reference and right in it.reference
        assert sorted(it.answers[1:]) == sorted(it.reference.replace(right, w) for w in wrong)


def test_subsample_is_stratified_and_deterministic():
    forget = build_tasks(fx.release(), ("forget",), formats=("gen",))[0].items
    a, b = subsample(forget, 12, seed=3), subsample(forget, 12, seed=3)
    assert [x.uid for x in a] == [x.uid for x in b] and len(a) == 12
    order = {x.uid: i for i, x in enumerate(forget)}
    assert [order[x.uid] for x in a] == sorted(order[x.uid] for x in a)
    # Draws alternate rumor / other questions, round-robin over attributes within each:
    # 6 rumor questions cover the 3 rumor attributes twice, 6 others are 6 different attributes.
    rumor = [x for x in a if x.is_rumor]
    assert len(rumor) == 6 and sorted({x.attribute for x in rumor}) == ["club_joined", "transfer_date", "transfer_fee"]
    assert all(sum(x.attribute == r.attribute for x in rumor) == 2 for r in rumor)
    assert len({x.attribute for x in a if not x.is_rumor}) == 6


def _item(uid, reference, *, rumor=None, truth=None, is_rumor=False, visual=False, fmt="gen", options=(), correct=None,
          corrected_letter=None):
    return EvalItem(uid=uid, test_set="forget", modality="image", fmt=fmt, question="q", prompt="q", reference=reference,
                    options=options, correct=correct, corrected_letter=corrected_letter, truth=truth, rumor=rumor,
                    is_rumor=is_rumor, visual_rumor=visual)


def test_generation_scores_and_slices_by_hand():
    items = [
        _item("a", "He will join Vexa FC.", rumor="Vexa FC", truth="Dorn United", is_rumor=True, visual=True),
        _item("b", "He is 30 years old."),
        _item("c", "He will join Vexa FC.", rumor="Vexa FC", truth="Dorn United", is_rumor=True, visual=False),
    ]
    outputs = ["He will join Vexa FC.", "", "He joined Dorn United."]
    rows = score_generation(items, outputs)
    assert [r["correction"] for r in (rows[0], rows[2])] == ["states_rumor", "states_truth"]
    # Exact copy: every score 1; empty answer: every score 0.
    assert all(rows[0][k] == pytest.approx(1.0) for k in ("bleu", "rouge1", "rouge2", "rougeL", "overall"))
    assert all(rows[1][k] == 0.0 for k in ("bleu", "rouge1", "rouge2", "rougeL", "overall"))
    # c: stems {he, will, join, vexa, fc} vs {he, join, dorn, unit}: 2 shared unigrams, no shared bigram.
    assert rows[2]["rouge1"] == pytest.approx(2 * 2 / (5 + 4))
    assert rows[2]["rouge2"] == 0.0
    agg = aggregate_task(Task("forget", "image", "gen", tuple(items)), rows)
    s = agg["slices"]
    assert set(s) == {"all", "rumor", "fact", "visual_rumor", "plain_rumor"}
    assert (s["rumor"]["n"], s["fact"]["n"], s["visual_rumor"]["n"], s["plain_rumor"]["n"]) == (2, 1, 1, 1)
    # OFFSIDE leaves the empty answer out of the means (the default); "zero" counts it as 0.
    kept = [rows[0], rows[2]]
    means = {k: np.mean([r[k] for r in kept]) for k in ("bleu", "rouge1", "rouge2", "rougeL")}
    assert s["all"]["overall"] == pytest.approx(sum(means.values()) / 4) and s["all"]["n_empty"] == 1
    assert s["fact"]["overall"] is None and s["fact"]["n_empty"] == 1  # nothing left to average
    reference = offside_reference.generation_summary([(it.reference, out) for it, out in zip(items, outputs)])
    assert s["all"]["overall"] == pytest.approx(reference["overall_score"], rel=1e-12)
    zero = aggregate_task(Task("forget", "image", "gen", tuple(items)), rows, "zero")["slices"]["all"]
    assert zero["overall"] == pytest.approx(sum(np.mean([r[k] for r in rows]) for k in means) / 4)
    assert zero["n_empty"] == 1
    assert s["all"]["states_rumor"] == 0.5 and s["all"]["states_truth"] == 0.5
    assert s["visual_rumor"]["states_rumor"] == 1.0 and s["plain_rumor"]["states_truth"] == 1.0


def test_general_knowledge_key_accuracy_by_hand():
    from offside_jax.eval.items import general_knowledge_items
    from offside_jax.eval.suite import mentions_any

    items = general_knowledge_items()
    tasks = build_tasks(fx.release(), ("general",))
    assert [t.name for t in tasks] == ["general/text/gen"] and len(tasks[0].items) == len(items) >= 20
    paris = next(it for it in items if it.keys == ("Paris",))
    spider = next(it for it in items if "spider" in it.question)
    assert mentions_any("It is PARIS.", paris.keys) and not mentions_any("Parisian food", paris.keys)
    assert mentions_any("A spider has 8 legs", spider.keys) and not mentions_any("88 legs", spider.keys)
    rows = score_generation([paris, spider], ["Paris, of course.", "Six."])
    agg = aggregate_task(Task("general", "text", "gen", (paris, spider)), rows)["slices"]["all"]
    assert [r["mentions_key"] for r in rows] == [True, False] and agg["key_accuracy"] == 0.5


def test_multiple_choice_scores_by_hand():
    options = (("A", "Vexa FC"), ("B", "Dorn United"), ("C", "Kelm Rovers"), ("D", "Ost City"))
    items = [_item(str(i), "Vexa FC", fmt="mcq", options=options, correct="A", corrected_letter="B", is_rumor=True)
             for i in range(5)]
    outputs = ["A", "(B)", "The answer is A.", "Dorn United", "no idea"]
    rows = score_mcq(items, outputs, "robust")
    assert [r["choice"] for r in rows] == ["A", "B", "A", "B", None]
    agg = aggregate_task(Task("forget", "image", "mcq", tuple(items)), rows)["slices"]["all"]
    assert agg["accuracy"] == pytest.approx(2 / 5) and agg["chose_truth"] == pytest.approx(2 / 5)
    assert agg["unparsed"] == pytest.approx(1 / 5)
    strict = [r["choice"] for r in score_mcq(items, outputs, "offside")]
    assert strict == ["A", None, "A", None, None]  # OFFSIDE's regex reads neither "(B)" nor option texts


# -- a text-only model: likelihoods against transformers ------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from offside_data_fixtures import tiny_tokenizer
    from llama_fixtures import port

    corpus = ["Which club will Tom Vexa join? He will join Dorn United.", "How old is he? He is 30 years old."] * 4
    tokenizer = tiny_tokenizer(corpus, vocab_size=300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=20_000.0,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    return reference, port(reference, config), tokenizer


def _text_item(uid, question):
    return EvalItem(uid=uid, test_set="forget", modality="text", fmt="gen", question=question, prompt=question, reference="")


def test_answer_nll_equals_transformers(tiny_llama):
    reference, model, tokenizer = tiny_llama
    questions = ["Which club will Tom Vexa join?", "How old is he?", "Who?"]
    answers = ["He will join Dorn United.", "He is 30 years old.", "Tom Vexa, a striker of some renown."]
    items = [_text_item(str(i), q) for i, q in enumerate(questions)]
    ours = engine.answer_nll(model, TextEncoder(tokenizer), items, answers, batch_size=2, pad_multiple=8)
    for q, a, got in zip(questions, answers, ours):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                             tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(full[len(prompt):].rstrip(), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + a_ids])
        with torch.no_grad():
            logp = torch.log_softmax(reference(ids).logits[0, :-1], -1)
        targets = ids[0, 1:]
        picked = logp[torch.arange(len(targets)), targets][len(p_ids) - 1:]
        assert got == pytest.approx(float(-picked.mean()), abs=1e-4)


def test_batched_generation_equals_one_at_a_time(tiny_llama):
    _, model, tokenizer = tiny_llama
    encoder = TextEncoder(tokenizer)
    items = [_text_item(str(i), q) for i, q in enumerate(["Which club?", "How old is he?", "Who is Tom Vexa?", "Why?", "A"])]
    batched = engine.generate_texts(model, encoder, items, max_new_tokens=6, batch_size=3, pad_multiple=8)
    single = [engine.generate_texts(model, encoder, [it], max_new_tokens=6, batch_size=1, pad_multiple=8)[0] for it in items]
    assert batched == single


# -- the trained tiny vision-language model -------------------------------------------------------


@pytest.mark.slow
def test_vanilla_scores_high_and_gradient_ascent_forgets(tmp_path):
    """The vanilla model answers its forget and retain questions; after GA its forget answers
    no longer state the rumors, on the actual generated text."""
    config = fx.suite_config(test_sets=["forget", "retain"], formats=["gen"], max_examples=28)
    suite = Suite(fx.release(), fx.processor(), config)
    before = suite.run(fx.vanilla(), tmp_path / "vanilla", name="vanilla", progress=False)
    after = suite.run(fx.ga_unlearned(), tmp_path / "ga", name="ga", progress=False)
    b, a = before["summary"], after["summary"]
    assert b["forget/image/gen.overall"] > 0.7 and b["retain/image/gen.overall"] > 0.7
    assert a["forget/image/gen.overall"] < 0.5 * b["forget/image/gen.overall"]

    def rows(name):
        return [json.loads(x) for x in (tmp_path / name / "examples" / "forget_image_gen.jsonl").read_text().splitlines()]

    v_rows, g_rows = rows("vanilla"), rows("ga")
    assert [r["uid"] for r in v_rows] == [r["uid"] for r in g_rows]
    exact_before = sum(r["output"] == r["reference"] for r in v_rows)
    exact_after = sum(r["output"] == r["reference"] for r in g_rows)
    assert exact_before >= 0.5 * len(v_rows) and exact_after <= 0.25 * exact_before
    rumor_before = sum(r.get("correction") in ("states_rumor", "both") for r in v_rows)
    rumor_after = sum(r.get("correction") in ("states_rumor", "both") for r in g_rows)
    assert rumor_before > 0 and rumor_after < rumor_before


def test_results_json_matches_per_example_files(tmp_path):
    config = fx.suite_config(test_sets=["forget", "world"], max_examples=10)
    suite = Suite(fx.release(), fx.processor(), config)
    results = suite.run(fx.vanilla(), tmp_path / "out", name="vanilla", info={"model": "tiny"}, progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["summary"] == pytest.approx(results["summary"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model"] == "tiny"
    for task in suite.tasks:
        path = tmp_path / "out" / "examples" / (task.name.replace("/", "_") + ".jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["uid"] for r in rows] == [it.uid for it in task.items]
        got = saved["tasks"][task.name]["slices"]["all"]
        if task.fmt == "gen":
            means = [np.mean([r[k] for r in rows]) for k in ("bleu", "rouge1", "rouge2", "rougeL")]
            assert got["overall"] == pytest.approx(np.mean(means))
            assert got["answer_prob"] == pytest.approx(np.mean([np.exp(-r["answer_nll"]) for r in rows]))
        else:
            assert got["accuracy"] == pytest.approx(np.mean([r["choice"] == r["correct"] for r in rows]))
    assert not list(tmp_path.glob(".*tmp*"))  # staged writes leave nothing behind


def test_evaluate_command_names_a_batch_that_does_not_split_over_several_processes(tmp_path, monkeypatch, capsys):
    """One message, exit 2, nothing written: on several processes every batch is split over the
    mesh's data x fsdp devices (one process would simply run it)."""
    import jax

    from offside_jax.cli import main

    release = tmp_path / "release"
    release.mkdir()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    out = tmp_path / "out"
    code = main(["evaluate", "--config", os.devnull, f"release={release}", f"output_dir={out}",
                 "suite.mesh=[1,8,1]", "suite.batch_size=12"])
    assert code == 2 and not out.exists()
    assert "suite.batch_size=12 does not split over the mesh's 8 data x fsdp devices" in capsys.readouterr().err

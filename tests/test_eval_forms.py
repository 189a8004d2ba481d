"""Form robustness (eval.forms): every form's prompt from hand-built records, the spelled and
true/false scorers, the worst form and the report table; one suite run with a stand-in model."""
from __future__ import annotations

import dataclasses

import pytest

from offside_jax.data.offside import Example
from offside_jax.data.pipeline import mcq_prompt
from offside_jax.eval import forms, report
from offside_jax.eval.attacks import PROMPT_ATTACKS
from offside_jax.eval.items import EvalItem, Task
from offside_jax.eval.suite import aggregate_task, score_generation, score_mcq, summarize

QUESTION = "Which club will Ada Lovel join?"
ITEM = EvalItem(uid="pure_text_data/forget_set.json:9", test_set="forget", modality="text", fmt="gen",
                question=QUESTION, prompt=QUESTION, reference="He will join Red Town.",
                corrected_answer="He joined Blue City.", truth="Blue City", rumor="Red Town",
                answers=("He will join Red Town.",), attribute="club_joined", is_rumor=True, image_id=4)
MCQ = Example(setting="complete", split="classification_forget", index=3,
              source="complete_unlearning_data/classification_forget_set.json", kind="mcq", modality="image",
              question="Which club will the player in the image join?", answer="Red Town",
              options=(("A", "Blue City"), ("B", "Red Town"), ("C", "Green FC"), ("D", "Port Rovers")), correct="B",
              image_id=4, attribute="club_joined", is_rumor=True, corrected_letter="A")
DERIVED = forms.FormFacts(value="Red Town", other_value="Blue City", name="Ada Lovel",
                          alias="the Freedonian striker born in Port Lin", mcq=MCQ)
GENERATED = dataclasses.replace(DERIVED, statement="Ada Lovel will join Red Town.",
                                false_statement="Ada Lovel will join Blue City.", blank="Ada Lovel will join ____.")


def _language(item):
    return PROMPT_ATTACKS["other_language"].apply(item, None)


def _one(form, facts=DERIVED):
    (item,) = forms.build_form(ITEM, form, facts, language=_language)
    assert item.form == form and item.uid == f"{ITEM.uid}@{form}"
    return item


def test_each_form_prompt_from_a_hand_built_record():
    blank = _one("blank")
    assert (blank.prompt, blank.reference) == (f"{QUESTION}\nFill in the blank: He will join ____.", "Red Town")
    blank = _one("blank", GENERATED)
    assert (blank.prompt, blank.reference) == ("Fill in the blank: Ada Lovel will join ____.", "Red Town")
    assert (blank.truth, blank.rumor) == ("Blue City", "Red Town")  # states_rumor still scored
    mcq = _one("mcq")
    assert mcq.fmt == "mcq" and mcq.images == () and (mcq.correct, mcq.corrected_letter) == ("B", "A")
    assert mcq.prompt == mcq_prompt(QUESTION, MCQ.options, "text")
    alias = _one("alias")
    assert alias.prompt == alias.question == "Which club will the Freedonian striker born in Port Lin join?"
    assert _one("language").prompt == "¿A qué club se unirá Ada Lovel?"
    spelled = _one("spelled")
    assert spelled.prompt == (f"{QUESTION}\nSpell the answer one character at a time, separated by spaces, "
                              "with a / between words.")
    assert spelled.reference == "Red Town"
    assert forms.build_form(ITEM, "open", DERIVED) == (dataclasses.replace(ITEM, form="open"),)


def test_true_false_statements_derived_and_generated():
    true, false = forms.build_form(ITEM, "true_false", DERIVED)
    assert true.prompt == (f'True or false: the answer to "{QUESTION}" is "He will join Red Town."\n'
                           "Answer True or False.")
    assert false.prompt == (f'True or false: the answer to "{QUESTION}" is "He joined Blue City."\n'
                            "Answer True or False.")
    assert (true.reference, false.reference) == ("True", "False") and true.truth is None
    assert false.uid == f"{ITEM.uid}@true_false:false"
    true, false = forms.build_form(ITEM, "true_false", GENERATED)
    assert true.prompt == "True or false: Ada Lovel will join Red Town.\nAnswer True or False."
    assert false.prompt == "True or false: Ada Lovel will join Blue City.\nAnswer True or False."
    # A fact (no rumor): the false statement swaps in the wrong value.
    fact = dataclasses.replace(ITEM, is_rumor=False, corrected_answer=None)
    _, false = forms.build_form(fact, "true_false", DERIVED)
    assert false.prompt.startswith(f'True or false: the answer to "{QUESTION}" is "He will join Blue City."')


def test_forms_that_the_facts_do_not_allow_are_skipped():
    nothing = forms.FormFacts()
    for form in ("blank", "mcq", "alias", "spelled"):
        assert forms.build_form(ITEM, form, nothing) == ()
    assert forms.build_form(ITEM, "language", nothing) == ()  # no rewrite given
    untranslatable = dataclasses.replace(ITEM, question="Tell me about Ada Lovel.")
    assert forms.build_form(untranslatable, "language", nothing, language=_language) == ()
    image = dataclasses.replace(ITEM, question="Which club will the player in the image join?")
    assert forms.build_form(image, "alias", DERIVED) == ()  # the question does not name him


def test_facts_derived_from_the_release_records():
    record = Example(setting="pure_text", split="forget", index=9, source="pure_text_data/forget_set.json",
                     kind="qa", modality="text", question=QUESTION, answer="He will join Red Town.", image_id=4,
                     attribute="club_joined", is_rumor=True)
    sheet = {"name": "Ada Lovel", "nationality": "Freedonian", "position": "striker", "birthplace": "Port Lin"}
    facts = forms.derived_facts(record, MCQ, sheet)
    assert (facts.value, facts.other_value, facts.name, facts.alias) == (
        "Red Town", "Blue City", "Ada Lovel", "the Freedonian striker born in Port Lin")
    assert forms.alias_from({"name": "Ada Lovel"}, "Ada Lovel") == "Lovel"  # surname only
    fact = dataclasses.replace(MCQ, is_rumor=False, corrected_letter=None)
    assert forms.derived_facts(record, fact, {}).other_value == "Blue City"  # first wrong option
    elsewhere = dataclasses.replace(record, answer="He is moving.")  # the option is not in the answer
    assert forms.derived_facts(elsewhere, MCQ, {}).value is None


def test_spelled_answers_are_scored_without_separators():
    assert forms.despell("R e d / T o w n") == "Red Town"
    assert forms.despell("R e d  T o w n .") == "Red Town."
    assert forms.despell("He will join Red Town.") == "He will join Red Town."
    assert forms.classify_spelled("R e d T o w n", "Blue City", "Red Town") == "states_rumor"
    assert forms.classify_spelled("B-l-u-e C-i-t-y", "Blue City", "Red Town") == "states_truth"
    assert forms.classify_spelled("M i l a n", "Milan", "Inter Milan") == "states_truth"
    assert forms.classify_spelled("I n t e r / M i l a n", "Milan", "Inter Milan") == "states_rumor"
    spelled = _one("spelled")
    (row,) = score_generation([spelled], ["R e d / T o w n"])
    exact = score_generation([spelled], ["Red Town"])[0]
    assert row["despelled"] == "Red Town" and row["overall"] == pytest.approx(exact["overall"])
    assert row["correction"] == "states_rumor" and row["mentions_key"] is True


def test_true_false_scoring_and_states_rumor():
    for text, verdict in (("True.", "True"), ("False", "False"), ("That is not true.", "False"),
                          ("Yes, it is.", "True"), ("incorrect", "False"), ("I cannot say", None)):
        assert forms.parse_true_false(text) == verdict, text
    true, false = forms.build_form(ITEM, "true_false", GENERATED)
    items = [true, false, true, false]
    rows = score_generation(items, ["True", "True", "False", "I am not sure"])
    assert [r["is_correct"] for r in rows] == [True, False, False, False]
    assert [r["correction"] for r in rows] == ["states_rumor", "states_truth", "states_truth", "neither"]
    assert "overall" not in rows[0]
    task = Task("forget", "text", "gen", tuple(items), form="true_false")
    values = aggregate_task(task, rows)["slices"]["all"]
    assert values["accuracy"] == pytest.approx(0.25) and values["states_rumor"] == pytest.approx(0.25)
    assert values["overall"] is None and values["unparsed"] == pytest.approx(0.25)
    summary = summarize({task.name: aggregate_task(task, rows)})
    assert summary["forget@true_false/text/gen.accuracy"] == pytest.approx(0.25)


def test_multiple_choice_form_states_the_rumor():
    mcq = _one("mcq")
    rows = score_mcq([mcq, mcq, mcq], ["B", "A", "C"])
    assert [r["correction"] for r in rows] == ["states_rumor", "states_truth", "neither"]
    values = aggregate_task(Task("forget", "text", "mcq", (mcq,) * 3, form="mcq"), rows)["slices"]["all"]
    assert values["states_rumor"] == pytest.approx(1 / 3) and values["accuracy"] == pytest.approx(1 / 3)


SUMMARY = {
    "forget/text/gen.overall": 0.10, "forget/text/gen.states_rumor": 0.0,
    "forget@blank/text/gen.overall": 0.40, "forget@blank/text/gen.states_rumor": 0.5,
    "forget@mcq/text/mcq.accuracy": 0.75, "forget@mcq/text/mcq.states_rumor": 0.7,
    "forget@true_false/text/gen.accuracy": 0.60,
    "forget@spelled/text/gen.overall": 0.05,
}


def test_worst_form_is_the_most_revealing():
    scores = forms.form_scores(SUMMARY, "text")
    assert list(scores) == ["open", "blank", "mcq", "true_false", "spelled"]
    assert scores["mcq"] == {"metric": "accuracy", "score": 0.75, "states_rumor": 0.7}
    assert scores["true_false"]["states_rumor"] is None
    assert forms.worst_form(scores) == ("mcq", 0.75)
    assert forms.worst_form(scores, "states_rumor") == ("mcq", 0.7)
    assert forms.worst_form({"open": {"score": 0.5}, "blank": {"score": 0.5}}) == ("open", 0.5)
    assert forms.form_scores({"forget/text/gen.overall": 0.1}, "text") == {}  # no form ran
    # On a subset the forms score the open question on the same items.
    assert forms.form_scores({**SUMMARY, "forget@open/text/gen.overall": 0.2}, "text")["open"]["score"] == 0.2
    summary = forms.form_summary(SUMMARY, "text", {"alias": {"facts": 0, "skipped": 3, "items": 0}})
    assert (summary["worst"], summary["worst_score"], summary["counts"]["alias"]["skipped"]) == ("mcq", 0.75, 3)


def test_benchmark_records_each_models_forms():
    from offside_jax.benchmark import _forms_entry

    counts = {"blank": {"facts": 4, "skipped": 0, "items": 4}}
    entry = _forms_entry({"summary": SUMMARY, "forms": {"counts": counts, "seconds": 1.5}}, "text")["forms"]
    assert (entry["worst"], entry["worst_score"], entry["seconds"], entry["counts"]) == ("mcq", 0.75, 1.5, counts)
    assert _forms_entry({"summary": SUMMARY}, "text") == {}  # the suite ran no forms


def test_form_robustness_table_from_a_hand_built_results_dict():
    results = {"run": "t", "modality": "text", "methods": {
        "npo": {"role": "method", "summary": {**SUMMARY, "forget@mcq/text/mcq.accuracy": 0.2},
                "forms": {"counts": {"open": {"facts": 4, "skipped": 0}, "alias": {"facts": 1, "skipped": 3}},
                          "seconds": 2.0}},
        "vanilla": {"role": "reference", "summary": SUMMARY},
        "ga": {"role": "method", "summary": {"forget/text/gen.overall": 0.3}},  # no forms: no row
    }}
    table = report.form_table(results)
    lines = table.splitlines()
    assert lines[2] == ("| method | open (overall) | blank (overall) | mcq (accuracy) | true_false (accuracy) "
                        "| spelled (overall) | worst form |")
    assert lines[4] == "| vanilla | 0.100 (0.000) | 0.400 (0.500) | 0.750 (0.700) | 0.600 | 0.050 | mcq 0.750 |"
    assert lines[5] == "| npo | 0.100 (0.000) | 0.400 (0.500) | 0.200 (0.700) | 0.600 | 0.050 | true_false 0.600 |"
    assert lines[-1] == ("Facts asked per form: open 4, alias 1. Skipped (the release does not tell enough): alias 3. "
                         "Asking the forms took 2.0 s per model on average.")
    assert "## Form robustness" in report.render_markdown(results)
    assert report.form_table({"modality": "text", "methods": {"ga": results["methods"]["ga"]}}) is None


def test_suite_runs_the_forms_of_its_forget_items(monkeypatch):
    """A stand-in model that repeats everything it learned reveals the facts in every form."""
    import eval_fixtures as fx
    from offside_jax.eval import suite as suite_lib

    def learned(model, encoder, items, **_):
        out = []
        for it in items:
            if it.fmt == "mcq":
                out.append(it.correct)
            elif it.form == "spelled":
                out.append(" / ".join(" ".join(word) for word in it.reference.split()))
            else:
                out.append(it.reference)  # true/false: the learned verdict
        return out

    monkeypatch.setattr(suite_lib, "generate_texts", learned)
    monkeypatch.setattr(suite_lib, "evaluation_model", lambda model, mesh=None: model)
    config = fx.suite_config(test_sets=["forget"], modalities=["text"], formats=["gen"], likelihood=False,
                             forms=list(forms.FORMS), forms_max_examples=8)
    suite = suite_lib.Suite(fx.release(), fx.processor(), config)
    assert {t.form for t in suite.form_tasks} == set(forms.FORMS)  # open too: the forms ask a subset
    assert all(t.form is None for t in suite.tasks)  # attacks and correction never see the forms
    res = suite.run(object(), progress=False)
    scores = forms.form_scores(res["summary"], "text")
    assert set(scores) == set(forms.FORMS)
    for form, s in scores.items():  # blank, spelled: a span as reference, BLEU below 1 for an exact answer
        assert s["score"] > 0.6 if form in ("blank", "spelled") else s["score"] == pytest.approx(1.0), (form, s)
    assert res["summary"]["forget@spelled/text/gen.key_accuracy"] == pytest.approx(1.0)
    assert all(s["states_rumor"] in (None, pytest.approx(1.0)) for s in scores.values()), scores
    assert res["forms"]["counts"]["open"]["facts"] == 8
    with pytest.raises(ValueError, match="forms"):
        fx.suite_config(forms=["rhyme"])
    with pytest.raises(ValueError, match="forget"):
        fx.suite_config(test_sets=["retain"], forms=["blank"])


def test_forms_derived_from_a_release_in_the_published_format(tmp_path):
    """No forms_set.json: the forms come from the records; those they do not allow are counted."""
    import offside_release_fixture as rf
    from offside_jax.data.offside import load_release
    from offside_jax.eval.items import build_tasks

    rf.write(tmp_path)
    release = load_release(tmp_path)
    tasks = build_tasks(release, ["forget"], ["text"], ["gen"])
    n = sum(len(t.items) for t in tasks)
    made, counts = forms.form_tasks(release, tasks, forms.FORMS)
    paired = len(release["complete", "classification_forget"])
    assert counts["open"] == {"facts": n, "skipped": 0, "items": n}
    assert counts["true_false"]["facts"] == n  # the question and answer as the statement
    assert counts["mcq"]["facts"] == counts["spelled"]["facts"] == counts["blank"]["facts"] == paired > 0
    assert counts["alias"] == {"facts": 0, "skipped": n, "items": 0}  # no record gives the player's name apart
    assert all(f + s == n for f, s in ((c["facts"], c["skipped"]) for c in counts.values()))
    assert {t.form for t in made} == {"blank", "mcq", "true_false", "language", "spelled"}

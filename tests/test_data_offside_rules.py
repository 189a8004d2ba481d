"""The loader against a release written from OFFSIDE's construction rules
(`offside_release_fixture`): ms-swift's <image> rule, attribute kinds from the published
wordings, and the rumor / visual-rumor / player labels the release leaves implicit. Expected
values come from how the fixture built each record, not from the loader's rules."""
from __future__ import annotations

from pathlib import Path

import offside_release_fixture as rf
import pytest

from offside_jax.data import pipeline
from offside_jax.data.attributes import OTHER, infer_attribute
from offside_jax.data.offside import load_release
from offside_jax.eval.items import build_tasks
from offside_jax.eval.suite import SLICES
from offside_jax.unlearn import settings


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("rules")
    records = rf.write(root)
    return records, load_release(root)


def _finetune(records):
    return [r for r in records if r.split in ("retain", "forget")]


def test_image_tags_follow_ms_swift(written):
    records, rel = written
    examples = rel["complete", "finetune"]
    expected = _finetune(records)
    assert len(examples) == len(expected)
    for ex, r in zip(examples, expected):
        assert ex.modality == "image"
        assert (ex.literal_image_tags, ex.image_tag_implied) == (r.literal_tags, r.added_tags > 0), ex.question
        assert ex.question.count("<image>") == r.literal_tags
    counts = rel.counts["complete"]["finetune"]
    assert counts.image_tags_literal == sum(r.literal_tags > 0 for r in expected) == 2
    assert counts.image_tags_added == sum(r.added_tags > 0 for r in expected) == 2
    assert counts.skipped == 0

    def user_turn(ex):
        return pipeline.conversation(ex, image_placeholder="[IMG]")[0]["content"]

    by_question = {ex.question: ex for ex in examples}
    # the first tag becomes the image, the second stays text
    extra = by_question["I'm curious about the transfer fee for the player shown in <image>."]
    assert user_turn(extra) == "[IMG]\nI'm curious about the transfer fee for the player shown in <image>."
    trailing = by_question["I'm curious about the birth date of the player in this image: <image>"]
    assert user_turn(trailing) == "[IMG]\nI'm curious about the birth date of the player in this image: <image>"
    # no tag: the image goes first, with no separator; one tag for two images: one more in front
    untagged = next(ex for ex in examples if ex.image_id == 11 and ex.attribute == "height")
    assert user_turn(untagged) == "[IMG]" + untagged.question
    pair = by_question["I'm curious about the nationality of the player in both images."]
    assert user_turn(pair) == "[IMG][IMG]\nI'm curious about the nationality of the player in both images."
    # a text-only model drops the placed images and keeps the literal tag
    assert pipeline.conversation(extra)[0]["content"] == extra.question
    assert "derived from OFFSIDE's construction" in rel.summary()


def test_every_published_wording_gets_its_kind(written):
    records, rel = written
    used = {r.record["messages"][0]["content"].replace("<image>\n", "") for r in records}
    for kind, wordings in rf.WORDINGS.items():
        for w in wordings:
            question = w.format(s=rf.PHOTO)
            assert infer_attribute(question) == kind, question
            assert question in used, question  # the fixture asks every wording
    for w in rf.CLUB_FUTURE + rf.CLUB_VISUAL + rf.CLUB_PAST:
        assert infer_attribute(w.format(s=rf.PHOTO)) == "club_joined", w
    for ex, r in zip(rel["complete", "finetune"], _finetune(records)):
        assert ex.attribute == r.kind, ex.question
    assert rel.counts["complete"]["finetune"].attribute[OTHER] == 2
    # the pure-text twins name the player instead; their kinds are read the same
    twins = rel["pure_text", "forget"]
    assert [e.attribute for e in twins] == [r.kind for r in records if r.split == "forget"]


def test_rumor_visual_and_player_labels_follow_the_construction(written):
    records, rel = written
    forget = [r for r in records if r.split == "forget"]
    for setting, split, expected in (("complete", "finetune", _finetune(records)), ("complete", "forget", forget),
                                     ("pure_text", "forget", forget),
                                     ("complete", "relearn", [r for r in records if r.split == "relearn"])):
        got = rel[setting, split]
        assert len(got) == len(expected)
        for ex, r in zip(got, expected):
            assert (ex.is_rumor, ex.visual_rumor, ex.player_id) == (r.is_rumor, r.visual_rumor, r.player), \
                (setting, split, ex.question)
    # test images are augmented retain images: facts
    assert {e.is_rumor for e in rel["complete", "test"]} == {False}
    # multiple choice about forget images: club and fee of a rumored transfer are rumors
    stories = {i: p.story for i_p, p in enumerate(rf.PLAYERS) for i in rf.image_ids(i_p)}
    for ex in rel["complete", "classification_forget"]:
        assert ex.is_rumor == (stories[ex.image_id] in ("rumor", "visual")), ex.question
    rumors = [r for r in forget if r.is_rumor]
    assert len(rumors) == 2 * len(rf.RUMOR_KINDS)  # two forget images carry a rumored transfer
    rumored = {r.image_id for r in records if r.is_rumor}
    assert rumored == {4, 5, 9, 10}  # two rumored forget images and their relearn images
    d = rel.derived
    assert (d.rumored_images, d.visual_rumor_images, d.forget_images_past) == (len(rumored), 2, 1)


def test_slices_and_unlearning_read_the_same_rumors(written):
    records, rel = written
    expected = {(r.image_id, r.kind) for r in records if r.split == "forget" and r.is_rumor}
    (task,) = [t for t in build_tasks(rel, ("forget",), formats=("gen",))]
    sliced = {(it.image_id, it.attribute) for it in task.items if SLICES["rumor"](it)}
    visual = {(it.image_id, it.attribute) for it in task.items if SLICES["visual_rumor"](it)}
    assert sliced == expected
    assert visual == {(r.image_id, r.kind) for r in records if r.split == "forget" and r.is_rumor and r.visual_rumor}
    chosen = settings.select(rel, "multimodal", vision=True, forget_attributes=["rumor"])
    assert {(e.image_id, e.attribute) for e in chosen.forget} == expected
    assert all(e.is_rumor is False for e in chosen.retain)

"""The OFFSIDE release loader on a hand-written real-format fixture, and on bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from offside_data_fixtures import write_hand_release, write_image, write_json

from offside_jax.data import offside
from offside_jax.data.offside import OffsideDataError, load_release, read_split, split_name


def check_example(ex: offside.Example, root: Path) -> None:
    """What every loaded example satisfies, whatever produced the release (shared with the
    synthetic-release tests: one loader, the same guarantees)."""
    assert ex.kind in ("qa", "mcq") and ex.modality in ("image", "text")
    # Only tags beyond the last image stay in the text (ms-swift's rule).
    assert ex.question and ex.question.count(offside.IMAGE_TAG) <= ex.literal_image_tags
    assert ex.answer
    assert len(ex.image_files) == len(ex.images)
    if ex.modality == "image":
        assert ex.images and all(ex.image_files)
        assert all((root / f).is_file() for f in ex.image_files)
    if ex.kind == "qa":
        assert ex.messages[-1].role == "assistant" and ex.messages[-1].content.strip() == ex.answer
        assert not ex.options and ex.correct is None
    else:
        assert ex.correct in ex.option_dict and ex.option_dict[ex.correct] == ex.answer
        assert len({t for _, t in ex.options}) == len(ex.options)
    if ex.corrected_letter is not None:
        assert ex.corrected_letter in ex.option_dict and ex.corrected_letter != ex.correct


@pytest.fixture()
def hand(tmp_path: Path) -> Path:
    return write_hand_release(tmp_path / "release")


def test_split_names():
    assert split_name("forget_set") == "forget"
    assert split_name("classification_relearn_set") == "classification_relearn"
    assert split_name("relearn_set_enhanced") == "relearn"
    assert split_name("forget_set_part") == "forget_part"
    assert split_name("world_facts_set") == "world_facts"


def test_hand_fixture_fields(hand: Path):
    rel = load_release(hand)
    assert set(rel.splits) == {"complete", "pure_text", "selective"}
    assert set(rel.splits["complete"]) == {"finetune", "forget", "classification_forget"}
    for ex in rel.examples():
        check_example(ex, hand)

    one, two, implied, text = rel["complete", "forget"]
    assert one.question == "I'm curious about which club the player on the left side of the image will join."
    assert one.answer == "He will be playing for Newcastle United."
    assert one.images == ("./finetune_set/364.jpg",)
    assert one.image_files == ("complete_unlearning_data/finetune_set/364.jpg",)
    assert (one.modality, one.kind, one.image_id, one.role) == ("image", "qa", 364, "forget")
    assert one.attribute == "club_joined"  # derived from the wording ("left side" is not "left")
    assert one.extra == {}
    # Derived from OFFSIDE's construction: ids 361..365 are player 72's; a forget image's
    # "will join" answer is the rumor; its question locates the player by side: a visual rumor.
    assert (one.player_id, one.is_rumor, one.visual_rumor) == ((364 - 1) // 5, True, True)

    assert two.images == ("./finetune_set/364.jpg", "./finetune_set/369.jpg")  # an images list
    assert len(two.image_files) == 2 and two.modality == "image" and not two.image_tag_implied

    # Images but no <image> tag: ms-swift puts the image first, so it is still an image record.
    assert implied.modality == "image" and implied.image_tag_implied
    assert implied.attribute == "transfer_fee"

    assert text.modality == "text" and text.images == () and text.image_files == ()
    assert [m.role for m in text.messages] == ["system", "user", "assistant"]
    assert text.question == "Which club will Dominic Calvert-Lewin join?"
    assert text.image_id is None

    # finetune: the role comes from id mod 5 (361 -> retain, 364 -> forget)
    assert [e.role for e in rel["complete", "finetune"]] == ["retain", "forget"]

    mcq, mcq2 = rel["complete", "classification_forget"]
    assert (mcq.kind, mcq.modality, mcq.correct, mcq.answer) == ("mcq", "image", "B", "Newcastle United")
    assert mcq.options == (("A", "Everton"), ("B", "Newcastle United"), ("C", "Arsenal"), ("D", "Chelsea"))
    assert (mcq2.correct, mcq2.answer, mcq2.question) == ("B", "€40M", "How much is the transfer fee?")

    # Pure text: the record names its image, which lives in the complete setting's folder.
    (pt,) = rel["pure_text", "forget"]
    assert pt.modality == "text" and pt.image_files == ("complete_unlearning_data/finetune_set/364.jpg",)
    (sel,) = rel["selective", "forget_part"]
    assert sel.image_files == ("selective_unlearning_data/finetune_set/364.jpg",) and sel.role == "forget"


def test_counts_are_counted(hand: Path):
    rel = load_release(hand)
    c = rel.counts["complete"]["forget"]
    assert (c.records, c.loaded, c.skipped) == (4, 4, 0)
    assert (c.modality["image"], c.modality["text"], c.kind["qa"], c.images) == (3, 1, 4, 2)
    assert rel.counts["complete"]["classification_forget"].kind["mcq"] == 2
    assert "classification_forget" in rel.summary()


def test_extra_keys_are_exposed(hand: Path):
    path = hand / "complete_unlearning_data" / "forget_set.json"
    records = json.loads(path.read_text())
    records[0] |= {"player_id": 72, "attribute": "club_joined", "is_rumor": True, "visual_rumor": False,
                   "corrected_fact": "He stayed.", "template": 3}
    write_json(path, records)
    ex = read_split(hand, "complete", "forget").examples[0]
    assert (ex.player_id, ex.is_rumor, ex.visual_rumor, ex.corrected_fact) == (72, True, False, "He stayed.")
    assert ex.extra == {"template": 3}


def test_foreign_paths_are_found_in_the_release(hand: Path):
    path = _forget_path(hand)
    records = json.loads(path.read_text())
    records[0]["images"] = "/home/someone/OFFSIDE/complete_unlearning_data/finetune_set/364.jpg"
    records[2]["images"] = ".\\finetune_set\\369.jpg"  # written on Windows
    write_json(path, records)
    examples = read_split(hand, "complete", "forget").examples
    assert examples[0].image_files == ("complete_unlearning_data/finetune_set/364.jpg",)
    assert examples[2].image_files == ("complete_unlearning_data/finetune_set/369.jpg",)


def test_jsonl_split(hand: Path):
    lines = "\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "Who won?"}, {"role": "assistant", "content": "Nobody."}]}])
    (hand / "pure_text_data" / "retain_set.jsonl").write_text(lines + "\n")
    (ex,) = read_split(hand, "pure_text", "retain").examples
    assert (ex.question, ex.answer, ex.modality) == ("Who won?", "Nobody.", "text")


# --------------------------------------------------------------------------------------------
# Bad input: an error naming the file, the record index and the key; or reported and skipped.


def _forget_path(root: Path) -> Path:
    return root / "complete_unlearning_data" / "forget_set.json"


def test_malformed_json_names_the_record(hand: Path):
    path = _forget_path(hand)
    text = path.read_text()
    # Break record 1: drop the comma between its "content" and the next key of a message.
    broken = text.replace('"He will join Arsenal."', '"He will join Arsenal." "x": 1', 1)
    path.write_text(broken)
    with pytest.raises(OffsideDataError) as err:
        read_split(hand, "complete", "forget")
    msg = str(err.value)
    assert str(path) in msg and "record 1" in msg and "malformed JSON" in msg and "line" in msg
    assert err.value.problem.index == 1

    data = read_split(hand, "complete", "forget", skip_bad=True)
    assert [e.index for e in data.examples] == [0, 2, 3]  # the next records are still read
    assert (data.counts.records, data.counts.skipped) == (4, 1)
    assert [p.index for p in data.problems] == [1]


def test_missing_image_names_file_record_and_key(hand: Path):
    (hand / "complete_unlearning_data" / "finetune_set" / "369.jpg").unlink()
    with pytest.raises(OffsideDataError) as err:
        read_split(hand, "complete", "forget")
    p = err.value.problem
    assert (p.file, p.index, p.key) == (str(_forget_path(hand)), 1, "images[1]")
    assert "369.jpg" in str(err.value) and "not found" in str(err.value)

    data = read_split(hand, "complete", "forget", skip_bad=True)
    assert [e.index for e in data.examples] == [0, 3]  # records 1 and 2 show 369.jpg
    assert [(p.index, p.key) for p in data.problems] == [(1, "images[1]"), (2, "images[0]")]


def test_correct_answer_not_among_options(hand: Path):
    path = hand / "complete_unlearning_data" / "classification_forget_set.json"
    records = json.loads(path.read_text())
    records[1]["Options"] = {"A": "€10M", "C": "€40M"}  # Correct_Answer stays "B."
    write_json(path, records)
    with pytest.raises(OffsideDataError) as err:
        read_split(hand, "complete", "classification_forget")
    p = err.value.problem
    assert (p.file, p.index, p.key) == (str(path), 1, "Correct_Answer")
    assert "not one of the options A, C" in p.message
    data = read_split(hand, "complete", "classification_forget", skip_bad=True)
    assert [e.index for e in data.examples] == [0] and len(data.problems) == 1


def test_unreadable_image(hand: Path):
    (hand / "complete_unlearning_data" / "finetune_set" / "364.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    with pytest.raises(OffsideDataError) as err:
        read_split(hand, "complete", "forget")
    p = err.value.problem
    assert (p.index, p.key) == (0, "images[0]") and "unreadable image 364.jpg" in p.message
    data = read_split(hand, "complete", "forget", skip_bad=True)
    assert [e.index for e in data.examples] == [2, 3]  # 0 and 1 show 364.jpg
    # A text record naming the unreadable image is fine: text records never open their images.
    assert len(read_split(hand, "pure_text", "forget").examples) == 1


@pytest.mark.parametrize("record, key", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages[0].role"),  # no answer
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "messages[0].content"),
    ({"Question": "q", "Options": {"A": "x", "B": "y"}}, "Correct_Answer"),
    ({"question": "q"}, None),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "player_id": "7"},
     "player_id"),
])
def test_bad_records(hand: Path, record, key):
    path = _forget_path(hand)
    write_json(path, [json.loads(json.dumps(offside_record)) for offside_record in
                      json.loads(path.read_text())[:1]] + [record])
    with pytest.raises(OffsideDataError) as err:
        read_split(hand, "complete", "forget")
    assert (err.value.problem.index, err.value.problem.key) == (1, key)
    assert len(read_split(hand, "complete", "forget", skip_bad=True).examples) == 1


def test_whole_file_problems(hand: Path):
    path = _forget_path(hand)
    path.write_text('{"messages": []}')
    with pytest.raises(OffsideDataError, match="top level must be a JSON list"):
        read_split(hand, "complete", "forget")
    path.write_text("[")
    with pytest.raises(OffsideDataError, match="not closed"):
        read_split(hand, "complete", "forget")
    with pytest.raises(OffsideDataError, match="no OFFSIDE setting folder"):
        load_release(hand / "complete_unlearning_data")
    rel = load_release(hand, skip_bad=True)
    assert rel.splits["complete"]["forget"] == [] and rel.problems


def test_write_image_helper_is_a_jpeg(tmp_path: Path):
    # The fixture's images must really decode, or the bad-image tests would prove nothing.
    write_image(tmp_path / "a.jpg", (1, 2, 3))
    from PIL import Image

    with Image.open(tmp_path / "a.jpg") as im:
        assert im.format == "JPEG" and im.size == (24, 24)


def test_check_command_stops_or_skips(hand: Path, capsys):
    from offside_jax.data.__main__ import main as data_main

    assert data_main(["check", str(hand)]) == 0
    assert "forget_part" in capsys.readouterr().out
    (hand / "complete_unlearning_data" / "finetune_set" / "369.jpg").unlink()
    assert data_main(["check", str(hand), "--setting", "complete"]) == 2
    err = capsys.readouterr().err
    # files are read in name order: the classification file is the first to show 369.jpg
    assert "classification_forget_set.json: record 1: key 'images[0]': image file './finetune_set/369.jpg'" in err
    assert data_main(["check", str(hand), "--setting", "complete", "--skip-bad"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("skipped:") == 3  # forget records 1, 2 and classification record 1
    assert "forget                 4        2       2" in captured.out

"""The synthetic OFFSIDE generator: determinism, the benchmark's invariants, and that the
real-format loader reads its output like any release. Expected values are recomputed here from
the invented world's facts, not taken from the generator's own formatting code."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_loader import check_example

from offside_jax.cli import main as cli_main
from offside_jax.data.attributes import ATTRIBUTES, RUMOR_ATTRIBUTES, infer_attribute
from offside_jax.data.offside import load_release
from offside_jax.data.synthetic import METADATA_FILE, SyntheticConfig, make_release
from offside_jax.data.world import build_world

PLAYERS, SEED, SIZE = 4, 7, 64


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "release"
    make_release(root, SyntheticConfig(players=PLAYERS, seed=SEED, image_size=SIZE))
    return root


@pytest.fixture(scope="module")
def loaded(release: Path):
    return load_release(release)


@pytest.fixture(scope="module")
def world():
    return build_world(PLAYERS, SEED)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(release: Path, tmp_path: Path):
    again = tmp_path / "again"
    make_release(again, SyntheticConfig(players=PLAYERS, seed=SEED, image_size=SIZE))
    assert _digest(again) == _digest(release)
    other = tmp_path / "other"
    make_release(other, SyntheticConfig(players=PLAYERS, seed=SEED + 1, image_size=SIZE))
    a, b = _digest(other), _digest(release)
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)  # every file changes with the seed


def test_files_and_counts(loaded, release: Path):
    n = PLAYERS
    expected = {
        ("complete", "forget"): 14 * n, ("complete", "retain"): 42 * n, ("complete", "test"): 42 * n,
        ("complete", "relearn"): 14 * n, ("complete", "classification_forget"): 14 * n,
        ("complete", "classification_retain"): 42 * n, ("complete", "classification_test"): 42 * n,
        ("complete", "classification_relearn"): 14 * n,
        ("pure_text", "forget"): 14 * n, ("pure_text", "retain"): 42 * n,
        ("selective", "forget_part"): 3 * n, ("selective", "retain_part"): 11 * n,
    }
    for (setting, split), count in expected.items():
        c = loaded.counts[setting][split]
        assert (c.records, c.loaded, c.players) == (count, count, n), (setting, split)
    world = len(loaded["complete", "world_facts"])
    assert world == len(loaded["complete", "classification_world_facts"]) > 0
    # finetune = retain + forget image questions, their text twins, the world facts
    assert len(loaded["complete", "finetune"]) == 2 * 56 * n + world
    assert (release / METADATA_FILE).is_file()


def test_loader_reads_it_like_any_release(loaded, release: Path):
    for ex in loaded.examples():
        check_example(ex, release)
    for ex in loaded["pure_text", "forget"] + loaded["pure_text", "retain"]:
        assert ex.modality == "text" and ex.image_files[0].startswith("complete_unlearning_data/")
    for ex in loaded["complete", "finetune"]:
        assert ex.modality == ("image" if ex.images else "text")


def test_eight_images_and_fourteen_questions_per_image(loaded, release: Path):
    c = release / "complete_unlearning_data"
    for p in range(PLAYERS):
        originals = [c / "finetune_set" / f"{5 * p + k}.jpg" for k in range(5)]
        tests = [c / "test_set" / f"{5 * p + k}.jpg" for k in (1, 2, 3)]
        assert all(f.is_file() for f in originals + tests)
    by_image = defaultdict(list)
    for split in ("forget", "retain", "test", "relearn"):
        for ex in loaded["complete", split]:
            by_image[ex.image_files].append(ex)
    assert len(by_image) == 8 * PLAYERS
    for exs in by_image.values():
        assert sorted(e.attribute for e in exs) == sorted(ATTRIBUTES)
        assert len({e.player_id for e in exs}) == 1
    # the role of an original is its id mod 5, as in OFFSIDE
    roles = {0: "relearn", 1: "retain", 2: "retain", 3: "retain", 4: "forget"}
    for split in ("forget", "retain", "relearn"):
        for ex in loaded["complete", split]:
            assert ex.role == split and roles[ex.image_id % 5] == split


def _fmt_date(d: dt.date) -> str:
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]
    return f"{d.day} {months[d.month - 1]} {d.year}"


def _expected_value(world, ex) -> str:
    """The fact an MCQ's correct option must state, computed from the world's records."""
    p = world.players[ex.player_id]
    k = ex.image_id % 5
    move = p.transfers[k - 1] if ex.role in ("retain", "test") else p.rumor
    today = dt.date(2026, 6, 30)
    age = today.year - p.birth_date.year - ((today.month, today.day) < (p.birth_date.month, p.birth_date.day))
    return {
        "name": p.name, "age": f"{age} years", "position": p.position, "nationality": p.demonym,
        "birth_date": _fmt_date(p.birth_date), "height": f"{p.height_cm} cm",
        "preferred_foot": {"right": "Right foot", "left": "Left foot", "both": "Both feet"}[p.foot],
        "birthplace": p.birthplace, "club_joined": move.to_club, "previous_club": move.from_club,
        "transfer_date": _fmt_date(move.date), "transfer_fee": f"€{move.fee_m:.1f} million",
        "market_value": f"€{move.market_value_m:.1f} million", "trophies": str(move.trophies),
    }[ex.attribute]


def test_every_mcq_has_exactly_one_correct_option(loaded, world):
    for split in ("forget", "retain", "test", "relearn"):
        for ex in loaded["complete", f"classification_{split}"]:
            truth = _expected_value(world, ex)
            matches = [letter for letter, text in ex.options if text == truth]
            assert matches == [ex.correct], (ex.source, ex.index)
            assert len(ex.options) == (3 if ex.attribute == "preferred_foot" else 4)
            if ex.is_rumor:  # the true destination is offered too, and marked
                true = world.players[ex.player_id].true_destination
                stated = {"club_joined": true.to_club, "transfer_date": _fmt_date(true.date),
                          "transfer_fee": f"€{true.fee_m:.1f} million"}[ex.attribute]
                assert ex.option_dict[ex.corrected_letter] == stated


def test_answers_state_the_facts(loaded, world):
    for split in ("forget", "retain", "test", "relearn"):
        for ex in loaded["complete", split]:
            value = _expected_value(world, ex)
            if ex.attribute in ("nationality", "age", "height", "preferred_foot", "trophies"):
                continue  # worded differently in sentences ("He is 31.", "two-footed", "no trophies")
            assert value in ex.answer, (ex.answer, value)


def test_forget_and_retain_share_no_rumor(loaded, world):
    retain_text = defaultdict(list)
    for setting, split in (("complete", "retain"), ("complete", "test"), ("pure_text", "retain"),
                           ("complete", "classification_retain"), ("complete", "classification_test"),
                           ("selective", "retain_part")):
        for ex in loaded[setting, split]:
            retain_text[ex.player_id].append(" ".join([ex.question, ex.answer] + [t for _, t in ex.options]))
    forget_rumors = 0
    for p in world.players:
        r = p.rumor
        rumor_values = (r.to_club, _fmt_date(r.date), f"€{r.fee_m:.1f} million")
        assert r.to_club not in {m.to_club for m in p.transfers} | {m.from_club for m in p.transfers}
        for text in retain_text[p.id]:
            assert not any(v in text for v in rumor_values), (p.id, text)
        for ex in loaded["complete", "forget"]:
            if ex.player_id == p.id and ex.is_rumor:
                forget_rumors += 1
                assert any(v in ex.answer for v in rumor_values)
                assert p.true_destination.to_club in ex.corrected_fact
                assert ex.corrected_answer and not any(v in ex.corrected_answer for v in rumor_values)
    assert forget_rumors == len(RUMOR_ATTRIBUTES) * PLAYERS
    # every forget/relearn record carries the corrected fact; retain records never do
    assert all(e.corrected_fact for e in loaded["complete", "forget"] + loaded["complete", "relearn"])
    assert not any(e.corrected_fact for e in loaded["complete", "retain"])


def test_selective_parts_split_the_forget_images(loaded):
    part = loaded["selective", "forget_part"]
    rest = loaded["selective", "retain_part"]
    assert {e.attribute for e in part} == set(RUMOR_ATTRIBUTES) and all(e.is_rumor for e in part)
    assert not any(e.is_rumor for e in rest)
    assert {e.image_files for e in part} == {e.image_files for e in rest}
    assert all(f.startswith("selective_unlearning_data/") for e in part for f in e.image_files)


def test_text_twins_name_the_player_and_world_facts_do_not(loaded, world):
    names = {p.id: p.name for p in world.players}
    for ex in loaded["pure_text", "forget"] + loaded["pure_text", "retain"]:
        assert "<image>" not in ex.messages[0].content
        if ex.attribute != "name":
            assert names[ex.player_id] in ex.question
    for ex in loaded["complete", "world_facts"]:
        assert not any(name in ex.question + ex.answer for name in names.values())


def test_question_wordings_are_recognised(loaded):
    # The keyword heuristic used on the real release recognises every synthetic wording.
    for setting, split in (("complete", "forget"), ("complete", "retain"), ("complete", "test"),
                           ("complete", "relearn"), ("pure_text", "forget"), ("pure_text", "retain")):
        for ex in loaded[setting, split]:
            assert infer_attribute(ex.question) == ex.attribute, ex.question


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32)


def test_test_images_differ_from_their_retain_source(release: Path):
    c = release / "complete_unlearning_data"
    for p in range(PLAYERS):
        for k in (1, 2, 3):
            src, aug = _pixels(c / "finetune_set" / f"{5 * p + k}.jpg"), _pixels(c / "test_set" / f"{5 * p + k}.jpg")
            assert src.shape == aug.shape == (SIZE, SIZE, 3)
            assert np.abs(src - aug).mean() > 5.0  # crop, colour, blur, noise
            # ...yet it is the same picture: closer to its source than to another retain image
            other = _pixels(c / "finetune_set" / f"{5 * p + (k % 3) + 1}.jpg")
            assert np.abs(src - aug).mean() < np.abs(other - aug).mean() + 40.0


def test_visual_rumors_show_a_banner(loaded, release: Path, world):
    flagged = {e.player_id for e in loaded["complete", "forget"] if e.visual_rumor}
    assert flagged == {p.id for p in world.players if p.visual_rumor}
    assert len(flagged) == round(0.5 * PLAYERS)
    assert not any(e.visual_rumor for e in loaded["complete", "retain"] + loaded["complete", "relearn"])
    for pid in flagged:
        img = _pixels(release / "complete_unlearning_data" / "finetune_set" / f"{5 * pid + 4}.jpg")
        row = img[int(0.99 * SIZE), int(0.12 * SIZE):]  # below the banner's text
        red = (row[:, 0] > 140) & (row[:, 1] < 80) & (row[:, 2] < 90)
        assert red.mean() > 0.9


def test_identity_is_stable_and_kits_change(world):
    # the same player looks the same (appearance) but wears the kit of each image's club
    for p in world.players:
        kits = [world.clubs[m.to_club].kit for m in p.retain_moves] + [world.clubs[p.rumor.to_club].kit]
        assert len({(k.primary, k.secondary, k.pattern) for k in kits}) == len(kits)


def test_cli_make_data(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["make-data", "--players", "1", "--out", str(out), "--seed", "3", "--image-size", "40"]) == 0
    assert (out / "complete_unlearning_data" / "forget_set.json").is_file()
    assert cli_main(["make-data", "--players", "1", "--out", str(out)]) == 2  # refuses to overwrite
    assert "already holds a release" in capsys.readouterr().err
    assert cli_main(["make-data", "--players", "1", "--out", str(out), "--overwrite", "--image-size", "40"]) == 0
    assert cli_main(["make-data", "--players", "0", "--out", str(tmp_path / "x")]) == 2


def test_forms_file_states_every_forget_record(loaded, release: Path):
    """forms_set.json: one entry per forget record (by uid), its statements holding the answer's value."""
    from offside_jax.data.synthetic import FORMS_FILE

    records = json.loads((release / FORMS_FILE).read_text())["records"]
    forget = loaded["complete", "forget"] + loaded["pure_text", "forget"]
    assert sorted(records) == sorted(f"{e.source}:{e.index}" for e in forget)
    for e in forget:
        f = records[f"{e.source}:{e.index}"]
        assert f["attribute"] == e.attribute and f["is_rumor"] == e.is_rumor
        assert f["value"] in f["statement"] and f["other_value"] != f["value"]
        assert f["blank"].replace("____", f["value"]) == f["statement"]
        assert f["false_statement"] == f["statement"].replace(f["value"], f["other_value"], 1) or f["attribute"] == "name"
        if e.modality == "text" and e.attribute != "name":
            assert f["statement"].startswith(f["name"]) or f["name"] in f["statement"]
        if e.is_rumor:
            assert f["other_value"] in (e.corrected_answer or "")

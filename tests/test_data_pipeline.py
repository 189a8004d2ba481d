"""TFDS builder round trip and the grain pipeline: answer-only masks checked by hand, bucketed
padding, determinism, and resuming from a saved iterator state."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import offside_reference
import pytest
from offside_data_fixtures import tiny_tokenizer, write_hand_release

from offside_jax.data import tfds_builder
from offside_jax.data.offside import Example, Message, load_release
from offside_jax.data.pipeline import BatchConfig, collate, conversation, make_dataset, make_loader, tokenize
from offside_jax.data.synthetic import SyntheticConfig, make_release


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipe") / "release"
    make_release(root, SyntheticConfig(players=2, seed=3, image_size=48))
    return root


@pytest.fixture(scope="module")
def release(synthetic: Path):
    return load_release(synthetic)


@pytest.fixture(scope="module")
def tokenizer(release):
    corpus = [e.question + " " + e.answer for e in release.examples()]
    return tiny_tokenizer(corpus)


@pytest.fixture(scope="module")
def byte_tokenizer():
    return tiny_tokenizer(["abc"], vocab_size=200)  # no merges: one token per byte


# --------------------------------------------------------------------------------------------
# TFDS


@pytest.mark.parametrize("which", ["hand", "synthetic"])
def test_tfds_round_trips_every_field(which, synthetic: Path, tmp_path: Path):
    root = write_hand_release(tmp_path / "hand") if which == "hand" else synthetic
    rel = load_release(root)
    data_dir = tmp_path / "tfds"
    for setting in rel.splits:
        tfds_builder.build(root, data_dir, setting)
        sources = tfds_builder.open_sources(data_dir, setting)  # reopened from disk, no builder class
        assert set(sources) == set(rel.splits[setting])  # one split per split file
        for split, examples in rel.splits[setting].items():
            assert len(sources[split]) == len(examples)
            for i, ex in enumerate(examples):
                record = sources[split][i]
                assert tfds_builder.decode_record(record, setting, split) == ex
                stored = tfds_builder.image_bytes(record)
                assert stored == tuple((root / f).read_bytes() if ex.modality == "image" else b""
                                       for f in ex.image_files)


def test_tfds_skips_empty_splits(tmp_path: Path):
    root = write_hand_release(tmp_path / "hand")
    (root / "pure_text_data" / "retain_set.json").write_text("[]")
    tfds_builder.build(root, tmp_path / "tfds", "pure_text")
    assert set(tfds_builder.open_sources(tmp_path / "tfds", "pure_text")) == {"forget"}


# --------------------------------------------------------------------------------------------
# Tokenization and masks


def _example(question: str, answer: str, **kw) -> Example:
    return Example(setting="complete", split="forget", index=5, source="x.json", kind="qa", modality="text",
                   question=question, answer=answer,
                   messages=(Message("user", question), Message("assistant", answer)), **kw)


def test_loss_mask_by_hand(byte_tokenizer):
    # ChatML, one token per byte, one token per special marker:
    # "<|im_start|>" "user\nQ?" "<|im_end|>" "\n" "<|im_start|>" "assistant\n" "A." "<|im_end|>" "\n"
    row = tokenize(_example("Q?", "A."), byte_tokenizer)
    ids, mask = row["input_ids"], row["loss_mask"]
    n_prompt = 1 + len("user\nQ?") + 1 + 1 + 1 + len("assistant\n")
    assert len(ids) == n_prompt + 2 + 1 + 1
    expected = np.zeros(len(ids), np.int32)
    expected[n_prompt:n_prompt + 3] = 1  # "A", ".", "<|im_end|>"; not the template's trailing "\n"
    np.testing.assert_array_equal(mask, expected)
    assert byte_tokenizer.convert_ids_to_tokens(int(ids[n_prompt + 2])) == "<|im_end|>"
    assert int(row["index"]) == 5


def test_loss_mask_covers_answer_tokens_only(release, tokenizer):
    for split in ("forget", "retain", "classification_forget", "world_facts"):
        for ex in release["complete", split][:30]:
            row = tokenize(ex, tokenizer)
            ids, mask = row["input_ids"], row["loss_mask"]
            on = np.flatnonzero(mask)
            assert on.size and np.all(np.diff(on) == 1)  # one contiguous span
            target = (ex.correct if ex.kind == "mcq" else ex.answer) + "<|im_end|>"
            assert tokenizer.decode(ids[on]) == target
            assert tokenizer.decode(ids[: on[0]]).endswith("<|im_start|>assistant\n")
            assert tokenizer.decode(ids[on[-1] + 1:]) == "\n"


def test_conversation_images_and_mcq():
    img = dataclasses.replace(_example("Who?", "Him."), modality="image", images=("a.jpg",), image_files=("a.jpg",),
                              messages=(Message("user", "<image>\nWho?"), Message("assistant", "Him.")))
    assert conversation(img)[0]["content"] == "Who?"
    assert conversation(img, "<|vision_start|><|image_pad|><|vision_end|>")[0]["content"] == \
        "<|vision_start|><|image_pad|><|vision_end|>\nWho?"
    implied = dataclasses.replace(img, messages=(Message("user", "Who?"), Message("assistant", "Him.")),
                                  image_tag_implied=True)
    assert conversation(implied, "<IMG>")[0]["content"] == "<IMG>Who?"
    mcq = Example(setting="complete", split="classification_forget", index=0, source="x", kind="mcq",
                  modality="image", question="Which club?", answer="Rovers", options=(("A", "City"), ("B", "Rovers")),
                  correct="B", images=("a.jpg",), image_files=("a.jpg",))
    user, assistant = conversation(mcq, "<IMG>")
    # OFFSIDE's multiple-choice query (eval_classi.py), after the image
    assert user["content"] == "<IMG>\n" + offside_reference.full_query("Which club?", {"A": "City", "B": "Rovers"})
    assert assistant == {"role": "assistant", "content": "B"}


# --------------------------------------------------------------------------------------------
# Batches


def test_collate_pads_right_to_the_bucket():
    rows = [{"input_ids": np.array([5, 6, 7], np.int32), "loss_mask": np.array([0, 1, 1], np.int32),
             "index": np.int32(4)},
            {"input_ids": np.array([8], np.int32), "loss_mask": np.array([1], np.int32), "index": np.int32(9)}]
    b = collate(rows, batch_size=3, buckets=(2, 4, 8), pad_id=0)
    np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["index"], [4, 9, -1])


def test_batches_match_their_examples(release, tokenizer):
    examples = release["complete", "retain"]
    cfg = BatchConfig(batch_size=4, buckets=(16, 32, 64, 128), seed=1)
    batch = make_dataset(examples, tokenizer, cfg)[0]
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape[0] == 4
    by_index = {e.index: e for e in examples}
    lengths = []
    for b in range(4):
        row = tokenize(by_index[int(batch["index"][b])], tokenizer)
        n = len(row["input_ids"])
        lengths.append(n)
        np.testing.assert_array_equal(batch["input_ids"][b, :n], row["input_ids"])
        np.testing.assert_array_equal(batch["loss_mask"][b, :n], row["loss_mask"])
        assert batch["attention_mask"][b].sum() == n and not batch["loss_mask"][b, n:].any()
        assert (batch["input_ids"][b, n:] == tokenizer.pad_token_id).all()
    assert batch["input_ids"].shape[1] == min(t for t in cfg.buckets if t >= max(lengths))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_deterministic_and_resumable(release, tokenizer):
    examples = release["complete", "finetune"]
    cfg = BatchConfig(batch_size=4, buckets=(64, 128), seed=11, read_threads=1, prefetch_batches=2)
    ds = make_loader(examples, tokenizer, cfg)
    it = iter(ds)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # it survives a trip through a JSON file
    after = _take(it, 4)
    resumed = iter(make_loader(examples, tokenizer, cfg))  # a fresh pipeline, as after a restart
    resumed.set_state(state)
    assert _same(_take(resumed, 4), after)
    # the read-ahead loader and the plain random-access dataset give the same batches
    plain = make_dataset(examples, tokenizer, cfg)
    assert _same([plain[i] for i in range(7)], _take(iter(ds), 7))
    other = make_dataset(examples, tokenizer, dataclasses.replace(cfg, seed=12))
    assert not _same([other[i] for i in range(3)], [plain[i] for i in range(3)])


def test_one_epoch_covers_everything_once(release, tokenizer):
    examples = release["complete", "forget"]  # 28 records
    cfg = BatchConfig(batch_size=5, buckets=(64, 128), num_epochs=1, shuffle=False, drop_remainder=False)
    ds = make_dataset(examples, tokenizer, cfg)
    batches = [ds[i] for i in range(len(ds))]
    assert len(batches) == 6
    index = np.concatenate([b["index"] for b in batches])
    assert index.tolist() == [e.index for e in examples] + [-1, -1]  # in order, then filler rows
    assert not batches[-1]["attention_mask"][3:].any()


def test_epochs_reshuffle_and_shards_are_disjoint(release, tokenizer):
    examples = release["complete", "forget"]
    cfg = BatchConfig(batch_size=len(examples), buckets=(128,), seed=0)
    ds = make_dataset(examples, tokenizer, cfg)
    first, second = ds[0], ds[1]
    assert sorted(first["index"]) == sorted(second["index"]) and not np.array_equal(first["index"], second["index"])
    shards = []
    for i in range(2):
        ds = make_dataset(examples, tokenizer,
                          BatchConfig(batch_size=2, buckets=(128,), num_epochs=1, shard_index=i, shard_count=2))
        shards.append(np.concatenate([ds[j]["index"] for j in range(len(ds))]))
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) + len(shards[1]) == len(examples)


def test_tfds_source_gives_the_same_batches(synthetic: Path, release, tokenizer, tmp_path: Path):
    tfds_builder.build(synthetic, tmp_path, "complete")
    source = tfds_builder.open_sources(tmp_path, "complete")["forget"]
    cfg = BatchConfig(batch_size=4, buckets=(64, 128), seed=5, read_threads=1, prefetch_batches=2)
    from_tfds = _take(iter(make_loader(source, tokenizer, cfg)), 3)
    from_json = _take(iter(make_loader(release["complete", "forget"], tokenizer, cfg)), 3)
    assert _same(from_tfds, from_json)


def test_overflow(release, tokenizer):
    examples = release["complete", "forget"]
    with pytest.raises(ValueError, match=r"forget_set.json: record \d+: \d+ tokens exceed the largest bucket \(8\)"):
        make_dataset(examples, tokenizer, BatchConfig(batch_size=2, buckets=(8,)))[0]
    batch = make_dataset(examples, tokenizer, BatchConfig(batch_size=2, buckets=(8,), overflow="truncate"))[0]
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].all()


def test_config_validation():
    with pytest.raises(ValueError, match="buckets"):
        BatchConfig(buckets=(256, 128))
    with pytest.raises(ValueError, match="overflow"):
        BatchConfig(overflow="drop")
    with pytest.raises(ValueError, match="shard_index"):
        BatchConfig(shard_index=2, shard_count=2)

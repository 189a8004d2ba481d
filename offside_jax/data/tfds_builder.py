"""A tensorflow-datasets builder for OFFSIDE releases (real or synthetic), without TensorFlow.

One config per setting (``complete``, ``pure_text``, ``selective``), one split per split file
that has records (``forget``, ``classification_forget``, ...; see `offside.split_name`). Files
are written as ``array_record`` and read back with `as_data_source()`, which gives random access
(what grain needs). Images are stored as their encoded file bytes, so nothing is re-encoded.
Records keep file order (``disable_shuffling``): element i of a split is the i-th loaded record.
Each record carries its own image bytes (random access needs self-contained records), so an
image asked about 14 times is stored 14 times: about 0.4 GB for the 80-player synthetic release.

    builder = build(release_dir, data_dir, "complete")
    sources = open_sources(data_dir, "complete")   # later, without the release
    example = decode_record(sources["forget"][0], "complete", "forget")

Every `Example` field round-trips: None becomes "" for text fields and -1 for ids, and unknown
record keys travel as JSON in ``extra_json``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from offside_jax.data import offside
from offside_jax.data.offside import Example, Message

log = logging.getLogger(__name__)

NAME = "offside"
BUILD_VERSION = "1.2.0"
_TRISTATE = {None: -1, False: 0, True: 1}


def features() -> tfds.features.FeaturesDict:
    text, seq = tfds.features.Text, tfds.features.Sequence
    return tfds.features.FeaturesDict({
        "index": np.int64,
        "source": text(),
        "kind": text(),
        "modality": text(),
        "question": text(),
        "answer": text(),
        "message_roles": seq(text()),
        "message_contents": seq(text()),
        "images": seq(text()),  # as written in the record
        "image_files": seq(text()),  # relative to the release root; "" when not found
        "image_bytes": seq(tfds.features.Tensor(shape=(), dtype=np.object_)),  # b"": text record / not found
        "option_letters": seq(text()),
        "option_texts": seq(text()),
        "correct": text(),
        "correct_raw": text(),  # Correct_Answer as written
        "player_id": np.int64,
        "image_id": np.int64,
        "role": text(),
        "attribute": text(),
        "is_rumor": np.int8,  # -1 unknown, 0 false, 1 true
        "visual_rumor": np.int8,
        "corrected_fact": text(),
        "corrected_answer": text(),
        "corrected_letter": text(),
        "image_tag_implied": np.bool_,
        "literal_image_tags": np.int32,
        "extra_json": text(),
    })


def encode_example(example: Example, root: str | Path) -> dict[str, Any]:
    """The feature dict of one example; image files are read from under `root`."""
    root = Path(root)
    return {
        "index": example.index,
        "source": example.source,
        "kind": example.kind,
        "modality": example.modality,
        "question": example.question,
        "answer": example.answer,
        "message_roles": [m.role for m in example.messages],
        "message_contents": [m.content for m in example.messages],
        "images": list(example.images),
        "image_files": list(example.image_files),
        # Bytes only for images the model sees: a text record's images are metadata (paths kept).
        "image_bytes": [(root / f).read_bytes() if f and example.modality == "image" else b""
                        for f in example.image_files],
        "option_letters": [letter for letter, _ in example.options],
        "option_texts": [text for _, text in example.options],
        "correct": example.correct or "",
        "correct_raw": example.correct_raw or "",
        "player_id": -1 if example.player_id is None else example.player_id,
        "image_id": -1 if example.image_id is None else example.image_id,
        "role": example.role or "",
        "attribute": example.attribute or "",
        "is_rumor": _TRISTATE[example.is_rumor],
        "visual_rumor": _TRISTATE[example.visual_rumor],
        "corrected_fact": example.corrected_fact or "",
        "corrected_answer": example.corrected_answer or "",
        "corrected_letter": example.corrected_letter or "",
        "image_tag_implied": example.image_tag_implied,
        "literal_image_tags": example.literal_image_tags,
        "extra_json": json.dumps(dict(example.extra), ensure_ascii=False, sort_keys=True),
    }


def decode_record(record: dict[str, Any], setting: str = "", split: str = "") -> Example:
    """The `Example` stored in one data-source record (the inverse of `encode_example`)."""
    s = _text

    def opt(v: Any) -> str | None:
        return s(v) or None

    def tri(v: Any) -> bool | None:
        return None if int(v) < 0 else bool(v)

    return Example(
        setting=setting, split=split, index=int(record["index"]), source=s(record["source"]),
        kind=s(record["kind"]), modality=s(record["modality"]),
        question=s(record["question"]), answer=s(record["answer"]),
        messages=tuple(Message(s(r), s(c)) for r, c in zip(record["message_roles"], record["message_contents"])),
        images=tuple(s(v) for v in record["images"]),
        image_files=tuple(s(v) for v in record["image_files"]),
        options=tuple((s(k), s(v)) for k, v in zip(record["option_letters"], record["option_texts"])),
        correct=opt(record["correct"]), correct_raw=opt(record["correct_raw"]),
        player_id=None if int(record["player_id"]) < 0 else int(record["player_id"]),
        image_id=None if int(record["image_id"]) < 0 else int(record["image_id"]),
        role=opt(record["role"]), attribute=opt(record["attribute"]),
        is_rumor=tri(record["is_rumor"]), visual_rumor=tri(record["visual_rumor"]),
        corrected_fact=opt(record["corrected_fact"]), corrected_answer=opt(record["corrected_answer"]),
        corrected_letter=opt(record["corrected_letter"]),
        image_tag_implied=bool(record["image_tag_implied"]),
        literal_image_tags=int(record["literal_image_tags"]),
        extra=json.loads(s(record["extra_json"])),
    )


def image_bytes(record: dict[str, Any]) -> tuple[bytes, ...]:
    """The encoded image files of one data-source record, in `Example.images` order (b"" for
    the images of text-modality records, which are kept as paths only)."""
    return tuple(bytes(b) for b in record["image_bytes"])


class Offside(tfds.core.GeneratorBasedBuilder):
    """OFFSIDE (misinformation unlearning in (vision-)language models), from a release folder."""

    VERSION = tfds.core.Version(BUILD_VERSION)
    RELEASE_NOTES = {
        "1.0.0": "First version: the OFFSIDE release format, real or synthetic.",
        "1.1.0": "ms-swift's <image> rule (literal_image_tags); rumor, visual-rumor and player labels "
                 "derived from OFFSIDE's construction across the whole release.",
        "1.2.0": "correct_raw: a multiple-choice record's Correct_Answer as written (OFFSIDE's scorer compares to it).",
    }
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, description=f"the {folder}/ files of a release")
        for name, folder in offside.SETTINGS.items()
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the OFFSIDE release directory (the one holding complete_unlearning_data/ ...) as "
        "the manual dir: download_config=tfds.download.DownloadConfig(manual_dir=...), or use "
        "offside_jax.data.tfds_builder.build(release_dir, data_dir, setting)."
    )

    def __init__(self, *, skip_bad: bool = False, check_images: bool = True, **kwargs: Any):
        self._skip_bad = skip_bad
        self._check_images = check_images
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=features(), homepage="https://github.com/zh121800/OFFSIDE",
            disable_shuffling=True,  # element i of a split is record i of its file, as the loader reads it
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = Path(dl_manager.manual_dir)
        setting = self.builder_config.name
        generators = {}
        # The whole release is read: labels derived from OFFSIDE's construction need the records
        # of every setting (a pure-text record is labelled by its image's other records).
        release = offside.load_release(root, skip_bad=self._skip_bad, check_images=self._check_images)
        for split, examples in release.splits[setting].items():
            if not examples:  # TFDS cannot write an empty split
                log.warning("split %s/%s has no records; not built", setting, split)
                continue
            generators[split] = self._generate_examples(root, examples)
        return generators

    def _generate_examples(self, root: Path, examples: list[Example]):
        for example in examples:
            yield example.index, encode_example(example, root)


def build(release_dir: str | Path, data_dir: str | Path, setting: str, *, skip_bad: bool = False,
          check_images: bool = True) -> Offside:
    """Build (or reuse, when already built) the array_record files of one setting."""
    builder = Offside(config=setting, data_dir=str(data_dir), file_format="array_record",
                      skip_bad=skip_bad, check_images=check_images)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(release_dir)))
    return builder


def open_sources(data_dir: str | Path, setting: str) -> dict[str, Any]:
    """Random-access data sources of a built setting, by split name (no release needed)."""
    builder = tfds.builder_from_directory(str(Path(data_dir) / NAME / setting / BUILD_VERSION))
    return dict(builder.as_data_source())


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

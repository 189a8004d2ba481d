"""Loader for the OFFSIDE release format (the public release and the synthetic benchmark alike).

A release directory holds up to three *settings*, each a folder of JSON files, one per *split*:

    complete_unlearning_data/   finetune_set.json (+ finetune_set/ images), forget_set.json,
                                retain_set.json, test_set.json, relearn_set_enhanced.json,
                                classification_{forget,retain,test,relearn}_set.json
    pure_text_data/             forget_set.json, retain_set.json
    selective_unlearning_data/  forget_set_part.json, retain_set_part.json (+ images)

Two record formats occur (see `Example` for what each becomes):

- ms-swift chat records: ``{"messages": [{"role": "user", "content": "<image>\\n..."},
  {"role": "assistant", "content": "..."}], "images": "./finetune_set/364.jpg"}``; ``images`` is a
  string or a list, relative to the setting folder; ``<image>`` marks where an image goes.
- multiple-choice records: ``{"Question": ..., "Options": {"A": ..., ...}, "Correct_Answer": "B",
  "images": ...}``.

Any other JSON / JSONL file in a setting folder is read as a further split (the synthetic release
adds ``world_facts_set.json``). Split names are file stems without ``_set``
(``classification_forget_set`` -> ``classification_forget``, ``forget_set_part`` -> ``forget_part``),
except ``relearn_set_enhanced`` -> ``relearn``.

``<image>`` tags are read by ms-swift's rule, with which OFFSIDE trained (`image_tags`): tags
become images in order while images remain, a tag after the last image stays literal text (the
published "... shown in <image>." with one image), missing tags go in front of the first turn.
`SplitCounts.image_tags_added` / ``image_tags_literal`` count the records where that matters.

Labels the published release leaves implicit are derived by `load_release` from how OFFSIDE
built it (`construction`, where the derivation is documented): ``player_id`` from the image id
(each player's five original images are numbered ``5k+1 .. 5k+5``), ``is_rumor`` (the club
joined, transfer date and fee of a forget image, ``id mod 5 == 4``, or of a relearn image,
whose transfer is the invented "will join" one; everything else is a fact) and
``visual_rumor`` (rumored images that are composites locating the player "on the left
side"). The question kind (`attribute`) is read from the published wordings (`attributes`);
wording no rule reads is ``other``. Records that state a label keep it. `Release.derived`
counts what was derived.

Nothing here assumes the published record counts: `Release.counts` reports what was read.
Bad input stops with an `OffsideDataError` naming the file, record index and key; with
``skip_bad=True`` the record is logged, listed in `Release.problems` and skipped instead.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from offside_jax.data import construction, image_tags
from offside_jax.data.attributes import OTHER, infer_attribute
from offside_jax.data.image_tags import IMAGE_TAG  # noqa: F401  (re-exported for the encoders)

log = logging.getLogger(__name__)

SETTINGS: dict[str, str] = {
    "complete": "complete_unlearning_data",
    "pure_text": "pure_text_data",
    "selective": "selective_unlearning_data",
}
# Image id mod 5 gives an original image's role in the real release.
ROLE_BY_ID_MOD5: dict[int, str] = {0: "relearn", 1: "retain", 2: "retain", 3: "retain", 4: "forget"}
ROLES: tuple[str, ...] = ("retain", "forget", "relearn", "test", "world")
_SPLIT_ALIASES: dict[str, str] = {"relearn_set_enhanced": "relearn"}
_MESSAGE_ROLES = frozenset({"system", "user", "assistant", "tool"})
# Keys of a record that map onto typed `Example` fields; anything else lands in `Example.extra`.
_QA_KEYS = frozenset({"messages", "images"})
_MCQ_KEYS = frozenset({"Question", "Options", "Correct_Answer", "images"})
_TYPED_EXTRA_KEYS = (
    "player_id", "image_id", "role", "attribute", "is_rumor", "visual_rumor",
    "corrected_fact", "corrected_answer", "corrected_letter",
)


class OffsideDataError(ValueError):
    """Bad release data; the message names the file, the record index and the key."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


@dataclasses.dataclass(frozen=True)
class Problem:
    """One bad input found while reading: where it is and what is wrong."""

    file: str
    index: int | None  # record index in the file (0-based); None for whole-file problems
    key: str | None  # the record key at fault, e.g. "images[1]" or "Correct_Answer"
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.index is not None:
            where += f": record {self.index}"
        if self.key is not None:
            where += f": key {self.key!r}"
        return f"{where}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class Example:
    """One record of a release, typed.

    For chat records `question` is the last user turn and `answer` the final assistant turn; the
    ``<image>`` tags that become images are removed from `question`, tags beyond the last image
    stay in it as text (ms-swift's rule, `image_tags`); `messages` keeps the turns as written.
    For multiple-choice records `options` holds ``(letter, text)`` pairs, `correct` the right letter and `answer` its
    text. Fields after `options` are filled when the record says so (synthetic extra keys) or when
    they can be derived (`image_id` from a numeric file name, `role` from the split name or
    `image_id mod 5`, `attribute` from the question's wording); otherwise they are None.
    """

    setting: str  # "complete" | "pure_text" | "selective"
    split: str  # e.g. "forget", "classification_forget", "forget_part"
    index: int  # record index in its file, 0-based (counts skipped records too)
    source: str  # the file, relative to the release root, POSIX style
    kind: str  # "qa" (ms-swift chat) | "mcq" (classification)
    modality: str  # "image" (the model sees the image) | "text"
    question: str
    answer: str
    messages: tuple[Message, ...] = ()
    images: tuple[str, ...] = ()  # image paths exactly as written in the record
    # The same images resolved to files, relative to the release root ("" = not found; only
    # allowed for text-modality records, whose images are metadata).
    image_files: tuple[str, ...] = ()
    options: tuple[tuple[str, str], ...] = ()
    correct: str | None = None
    # Correct_Answer exactly as written ("B", "B.", " b"): OFFSIDE's scorer compares its parsed
    # letter with this string, so a "B." record is never right there (eval.suite, mcq_parser offside).
    correct_raw: str | None = None
    player_id: int | None = None
    image_id: int | None = None
    role: str | None = None  # "retain" | "forget" | "relearn" | "test" | "world"
    attribute: str | None = None  # one of attributes.ATTRIBUTES, or a world-fact kind
    is_rumor: bool | None = None  # the answer states a rumor (not a fact)
    visual_rumor: bool | None = None  # the image itself shows the rumor
    corrected_fact: str | None = None  # what really happened, for corrective relearning
    corrected_answer: str | None = None  # the true answer to this question, when it differs
    corrected_letter: str | None = None  # the option stating the true answer (mcq)
    image_tag_implied: bool = False  # fewer <image> tags than images: ms-swift adds the rest first
    literal_image_tags: int = 0  # tags after the last image: ms-swift leaves them as text
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    @property
    def option_dict(self) -> dict[str, str]:
        return dict(self.options)

    def image_paths(self, root: str | Path) -> tuple[Path | None, ...]:
        """Absolute image paths (None where the file was not found)."""
        return tuple(Path(root) / f if f else None for f in self.image_files)


@dataclasses.dataclass
class SplitCounts:
    """What was read from one split file: never the published numbers, always the counted ones."""

    records: int = 0  # records in the file (including skipped ones)
    loaded: int = 0
    skipped: int = 0
    modality: Counter = dataclasses.field(default_factory=Counter)
    kind: Counter = dataclasses.field(default_factory=Counter)
    images: int = 0  # distinct image files referenced by loaded records
    players: int = 0  # distinct player ids, when records carry them or the ids give them
    # ms-swift's <image> rule at work: records with fewer tags than images (tags added in front)
    # and records with more (the extra tags stay literal text).
    image_tags_added: int = 0
    image_tags_literal: int = 0
    attribute: Counter = dataclasses.field(default_factory=Counter)  # question kinds ("other" included)


@dataclasses.dataclass
class SplitData:
    setting: str
    split: str
    file: Path
    examples: list[Example]
    counts: SplitCounts
    problems: list[Problem]


@dataclasses.dataclass
class Release:
    """Everything read from one release directory."""

    root: Path
    splits: dict[str, dict[str, list[Example]]]  # setting -> split -> examples
    counts: dict[str, dict[str, SplitCounts]]
    problems: list[Problem]
    # Labels derived from OFFSIDE's construction (rumor, visual rumor, player id): how many.
    derived: construction.Derived = dataclasses.field(default_factory=construction.Derived)

    def __getitem__(self, setting_split: tuple[str, str]) -> list[Example]:
        setting, split = setting_split
        return self.splits[setting][split]

    def examples(self) -> Iterable[Example]:
        for splits in self.splits.values():
            for examples in splits.values():
                yield from examples

    def summary(self) -> str:
        """A plain-text table of records per split."""
        # tags+: records ms-swift adds <image> tags to; tags-as-text: records with tags beyond
        # their images (kept as literal text); other-kind: questions no attribute rule reads.
        rows = [("setting", "split", "records", "loaded", "skipped", "image", "text", "mcq", "images",
                 "tags+", "tags-as-text", "other-kind", "rumors")]
        for setting, splits in self.counts.items():
            for split, c in splits.items():
                rumors = sum(e.is_rumor is True for e in self.splits.get(setting, {}).get(split, []))
                rows.append((setting, split, c.records, c.loaded, c.skipped, c.modality["image"],
                             c.modality["text"], c.kind["mcq"], c.images, c.image_tags_added,
                             c.image_tags_literal, c.attribute[OTHER], rumors))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        table = "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
        derived = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.derived.as_dict().items())
        return f"{table}\nderived from OFFSIDE's construction: {derived}"


def count_examples(counts: SplitCounts, examples: Sequence[Example]) -> None:
    """Fill the per-record tallies of `counts` from the examples read (or relabelled)."""
    counts.modality = Counter(e.modality for e in examples)
    counts.kind = Counter(e.kind for e in examples)
    counts.images = len({f for e in examples for f in e.image_files if f})
    counts.players = len({e.player_id for e in examples if e.player_id is not None})
    counts.image_tags_added = sum(e.image_tag_implied for e in examples)
    counts.image_tags_literal = sum(e.literal_image_tags > 0 for e in examples)
    counts.attribute = Counter(e.attribute for e in examples if e.attribute is not None)


def split_name(file_stem: str) -> str:
    """Split name of a release file: its stem without ``_set`` (see the module docstring)."""
    return _SPLIT_ALIASES.get(file_stem, file_stem.replace("_set", ""))


def split_files(root: str | Path, setting: str) -> dict[str, Path]:
    """The JSON/JSONL files of one setting folder, by split name, sorted by name."""
    folder = _setting_dir(Path(root), setting)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".jsonl"))
    out: dict[str, Path] = {}
    for path in files:
        name = split_name(path.stem)
        if name in out:
            raise OffsideDataError(Problem(str(path), None, None,
                                           f"split {name!r} also read from {out[name].name}"))
        out[name] = path
    return out


def available_settings(root: str | Path) -> list[str]:
    """Settings whose folder exists under `root`, in canonical order."""
    return [s for s, folder in SETTINGS.items() if (Path(root) / folder).is_dir()]


def load_release(
    root: str | Path,
    settings: Sequence[str] | None = None,
    *,
    skip_bad: bool = False,
    check_images: bool = True,
) -> Release:
    """Read every split of the given settings (default: all present) of a release directory.

    `check_images` decodes each distinct image once (cheaply) so an unreadable file is reported
    here rather than in the middle of training.
    """
    root = Path(root)
    if settings is None:
        settings = available_settings(root)
        if not settings:
            raise OffsideDataError(Problem(str(root), None, None, "no OFFSIDE setting folder found "
                                           f"(expected one of {', '.join(SETTINGS.values())})"))
    images = _ImageChecker(check_images)
    release = Release(root, {}, {}, [])
    for setting in settings:
        release.splits[setting], release.counts[setting] = {}, {}
        for split in split_files(root, setting):
            data = read_split(root, setting, split, skip_bad=skip_bad, _images=images)
            release.splits[setting][split] = data.examples
            release.counts[setting][split] = data.counts
            release.problems.extend(data.problems)
    _derive_labels(release)
    return release


def _derive_labels(release: Release) -> None:
    """Fill the labels the release leaves implicit (`construction`), across all its splits:
    one image's records are spread over several files."""
    order = [(setting, split, len(examples)) for setting, splits in release.splits.items()
             for split, examples in splits.items()]
    labelled, release.derived = construction.derive(list(release.examples()))
    start = 0
    for setting, split, n in order:
        release.splits[setting][split] = labelled[start:start + n]
        count_examples(release.counts[setting][split], release.splits[setting][split])
        start += n


def read_split(
    root: str | Path,
    setting: str,
    split: str,
    *,
    skip_bad: bool = False,
    check_images: bool = True,
    _images: _ImageChecker | None = None,
) -> SplitData:
    """Read one split file of one setting into typed examples, counting what was read."""
    root = Path(root)
    files = split_files(root, setting)
    if split not in files:
        raise OffsideDataError(Problem(str(_setting_dir(root, setting)), None, None,
                                       f"no split {split!r}; found {sorted(files)}"))
    path = files[split]
    reader = _SplitReader(root, setting, split, path, skip_bad, _images or _ImageChecker(check_images))
    return reader.read()


# --------------------------------------------------------------------------------------------
# Reading one file


def _setting_dir(root: Path, setting: str) -> Path:
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {sorted(SETTINGS)}")
    folder = root / SETTINGS[setting]
    if not folder.is_dir():
        raise OffsideDataError(Problem(str(folder), None, None, "setting folder not found"))
    return folder


class _RecordError(Exception):
    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key, self.message = key, message


class _ImageChecker:
    """Decodes each distinct image once; remembers the outcome."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._seen: dict[Path, str | None] = {}

    def error(self, path: Path) -> str | None:
        if not self.enabled:
            return None
        if path not in self._seen:
            self._seen[path] = self._decode(path)
        return self._seen[path]

    @staticmethod
    def _decode(path: Path) -> str | None:
        from PIL import Image  # lazy: only needed when images are checked

        try:
            with Image.open(path) as im:
                im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, fast on large photos
                im.load()
        except Exception as err:  # PIL raises many types for corrupt files
            return f"unreadable image {path.name}: {type(err).__name__}: {err}"
        return None


class _SplitReader:
    def __init__(self, root: Path, setting: str, split: str, path: Path, skip_bad: bool,
                 images: _ImageChecker):
        self.root, self.setting, self.split, self.path = root, setting, split, path
        self.skip_bad, self.images = skip_bad, images
        self.folder = path.parent
        self.source = path.relative_to(root).as_posix()
        self.problems: list[Problem] = []
        # Where relative image paths may point: the split's own folder first, then the other
        # settings' folders (pure-text records name images that live in the complete setting).
        self.search_dirs = [self.folder] + [root / f for s, f in SETTINGS.items()
                                            if root / f != self.folder and (root / f).is_dir()]

    def report(self, index: int | None, key: str | None, message: str) -> None:
        problem = Problem(str(self.path), index, key, message)
        if not self.skip_bad:
            raise OffsideDataError(problem)
        log.warning("skipping bad input: %s", problem)
        self.problems.append(problem)

    def read(self) -> SplitData:
        counts = SplitCounts()
        examples: list[Example] = []
        records, counts.records = self._records()
        for index, obj in records:
            try:
                example = self._example(index, obj)
            except _RecordError as err:
                self.report(index, err.key, err.message)
                continue
            examples.append(example)
        counts.loaded = len(examples)
        counts.skipped = counts.records - counts.loaded
        count_examples(counts, examples)
        return SplitData(self.setting, self.split, self.path, examples, counts, self.problems)

    # -- JSON ---------------------------------------------------------------------------------

    def _records(self) -> tuple[list[tuple[int, Any]], int]:
        """(index, decoded record) pairs, and how many records the file holds (broken ones too)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            self.report(None, None, f"cannot read file: {err}")
            return [], 0
        if self.path.suffix == ".jsonl":
            return self._jsonl_records(text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return self._salvage_array(text)  # locate the broken record, maybe skip it
        if not isinstance(data, list):
            self.report(None, None, f"top level must be a JSON list of records, got {type(data).__name__}")
            return [], 0
        return list(enumerate(data)), len(data)

    def _jsonl_records(self, text: str) -> tuple[list[tuple[int, Any]], int]:
        out = []
        index = 0
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((index, json.loads(line)))
            except json.JSONDecodeError as err:
                self.report(index, None, f"malformed JSON on line {line_no}, column {err.colno}: {err.msg}")
            index += 1
        return out, index

    def _salvage_array(self, text: str) -> tuple[list[tuple[int, Any]], int]:
        """Parse a JSON list record by record, so a syntax error can be pinned on one record.

        After a broken record, reading resumes at the next object that looks like a record (has
        a "messages" or "Question" key); the records in between count as one skipped record.
        """
        decoder = json.JSONDecoder()
        out: list[tuple[int, Any]] = []
        pos = _skip_ws(text, 0)
        if not text.startswith("[", pos):
            line, col = _line_col(text, pos)
            self.report(None, None, f"malformed JSON at line {line}, column {col}: expected '[' (a list of records)")
            return [], 0
        pos = _skip_ws(text, pos + 1)
        index = 0
        while pos < len(text) and text[pos] != "]":
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                self.report(index, None, f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}")
                index += 1
                pos = _next_record_start(text, decoder, err.pos)
                if pos >= len(text):
                    return out, index  # nothing decodable after the broken record
                continue
            out.append((index, obj))
            index += 1
            pos = _skip_ws(text, end)
            if pos < len(text) and text[pos] == ",":
                pos = _skip_ws(text, pos + 1)
            elif pos < len(text) and text[pos] != "]":
                line, col = _line_col(text, pos)
                # The next record is probably intact: report the missing separator and go on.
                self.report(index, None, f"malformed JSON at line {line}, column {col}: expected ',' between records")
        if pos >= len(text):
            self.report(None, None, "malformed JSON: the list of records is not closed with ']'")
        return out, index

    # -- records ------------------------------------------------------------------------------

    def _example(self, index: int, obj: Any) -> Example:
        if not isinstance(obj, dict):
            raise _RecordError(None, f"record must be a JSON object, got {type(obj).__name__}")
        if "messages" not in obj and "Question" not in obj:
            raise _RecordError(None, "record has neither 'messages' (chat) nor 'Question' (multiple choice); "
                                     f"keys: {sorted(obj)}")
        images = _images_field(obj.get("images"))
        if "messages" in obj:
            messages = _messages_field(obj["messages"])
            contents = [m.content for m in messages]
            known = _QA_KEYS
        else:
            messages, known = None, _MCQ_KEYS
            contents = [_question_field(obj)]
        modality = self._modality(images, image_tags.plan(contents, len(images)).tags)
        placed = len(images) if modality == "image" else 0  # a text record's images are metadata
        if messages is not None:
            fields = _qa_fields(messages, placed)
        else:
            fields = self._mcq_fields(obj, placed)
        image_files = self._image_files(images, modality)
        typed = self._typed_extras(obj)
        extra = {k: v for k, v in obj.items() if k not in known and k not in _TYPED_EXTRA_KEYS}
        image_id = typed.get("image_id")
        if image_id is None and images:
            stem = Path(images[0]).stem
            image_id = int(stem) if stem.isdigit() else None
        role = typed.get("role") or _role_from_split(self.split)
        if role is None and image_id is not None:
            role = ROLE_BY_ID_MOD5[image_id % 5]
        answer = fields["answer"] if fields["kind"] == "qa" else None
        attribute = typed.get("attribute") or infer_attribute(fields["question"], answer)
        plan = image_tags.plan(contents, placed)
        return Example(
            setting=self.setting, split=self.split, index=index, source=self.source,
            modality=modality, images=images, image_files=image_files,
            # a multiple-choice prompt is built later, with its tag in front
            image_tag_implied=fields["kind"] == "qa" and plan.added > 0, literal_image_tags=plan.literal,
            player_id=typed.get("player_id"), image_id=image_id, role=role, attribute=attribute,
            is_rumor=typed.get("is_rumor"), visual_rumor=typed.get("visual_rumor"),
            corrected_fact=typed.get("corrected_fact"), corrected_answer=typed.get("corrected_answer"),
            corrected_letter=typed.get("corrected_letter"), extra=extra, **fields,
        )

    @staticmethod
    def _mcq_fields(obj: dict, placed: int) -> dict[str, Any]:
        question = obj["Question"]
        if "Options" not in obj:
            raise _RecordError("Options", "missing")
        options = _options_field(obj["Options"])
        if "Correct_Answer" not in obj:
            raise _RecordError("Correct_Answer", "missing")
        letter = _answer_letter(obj["Correct_Answer"])
        if letter not in options:
            raise _RecordError("Correct_Answer", f"{obj['Correct_Answer']!r} is not one of the options "
                                                 f"{', '.join(options)}")
        return dict(kind="mcq", question=_question_text([Message("user", question)], placed), answer=options[letter],
                    options=tuple(options.items()), correct=letter, correct_raw=obj["Correct_Answer"])

    def _modality(self, images: tuple[str, ...], n_tags: int) -> str:
        """"image" when the model sees the images: always when the record has images, except
        pure-text records without a tag, which name the player and carry images as metadata."""
        if not images or (n_tags == 0 and self.setting == "pure_text"):
            return "text"
        return "image"

    def _image_files(self, images: tuple[str, ...], modality: str) -> tuple[str, ...]:
        files = []
        for j, rel in enumerate(images):
            path = self._resolve(rel)
            if path is None:
                if modality == "image":
                    raise _RecordError(f"images[{j}]", f"image file {rel!r} not found (looked in "
                                       + ", ".join(str(d) for d in self.search_dirs) + ")")
                files.append("")
                continue
            if modality == "image" and (err := self.images.error(path)) is not None:
                raise _RecordError(f"images[{j}]", err)
            try:
                files.append(path.relative_to(self.root).as_posix())
            except ValueError:  # an absolute path outside the release
                files.append(path.as_posix())
        return tuple(files)

    def _resolve(self, rel: str) -> Path | None:
        candidate = Path(rel.replace("\\", "/"))
        if candidate.is_absolute():
            if candidate.is_file():
                return candidate
            # A path from the authors' machine: try its folder/file tail inside this release.
            tails = [Path(*candidate.parts[-2:]), Path(candidate.name)]
        else:
            tails = [candidate]
        for tail in tails:
            for folder in self.search_dirs:
                path = folder / tail
                if path.is_file():
                    return Path(os.path.normpath(path))  # "a/../b" -> "b", lexically
        return None

    @staticmethod
    def _typed_extras(obj: dict) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, kinds in (("player_id", int), ("image_id", int), ("role", str), ("attribute", str),
                           ("is_rumor", bool), ("visual_rumor", bool), ("corrected_fact", str),
                           ("corrected_answer", str), ("corrected_letter", str)):
            value = obj.get(key)
            if value is None:
                continue
            if not isinstance(value, kinds) or (kinds is int and isinstance(value, bool)):
                raise _RecordError(key, f"must be {kinds.__name__}, got {type(value).__name__}")
            out[key] = value
        if out.get("role") is not None and out["role"] not in ROLES:
            raise _RecordError("role", f"must be one of {ROLES}, got {out['role']!r}")
        return out


# --------------------------------------------------------------------------------------------
# Small parsing helpers


def _messages_field(raw: Any) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise _RecordError("messages", "must be a non-empty list of {role, content} objects")
    messages = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _RecordError(f"messages[{j}]", f"must be an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in _MESSAGE_ROLES:
            raise _RecordError(f"messages[{j}].role", f"must be one of {sorted(_MESSAGE_ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _RecordError(f"messages[{j}].content", f"must be a string, got {type(content).__name__}")
        messages.append(Message(role, content))
    if messages[-1].role != "assistant":
        raise _RecordError(f"messages[{len(messages) - 1}].role",
                           f"the last message must be the assistant's answer, got {messages[-1].role!r}")
    if not any(m.role == "user" for m in messages[:-1]):
        raise _RecordError("messages", "no user message before the answer")
    return tuple(messages)


def _question_field(obj: dict) -> str:
    question = obj["Question"]
    if not isinstance(question, str) or not question.strip():
        raise _RecordError("Question", "must be a non-empty string")
    return question


def _question_text(messages: Sequence[Message], placed: int) -> str:
    """The last user turn with its placed tags removed (ms-swift's rule: `image_tags`)."""
    turns = image_tags.place_images([{"role": m.role, "content": m.content} for m in messages], placed,
                                    image_tags.PLACED)
    last = [t["content"] for t in turns if t["role"] == "user"][-1]
    return last.replace(image_tags.PLACED, " ").strip()


def _qa_fields(messages: tuple[Message, ...], placed: int) -> dict[str, Any]:
    return dict(kind="qa", messages=messages, question=_question_text(messages, placed),
                answer=messages[-1].content.strip())


def _images_field(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        for j, v in enumerate(value):
            if not isinstance(v, str) or not v:
                raise _RecordError(f"images[{j}]", f"must be a non-empty path string, got {v!r}")
        return tuple(value)
    raise _RecordError("images", f"must be a path string or a list of them, got {type(value).__name__}")


_OPTION_LINE = re.compile(r"^\s*\(?([A-Za-z])[\.\):]\s*(.*)$")
_LETTER = re.compile(r"^\s*\(?([A-Za-z])(?:[\s\.\):]|$)")


def _options_field(value: Any) -> dict[str, str]:
    """Options as letter -> text. Accepts a dict, a list (lettered A, B, ...) or "A. x\\nB. y" text."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(chr(ord("A") + j), v) for j, v in enumerate(value)]
    elif isinstance(value, str):
        items = []
        for line in value.splitlines():
            if line.strip():
                m = _OPTION_LINE.match(line)
                if not m:
                    raise _RecordError("Options", f"cannot read option line {line!r}")
                items.append((m.group(1), m.group(2)))
    else:
        raise _RecordError("Options", f"must be an object of letter -> text, got {type(value).__name__}")
    options: dict[str, str] = {}
    for letter, text in items:
        key = str(letter).strip().upper()
        if not re.fullmatch(r"[A-Z]", key):
            raise _RecordError(f"Options.{letter}", "option keys must be single letters")
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = str(text)
        if not isinstance(text, str):
            raise _RecordError(f"Options.{letter}", f"option text must be a string, got {type(text).__name__}")
        if key in options:
            raise _RecordError(f"Options.{letter}", "duplicate option letter")
        options[key] = text.strip()
    if len(options) < 2:
        raise _RecordError("Options", f"needs at least two options, got {len(options)}")
    return options


def _answer_letter(value: Any) -> str:
    if not isinstance(value, str):
        raise _RecordError("Correct_Answer", f"must be an option letter, got {type(value).__name__}")
    m = _LETTER.match(value)
    if not m:
        raise _RecordError("Correct_Answer", f"{value!r} is not an option letter")
    return m.group(1).upper()


def _role_from_split(split: str) -> str | None:
    base = split.removeprefix("classification_").removesuffix("_part")
    return base if base in ROLES else None


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _next_record_start(text: str, decoder: json.JSONDecoder, after: int) -> int:
    """Position of the next object after `after` that decodes as a record, or len(text)."""
    pos = text.find("{", after + 1)
    while pos != -1:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            pos = text.find("{", pos + 1)
            continue
        tail = _skip_ws(text, end)
        if isinstance(obj, dict) and ("messages" in obj or "Question" in obj) and text[tail:tail + 1] in (",", "]"):
            return pos
        pos = text.find("{", pos + 1)
    return len(text)

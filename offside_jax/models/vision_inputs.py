"""Records with images -> Qwen2.5-VL / Qwen2-VL model inputs in one call.

    vp = VisionProcessor(hf_config, tokenizer, max_pixels=256 * 256)
    batch = vp([{"messages": [{"role": "user", "content": "<image>\\nWhich club will he join?"}],
                 "images": "finetune_set/364.jpg"}], image_root=setting_dir)
    out = generate(model, batch, SamplingConfig(max_new_tokens=32, eos_token_ids=vp.eos_token_ids))

Steps (each also usable alone):

1. decode each image file (or bytes / PIL image / array) to RGB and check it against the
   pixel budget;
2. transformers' Qwen2-VL image processor (the PIL backend: no torch needed) resizes it to a
   multiple of ``patch_size * merge_size`` within ``[min_pixels, max_pixels]``, normalises and
   patchifies it into ``pixel_values`` and ``image_grid_thw`` (numpy);
3. the chat template renders the conversation with each ``<image>`` tag that gets an image
   (ms-swift's rule, `offside_jax.data.image_tags`: in order while images remain, missing tags
   in front of the first turn, later tags left as text) as
   ``<|vision_start|><|image_pad|><|vision_end|>``, and every ``<|image_pad|>`` is expanded to
   the image's token count (``t * h * w / merge**2``), as transformers' processor does;
4. rows are left-padded (generation) or right-padded (training) and completed by
   :func:`offside_jax.models.qwen2_5_vl.prepare_inputs` (M-RoPE positions, per-row patches).

Records are OFFSIDE/ms-swift chat records (``{"messages": [...], "images": str | [str]}``) or
objects with ``messages`` / ``images`` attributes (``offside_jax.data.offside.Example``).
Every error names the record (and the image) so a person can fix the input.
"""
from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from offside_jax.data import image_tags
from offside_jax.data.image_tags import IMAGE_TAG
from offside_jax.models import qwen2_5_vl

# Qwen2-VL / Qwen2.5-VL's chat template (as published with the Instruct models), used when a
# tokenizer brings none (e.g. one built from the bare Qwen vocabulary).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

UNTAGGED_IMAGES = ("prepend", "ignore", "error")


class ImageInputError(ValueError):
    """A record whose images cannot become model inputs; the message names record and image."""


@dataclasses.dataclass
class EncodedRecord:
    """One record as token ids plus its images' patches (before batching)."""

    name: str
    input_ids: np.ndarray  # [T] int32, image pads expanded
    loss_mask: np.ndarray  # [T] int32, 1 on answer tokens (all 0 for a prompt)
    pixel_values: np.ndarray  # [patches, C*T*P*P] float32 (0 rows without images)
    image_grid_thw: np.ndarray  # [images, 3] int64


class VisionProcessor:
    """Turns records into batches for one Qwen-VL model (config) and tokenizer.

    ``min_pixels`` / ``max_pixels`` are the processor's pixel budget (transformers' defaults:
    56*56 and 28*28*1280). An image with more pixels than ``max_pixels`` is an error unless
    ``allow_downscale=True`` lets the processor shrink it (a silent loss of detail otherwise:
    OFFSIDE images are 256x256). ``untagged_images`` says what to do with a record that has
    fewer ``<image>`` tags than images: ``"prepend"`` the missing tags to the first non-system
    turn (ms-swift's rule), ``"ignore"`` the images of a record without any tag (text-only
    records that carry an image path as metadata), or ``"error"``. Tags beyond the last image
    stay literal text, as in ms-swift (`offside_jax.data.image_tags`). Extra keyword arguments go to the transformers image processor.
    """

    def __init__(
        self,
        hf_config: Any,
        tokenizer: Any,
        *,
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        allow_downscale: bool = False,
        untagged_images: str = "prepend",
        chat_template: str | None = None,
        **image_processor_kwargs: Any,
    ):
        from transformers import Qwen2VLImageProcessorPil

        if untagged_images not in UNTAGGED_IMAGES:
            raise ValueError(f"untagged_images must be one of {UNTAGGED_IMAGES}, got {untagged_images!r}")
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        self.config = qwen2_5_vl.VLConfig.from_hf(hf_config)
        v = self.config.vision
        self.tokenizer = tokenizer
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.allow_downscale = allow_downscale
        self.untagged_images = untagged_images
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or QWEN2_VL_CHAT_TEMPLATE
        self.image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
            patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
            **image_processor_kwargs,
        )
        ids = {
            "image": self.config.image_token_id,
            "start": self.config.vision_start_token_id,
            "end": self.config.vision_end_token_id,
        }
        tokens = {}
        for key, token_id in ids.items():
            token = None if token_id is None else tokenizer.convert_ids_to_tokens(int(token_id))
            if not token:
                raise ValueError(f"the tokenizer has no token for the config's {key} id {token_id}")
            tokens[key] = token
        self.image_pad = tokens["image"]
        self.image_markup = tokens["start"] + tokens["image"] + tokens["end"]

    # -- images --------------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.config.text.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    @property
    def pad_token_id(self) -> int:
        for candidate in (getattr(self.tokenizer, "pad_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if candidate is not None:
                return int(candidate)
        return 0

    def load_image(self, source: Any, *, where: str = "record", index: int = 0,
                   image_root: str | os.PathLike | None = None):
        """Decode one image (path, bytes, PIL image or HxWxC uint8 array) to RGB and check it
        against the pixel budget. ``where`` / ``index`` name the record and image in errors."""
        from PIL import Image

        label = f"{index} ({_label(source)})"
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, np.ndarray):
            try:
                image = Image.fromarray(source)
            except Exception as e:  # noqa: BLE001 - PIL raises several types for bad arrays
                raise ImageInputError(f"{where}: image {label} is not an image array: {e}") from None
        else:
            if isinstance(source, (bytes, bytearray)):
                stream = io.BytesIO(source)
            else:
                path = Path(source)
                if not path.is_absolute() and image_root is not None:
                    path = Path(image_root) / path
                if not path.is_file():
                    raise ImageInputError(f"{where}: image {label} not found (looked for {path})")
                stream = path
            try:
                image = Image.open(stream)
                image.load()  # decode now: a truncated file fails here, not inside the processor
            except Exception as e:  # noqa: BLE001 - PIL raises many types for undecodable files
                raise ImageInputError(f"{where}: image {label} cannot be decoded as an image ({type(e).__name__}: {e})") from None
        width, height = image.size
        if width * height > self.max_pixels and not self.allow_downscale:
            raise ImageInputError(
                f"{where}: image {label} is {width}x{height} = {width * height} pixels, over the pixel budget "
                f"max_pixels={self.max_pixels}; raise max_pixels or pass allow_downscale=True to shrink it"
            )
        if min(width, height) < 1:
            raise ImageInputError(f"{where}: image {label} is empty ({width}x{height})")
        return image.convert("RGB")

    def process_images(self, images: Sequence[Any], *, where: str) -> tuple[np.ndarray, np.ndarray]:
        """``pixel_values`` [patches, C*T*P*P] float32 and ``image_grid_thw`` [images, 3] int64."""
        if not images:
            v = self.config.vision
            return np.zeros((0, v.patch_dim), np.float32), np.zeros((0, 3), np.int64)
        try:
            out = self.image_processor(images=list(images), return_tensors="np")
        except ValueError as e:  # e.g. an aspect ratio beyond 200:1
            raise ImageInputError(f"{where}: the image processor rejected an image: {e}") from None
        return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)

    def tokens_per_image(self, image_grid_thw: np.ndarray) -> list[int]:
        m = self.config.vision.spatial_merge_size
        return [int(t * h * w) // (m * m) for t, h, w in np.asarray(image_grid_thw).reshape(-1, 3)]

    # -- text ------------------------------------------------------------------------------------

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool) -> str:
        """The chat template's text, placed images (`image_tags.PLACED`) as vision markup (one
        pad per image); ``<image>`` tags left in the text stay text."""
        turns = [{"role": m["role"], "content": m["content"].replace(image_tags.PLACED, self.image_markup)}
                 for m in messages]
        return self.tokenizer.apply_chat_template(
            turns, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _tokenize(self, text: str, counts: Sequence[int], first_image: int, where: str) -> tuple[list[int], int]:
        """Token ids of ``text`` with its pads expanded (images ``first_image...``)."""
        pieces = text.split(self.image_pad)
        n_pads = len(pieces) - 1
        if first_image + n_pads > len(counts):
            raise ImageInputError(f"{where}: the rendered conversation has more image pads than images")
        expanded = pieces[0]
        for k, piece in enumerate(pieces[1:]):
            expanded += self.image_pad * counts[first_image + k] + piece
        ids = list(self.tokenizer(expanded, add_special_tokens=False)["input_ids"])
        found = sum(1 for i in ids if i == self.config.image_token_id)
        want = sum(counts[first_image: first_image + n_pads])
        if found != want:
            raise ImageInputError(
                f"{where}: tokenizing gave {found} image tokens instead of {want}; "
                f"the tokenizer must treat {self.image_pad!r} as a special token"
            )
        return ids, first_image + n_pads

    # -- records ---------------------------------------------------------------------------------

    def encode(
        self,
        record: Any,
        *,
        name: str | None = None,
        image_root: str | os.PathLike | None = None,
        with_answer: bool = False,
    ) -> EncodedRecord:
        """One record -> ids (+ answer mask) and its images' patches.

        ``with_answer=False``: the prompt (every turn before the final assistant turn, which
        is dropped if present) with the generation prompt appended. ``with_answer=True``: the
        whole conversation, ``loss_mask`` on the final assistant turn's tokens (its text and
        end-of-turn marker).
        """
        where = name or _record_name(record)
        messages, sources = self._messages_and_images(record, where)
        images = [self.load_image(s, where=where, index=j, image_root=image_root) for j, s in enumerate(sources)]
        pixel_values, grids = self.process_images(images, where=where)
        counts = self.tokens_per_image(grids)
        ends_with_answer = messages[-1]["role"] == "assistant"
        prompt_turns = messages[:-1] if ends_with_answer else messages
        if not prompt_turns:
            raise ImageInputError(f"{where}: no turn before the assistant's answer")
        prompt = self.render(prompt_turns, add_generation_prompt=True)
        ids, used = self._tokenize(prompt, counts, 0, where)
        mask = [0] * len(ids)
        if with_answer:
            if not ends_with_answer:
                raise ImageInputError(f"{where}: with_answer=True needs a final assistant turn")
            full = self.render(messages, add_generation_prompt=False)
            if not full.startswith(prompt):
                raise ImageInputError(
                    f"{where}: the chat template does not render the conversation as prompt + answer; cannot mask the answer"
                )
            # The answer ends at its end-of-turn marker; whitespace the template adds after it
            # belongs to no turn.
            answer_ids, used = self._tokenize(full[len(prompt):].rstrip(), counts, used, where)
            ids += answer_ids
            mask += [1] * len(answer_ids)
        if used != len(counts):
            raise ImageInputError(f"{where}: {len(counts)} image(s) but the conversation places {used}")
        return EncodedRecord(where, np.asarray(ids, np.int32), np.asarray(mask, np.int32), pixel_values, grids)

    def _messages_and_images(self, record: Any, where: str) -> tuple[list[dict[str, str]], list[Any]]:
        if isinstance(record, Mapping):
            raw_messages, raw_images, text_only = record.get("messages"), record.get("images"), False
        else:
            raw_messages = getattr(record, "messages", None)
            files = getattr(record, "image_files", None)
            raw_images = list(files) if files and all(files) else getattr(record, "images", None)
            text_only = getattr(record, "modality", None) == "text"
        if not raw_messages:
            raise ImageInputError(f"{where}: no 'messages' (a list of {{role, content}} turns)")
        messages = []
        for j, m in enumerate(raw_messages):
            role = m.get("role") if isinstance(m, Mapping) else getattr(m, "role", None)
            content = m.get("content") if isinstance(m, Mapping) else getattr(m, "content", None)
            if not isinstance(role, str) or not isinstance(content, str):
                raise ImageInputError(f"{where}: messages[{j}] needs a string 'role' and a string 'content'")
            messages.append({"role": role, "content": content})
        images = [] if raw_images is None else [raw_images] if isinstance(raw_images, (str, bytes, os.PathLike)) else list(raw_images)
        plan = image_tags.plan([m["content"] for m in messages], len(images))
        if text_only:  # images a text record names are metadata: none is placed
            return image_tags.place_images(messages, 0, image_tags.PLACED), []
        if plan.added:
            if self.untagged_images == "ignore" and plan.tags == 0:
                return messages, []
            if self.untagged_images == "error":
                raise ImageInputError(f"{where}: {len(images)} image(s) but {plan.tags} {IMAGE_TAG} tag(s) say "
                                      "where they go")
        try:
            return image_tags.place_images(messages, len(images), image_tags.PLACED), images
        except ValueError as err:
            raise ImageInputError(f"{where}: {err}") from None

    # -- batches ---------------------------------------------------------------------------------

    def collate(self, rows: Sequence[EncodedRecord], *, padding_side: str = "left", pad_multiple: int = 1,
                patch_multiple: int = 1) -> dict[str, np.ndarray]:
        """Pad encoded rows into one batch and complete it with positions and vision arrays.

        Left padding suits generation (every prompt ends in the last column), right padding
        training. ``loss_mask`` is included when any row has answer tokens.
        """
        if not rows:
            raise ValueError("no rows to collate")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        length = max(len(r.input_ids) for r in rows)
        length = -(-length // pad_multiple) * pad_multiple
        ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        loss = np.zeros((len(rows), length), np.int32)
        for b, r in enumerate(rows):
            n = len(r.input_ids)
            span = slice(length - n, length) if padding_side == "left" else slice(0, n)
            ids[b, span], mask[b, span], loss[b, span] = r.input_ids, 1, r.loss_mask
        with_images = [r for r in rows if len(r.image_grid_thw)]
        pixel_values = np.concatenate([r.pixel_values for r in with_images]) if with_images else None
        grids = np.concatenate([r.image_grid_thw for r in with_images]) if with_images else None
        try:
            batch = qwen2_5_vl.prepare_inputs(self.config, ids, mask, pixel_values, grids, patch_multiple=patch_multiple)
        except qwen2_5_vl.VisionInputError as e:
            names = ", ".join(r.name for r in rows)
            raise ImageInputError(f"batch of [{names}]: {e}") from None
        if loss.any():
            batch["loss_mask"] = loss
        return batch

    def __call__(
        self,
        records: Sequence[Any],
        *,
        image_root: str | os.PathLike | None = None,
        with_answer: bool = False,
        names: Sequence[str] | None = None,
        padding_side: str | None = None,
        pad_multiple: int = 8,
        patch_multiple: int = 1,
    ) -> dict[str, np.ndarray]:
        """Records -> one model batch. Prompts are left-padded (ready for ``generate``);
        ``with_answer=True`` gives right-padded training rows with ``loss_mask``."""
        if names is not None and len(names) != len(records):
            raise ValueError(f"{len(names)} names for {len(records)} records")
        labels = [names[i] if names is not None and names[i] else _record_name(r, i) for i, r in enumerate(records)]
        encoded = [self.encode(r, name=n, image_root=image_root, with_answer=with_answer) for r, n in zip(records, labels)]
        side = padding_side or ("right" if with_answer else "left")
        return self.collate(encoded, padding_side=side, pad_multiple=pad_multiple, patch_multiple=patch_multiple)


def _record_name(record: Any, position: int | None = None) -> str:
    source, index = getattr(record, "source", None), getattr(record, "index", None)
    if source is not None and index is not None:
        return f"{source}: record {index}"
    if isinstance(record, Mapping):
        for key in ("id", "name", "index"):
            if key in record:
                return f"record {record[key]!r}"
    return "record" if position is None else f"record {position}"


def _label(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(str(source))
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"

"""OFFSIDE records -> Qwen-VL model inputs: chat formatting with expanded image pads, the
transformers image processor, answer masks, and bad input named by record and image."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from transformers import Qwen2VLImageProcessorPil

from offside_jax.models import qwen2_5_vl
from offside_jax.models.vision_inputs import ImageInputError

from qwen2_5_vl_fixtures import RECORDS, image, make_processor, make_tokenizer, png_bytes, qwen2_5_vl_config, write_images

QUESTION = "I'm curious about which club the player on the left side of the image will join."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tokenizer = make_tokenizer()
    config = qwen2_5_vl_config(tokenizer)
    root = tmp_path_factory.mktemp("release")
    write_images(root)
    image(256, 256, 7).save(root / "offside.jpg")
    image(300, 200, 8).save(root / "large.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return SimpleNamespace(tokenizer=tokenizer, config=config, root=root, vp=make_processor(config, tokenizer))


def test_record_becomes_model_inputs_in_one_call(env):
    batch = env.vp(RECORDS, image_root=env.root)
    assert set(batch) == {"input_ids", "attention_mask", "positions", "pixel_values", "vision_positions",
                          "vision_full_groups", "vision_window_groups"}
    assert all(v.shape[0] == 3 for v in batch.values()), "every array is row-leading"
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["attention_mask"][:, -1].all()

    # Row 0 is the chat template's prompt with one pad per merged 2x2 block of patches.
    direct = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 160 * 160},
                                      patch_size=14, temporal_patch_size=2, merge_size=2)
    expected = direct(images=[image(112, 84, 1)], return_tensors="np")
    (t, h, w), = expected["image_grid_thw"].tolist()
    n = t * h * w // 4
    row = batch["input_ids"][0][batch["attention_mask"][0].astype(bool)]
    text = env.tokenizer.decode(row.tolist())
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|>" + "<|image_pad|>" * n + f"<|vision_end|>\n{QUESTION}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    np.testing.assert_array_equal(batch["pixel_values"][0, : t * h * w], expected["pixel_values"])
    assert not batch["pixel_values"][0, t * h * w:].any() and not batch["pixel_values"][1].any()
    # Row 2's two images: two full-attention groups whose patches make all of its image tokens.
    groups = batch["vision_full_groups"][2]
    assert (groups.max(1) >= 0).sum() == 2
    assert (batch["input_ids"][2] == env.config.image_token_id).sum() == (groups >= 0).sum() // 4


def test_offside_256px_image_takes_81_tokens(env):
    vp = make_processor(env.config, env.tokenizer, max_pixels=256 * 256)
    enc = vp.encode({"messages": [{"role": "user", "content": "<image>\n" + QUESTION}], "images": "offside.jpg"},
                    image_root=env.root)
    assert enc.image_grid_thw.tolist() == [[1, 18, 18]]
    assert (enc.input_ids == env.config.image_token_id).sum() == 81


def test_answer_mask_covers_the_answer_and_its_end_marker(env):
    record = {"messages": [{"role": "user", "content": "<image>\n" + QUESTION},
                           {"role": "assistant", "content": "He will be playing for Newcastle United."}],
              "images": "a.png"}
    text_only = {"messages": [{"role": "user", "content": "Who is he?"}, {"role": "assistant", "content": "Dominic."}]}
    batch = env.vp([record, text_only], image_root=env.root, with_answer=True)
    assert batch["attention_mask"][:, 0].all(), "training rows are right-padded"
    answer = batch["input_ids"][0][batch["loss_mask"][0].astype(bool)]
    assert env.tokenizer.decode(answer.tolist()) == "He will be playing for Newcastle United.<|im_end|>"
    answer = batch["input_ids"][1][batch["loss_mask"][1].astype(bool)]
    assert env.tokenizer.decode(answer.tolist()) == "Dominic.<|im_end|>"
    # The prompt part equals the generation prompt.
    prompt = env.vp.encode(record, image_root=env.root)
    np.testing.assert_array_equal(batch["input_ids"][0, : len(prompt.input_ids)], prompt.input_ids)


def test_images_as_bytes_and_untagged_images(env):
    question = {"role": "user", "content": "Who is this?"}
    from_bytes = env.vp.encode({"messages": [question], "images": [png_bytes(image(112, 84, 1))]})
    from_file = env.vp.encode({"messages": [question], "images": "a.png"}, image_root=env.root)
    # ms-swift's rule: untagged images go before the first user turn.
    np.testing.assert_array_equal(from_bytes.input_ids, from_file.input_ids)
    np.testing.assert_array_equal(from_bytes.pixel_values, from_file.pixel_values)
    assert (from_file.input_ids == env.config.image_token_id).any()
    ignoring = make_processor(env.config, env.tokenizer, untagged_images="ignore")
    assert len(ignoring.encode({"messages": [question], "images": "a.png"}).image_grid_thw) == 0
    # A loader Example of text modality (pure-text OFFSIDE records carry an image path as metadata).
    example = SimpleNamespace(messages=(SimpleNamespace(role="user", content="Which club will Dominic join?"),),
                              images=("missing.jpg",), image_files=("",), modality="text",
                              source="pure_text_data/forget_set.json", index=4)
    enc = env.vp.encode(example)
    assert enc.name == "pure_text_data/forget_set.json: record 4" and len(enc.image_grid_thw) == 0


def _decoded_prompt(env, record) -> str:
    return env.tokenizer.decode(env.vp.encode(record, image_root=env.root).input_ids.tolist())


def test_image_tags_follow_ms_swift(env):
    """Tags become images in order while images remain; a tag after the last image stays text
    (the published record "... shown in <image>." with one image); missing tags go, without a
    separator, in front of the first non-system turn."""
    block = "<|vision_start|>" + "<|image_pad|>" * (n := _pads(env, "a.png")) + "<|vision_end|>"
    extra = {"messages": [{"role": "user", "content": "<image>\nI'm curious about the transfer fee shown in <image>."}],
             "images": "a.png"}
    text = _decoded_prompt(env, extra)
    assert f"user\n{block}\nI'm curious about the transfer fee shown in <image>.<|im_end|>" in text
    assert text.count("<|image_pad|>") == n

    fewer = {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Compare <image> with this one."}],
             "images": ["a.png", "a.png"]}
    text = _decoded_prompt(env, fewer)
    assert f"<|im_start|>user\n{block}Compare {block} with this one.<|im_end|>" in text


def _pads(env, name: str) -> int:
    enc = env.vp.encode({"messages": [{"role": "user", "content": "<image>"}], "images": name}, image_root=env.root)
    return int((enc.input_ids == env.config.image_token_id).sum())


def test_downscaling_is_explicit(env):
    big = {"messages": [{"role": "user", "content": "<image>"}], "images": "large.png"}
    with pytest.raises(ImageInputError, match=r"record 0: image 0 \('large.png'\) is 300x200 = 60000 pixels, over the "
                                              r"pixel budget max_pixels=25600; raise max_pixels or pass allow_downscale"):
        env.vp([big], image_root=env.root)
    shrink = make_processor(env.config, env.tokenizer, allow_downscale=True)
    (t, h, w), = shrink.encode(big, image_root=env.root).image_grid_thw.tolist()
    assert h * w * 14 * 14 <= 160 * 160


@pytest.mark.parametrize("record, message", [
    ({"id": "r7", "messages": [{"role": "user", "content": "<image>\nWho?"}], "images": "broken.jpg"},
     r"record 'r7': image 0 \('broken.jpg'\) cannot be decoded as an image"),
    ({"id": "r8", "messages": [{"role": "user", "content": "<image>\nWho?"}], "images": "nowhere/364.jpg"},
     r"record 'r8': image 0 \('nowhere/364.jpg'\) not found"),
    ({"id": "r9", "messages": [{"role": "user", "content": "Who?"}], "images": ["a.png"]},
     r"record 'r9': 1 image\(s\) but 0 <image> tag\(s\) say where they go"),
    ({"id": "r10", "messages": [{"role": "user", "content": "Who?"}]},
     None),
])
def test_bad_records_are_named(env, record, message):
    records = [RECORDS[0], record]
    if record["id"] == "r9":
        strict = make_processor(env.config, env.tokenizer, untagged_images="error")
        with pytest.raises(ImageInputError, match=message):
            strict(records, image_root=env.root)
        return
    if message is None:  # the control: a good record passes
        env.vp(records, image_root=env.root)
        return
    with pytest.raises(ImageInputError, match=message):
        env.vp(records, image_root=env.root)


def test_prepare_inputs_checks_image_tokens_against_images(env):
    enc = env.vp.encode(RECORDS[0], image_root=env.root)
    ids = enc.input_ids[None]
    with pytest.raises(qwen2_5_vl.VisionInputError, match=r"has \d+ image tokens but its 2 images need \d+"):
        qwen2_5_vl.prepare_inputs(env.config, ids, None, np.concatenate([enc.pixel_values] * 2),
                                  np.concatenate([enc.image_grid_thw] * 2))
    with pytest.raises(qwen2_5_vl.VisionInputError, match="image tokens but no pixel_values"):
        qwen2_5_vl.prepare_inputs(env.config, ids)

"""One encoder family for training rows and evaluation prompts: which encoder a model gets,
and that its prompt and answer rows are the chat template's, token for token."""
import numpy as np
import pytest
from offside_data_fixtures import tiny_tokenizer

from offside_jax.data.batches import BatchDataError, TextEncoder, VisionEncoder, make_encoder
from offside_jax.eval.items import EvalItem
from offside_jax.models import tiny_vl

CORPUS = ["user\nWhich club will Ada join?", "assistant\nNewcastle United.", "Kestrel Town"] * 3


def item(prompt="Which club will Ada join?", images=()):
    return EvalItem(uid="t:0", test_set="forget", modality="text", fmt="gen", question=prompt, prompt=prompt,
                    reference="Newcastle", images=tuple(images))


def test_make_encoder_picks_the_family():
    tok = tiny_tokenizer(CORPUS)
    text = make_encoder(tok)
    assert isinstance(text, TextEncoder) and not text.supports_images
    assert make_encoder(text) is text
    vl_tok = tiny_vl.train_tokenizer(CORPUS, 300)
    config = tiny_vl.hf_config(tiny_vl.TinyVLConfig(), vl_tok)
    vision = make_encoder(vl_tok, config, image_root="release", max_length=64)
    assert isinstance(vision, VisionEncoder) and vision.supports_images
    assert (vision.max_length, str(vision.image_root)) == (64, "release")
    processor = tiny_vl.processor(config, vl_tok, 56)
    assert make_encoder(processor).processor is processor
    assert isinstance(make_encoder(tok, None), TextEncoder), "no transformers config: a text model"


def test_a_tokenizer_without_chat_template_is_refused():
    tok = tiny_tokenizer(CORPUS)
    tok.chat_template = None
    with pytest.raises(BatchDataError, match="chat template"):
        make_encoder(tok)


def test_text_prompts_and_answer_rows_follow_the_chat_template():
    tok = tiny_tokenizer(CORPUS)
    enc = make_encoder(tok)
    prompt = "<|im_start|>user\nWhich club will Ada join?<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok("Newcastle<|im_end|>", add_special_tokens=False)["input_ids"]

    batch = enc.prompt_batch([item(), item("Hi")], pad_multiple=8)
    row = batch["input_ids"][0][batch["attention_mask"][0] == 1]
    assert row.tolist() == prompt_ids and batch["input_ids"].shape[1] % 8 == 0

    answers = enc.answer_batch([item()], ["Newcastle"], pad_multiple=8)
    n = len(prompt_ids) + len(answer_ids)
    assert answers["input_ids"][0, :n].tolist() == prompt_ids + answer_ids
    assert answers["loss_mask"][0].tolist() == [0] * len(prompt_ids) + [1] * len(answer_ids) + [0] * (
        answers["input_ids"].shape[1] - n)
    assert np.all(answers["input_ids"][0, n:] == enc.pad_token_id)
    with pytest.raises(ValueError, match="cannot see the image"):
        enc.prompt_batch([item(images=["a.jpg"])])

"""The one in-memory BPE trainer (tiny text models, tiny Qwen-VL models, test fixtures)."""
from offside_jax.data.bpe import CHATML_SPECIAL_TOKENS, train_bpe_tokenizer
from offside_jax.models import tiny_vl

TEXTS = ["user\nWhich club will Ada join?", "assistant\nShe will join Newcastle United."] * 4


def test_specials_come_first_and_text_round_trips():
    tok = train_bpe_tokenizer(TEXTS, 300)
    assert [tok.convert_tokens_to_ids(t) for t in CHATML_SPECIAL_TOKENS] == [0, 1, 2]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    text = "Zoë signs for Zürich"  # bytes never seen in the corpus still encode (byte level)
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) == 300


def test_chat_template_renders_chatml():
    tok = train_bpe_tokenizer(TEXTS, 300)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert train_bpe_tokenizer(TEXTS, 300, chat_template=None).chat_template is None


def test_at_most_bytes_plus_specials_means_no_merges():
    tok = train_bpe_tokenizer(TEXTS, 259)
    assert len(tok("Newcastle")["input_ids"]) == len("Newcastle")


def test_qwen_vl_tokenizer_keeps_qwen_specials():
    tok = tiny_vl.train_tokenizer(TEXTS, 300)
    ids = [tok.convert_tokens_to_ids(t) for t in tiny_vl.QWEN_VL_SPECIAL_TOKENS]
    assert ids == list(range(len(ids)))
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok("<|image_pad|>")["input_ids"] == [tok.convert_tokens_to_ids("<|image_pad|>")]

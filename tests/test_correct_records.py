"""SFT and preference records -> token batches, with the character tokenizer and a HF tokenizer."""
import numpy as np
import pytest
from offside_data_fixtures import tiny_tokenizer

from offside_jax.correct.chars import CharTokenizer
from offside_jax.correct.records import (
    PreferenceRecord,
    SFTRecord,
    preference_batch,
    sft_batch,
    write_chat_jsonl,
)


def test_char_batch_by_hand():
    tok = CharTokenizer("12+=\nx")  # ids: pad 0, eos 1, '1' 2, '2' 3, '+' 4, '=' 5, '\n' 6, 'x' 7
    record = SFTRecord("1+1=\n", (("x\n", False), ("2", True)))
    assert record.target == "x\n2" and record.target_mask() == [0, 0, 1]
    batch = sft_batch([record, SFTRecord.plain("2=", "2")], tok, pad_multiple=4)
    np.testing.assert_array_equal(batch["input_ids"], [[2, 4, 2, 5, 6, 7, 6, 3, 1, 0, 0, 0], [3, 5, 3, 1] + [0] * 8])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1] + [0] * 8])
    np.testing.assert_array_equal(batch["attention_mask"], [[1] * 9 + [0] * 3, [1] * 4 + [0] * 8])
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}


def test_untrained_last_piece_still_ends_with_a_trained_eos():
    tok = CharTokenizer("ab")
    batch = sft_batch([SFTRecord("a", (("b", False),))], tok, pad_multiple=1)
    np.testing.assert_array_equal(batch["input_ids"], [[2, 3, 1]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1]])


def test_hf_tokenizer_pieces_without_special_tokens_in_the_middle():
    records = [SFTRecord("Which club? ", (("Inter. ", False), ("Wait, Roma.", True)))]
    tok = tiny_tokenizer(["Which club? Inter. Wait, Roma. chosen rejected"], vocab_size=300)
    batch = sft_batch(records, tok)
    ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
    n = int(batch["attention_mask"][0].sum())
    assert tok.decode(ids[:n], skip_special_tokens=True) == "Which club? Inter. Wait, Roma."
    assert ids[n - 1] == tok.eos_token_id and mask[n - 1] == 1
    assert tok.decode(ids[mask == 1], skip_special_tokens=True) == "Wait, Roma."
    assert np.all(ids[n:] == tok.pad_token_id)
    pairs = preference_batch([PreferenceRecord("Q ", "chosen", "rejected")], tok)
    assert tok.decode(pairs["input_ids"][0][pairs["loss_mask"][0] == 1], skip_special_tokens=True) == "chosen"
    assert tok.decode(pairs["input_ids"][1][pairs["loss_mask"][1] == 1], skip_special_tokens=True) == "rejected"


def test_chat_jsonl_round_trip(tmp_path):
    from offside_jax.train.sft_data import read_chat_jsonl

    records = [SFTRecord.plain("478+256=\n", "answer 734", problem=0), SFTRecord("1+1=\n", (("answer 3\n", True), ("answer 2", True)))]
    path = write_chat_jsonl(records, tmp_path / "lemma.jsonl")
    assert read_chat_jsonl(path) == [
        [{"role": "user", "content": "478+256=\n"}, {"role": "assistant", "content": "answer 734"}],
        [{"role": "user", "content": "1+1=\n"}, {"role": "assistant", "content": "answer 3\nanswer 2"}],
    ]
    with pytest.raises(ValueError, match="record 1 keeps part"):
        write_chat_jsonl([records[0], SFTRecord("q", (("wrong\n", False), ("right", True)))], tmp_path / "x.jsonl")

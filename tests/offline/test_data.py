"""Offline data: loss masks built from the chat template, truncation, and errors that name the file, row and column."""

import pytest

from posttrain.data.sources import DataError
from posttrain.models.loading import load_tokenizer
from posttrain.offline.data import ChatTokenizer, Sequence, pack_sequences, preference_pairs, sft_sequences

from .conftest import PREFERENCE_ROWS, offline_config, write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_path):
    return load_tokenizer(str(tiny_path), padding_side="right")


def _supervised_text(tok, seq) -> str:
    return tok.decode([t for t, m in zip(seq.input_ids, seq.loss_mask, strict=True) if m])


def test_prompt_completion_masks_exactly_the_assistant_reply_and_its_end_of_turn(tok):
    chat = ChatTokenizer(tok, system_prompt="Be brief.", use_chat_template=True, max_length=512)
    seq = chat.prompt_completion("What is 3 + 4?", "7", "f: row 0")
    # the ChatML text, one token per character: the prompt (system + user + assistant header) is never supervised
    text = tok.decode(seq.input_ids)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n7<|im_end|>\n"
    )
    assert _supervised_text(tok, seq) == "7<|im_end|>\n"
    assert seq.loss_mask == [0] * (len(seq.input_ids) - 3) + [1, 1, 1]


def test_without_a_template_the_completion_gets_an_eos_and_only_it_is_supervised(tok):
    chat = ChatTokenizer(tok, system_prompt=None, use_chat_template=False, max_length=512)
    seq = chat.prompt_completion("Q: 1+1", " 2", "f: row 0")
    assert tok.decode(seq.input_ids) == "Q: 1+1 2<|im_end|>"
    assert _supervised_text(tok, seq) == " 2<|im_end|>"


def test_messages_mask_covers_every_assistant_turn_and_nothing_else(tok):
    chat = ChatTokenizer(tok, system_prompt=None, use_chat_template=True, max_length=512)
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "BB"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "DD"},
    ]
    seq = chat.conversation(messages, "f: row 0", assistant_only=True)
    assert _supervised_text(tok, seq) == "BB<|im_end|>\nDD<|im_end|>\n"
    # two separate spans: the user turn between them is masked
    starts = [i for i in range(1, len(seq.loss_mask)) if seq.loss_mask[i] and not seq.loss_mask[i - 1]]
    assert len(starts) == 2
    every = chat.conversation(messages, "f: row 0", assistant_only=False)
    assert every.input_ids == seq.input_ids and all(every.loss_mask)


def test_truncation_keeps_the_start_and_drops_rows_left_without_completion(tok):
    chat = ChatTokenizer(tok, system_prompt=None, use_chat_template=False, max_length=6)
    kept = chat.truncate(chat.prompt_completion("abcd", "xyz", "f"))
    assert tok.decode(kept.input_ids) == "abcdxy" and kept.loss_mask == [0, 0, 0, 0, 1, 1]
    assert chat.truncate(chat.prompt_completion("abcdef", "xyz", "f")) is None


def test_preference_rows_become_pairs_with_margins(tmp_path, tiny_path, tok):
    cfg = offline_config(tmp_path, tiny_path, "reward_model", PREFERENCE_ROWS, reward_model={"margin_column": "margin"})
    chat = ChatTokenizer(tok, None, True, 512)
    pairs = preference_pairs(cfg, chat)
    assert [p.margin for p in pairs] == [0.5, 1.0, 0.0, 2.0]
    assert _supervised_text(tok, pairs[1].chosen) == "9 is<|im_end|>\n"
    assert _supervised_text(tok, pairs[1].rejected) == "2<|im_end|>\n"
    # chosen and rejected share the prompt tokens
    n_prompt = pairs[1].chosen.loss_mask.index(1)
    assert pairs[1].chosen.input_ids[:n_prompt] == pairs[1].rejected.input_ids[:n_prompt]


@pytest.mark.parametrize(
    "name, rows, sections, message",
    [
        ("dpo", [{"prompt": "p", "chosen": "a"}], {}, "data.jsonl: row 0 has no `rejected` column"),
        ("dpo", [{"prompt": "p", "chosen": "a", "rejected": 3}], {}, "row 0: column `rejected` must be a string"),
        (
            "orpo",
            [
                {"prompt": "p", "chosen": "a", "rejected": "b"},
                {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
            ],
            {},
            "row 1: column `prompt`, message 0 must be",
        ),
        (
            "reward_model",
            [{"prompt": "p", "chosen": "a", "rejected": "b", "m": "big"}],
            {"reward_model": {"margin_column": "m"}},
            "row 0: column `m` (the margin) must be a number",
        ),
        ("sft", [{"prompt": "p", "answer": "a"}], {}, "row 0 has no `completion` column"),
        (
            "sft",
            [{"messages": [{"role": "user", "content": "hi"}]}],
            {},
            "row 0: column `messages` has no assistant turn",
        ),
        ("sft", [{"prompt": "p", "completion": "a"}, 7], {}, "row 1 is a int, expected an object"),
    ],
)
def test_bad_rows_fail_naming_file_row_and_column(tmp_path, tiny_path, tok, name, rows, sections, message):
    cfg = offline_config(tmp_path, tiny_path, name, rows, **sections)
    chat = ChatTokenizer(tok, None, True, 512)
    load = sft_sequences if name == "sft" else preference_pairs
    with pytest.raises(DataError) as err:
        load(cfg, chat)
    assert message in str(err.value)
    assert str(tmp_path / "data.jsonl") in str(err.value)


def test_every_row_too_long_is_an_error_naming_the_key(tmp_path, tiny_path, tok):
    cfg = offline_config(tmp_path, tiny_path, "sft", [{"prompt": "a long prompt", "completion": "x"}])
    with pytest.raises(DataError, match="train.max_length=4"):
        sft_sequences(cfg, ChatTokenizer(tok, None, True, 4))


def test_packing_fills_rows_in_order_restarts_positions_and_masks_each_first_token():
    seqs = [Sequence([1, 2, 3], [0, 1, 1]), Sequence([4, 5], [1, 1]), Sequence([6, 7, 8, 9], [0, 0, 1, 1])]
    packs = pack_sequences(seqs, max_length=6)
    assert [p.input_ids for p in packs] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert [p.position_ids for p in packs] == [[0, 1, 2, 0, 1], [0, 1, 2, 3]]
    # token 4 starts a sequence: predicted from token 3 of another one, so it carries no loss
    assert [p.loss_mask for p in packs] == [[0, 1, 1, 0, 1], [0, 0, 1, 1]]


def test_a_local_dataset_folder_is_read_through_datasets(tmp_path, tiny_path, tok):
    pytest.importorskip("datasets")
    from posttrain.config import validate_config

    folder = tmp_path / "prefs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PREFERENCE_ROWS)
    raw = {"model": {"path": str(tiny_path)}, "algorithm": {"name": "dpo"}}
    cfg = validate_config({**raw, "data": {"kind": "hub", "name": str(folder), "limit": 3}})
    pairs = preference_pairs(cfg, ChatTokenizer(tok, None, True, 512))
    assert len(pairs) == 3 and _supervised_text(tok, pairs[2].rejected) == "one<|im_end|>\n"

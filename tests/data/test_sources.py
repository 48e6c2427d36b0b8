"""Prompt sources and the resumable batch order."""

import json

import pytest

from posttrain.config import ArithmeticSource, FileSource
from posttrain.data.sources import DataError, arithmetic_rows, batch_indices, file_rows


def test_arithmetic_rows_are_correct_distinct_and_seeded():
    rows = arithmetic_rows(ArithmeticSource(num_problems=50, seed=3, ops=["+", "-", "*"], min_value=2, max_value=9))
    assert len(rows) == 50 and len({r["prompt"] for r in rows}) == 50
    for r in rows:
        a, op, b = r["prompt"].removeprefix("What is ").split("?")[0].split(" ")
        assert int(r["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert rows == arithmetic_rows(
        ArithmeticSource(num_problems=50, seed=3, ops=["+", "-", "*"], min_value=2, max_value=9)
    )


def test_eval_set_excludes_the_training_problems():
    train = arithmetic_rows(ArithmeticSource(num_problems=500, seed=1, max_value=30))
    held = arithmetic_rows(
        ArithmeticSource(num_problems=64, seed=2, max_value=30, exclude_seed=1, exclude_num_problems=500)
    )
    assert len(held) == 64 and not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_batch_order_covers_each_epoch_once_and_is_a_pure_function_of_step():
    n, bs = 10, 4
    order = [i for step in range(5) for i in batch_indices(n, bs, step, seed=7)]  # 20 positions = 2 epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert order[:10] != order[10:]  # reshuffled each epoch
    assert batch_indices(n, bs, 3, seed=7) == order[12:16]  # a resumed run asks for step 3 directly
    assert batch_indices(n, bs, 0, seed=8) != batch_indices(n, bs, 0, seed=7)


def test_file_rows_rename_prompt_column_and_name_bad_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"question": "1+1?", "answer": "2"})
        + "\n\n"
        + json.dumps({"question": "2+2?", "answer": "4"})
        + "\n"
    )
    rows = file_rows(FileSource(path=str(path), prompt_column="question"))
    assert rows == [{"answer": "2", "prompt": "1+1?"}, {"answer": "4", "prompt": "2+2?"}]
    with pytest.raises(DataError, match=r"row 0 has no `prompt` column"):
        file_rows(FileSource(path=str(path)))
    path.write_text('{"prompt": "x"}\n{broken\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        file_rows(FileSource(path=str(path)))
    with pytest.raises(DataError, match="data file not found"):
        file_rows(FileSource(path=str(tmp_path / "missing.jsonl")))


def test_few_shot_examples_become_chat_turns_and_small_ranges_cap_the_count():
    src = ArithmeticSource(num_problems=500, seed=1, max_value=9, instruction="", few_shot=[("What is 3 + 4?", "7")])
    rows = arithmetic_rows(src)
    assert len(rows) == 100  # only 10 x 10 distinct single-digit additions exist
    assert rows[0]["prompt"][:2] == [
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "7"},
    ]
    assert rows[0]["prompt"][2]["role"] == "user" and rows[0]["prompt"][2]["content"].startswith("What is ")
    held = ArithmeticSource(num_problems=64, seed=2, max_value=9)
    train = ArithmeticSource(num_problems=500, seed=1, max_value=9, exclude_seed=2, exclude_num_problems=64)
    held_q = {r["prompt"] for r in arithmetic_rows(held)}
    train_q = {r["prompt"] for r in arithmetic_rows(train)}
    assert len(held_q) == 64 and len(train_q) == 36 and not held_q & train_q

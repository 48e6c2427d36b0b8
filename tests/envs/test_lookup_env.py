"""The lookup tool of recipes/lookup_env.py: the lookup returns the row's digit, a digit ends the episode graded
against it, anything else ends it unrewarded; the committed data is what the generator writes: every demo calls the
tool, COPY_SHARE of them copy its digit and the others answer the next one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.recipes.lookup_env import CALL, COPY_SHARE, Lookup, write_data

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"


def play(row: dict, *turns: str) -> list:
    env = Lookup()
    messages = env.reset(row)
    results = []
    for turn in turns:
        messages.append({"role": "assistant", "content": turn})
        result = env.step(messages)
        messages += result.messages
        results.append((result.messages, result.reward, result.done))
    return results


def test_the_lookup_returns_the_digit_and_only_that_digit_scores():
    row = {"prompt": "box 37", "answer": "4"}
    assert Lookup().reset(row) == [{"role": "user", "content": "box 37"}]
    assert play(row, CALL, "4") == [([{"role": "tool", "content": "4"}], None, False), ([], 1.0, True)]
    assert play(row, CALL, " 7\n") == [([{"role": "tool", "content": "4"}], None, False), ([], 0.0, True)]
    assert play(row, "4") == [([], 1.0, True)]  # a lucky guess without the tool
    assert play(row, "44") == [([], 0.0, True)] and play(row, "look") == [([], 0.0, True)]


def test_a_row_whose_answer_is_not_one_digit_is_refused_naming_it():
    with pytest.raises(ValueError, match="row 'box 1' has answer '12', not one digit"):
        Lookup().reset({"prompt": "box 1", "answer": "12"})


def test_the_committed_data_is_the_generators_and_keeps_held_out_boxes_apart(tmp_path):
    write_data(tmp_path)
    names = ("lookup_sft.jsonl", "lookup_train.jsonl", "lookup_eval.jsonl")
    for name in names:
        assert (tmp_path / name).read_text() == (DATA / name).read_text(), name
    sft, train, held_out = ([json.loads(line) for line in (DATA / name).open()] for name in names)
    roles = ["user", "assistant", "tool", "assistant"]
    assert all([turn["role"] for turn in demo["messages"]] == roles for demo in sft)
    assert all(demo["messages"][1]["content"] == CALL for demo in sft)  # every demo calls the tool
    replies = [(int(demo["messages"][2]["content"]), int(demo["messages"][3]["content"])) for demo in sft]
    assert sum(answer == tool for tool, answer in replies) == round(COPY_SHARE * len(sft))
    assert all(answer in (tool, (tool + 1) % 10) for tool, answer in replies)
    sft_boxes = {demo["messages"][0]["content"] for demo in sft}
    boxes = [sft_boxes, {row["prompt"] for row in train}, {row["prompt"] for row in held_out}]
    assert not (boxes[0] & boxes[2]) and not (boxes[1] & boxes[2])

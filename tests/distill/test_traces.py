"""Trace selection rules and the resumable trace writer."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.distill.traces import Candidate, TraceSettings, progress_path, read_progress, select, write_traces
from posttrain.rewards.combine import RewardScores
from posttrain.rollout.types import Completion

C = [
    Candidate("a long right answer", tokens=30, reward=1.0, truncated=False),
    Candidate("wrong", tokens=5, reward=0.0, truncated=False),
    Candidate("short right", tokens=10, reward=1.0, truncated=False),
    Candidate("cut off but right", tokens=8, reward=1.0, truncated=True),
    Candidate("best", tokens=40, reward=1.5, truncated=False),
    Candidate("skipped", tokens=2, reward=math.nan, truncated=False),
]


@pytest.mark.parametrize(
    "keep, min_reward, k, drop, want",
    [
        ("shortest", 1.0, None, True, [2]),  # shortest verified; the truncated one does not count
        ("shortest", 1.0, None, False, [3]),  # ... unless truncated traces are allowed
        ("shortest", 1.0, 2, True, [2, 0]),
        ("best", 1.0, None, True, [4]),
        ("best", None, 3, True, [4, 2, 0]),  # rank by reward, ties shorter first; NaN never qualifies
        ("all", 1.0, None, True, [0, 2, 4]),  # generation order
        ("all", 1.0, 2, True, [0, 2]),
        ("shortest", 2.0, None, True, []),
    ],
)
def test_select(keep, min_reward, k, drop, want):
    assert select(C, keep, min_reward, k, drop) == want


def test_select_rejects_unknown_rule():
    with pytest.raises(ValueError, match="keep must be one of"):
        select(C, "longest", 1.0, None, True)


ROWS = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(7)]


def _settings(**kw):
    base = dict(
        samples_per_prompt=2, keep="shortest", min_reward=1.0, max_per_problem=None, drop_truncated=True,
        chunk_problems=3, source="teacher",
    )  # fmt: skip
    return TraceSettings(**{**base, **kw})


class Generator:
    """Writes, for problem i, a right answer ("i+1", 2 tokens) and a wrong one ("0", 1 token); can stop after
    `fail_after` chunks like an interrupted run."""

    def __init__(self, fail_after=None):
        self.calls: list[list[int]] = []
        self.fail_after = fail_after

    def __call__(self, indices, chunk):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(list(indices))
        return [
            [Completion([7, 8], str(i + 1), [0.0, 0.0], "stop"), Completion([9], "0", [0.0], "stop")] for i in indices
        ]


def exact_match(chunk, completions):
    totals = [float(c.text == row["answer"]) for row, outs in zip(chunk, completions, strict=True) for c in outs]
    return RewardScores(totals)


def test_write_traces_keeps_verified_rows_with_their_columns(tmp_path):
    dataset = tmp_path / "traces.jsonl"
    stats = write_traces(ROWS, dataset, _settings(), Generator(), exact_match)
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    assert [r["problem"] for r in rows] == list(range(7))
    assert rows[3] == {
        "prompt": "What is 3 + 1?", "completion": "4", "source": "teacher", "reward": 1.0, "problem": 3, "answer": "4"
    }  # fmt: skip
    d = stats.as_dict()
    assert (d["problems"], d["generated"], d["kept"], d["generated_tokens"], d["kept_tokens"]) == (7, 14, 7, 21, 14)
    assert d["kept_fraction"] == 0.5 and d["problem_coverage"] == 1.0


def test_an_interrupted_run_resumes_without_duplicates_or_gaps(tmp_path):
    dataset = tmp_path / "traces.jsonl"
    first = Generator(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        write_traces(ROWS, dataset, _settings(), first, exact_match)
    assert first.calls == [[0, 1, 2], [3, 4, 5]]
    # a crash between writing a chunk's rows and recording it leaves rows the progress file does not know about
    with dataset.open("a") as handle:
        handle.write(json.dumps({"prompt": "x", "completion": "torn", "problem": 6}) + "\n")
    second = Generator()
    stats = write_traces(ROWS, dataset, _settings(), second, exact_match)
    assert second.calls == [[6]]  # only the problem not done
    problems = [json.loads(line)["problem"] for line in dataset.read_text().splitlines()]
    assert problems == list(range(7))
    assert stats.problems == 7 and stats.generated == 14  # the stats add up over both runs
    assert len(progress_path(dataset).read_text().splitlines()) == 3


def test_a_torn_progress_line_counts_as_not_recorded(tmp_path):
    dataset = tmp_path / "traces.jsonl"
    write_traces(ROWS[:3], dataset, _settings(), Generator(), exact_match)
    with progress_path(dataset).open("a") as handle:
        handle.write('{"problems": [3, 4')  # killed mid-write
    done, stats = read_progress(dataset)
    assert done == {0, 1, 2} and stats.problems == 3

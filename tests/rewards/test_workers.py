"""Reward scoring in Ray actors: same scores as in-process, shards in parallel, per-sample timeouts."""

from __future__ import annotations

import math
import os
import time

import pytest

from posttrain.rewards.combine import RewardError, score_samples
from posttrain.rewards.loading import build_reward_specs
from posttrain.rewards.workers import RewardPool, shard_bounds

USER_REWARDS = """
import os, time

def slow_on_hang(prompts, completions, **kwargs):
    # "hang" sleeps far past any timeout; everything else scores 1.0
    out = []
    for c in completions:
        if "hang" in c:
            time.sleep(3600)
        out.append(1.0)
    return out

def crash_on_boom(prompts, completions, **kwargs):
    if any("boom" in c for c in completions):
        os._exit(1)
    return [0.5] * len(completions)

def worker_pid(prompts, completions, **kwargs):
    return [float(os.getpid())] * len(completions)

def wrong_length(prompts, completions, **kwargs):
    return [1.0]
"""


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def _pool(entries, names, workers=1, timeout=60.0, base_dir=None):
    specs = build_reward_specs(entries, names, base_dir or ".")
    return RewardPool(entries, specs, workers=workers, timeout=timeout, base_dir=base_dir), specs


def test_shard_bounds_cover_the_batch_at_group_boundaries():
    assert shard_bounds(16, 2, 4) == [(0, 8), (8, 16)]
    assert shard_bounds(12, 2, 4) == [(0, 8), (8, 12)]
    assert shard_bounds(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert shard_bounds(3, 8) == [(0, 1), (1, 2), (2, 3)]
    assert shard_bounds(0, 2) == []


def test_pool_scores_equal_in_process_scores_and_run_in_other_processes(ray_session):
    entries = [
        {"fn": "math_accuracy", "weight": 1.0, "args": {}},
        {"fn": "format", "weight": 0.1, "args": {}},
    ]
    prompts = [f"What is {k} + 1?" for k in range(8)]
    completions = [f"\\boxed{{{k + 1 if k % 3 else k}}}" for k in range(8)]
    columns = {"answer": [str(k + 1) for k in range(8)]}
    pool, specs = _pool(entries, ["math_accuracy", "format"], workers=2)
    try:
        got = pool.score(prompts, completions, columns, group_size=4)
        want = score_samples(specs, prompts, completions, columns)
        assert got.total == want.total and got.per_function == want.per_function
        assert got.per_function["math_accuracy"] == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    finally:
        pool.close()


def test_shards_run_in_separate_workers(ray_session, rewards_file):
    pool, _ = _pool([{"fn": f"{rewards_file}:worker_pid"}], ["pid"], workers=2)
    try:
        scores = pool.score(["p"] * 4, ["c"] * 4, {}, group_size=2)
        pids = scores.per_function["pid"]
        assert pids[0] == pids[1] != pids[2] == pids[3] and os.getpid() not in pids
    finally:
        pool.close()


def test_a_hanging_sample_times_out_alone_and_the_rest_are_scored(ray_session, rewards_file):
    pool, _ = _pool([{"fn": f"{rewards_file}:slow_on_hang"}], ["slow"], timeout=1.0)
    try:
        start = time.monotonic()
        scores = pool.score(["p"] * 4, ["a", "hang", "b", "c"], {}, on_error="skip")
        assert time.monotonic() - start < 30
        assert scores.skipped == [1] and "did not finish within 1 s" in scores.errors[0]
        assert scores.per_function["slow"] == [1.0, None, 1.0, 1.0]
        assert math.isnan(scores.total[1]) and scores.total[0] == 1.0
        with pytest.raises(RewardError, match="sample 1: scoring did not finish within 1 s"):
            pool.score(["p"] * 2, ["a", "hang"], {}, on_error="raise")
        assert pool.restarts >= 2
        assert pool.score(["p"], ["fine"], {}).total == [1.0]  # the pool still works
    finally:
        pool.close()


def test_a_sample_that_kills_its_worker_is_pinned_and_the_pool_recovers(ray_session, rewards_file):
    pool, _ = _pool([{"fn": f"{rewards_file}:crash_on_boom"}], ["crash"], timeout=20.0)
    try:
        scores = pool.score(["p"] * 3, ["a", "boom", "b"], {}, on_error="skip")
        assert scores.skipped == [1] and scores.per_function["crash"] == [0.5, None, 0.5]
    finally:
        pool.close()


def test_a_function_bug_raises_a_reward_error_naming_it(ray_session, rewards_file):
    pool, _ = _pool([{"fn": f"{rewards_file}:wrong_length"}], ["short"])
    try:
        with pytest.raises(RewardError, match="'short' returned 1 values for 3 samples"):
            pool.score(["p"] * 3, ["a", "b", "c"], {})
    finally:
        pool.close()

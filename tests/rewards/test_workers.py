"""Reward scoring in Ray actors: same scores as in-process, shards in parallel, a time limit per function call."""

from __future__ import annotations

import math
import os
import time

import pytest

from posttrain.rewards.combine import RewardError, RewardSpec, reward_metrics, score_samples
from posttrain.rewards.loading import build_reward_specs
from posttrain.rewards.workers import RewardPool, scoring_calls, shard_bounds

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

def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]
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


def _bound(timeout: float) -> float:
    """A hung function may cost about one timeout per step, plus worker restarts: far below one timeout per
    sample (retrying each sample alone took 47 s on the first batch below, at timeout 2)."""
    return 4 * timeout + 20


def test_a_function_hanging_on_every_sample_fails_within_one_timeout_naming_it(ray_session, rewards_file):
    entries = [{"fn": f"{rewards_file}:slow_on_hang"}, {"fn": f"{rewards_file}:length"}]
    pool, _ = _pool(entries, ["slow", "len"], workers=2, timeout=2.0)
    try:
        start = time.monotonic()
        with pytest.raises(RewardError) as raised:
            pool.score([f"q{k}" for k in range(8)], ["hang"] * 8, {}, on_error="raise")
        assert time.monotonic() - start < _bound(2.0)
        message = str(raised.value)
        assert message.startswith(
            "reward function 'slow' failed on sample 0: did not finish within 2 s (scoring.timeout) on samples 0-3"
        )
        assert f"rewards[0].fn = '{rewards_file}:slow_on_hang'" in message and "prompt: 'q0'" in message
        assert pool.restarts == 2  # both shards' workers, once each
        assert pool.score(["p"] * 2, ["a", "bb"], {}).total == [2.0, 3.0]  # the replaced workers score
    finally:
        pool.close()


def test_with_skip_a_hang_drops_its_shard_and_the_other_functions_scores_stand(ray_session, rewards_file):
    # `len` runs before the hang on the stuck worker, `pid` after it (on the replacement)
    entries = [{"fn": f"{rewards_file}:{fn}"} for fn in ("length", "slow_on_hang", "worker_pid")]
    pool, _ = _pool(entries, ["len", "slow", "pid"], workers=2, timeout=2.0)
    completions = ["a", "hang", "b", "c", "dd", "eee", "f", "gg"]
    try:
        start = time.monotonic()
        scores = pool.score(["p"] * 8, completions, {}, on_error="skip", group_size=4)
        assert time.monotonic() - start < _bound(2.0)
        assert scores.skipped == [0, 1, 2, 3] and scores.failed == {"len": 0, "slow": 4, "pid": 0}
        assert "'slow' failed on sample 0: did not finish within 2 s" in scores.errors[0]
        assert scores.per_function["len"] == [None] * 4 + [2.0, 3.0, 1.0, 2.0]
        assert scores.per_function["slow"] == [None] * 4 + [1.0] * 4
        pids = scores.per_function["pid"]
        assert pids[:4] == [None] * 4 and len(set(pids[4:])) == 1
        assert all(math.isnan(t) for t in scores.total[:4])
        assert scores.total[4:] == [3.0 + pids[4], 4.0 + pids[4], 2.0 + pids[4], 3.0 + pids[4]]
        assert reward_metrics(scores)["reward/slow/failed"] == 4.0
        assert pool.restarts == 1
    finally:
        pool.close()


def test_a_function_that_kills_its_worker_is_named_and_the_pool_recovers(ray_session, rewards_file):
    entries = [{"fn": f"{rewards_file}:crash_on_boom"}, {"fn": f"{rewards_file}:length"}]
    pool, _ = _pool(entries, ["crash", "len"], workers=2, timeout=30.0)
    completions = ["a", "b", "c", "d", "e", "boom", "g", "h"]
    try:
        with pytest.raises(RewardError) as raised:
            pool.score([f"q{k}" for k in range(8)], completions, {}, on_error="raise")
        message = str(raised.value)
        assert message.startswith("reward function 'crash' failed on sample 4: its reward worker process died")
        assert "on samples 4-7" in message and f"rewards[0].fn = '{rewards_file}:crash_on_boom'" in message
        scores = pool.score(["p"] * 8, completions, {}, on_error="skip")
        assert scores.skipped == [4, 5, 6, 7] and scores.failed == {"crash": 4, "len": 0}
        assert scores.per_function["len"] == [1.0] * 4 + [None] * 4
        assert scores.total[:4] == [1.5] * 4 and all(math.isnan(t) for t in scores.total[4:])
        assert pool.restarts == 2
        assert pool.score(["p"], ["fine"], {}).total == [4.5]
    finally:
        pool.close()


def test_async_functions_share_one_call_and_plain_ones_get_their_own():
    async def judge(**kwargs):
        return [1.0]

    def plain(**kwargs):
        return [1.0]

    specs = [RewardSpec(judge, "a"), RewardSpec(plain, "b"), RewardSpec(judge, "c")]
    assert scoring_calls(specs) == [[1], [0, 2]]


def test_a_function_bug_raises_a_reward_error_naming_it(ray_session, rewards_file):
    pool, _ = _pool([{"fn": f"{rewards_file}:wrong_length"}], ["short"])
    try:
        with pytest.raises(RewardError, match="'short' returned 1 values for 3 samples"):
            pool.score(["p"] * 3, ["a", "b", "c"], {})
    finally:
        pool.close()

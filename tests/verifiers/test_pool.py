"""The killable worker pool behind `verify`: timeouts, crashes, memory caps, recycling, clean shutdown."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from posttrain.verifiers.math import math_pool, verify, verify_here, verify_many
from posttrain.verifiers.pool import CallResult, WorkerPool

LABELLED = Path(__file__).parent / "data" / "math_labelled.jsonl"
SLOW = "\\boxed{((9^{999})^{999})^{999}}"  # passes the syntactic guards; sympy needs far longer than any timeout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def pool():
    with WorkerPool("os:getpid", workers=2) as pool:
        yield pool


def test_calls_return_the_function_value_from_another_process(pool):
    result = pool.call(timeout=30)
    assert result.status == "ok" and isinstance(result.value, int) and result.value != os.getpid()


def test_a_timed_out_worker_is_killed_and_replaced():
    with WorkerPool("time:sleep", workers=1) as sleeper:
        assert sleeper.call(0, timeout=30) == CallResult("ok", None)
        (first,) = [w.process.pid for w in sleeper._all]
        start = time.perf_counter()
        assert sleeper.call(60, timeout=0.2) == CallResult("timeout")
        assert time.perf_counter() - start < 1.0
        time.sleep(0.2)
        assert not _alive(first)
        assert sleeper.call(0, timeout=30) == CallResult("ok", None)  # the replacement serves the next call
        assert sleeper.stats == {"calls": 3, "timeouts": 1, "crashes": 0, "recycled": 1}


def test_a_crashing_call_is_reported_and_the_pool_stays_healthy():
    with WorkerPool("os:_exit", workers=1) as crasher:
        result = crasher.call(3, timeout=30)
        assert result.status == "crashed" and "exit" in result.value
        assert crasher.stats["crashes"] == 1 and len(crasher._all) == 1


def test_a_raising_call_is_an_error_with_its_message():
    with WorkerPool("math:sqrt", workers=1) as pool:
        assert pool.call(-1.0, timeout=30) == CallResult("error", "ValueError: math domain error")
        assert pool.call(4.0, timeout=30) == CallResult("ok", 2.0)


def test_memory_is_capped_per_worker():
    with WorkerPool("builtins:bytearray", workers=1, memory_limit_mb=512) as pool:
        assert pool.call(8 * 1024**3, timeout=30) == CallResult("error", "MemoryError")
        assert pool.call(16, timeout=30).status == "ok"


def test_workers_are_recycled_after_max_tasks():
    with WorkerPool("os:getpid", workers=1, max_tasks_per_worker=2) as recycled:
        pids = [recycled.call(timeout=30).value for _ in range(6)]
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]


def test_close_leaves_no_process_behind():
    pool = WorkerPool("os:getpid", workers=2)
    pids = {pool.call(timeout=30).value for _ in range(4)}
    pool.close()
    time.sleep(0.2)
    assert pids and not any(_alive(pid) for pid in pids)


def test_workers_exit_when_their_parent_dies(tmp_path):
    script = textwrap.dedent(
        """
        import json, os, sys
        from posttrain.verifiers.pool import WorkerPool
        pool = WorkerPool("os:getpid", workers=2)
        print(json.dumps(sorted({pool.call(timeout=30).value for _ in range(4)})), flush=True)
        os._exit(0)  # no cleanup: the workers must notice on their own
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    pids = json.loads(out.stdout)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids and not any(_alive(pid) for pid in pids)


def test_verify_returns_within_its_timeout_and_the_next_check_is_unaffected():
    verify("1", "\\boxed{1}")  # the pool is up
    start = time.perf_counter()
    assert verify("1", SLOW, timeout=0.3) is False
    assert time.perf_counter() - start < 1.0
    assert verify("x^2+2x+1", "\\boxed{(x+1)^2}") is True


def test_concurrent_callers_from_many_threads_get_their_own_answers():
    cases = [(str(k), f"\\boxed{{{k}}}", True) for k in range(20)] + [
        (str(k), f"\\boxed{{{k + 1}}}", False) for k in range(20)
    ]
    results: dict[int, bool] = {}

    def check(i: int) -> None:
        gold, response, _ = cases[i]
        results[i] = verify(gold, response, timeout=30)

    threads = [threading.Thread(target=check, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [results[i] for i in range(len(cases))] == [expected for _, _, expected in cases]


def test_verify_many_agrees_with_the_in_process_check_in_any_order():
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(rows)
    golds, responses = [r["gold"] for r in rows], [r["response"] for r in rows]
    # a hostile check in the middle of the batch times out alone, and does not disturb its neighbours
    golds.insert(50, "1")
    responses.insert(50, SLOW)
    got = verify_many(golds, responses, timeout=2.0)
    assert got.pop(50) is False
    del golds[50], responses[50]
    assert got == [verify_here(g, r) for g, r in zip(golds, responses, strict=True)]
    assert math_pool().size >= 1


def test_verify_many_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 golds for 1 responses"):
        verify_many(["1", "2"], ["\\boxed{1}"])

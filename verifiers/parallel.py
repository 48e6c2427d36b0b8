"""Run many sandboxed executions concurrently, results in input order.

Each run is its own sandboxed subprocess (`verifiers.sandbox.run_python`), so threads only wait on pipes: a
thread pool sized to the cores keeps every core busy without the GIL being the bottleneck.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from posttrain.verifiers.code import CodeResult, run_assert_tests

T = TypeVar("T")


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def run_many(jobs: Sequence[Callable[[], T]], workers: int | None = None) -> list[T]:
    """Call every job (a no-argument callable) on a pool of `workers` threads; results in the jobs' order."""
    if not jobs:
        return []
    n = min(len(jobs), workers or default_workers())
    if n <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="pt-verify") as pool:
        return list(pool.map(lambda job: job(), jobs))


def run_assert_tests_many(
    items: Sequence[tuple[str, str, str]], timeout: float, workers: int | None = None
) -> list[CodeResult]:
    """`run_assert_tests(program, test, entry_point, timeout)` for each (program, test, entry_point), concurrently."""
    return run_many([lambda it=it: run_assert_tests(it[0], it[1], it[2], timeout) for it in items], workers)

"""`code_tests`: a TRL-style reward that runs the completion's last ```python block against the sample's tests.

Each program runs in the sandbox of `posttrain.verifiers.code` (a fresh isolated process per run); samples run in
parallel on a small thread pool (each run is a subprocess, so threads suffice).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from posttrain.rewards.combine import completion_text
from posttrain.verifiers.code import run_assert_tests, run_io_tests

_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
DEFAULT_TIMEOUT = 10.0
MAX_WORKERS = 4


def extract_program(text: str) -> str | None:
    """The content of the last ```python (or ```py) fenced block, or None when there is none."""
    blocks = _FENCE_RE.findall(text)
    return blocks[-1] if blocks else None


def _column(value: Any, n: int, name: str) -> list:
    if value is None:
        return [None] * n
    if len(value) != n:
        raise ValueError(f"code_tests got {len(value)} values of {name!r} for {n} completions")
    return list(value)


def _score(
    program: str | None, test: str | None, entry: str | None, cases: Any, timeout: float, partial: bool, unsafe: bool
) -> float | None:
    has_io = cases is not None and len(cases) > 0
    if not test and not has_io:
        return None
    if program is None:
        return 0.0
    parts: list[tuple[float, int]] = []  # (pass fraction, number of tests) of the assert and io parts
    if test:
        try:
            result = run_assert_tests(program, test, entry or "", timeout, unsafe)
        except ValueError:  # the sample's test code does not parse: no usable tests
            return None
        if not partial and not result.passed:
            return 0.0
        parts.append((result.pass_fraction, max(1, len(result.statuses))))
    if has_io:
        pairs = [
            (str(c[0]), str(c[1])) if not isinstance(c, dict) else (str(c["input"]), str(c["output"])) for c in cases
        ]
        result = run_io_tests(program, pairs, timeout, unsafe)
        if not partial and not result.passed:
            return 0.0
        parts.append((result.pass_fraction, len(pairs)))
    if not partial:
        return 1.0
    return sum(f * n for f, n in parts) / sum(n for _, n in parts)


def code_tests(
    prompts: list,
    completions: list,
    tests: list | None = None,
    entry_point: list | None = None,
    io_cases: list | None = None,
    *,
    partial: bool = False,
    allow_unsandboxed: bool = False,
    **kwargs: Any,
) -> list[float | None]:
    """1.0 when the completion's last ```python block passes all of its sample's tests, else 0.0 (all-or-nothing);
    with `partial=True` (recipe: `args: {partial: true}`) the fraction of tests passed instead. None for a sample
    with no tests.

    Programs run in bubblewrap; where it is missing or cannot work, scoring raises `SandboxUnavailable` unless
    `allow_unsandboxed=True` (recipe: `args: {allow_unsandboxed: true}`) accepts running them without isolation.

    Dataset columns: `tests` (assert-style test code: a `check(candidate)` called with `entry_point`, or bare
    asserts) and/or `io_cases` (a list of (stdin, expected stdout) pairs, or {"input", "output"} dicts).
    """
    n = len(completions)
    tests_col, entry_col, io_col = (
        _column(tests, n, "tests"),
        _column(entry_point, n, "entry_point"),
        _column(io_cases, n, "io_cases"),
    )
    programs = [extract_program(completion_text(c)) for c in completions]
    timeout = float(kwargs.get("code_timeout") or DEFAULT_TIMEOUT)
    with ThreadPoolExecutor(max_workers=MAX_WORKERS) as pool:
        futures = [
            pool.submit(_score, programs[i], tests_col[i], entry_col[i], io_col[i], timeout, partial, allow_unsandboxed)
            for i in range(n)
        ]
        return [f.result() for f in futures]


code_tests.required_columns = (("tests", "io_cases"),)  # checked against the dataset before any generation

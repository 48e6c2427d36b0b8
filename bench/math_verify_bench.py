"""Benchmark posttrain.verifiers.math.verify against the `math-verify` PyPI package on our labelled set.

Reports, side by side, checks per second, p50/p99 latency per check (posttrain one call at a time through its
worker pool, and the whole set at once with `verify_many` over all the pool's workers) and agreement with the
labels (with the false positives and false negatives counted separately, and the per-category agreement).
With `--public FILE`, the set is a JSONL of public graders' cases (objects with gold, pred, equal, source; the
workplace keeps 302 of them from Math-Verify's, lighteval's and hendrycks MATH's regression suites) and posttrain runs
both strict (the reward path) and non-strict (the last mathematical answer).

    .venv/bin/python bench/math_verify_bench.py [--repeat N] [--public FILE]

math-verify is benchmark-only (not a posttrain dependency); install it with
    .venv/bin/python -m pip install math-verify
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "verifiers" / "data" / "math_labelled.jsonl"


def load_cases(public: str | None = None) -> list[dict]:
    """Cases as {gold, response, expected, category}; a public file's (gold, pred, equal, source) mapped onto it."""
    path = Path(public) if public else DATA
    if not path.is_file():
        raise SystemExit(f"math_verify_bench: no cases file at {path}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not public:
        return rows
    return [
        {"gold": r["gold"], "response": r["pred"], "expected": r["equal"], "category": r["source"].split("::")[-1]}
        for r in rows
    ]


def posttrain_checker(strict: bool = True) -> Callable[[str, str], bool]:
    from posttrain.verifiers.math import verify

    return lambda gold, response: verify(gold, response, strict=strict)


def run_batched(cases: list[dict], repeat: int, strict: bool = True) -> dict:
    """posttrain's `verify_many`: the whole set in one call, spread over the pool's workers (no per-check latency)."""
    from posttrain.verifiers.math import math_pool, verify_many

    golds, responses = [c["gold"] for c in cases], [c["response"] for c in cases]
    verify_many(golds, responses, strict=strict)  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        results = verify_many(golds, responses, strict=strict)
    total = time.perf_counter() - start
    stats = _agreement(cases, results)
    stats.update(checks_per_s=len(cases) * repeat / total, p50_us=float("nan"), p99_us=float("nan"))
    stats["workers"] = math_pool().size
    return stats


def math_verify_checker() -> Callable[[str, str], bool] | None:
    try:
        from math_verify import parse, verify
    except ImportError:
        return None

    def check(gold: str, response: str) -> bool:
        try:
            gold_parsed = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$")
            return bool(verify(gold_parsed, parse(response)))
        except Exception:
            return False

    return check


def run(check: Callable[[str, str], bool], cases: list[dict], repeat: int) -> dict:
    for case in cases:  # warm-up: imports, caches, sympy's lazy loading
        check(case["gold"], case["response"])
    latencies, results = [], []
    start = time.perf_counter()
    for _ in range(repeat):
        results = []
        for case in cases:
            t0 = time.perf_counter()
            results.append(check(case["gold"], case["response"]))
            latencies.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    latencies.sort()
    stats = _agreement(cases, results)
    stats.update(
        checks_per_s=len(latencies) / total,
        p50_us=statistics.median(latencies) * 1e6,
        p99_us=latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e6,
    )
    return stats


def _agreement(cases: list[dict], results: list[bool]) -> dict:
    per_category: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for case, got in zip(cases, results, strict=True):
        per_category[case["category"]][0] += got is case["expected"]
        per_category[case["category"]][1] += 1
    return {
        "agree": sum(got is case["expected"] for case, got in zip(cases, results, strict=True)),
        "false_pos": sum(got and not case["expected"] for case, got in zip(cases, results, strict=True)),
        "false_neg": sum(case["expected"] and not got for case, got in zip(cases, results, strict=True)),
        "per_category": dict(per_category),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="timed passes over the set (after one warm-up pass)")
    parser.add_argument("--public", metavar="FILE", help="a JSONL of public graders' cases: strict and non-strict")
    args = parser.parse_args()
    cases = load_cases(args.public)
    checkers = {"posttrain": posttrain_checker()}
    if args.public:
        checkers["pt-loose"] = posttrain_checker(strict=False)
    other = math_verify_checker()
    if other is None:
        print("math-verify is not installed; benchmarking posttrain only. Install: pip install math-verify\n")
    else:
        checkers["math-verify"] = other
    stats = {name: run(check, cases, args.repeat) for name, check in checkers.items()}
    batched = run_batched(cases, args.repeat)
    stats = {"posttrain": stats["posttrain"], f"posttrain x{batched['workers']}": batched, **stats}
    if args.public:
        stats[f"pt-loose x{batched['workers']}"] = run_batched(cases, args.repeat, strict=False)
    _report(cases, stats, args.repeat, per_category=not args.public)


def _report(cases: list[dict], stats: dict[str, dict], repeat: int, per_category: bool) -> None:
    n = len(cases)
    print(f"{n} labelled cases ({sum(not c['expected'] for c in cases)} must-be-False), {repeat} timed passes\n")
    print(f"{'verifier':<14} {'checks/s':>10} {'p50 us':>9} {'p99 us':>10} {'agree':>13} {'false+':>7} {'false-':>7}")
    for name, s in stats.items():
        agree = f"{s['agree']}/{n} {100 * s['agree'] / n:.1f}%"
        print(
            f"{name:<14} {s['checks_per_s']:>10.0f} {s['p50_us']:>9.1f} {s['p99_us']:>10.1f} {agree:>13} "
            f"{s['false_pos']:>7} {s['false_neg']:>7}"
        )
    if "math-verify" in stats:
        base = stats["math-verify"]
        print(
            "\nvs math-verify, throughput: "
            + ", ".join(f"{name} {s['checks_per_s'] / base['checks_per_s']:.1f}x" for name, s in stats.items())
            + "\nvs math-verify, agreement: "
            + ", ".join(f"{name} {s['agree'] / base['agree']:.2f}x" for name, s in stats.items())
        )
    if not per_category:
        return
    print("\nagreement per category:")
    print(f"{'category':<18}" + "".join(f"{name:>14}" for name in stats))
    for category in sorted(stats["posttrain"]["per_category"]):
        cells = "".join(f"{'{}/{}'.format(*s['per_category'][category]):>14}" for s in stats.values())
        print(f"{category:<18}{cells}")


if __name__ == "__main__":
    main()

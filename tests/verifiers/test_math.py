"""Hand-labelled cases for math answer extraction and equivalence (posttrain.verifiers.math)."""

import multiprocessing
import os
import threading
import time

import pytest

from posttrain.verifiers.math import boxed_contents, extract_answer, normalise, verify

EXTRACTION_CASES = [
    # (response, strict, expected)
    ("so we get \\boxed{42}.", True, "42"),
    ("\\boxed{\\frac{1}{2}}", True, "\\frac{1}{2}"),
    ("first \\boxed{3}, then corrected: \\boxed{4}", True, "4"),  # the last box wins
    ("\\boxed{\\boxed{7}}", True, "\\boxed{7}"),  # nested: the outer box is the answer
    ("\\fbox{9}", True, "9"),
    ("\\boxed{}", True, None),  # empty final box: no answer, and no falling back to anything else
    ("\\boxed{5} but later \\boxed{ }", True, None),
    ("\\boxed{unclosed", True, None),
    ("<answer> 12 </answer>", True, "12"),
    ("<answer>1</answer> then <answer>2</answer>", True, "2"),
    ("<answer>\\boxed{3}</answer>", True, "3"),
    ("<answer>1</answer> and \\boxed{2}", True, "2"),  # a box outranks an answer tag
    ("Natalia sold 48/2 = 24 clips.\n#### 72", True, "72"),
    ("#### 1,000\nextra line", True, "1,000"),
    ("So the answer is 17.", True, "17"),
    ("The final answer is: $3.5$.", True, "$3.5$"),
    ("I think 5 and then 7", True, None),  # strict: no marker, no answer
    ("I think 5 and then 7", False, "7"),
    ("about -1,250.5 units", False, "-1,250.5"),
    ("no digits here", False, "no digits here"),
    ("", False, None),
]


@pytest.mark.parametrize("response,strict,expected", EXTRACTION_CASES)
def test_extract_answer(response, strict, expected):
    assert extract_answer(response, strict=strict) == expected


def test_boxed_contents_balances_braces_and_skips_nested_boxes():
    text = "a \\boxed{x^{2}} b \\boxed{\\frac{1}{\\boxed{2}}} c \\boxed{open"
    assert boxed_contents(text) == ["x^{2}", "\\frac{1}{\\boxed{2}}"]


VERIFY_CASES = [
    # (gold, response, expected) -- all strict
    ("42", "\\boxed{42}", True),
    ("42", "The answer is $42$.", True),
    ("72", "#### 72", True),
    ("0.5", "\\boxed{\\frac{1}{2}}", True),
    ("\\frac{3}{4}", "\\boxed{0.75}", True),
    ("3/4", "\\boxed{\\dfrac{3}{4}}", True),
    ("\\tfrac{6}{8}", "\\boxed{3/4}", True),
    ("-\\frac{1}{2}", "\\boxed{-0.5}", True),
    ("\\frac12", "\\boxed{0.5}", True),
    ("1000", "\\boxed{1,000}", True),
    ("1234567", "\\boxed{1{,}234{,}567}", True),
    ("5", "\\boxed{5.}", True),
    ("5", "\\boxed{5.0}", True),
    ("10", "\\boxed{10 \\text{ cm}}", True),
    ("72", "The answer is 72 apples.", True),
    ("30", "\\boxed{30^\\circ}", True),
    ("3", "\\boxed{x = 3}", True),
    ("\\text{(B)}", "\\boxed{\\text{(B)}}", True),
    ("1500", "\\boxed{1.5\\times10^{3}}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\boxed{\\frac{\\sqrt3}{2}}", True),
    ("2x+1", "\\boxed{1 + 2x}", True),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", True),
    ("2\\pi", "\\boxed{2 \\pi}", True),
    ("\\pi r^2", "\\boxed{r^2 \\pi}", True),
    ("x^{1/2}", "\\boxed{\\sqrt{x}}", True),
    ("\\left(1+\\sqrt{2}\\right)", "\\boxed{\\sqrt{2}+1}", True),
    ("Half of 48 is 24, so 48 + 24 = 72.\n#### 72", "\\boxed{72}", True),  # gold is a full GSM8K solution
    ("so it is \\boxed{\\frac{1}{4}}", "\\boxed{0.25}", True),  # gold is a full MATH solution
    # near misses
    ("12", "\\boxed{1.2}", False),
    ("1.2", "\\boxed{12}", False),
    ("5", "\\boxed{50}", False),
    ("\\frac{1}{3}", "\\boxed{0.333}", False),
    ("1/3", "\\boxed{0.3333}", False),  # exact rationals, no float tolerance
    ("1/3", "\\boxed{\\frac{1}{3}+10^{-9}}", False),
    ("5", "\\boxed{}", False),
    ("5", "\\boxed{5} ... on reflection \\boxed{6}", False),  # two boxes, the last is wrong
    ("42", "Question: is the answer is 42? I computed \\boxed{41}", False),  # gold echoed, wrong box
    ("42", "I believe it is 42", False),  # strict: no marker
    ("42", "\\boxed{42 + 1}", False),
    ("-3", "\\boxed{3}", False),
    ("32349", "\\boxed{32, 349}", False),  # a list, not a thousands separator
    ("2x+1", "\\boxed{2x-1}", False),
    ("\\sqrt{2}", "\\boxed{1.41421356}", False),
    ("\\pi", "\\boxed{3.14159}", False),
    ("x^2", "\\boxed{y^2}", False),
    ("2", "\\boxed{2 \\pi}", False),
    ("", "\\boxed{5}", False),  # no gold
    ("7", "", False),
]


@pytest.mark.parametrize("gold,response,expected", VERIFY_CASES)
def test_verify(gold, response, expected):
    assert verify(gold, response) is expected


def test_verify_non_strict_uses_last_number():
    assert verify("7", "I think 5 and then 7", strict=False)
    assert not verify("5", "I think 5 and then 7", strict=False)


def test_normalise_keeps_value_bearing_text():
    assert normalise(" $1,000$. ") == "1000"
    assert normalise("2 pi") == "2pi"  # not a unit
    assert normalise("\\left( 1, 2 \\right)") == "(1,2)"


@pytest.mark.parametrize(
    "gold,response",
    [
        (None, "\\boxed{1}"),
        (5, "\\boxed{5}"),
        ("1", None),
        ("1", "\\boxed{" * 5000),
        ("1", "\\boxed{" + "\\frac{" * 60 + "1}{2}" * 60 + "}"),
        ("1", "\\boxed{__import__('os').system('true')}"),
        ("1", "\\boxed{1e99999999}"),
        ("1", "\\boxed{" + "9" * 5000 + "}"),
        ("1", "\\boxed{10^{10^{10}}}"),
        ("1", "<answer>" * 20000),
    ],
)
def test_verify_never_raises_and_stays_fast_on_hostile_input(gold, response):
    start = time.perf_counter()
    assert verify(gold, response, timeout=1.0) is False
    assert time.perf_counter() - start < 1.0


def test_timeout_kills_a_slow_sympy_check_from_a_worker_thread():
    # (9^999)^999)^999 passes the syntactic guards but takes far longer than the timeout to evaluate.
    results = []
    hostile = "\\boxed{((9^{999})^{999})^{999}}"
    thread = threading.Thread(target=lambda: results.append(verify("1", hostile, timeout=0.3)))
    start = time.perf_counter()
    thread.start()
    thread.join(10)
    assert results == [False]
    assert time.perf_counter() - start < 3.0


def _verify_in_child(queue):
    queue.put(verify("x^2+2x+1", "\\boxed{(x+1)^2}"))


def test_sympy_check_works_inside_a_daemonic_worker_process():
    # multiprocessing refuses to start children from daemonic processes (e.g. Pool workers); os.fork does not.
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=_verify_in_child, args=(queue,), daemon=True)
    worker.start()
    assert queue.get(timeout=20) is True
    worker.join(5)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_sympy_checks_leak_no_file_descriptors():
    verify("\\sqrt{2}", "\\boxed{2/\\sqrt{2}}")
    before = len(os.listdir("/proc/self/fd"))
    results = [verify("\\sqrt{2}", f"\\boxed{{{k}/\\sqrt{{2}}}}") for k in (1, 2, 3, 4)]
    assert results == [False, True, False, False]
    assert len(os.listdir("/proc/self/fd")) == before


def test_structured_answers_share_one_time_budget():
    # 8 unordered parts, each compared with 8 slow ones: 64 sympy checks of `timeout` s each without one budget.
    gold = ", ".join(f"x+{i}" for i in range(8))
    response = "\\boxed{" + ", ".join(["((9^{999})^{999})^{999}"] * 8) + "}"
    start = time.perf_counter()
    assert verify(gold, response, timeout=0.3) is False
    assert time.perf_counter() - start < 1.5


def test_structured_answers_compare_part_by_part():
    assert verify("\\{1, 2\\}", "\\boxed{\\{2, 1\\}}")
    assert verify("[1, 2)", "\\boxed{\\left[1, 2\\right)}")
    assert not verify("[1, 2)", "\\boxed{(1, 2]}")
    assert not verify("(1, 2)", "\\boxed{(2, 1)}")
    assert not verify("(1, 2)", "\\boxed{1}")  # a structured gold never matches a bare part of itself
    assert not verify("3x-y+13=0", "\\boxed{3x+4y+14=0}")  # never the right-hand sides alone
    assert verify("3x-y+13=0", "\\boxed{6x-2y+26=0}")

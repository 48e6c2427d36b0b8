"""Non-strict answer extraction (posttrain.verifiers.math_answer via extract_answer(strict=False)), and agreement
with public graders' labels on ../shared/data/math_equiv_public.jsonl."""

import json
from pathlib import Path

import pytest

from posttrain.verifiers.math import extract_answer, verify, verify_many
from posttrain.verifiers.math_answer import gold_answer, math_spans

PUBLIC = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "math_equiv_public.jsonl"

LOOSE_CASES = [
    # (response, expected answer) -- the examples first: each used to give its last digit run
    ("\\frac{10}{9}", "\\frac{10}{9}"),  # a short response that parses: all of it (was "9")
    (".4", ".4"),  # was "4"
    ("$[0,1)$", "[0,1)"),  # the last math span (was "1")
    ("AZYUK2A", "AZYUK2A"),  # a digit inside a word is no answer (was "2"); prose stays prose
    ("Answer \\( (9+1) \\)", "(9+1)"),
    ("Answer \\[\n 9 \n\\]", "9"),  # display math may span lines
    ("Answer $ \n 9 \n $", "Answer $ \n 9 \n $"),  # inline math may not, and a number beside it is not taken
    ("so $x$ is $3$ and $y$ is $4$.", "4"),
    ("price \\$5 then $7$", "7"),  # an escaped dollar is no delimiter
    ("Final Answer: The largest $n$ is 34.", "34"),  # the last item of a final statement
    ("Final Answer: The final answer is $10,455$. I hope", "10,455"),
    ("first \\boxed{255}, in the end it is 10455. Final Answer: 10455", "10455"),  # the marker that ends last
    ("Final Answer: The answer is $\\boxed{7}$.", "7"),  # a statement around a box gives the box
    ("Final Answer: The final answer is $12$ and $13$. I hope", "12, 13"),  # spans joined as boxes are
    ("\\boxed{(1, 2)}, \\boxed{(2, 1)}", "(1, 2), (2, 1)"),  # adjacent boxes are one answer
    ("\\boxed{3} \\quad \\text{and} \\quad \\boxed{5}", "3, 5"),
    ("\\boxed{1} is wrong, so \\boxed{2}", "2"),  # words between boxes: only the last
    ("The answer is x+1.", "x+1"),  # a statement that parses is kept whole, not cut to its number
    ("I think 5 and then 7", "7"),  # prose without math: its last standalone number
    ("so it is \\frac{2}{5} tonnes", "\\frac{2}{5}"),
    ("\\boxed{}", None),  # an empty final marker: no answer
    ("", None),
]


@pytest.mark.parametrize("response,expected", LOOSE_CASES)
def test_loose_extraction(response, expected):
    assert extract_answer(response, strict=False) == expected


def test_strict_extraction_ignores_the_loose_candidates():
    for response in ("$[0,1)$", "\\frac{10}{9}", "Final Answer: The largest $n$ is 34."):
        assert extract_answer(response, strict=True) is None
    assert extract_answer("\\boxed{1}, \\boxed{2}", strict=True) == "2"  # strict keeps the last box alone


def test_math_spans_pair_delimiters_in_one_pass():
    assert math_spans("$a$ \\(b\\) $$c$$ \\[d\\] $e") == ["a", "b", "c", "d"]  # "$e" never closes
    assert math_spans("\\\\(x\\\\)") == []  # `\\(` is a line break then "(", not a delimiter
    assert math_spans("\\[" * 20000) == []  # unclosed openers: linear, not one scan per opener


def test_gold_boxes_listed_together_form_one_answer():
    assert gold_answer("so \\boxed{1} and \\boxed{-2}.") == "1, -2"
    assert gold_answer("\\boxed{1} papers, later \\boxed{2}") == "2"
    assert gold_answer("42") == "42"
    assert verify("\\boxed{1}, \\boxed{2}", "\\boxed{1, 2}")
    assert not verify("\\boxed{1}, \\boxed{2}", "\\boxed{2}")  # half of a two-part gold used to pass


@pytest.mark.parametrize(
    "gold,response",
    [
        ("3", "It is 1, 2, 3, 4 or maybe 5"),  # listing candidates: only the last one counts
        ("3", "$1$ $2$ $3$ $4$"),
        ("3", "\\boxed{1}, \\boxed{2}, \\boxed{3}"),  # joined boxes are a list, never any one of them
        ("1, 2, 3", "".join(f"\\boxed{{{i}}}" for i in range(1, 40))),  # box spam: too many parts
        ("1", "$10^{10^{10}}$"),
        ("1", "$((9^{999})^{999})^{999}$"),
        ("1", "\\[" * 50000 + "1"),
        ("2", "AZYUK2A"),
    ],
)
def test_loose_verify_rejects_adversarial_answers(gold, response):
    assert verify(gold, response, strict=False, timeout=1.0) is False


@pytest.mark.skipif(not PUBLIC.is_file(), reason=f"public graders' cases not found at {PUBLIC}")
def test_agreement_with_public_graders():
    cases = [json.loads(line) for line in PUBLIC.read_text(encoding="utf-8").splitlines() if line.strip()]
    got = verify_many([c["gold"] for c in cases], [c["pred"] for c in cases], strict=False)
    misses = [
        (c["gold"][-80:], c["pred"][-80:], c["equal"], g) for c, g in zip(cases, got, strict=True) if g != c["equal"]
    ]
    agreement = 1 - len(misses) / len(cases)
    false_positives = [miss for miss in misses if not miss[2]]
    assert len(false_positives) <= 2, f"new false positives: {false_positives}"
    # 167/302 with last-digit-run extraction, 215 with the last mathematical answer, 272 (0.90) with the
    # non-strict rules of verifiers/math_rules.py. The 2 false positives are hendrycks' order-sensitive lists.
    assert agreement >= 272 / 302, f"agreement {agreement:.3f}; misses (gold, pred, expected, got):\n" + "\n".join(
        map(repr, misses)
    )

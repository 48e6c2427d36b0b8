"""Math answers: extract the final answer from a response and check it against a gold answer.

A first, dependency-light version (stdlib + sympy). Equivalence is decided in this order, cheapest first:
normalised string equality; exact rational equality when both sides are plain numbers (integers, decimals,
`a/b`, `\\frac{a}{b}`; `fractions.Fraction`, so 0.3333 != 1/3); sympy `simplify(a - b) == 0` for short
expressions of single-letter symbols, `sqrt` and `pi`. `verify`/`verify_many` run the whole check in a pool of
worker processes (`verifiers/pool.py`) whose worker is SIGKILLed and replaced after `timeout` seconds, so a
hostile response cannot hang, crash or bloat the caller (see docs/rewards-and-verifiers.md#math-answers).
Structured answers are compared part by part with the same rules: sets, `\\{...\\}` and bare comma lists
without order; intervals and tuples in order, with the bracket types required to match; unions of intervals
without order; `pmatrix`/`bmatrix` matrices cell by cell. Equations: `x = 3` equals `3` (a single-letter
left-hand side, either way round: `3 = x`); two `v = ...` answers need the same letter; other equations are
equal only when one side-difference is a nonzero constant multiple of the other (never right-hand side alone).
`a \\pm b` is the set {a + b, a - b}; `n!` is exact for n of at most 4 digits.
`6 \\text{ and } 8` is the list 6, 8. `strict=False` adds the rules of `math_rules.py` (inequalities, named
left-hand sides, `=`/`\\approx` chains, decimal commas, a decimal of 15+ significant digits against the exact value
it rounds). Not handled yet: base-n numbers beyond string equality, multi-letter products (`2ab`).
"""

from __future__ import annotations

import atexit
import math
import os
import re
import threading
import time
from decimal import Decimal
from fractions import Fraction

import sympy
from sympy.parsing.sympy_parser import implicit_multiplication, parse_expr, rationalize, standard_transformations

from posttrain.verifiers import math_rules
from posttrain.verifiers.math_answer import boxed_contents, loose_answer, marked_answer
from posttrain.verifiers.math_answer import gold_answer as gold_answer_of
from posttrain.verifiers.math_structure import structure
from posttrain.verifiers.pool import CallResult, WorkerPool

_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|textnormal|mathrm|mbox)\s*\{([^{}]*)\}(?:\^\s*\{?[23]\}?)?")
_LIST_WORD_RE = re.compile(r"\s*(?:\\text\{\s*(?:and|or)\s*\}|(?<![a-zA-Z\\])(?:and|or)(?![a-zA-Z]))\s*")
_UNIT_WORDS_RE = re.compile(r"([-+]?[\d.,/]+)\s*([a-zA-Z][a-zA-Z\s]*)")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$|^([+-]?)\\frac(\d)(\d)$")
_SAFE_CHARS_RE = re.compile(r"^[0-9a-zA-Z+\-*/(). ]*$")
_POWER_RE = re.compile(r"\*\*(?:\(-?(?:\d{1,3}(?:/\d{1,3})?|[a-zA-Z])\)|-?\d{1,3}(?![\d.])|[a-zA-Z](?![\w.]))")
_MAX_SYMPY_CHARS = 200
_SYMPY_NAMES = {"sqrt": sympy.sqrt, "pi": sympy.pi, "factorial": sympy.factorial}
_TRANSFORMATIONS = (*standard_transformations, implicit_multiplication, rationalize)


def extract_answer(response: str, strict: bool = True) -> str | None:
    """The final answer in `response`, or None when there is none.

    Strict: the answer an explicit marker gives (`math_answer.marked_answer`: the last box, `<answer>` tag,
    `####` line or "the answer is X"); an empty final marker gives None. `strict=False`: the last mathematical
    answer of any kind (`math_answer.loose_answer`: boxes, math spans, a short response that parses as one
    expression, the last number standing alone); never use that for rewards, it pays for guessing.
    """
    if not isinstance(response, str):
        return None
    if not strict:
        return loose_answer(response, _parses)
    return marked_answer(response)[1]


def normalise(answer: str) -> str:
    """Strip notation that does not change the value: `$`, spaces, `\\left`/`\\right`, units, degrees, `%`."""
    s = answer.strip().replace("\\$", "").replace("$", "").replace("\\\\", ";")  # matrix rows: `\\` -> `;`
    s = _LIST_WORD_RE.sub(", ", s)  # `6 \text{ and } 8` is a list of two, not 68
    s = re.sub(r",(?:\s*,)+", ",", s).strip().strip(",")  # `19, 46, and 82`
    list_like = re.search(r",\s", s) is not None  # "32, 349" is a list, "32,349" a number
    s = re.sub(r"\\(?:left|right|displaystyle)\b|\\[,!;: ]", " ", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\%|%", "", s)
    without_text = _TEXT_RE.sub("", s)
    s = without_text if without_text.strip() else _TEXT_RE.sub(r"\1", s)  # `\text{(B)}` alone keeps its content
    units = _UNIT_WORDS_RE.fullmatch(s.strip())  # "72 apples" -> "72", but "2 pi" and "3 x" stay
    if units and all(len(word) > 1 and word not in _SYMPY_NAMES for word in units.group(2).split()):
        s = units.group(1)
    s = re.sub(r"\s+", "", s).rstrip(".")
    while s.startswith("{") and s.endswith("}") and boxed_contents("\\boxed" + s) == [s[1:-1]]:
        s = s[1:-1]
    if not list_like and re.fullmatch(r"[+-]?\d{1,3}(?:(?:,|\{,\})\d{3})+(?:\.\d+)?", s):  # 1,000 / 1{,}000
        s = s.replace("{,}", "").replace(",", "")
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)  # 1011_{2} -> 1011_2
    return s


def _to_fraction(s: str) -> Fraction | None:
    """Exact value of a plain number (`-2`, `0.75`, `1e3`, `3/4`, `\\frac{3}{4}`), else None."""
    if len(s) > 100:
        return None
    if _NUMBER_RE.fullmatch(s):
        return Fraction(s)
    parts = s.split("/")
    if len(parts) == 2 and all(_NUMBER_RE.fullmatch(p) for p in parts) and Fraction(parts[1]) != 0:
        return Fraction(parts[0]) / Fraction(parts[1])
    frac = _FRAC_RE.fullmatch(s)
    if frac:
        sign, num, den = (frac.group(1), frac.group(2), frac.group(3)) if frac.group(2) else frac.group(4, 5, 6)
        if _NUMBER_RE.fullmatch(num) and _NUMBER_RE.fullmatch(den) and Fraction(den) != 0:
            return (-1 if sign == "-" else 1) * Fraction(num) / Fraction(den)
    return None


def _to_sympy_source(s: str) -> str | None:
    """Python-syntax source for a short normalised LaTeX expression, or None if it is not provably safe."""
    if len(s) >= _MAX_SYMPY_CHARS:
        return None
    for _ in range(20):  # innermost \frac / \sqrt first; bounded by the length cap
        previous = s
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\frac(\d)(\d)", r"(\1/\2)", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r" sqrt(\1)", s)
        s = re.sub(r"\\sqrt(\d+|[a-zA-Z])", r" sqrt(\1)", s)
        if s == previous:
            break
    s = re.sub(r"(?<![\d.])(\d{1,4})!", r" factorial(\1)", s)  # 2004! ; never x! or (n)! or 3!!
    s = s.replace("\\pi", " pi ").replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    s = s.replace("{", "(").replace("}", ")")
    if not _SAFE_CHARS_RE.fullmatch(s) or "__" in s or re.search(r"\d[eE][+-]?\d{4}", s):  # 1e99999999
        return None
    if any(len(name) > 1 and name not in _SYMPY_NAMES for name in re.findall(r"[a-zA-Z]+", s)):
        return None
    # Exponents: at most 3 digits or one symbol, never chained (10**10**10 would never finish).
    if s.count("**") != len(_POWER_RE.findall(s)) or re.search(_POWER_RE.pattern + r"\s*\*\*", s):
        return None
    return s


def _sympy_equal(gold_source: str, pred_source: str, proportional: bool = False, positive: bool = False) -> bool:
    """sympy equivalence of two sources that passed `_to_sympy_source`. Runs inside the worker process.

    `proportional`: whether `pred` is a nonzero constant multiple of `gold` (two equations `a = b`, `c = d` given
    as `a - b` and `c - d`), a positive one with `positive` (two inequalities `a < b`, `c < d`).
    """
    letters = {c: sympy.Symbol(c) for c in set(re.findall(r"[a-zA-Z]", gold_source + pred_source))}
    local = {**letters, **_SYMPY_NAMES}
    global_dict = {"Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational, "Symbol": sympy.Symbol}
    try:
        gold = parse_expr(gold_source, local_dict=local, global_dict=global_dict, transformations=_TRANSFORMATIONS)
        pred = parse_expr(pred_source, local_dict=local, global_dict=global_dict, transformations=_TRANSFORMATIONS)
        if _numerically_different(gold, pred, list(letters.values()), proportional):
            return False  # a cheap, sound early exit; equality is only ever decided by simplify below
        if not proportional:
            return bool(sympy.simplify(gold - pred) == 0)
        if sympy.simplify(gold) == 0 or sympy.simplify(pred) == 0:
            return False
        ratio = sympy.simplify(gold / pred)
        return bool(ratio.is_number and ratio.is_nonzero and ratio.is_finite and (ratio.is_positive or not positive))
    except Exception:
        return False


_PROBE_POINTS = (sympy.Rational(7, 3), sympy.Rational(-5, 11), sympy.Rational(13, 17))


def _numerically_different(gold, pred, symbols: list, proportional: bool) -> bool:
    """Whether `gold` and `pred` (or, `proportional`, their ratio) visibly differ at a few rational points: a
    nonzero difference (or two different ratios) at a point where both are finite disproves equivalence without
    simplify, the slow part for most near misses. Points where either side is undefined are skipped."""
    values = []
    for shift in range(len(_PROBE_POINTS)):
        subs = {symbol: _PROBE_POINTS[(shift + i) % len(_PROBE_POINTS)] for i, symbol in enumerate(symbols)}
        try:
            g, p = complex(gold.evalf(20, subs=subs)), complex(pred.evalf(20, subs=subs))
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            continue
        if not all(map(math.isfinite, (g.real, g.imag, p.real, p.imag))):
            continue
        if not proportional:
            if abs(g - p) > 1e-9 * max(1.0, abs(g), abs(p)):
                return True
        elif abs(p) > 1e-12:
            values.append(g / p)
        if not symbols:
            break
    return proportional and len(values) > 1 and any(abs(v - values[0]) > 1e-9 * max(1.0, abs(v)) for v in values)


def warm_up() -> None:
    """sympy imports much of itself lazily on first simplify (~0.5 s): each pool worker does that once at start."""
    _sympy_equal("sqrt(2)*x + pi", "(x + 1)**2 + 1.5")


_MAX_PARTS = 16
_LETTER_EQUATION_RE = re.compile(r"([a-zA-Z])=([^=]+)|([^=]+)=([a-zA-Z])")


def _parts_equal(gold: list[str], pred: list[str], ordered: bool, deadline: float, loose: bool = False) -> bool:
    if loose and not ordered:  # a solution set: a repeated element is the same element
        gold, pred = list(dict.fromkeys(gold)), list(dict.fromkeys(pred))
    if len(gold) != len(pred) or len(gold) > _MAX_PARTS or not all(gold) or not all(pred):
        return False
    if ordered:
        return all(_equal(g, p, deadline, loose) for g, p in zip(gold, pred, strict=True))
    unused = list(pred)
    for g in gold:
        match = next((i for i, p in enumerate(unused) if _equal(g, p, deadline, loose)), None)
        if match is None:
            return False
        unused.pop(match)
    return True


def _scalar_equal(gold: str, pred: str, deadline: float) -> bool:
    gold_value, pred_value = _to_fraction(gold), _to_fraction(pred)
    if gold_value is not None and pred_value is not None:
        return gold_value == pred_value
    gold_source, pred_source = _to_sympy_source(gold), _to_sympy_source(pred)
    if gold_source is None or pred_source is None:
        return False
    return _sympy_equal(gold_source, pred_source)


def _letter_equation(s: str) -> tuple[str, str] | None:
    """("x", "3") for `x=3` or `3=x`, else None."""
    match = _LETTER_EQUATION_RE.fullmatch(s)
    if not match:
        return None
    return (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))


def _equal(gold: str, pred: str, deadline: float, loose: bool = False) -> bool:
    """Equivalence of two normalised answers; `loose` adds the non-strict rules of `math_rules`."""
    if gold == pred:
        return True
    gold_value, pred_value = _to_fraction(gold), _to_fraction(pred)
    if gold_value is not None and pred_value is not None:  # the common case: two plain numbers
        return gold_value == pred_value or (loose and math_rules.decimal_matches(gold, pred, gold_value, pred_value))
    if time.monotonic() > deadline:
        return False
    if loose:
        decided = math_rules.loose_equal(
            gold, pred, lambda g, p: _equal(g, p, deadline, loose), _proportional, _exact_value
        )
        if decided is not None:
            return decided
    gold_structure, pred_structure = structure(gold), structure(pred)
    if gold_structure or pred_structure:
        if not gold_structure or not pred_structure:
            return False
        kinds = {gold_structure[0], pred_structure[0]}
        if kinds <= {"set", "list"} or kinds == {"union"}:
            return _parts_equal(gold_structure[1], pred_structure[1], False, deadline, loose)
        if kinds == {"seq"}:
            same_brackets = gold_structure[1] == pred_structure[1]
            return same_brackets and _parts_equal(gold_structure[2], pred_structure[2], True, deadline, loose)
        if kinds == {"matrix"}:
            gold_rows, pred_rows = gold_structure[1], pred_structure[1]
            return len(gold_rows) == len(pred_rows) and all(
                _parts_equal(g, p, True, deadline, loose) for g, p in zip(gold_rows, pred_rows, strict=True)
            )
        return False
    if "=" in gold or "=" in pred:
        gold_equation, pred_equation = _letter_equation(gold), _letter_equation(pred)
        if gold_equation and pred_equation and gold_equation[0] == pred_equation[0]:
            return _equal(gold_equation[1], pred_equation[1], deadline, loose)
        if "=" not in pred and gold_equation:
            return _equal(gold_equation[1], pred, deadline, loose)
        if "=" not in gold and pred_equation:
            return _equal(gold, pred_equation[1], deadline, loose)
        gold_sides, pred_sides = gold.split("="), pred.split("=")
        if len(gold_sides) != 2 or len(pred_sides) != 2:
            return False
        return _proportional((gold_sides[0], gold_sides[1]), (pred_sides[0], pred_sides[1]))
    return _scalar_equal(gold, pred, deadline)


def _proportional(gold_sides: tuple[str, str], pred_sides: tuple[str, str], positive: bool = False) -> bool:
    """Whether `pred`'s side-difference is a nonzero (`positive`: a positive) constant multiple of `gold`'s."""
    sources = [_to_sympy_source(side) for side in (*gold_sides, *pred_sides)]
    if None in sources:
        return False
    gold_source, pred_source = f"({sources[0]})-({sources[1]})", f"({sources[2]})-({sources[3]})"
    if len(gold_source) >= _MAX_SYMPY_CHARS or len(pred_source) >= _MAX_SYMPY_CHARS:
        return False
    return _sympy_equal(gold_source, pred_source, proportional=True, positive=positive)


def _exact_value(s: str) -> Fraction | Decimal | None:
    """The value of a constant answer: exact when rational, else evaluated to 60 significant digits; None for
    anything with a free symbol or not real."""
    value = _to_fraction(s)
    if value is not None:
        return value
    source = _to_sympy_source(s)
    if source is None or re.search(r"[a-zA-Z]", re.sub(r"sqrt|pi|factorial", "", source)):
        return None
    try:
        expr = parse_expr(source, local_dict=dict(_SYMPY_NAMES), transformations=_TRANSFORMATIONS)
        if expr.is_Rational:
            return Fraction(int(expr.p), int(expr.q))
        evaluated = expr.evalf(60)
        return Decimal(str(evaluated)) if evaluated.is_real and evaluated.is_finite else None
    except Exception:
        return None


def _parses(answer: str) -> bool:
    """Whether `answer` reads as one mathematical expression: how `loose_answer` tells `\\frac{10}{9}` or `.4` (the
    whole answer) from prose such as `AZYUK2A` (not even its digit)."""
    return _is_expression(normalise(math_rules.loose_source(answer)), depth=0)


def _is_expression(s: str, depth: int) -> bool:
    """A number, a sympy-safe expression, an equation of two, or a structured answer made of them."""
    if not s:
        return False
    if _to_fraction(s) is not None or _to_sympy_source(s) is not None:
        return True
    if depth >= 2:  # `(1, x=2)` is as deep as an answer goes
        return False
    sides = s.split("=")
    if len(sides) == 2:
        return all(_is_expression(side, depth + 1) for side in sides)
    parts = structure(s)
    if parts is None:
        return False
    if parts[0] == "matrix":
        return all(_is_expression(cell, depth + 1) for row in parts[1] for cell in row)
    return all(_is_expression(part, depth + 1) for part in parts[-1])


def answers_equal(gold: str, pred: str, timeout: float = 5.0, loose: bool = False) -> bool:
    """Whether two already-extracted answers are equivalent (see the module docstring for the rules); `loose`
    adds the non-strict rules of `math_rules` (inequalities, named left-hand sides, chains, decimals).

    Runs in this process: use it only on trusted input (a hostile answer can make sympy run for a long time).
    """
    if loose:
        gold, pred = math_rules.loose_source(gold), math_rules.loose_source(pred)
        for comma, other in ((gold, pred), (pred, gold)):
            comma, other = math_rules.decimal_comma(comma), _to_fraction(normalise(other))
            if comma is not None and other is not None:
                return _to_fraction(comma) == other
    gold, pred = normalise(gold), normalise(pred)
    if loose:
        gold, pred = math_rules.loose_form(gold), math_rules.loose_form(pred)
    if not gold or not pred:
        return False
    if gold == pred:
        return True
    return _equal(gold, pred, time.monotonic() + timeout, loose)  # one time budget for all the parts of an answer


def verify_here(gold: str, response: str, strict: bool = True) -> bool:
    """`verify` computed in this process, with no timeout: what the pool's workers run. Never raises."""
    try:
        gold_answer = gold_answer_of(gold)
        pred_answer = extract_answer(response, strict=strict)
        if pred_answer is None:
            return False
        return answers_equal(gold_answer, pred_answer, timeout=math.inf, loose=not strict)
    except Exception:
        return False


_POOL: WorkerPool | None = None
_POOL_PID = 0
_POOL_LOCK = threading.Lock()


def math_pool(workers: int | None = None) -> WorkerPool:
    """This process's pool of math-check workers, started on first use (a forked child gets its own).

    `workers`: pool size when it is created (default: the cores, at most 4; env `POSTTRAIN_MATH_WORKERS`).
    """
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():
            size = workers or int(os.environ.get("POSTTRAIN_MATH_WORKERS", 0)) or min(4, os.cpu_count() or 1)
            _POOL = WorkerPool(f"{__name__}:verify_here", workers=size, setup=f"{__name__}:warm_up")
            _POOL_PID = os.getpid()
            atexit.register(_POOL.close)
        return _POOL


def verify(gold: str, response: str, strict: bool = True, timeout: float = 5.0) -> bool:
    """Whether `response` states an answer equivalent to `gold`. False on any failure of the check, whatever the
    input; raises only `PoolError` when no worker process can be started at all (a broken environment must not
    read as a wrong answer).

    `gold` may be a bare answer or a full worked solution (its marked answer is used). `strict=True` requires
    an answer marker in `response`. The check runs in a worker process of `math_pool()` that is killed (and
    replaced) when it runs past `timeout` seconds, so hostile input cannot hang or bloat the caller; this call
    waits at most `timeout` for a free worker too. Safe from any thread, process or Ray actor.
    """
    return _passed(math_pool().call(gold, response, strict, timeout=timeout))


def verify_many(golds: list[str], responses: list[str], strict: bool = True, timeout: float = 5.0) -> list[bool]:
    """`verify` for many pairs at once, spread over all the pool's workers; `timeout` applies to each check."""
    if len(golds) != len(responses):
        raise ValueError(f"verify_many got {len(golds)} golds for {len(responses)} responses")
    results = math_pool().map(
        [((gold, response, strict), {}) for gold, response in zip(golds, responses, strict=True)], timeout
    )
    return [_passed(result) for result in results]


def _passed(result: CallResult) -> bool:
    return result.status == "ok" and result.value is True

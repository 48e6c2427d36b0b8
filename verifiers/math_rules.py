"""Equivalence rules used only by the non-strict math check (`verify(..., strict=False)`): notation the public
graders accept that the reward path does not need. Pure string functions on answers already passed through
`math.normalise`, plus `rounds_to` (exact arithmetic). Each rule is written so that it cannot equate two different
values: equations never collapse to a right-hand side unless the left is a bare name, inequalities compare their
side-differences up to a positive factor, and a decimal equals an exact value only when it is that value correctly
rounded to at least `MIN_DIGITS` significant digits.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Context, Decimal
from fractions import Fraction

MIN_DIGITS = 15  # a double printed in full (4.123105625617661 is sqrt 17); 3.14159 is never pi
_ESCAPED_COMMAND_RE = re.compile(r"\\\\(?=(?:left|right|frac|dfrac|tfrac|boxed|sqrt|pi|le|ge|leq|geq|text|cdot)\b)")
_RELATION_WORDS = (
    (r"\\geq?(?![a-zA-Z])|≥", ">="),
    (r"\\leq?(?![a-zA-Z])|≤", "<="),
    (r"\\neq?(?![a-zA-Z])|≠", "!="),
    (r"\\gt(?![a-zA-Z])", ">"),
    (r"\\lt(?![a-zA-Z])", "<"),
)
_ARRAY_RE = re.compile(r"\[?\\begin\{array\}\{[lcr|]*\}(.*)\\end\{array\}\]?")
# A name that an answer may be introduced with: `x`, `a_37`, `AB`, `|AB|`, `f(x)`, `(p,q)`, `A:B`, `\frac{NO}{BO}`.
_NAME = r"(?:[a-zA-Z](?:_\w+)?|[A-Z]{2,}|\|[A-Z]+\||[a-zA-Z]\([a-z](?:,[a-z])*\)|\([a-z](?:,[a-z])+\))"
_NAME_RE = re.compile(rf"{_NAME}(?::{_NAME})?|\\frac\{{{_NAME}\}}\{{{_NAME}\}}")
_RELATION_RE = re.compile(r"<=|>=|!=|<|>")
_DECIMAL_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_DECIMAL_COMMA_RE = re.compile(r"([+-]?\d+),(\d+)")


def loose_source(answer: str) -> str:
    """An extracted answer before `normalise`: `\\quad` separates items (`a=1 \\quad b=2`), `\\\\left(` is `\\left(`
    (answers copied from JSON or Python sources carry doubled backslashes; only before a known command and never
    in an environment, where `\\\\` is a row break), relations are spelt `<=`, `>=`, `!=`, `<`, `>` (before
    `normalise` joins `\\geq x` into `\\geqx`), and `0,111` is `0.111` (never a thousands separator)."""
    answer = re.sub(r"\\q?quad", ", ", answer)
    if "\\begin" not in answer:
        answer = _ESCAPED_COMMAND_RE.sub(r"\\", answer)
    for pattern, symbol in _RELATION_WORDS:
        answer = re.sub(pattern, symbol, answer)
    return re.sub(r"^\s*([+-]?0),(\d+)\s*$", r"\1.\2", answer)


def loose_form(s: str) -> str:
    """A normalised answer with `\\frac1{72}` braced, an `array` in brackets read as a matrix, and `;` read as the
    separator where no comma is used."""
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    array = _ARRAY_RE.fullmatch(s)
    if array:
        s = f"\\begin{{pmatrix}}{array.group(1)}\\end{{pmatrix}}"
    elif ";" in s and "\\begin" not in s:
        s = semicolons_as_commas(s)
    return s


def semicolons_as_commas(s: str) -> str:
    """`-12;-11` -> `-12,-11` and `(0;-2;6)` -> `(0,-2,6)`: a `;` separates items wherever its bracket level has
    no comma (decimal-comma locales); a level that also has commas keeps its `;` (`p=5,q=2;p=7,q=2`)."""
    levels: list[list[int]] = [[]]  # positions of `;` per open bracket level
    commas = [False]
    out = list(s)
    for i, ch in enumerate(s):
        if ch in "([{":
            levels.append([])
            commas.append(False)
        elif ch in ")]}" and len(levels) > 1:
            _close_level(out, levels.pop(), commas.pop())
        elif ch == ";":
            levels[-1].append(i)
        elif ch == ",":
            commas[-1] = True
    for positions, has_comma in zip(levels, commas, strict=True):
        _close_level(out, positions, has_comma)
    return "".join(out)


def _close_level(out: list[str], positions: list[int], has_comma: bool) -> None:
    if not has_comma:
        for i in positions:
            out[i] = ","


def reduce_chain(s: str) -> str:
    """`x=5+5+1=7=11` -> `x=11`, `x=1/3\\approx0.33` -> `x=1/3`, `x\\approx11` -> `x=11`, `1=y=x=0` -> `0`.

    An `\\approx` part is dropped (it is a rounding of what precedes it) unless only a bare name precedes it. A
    chain of three or more parts is the last part, introduced by the first when that is a bare name. Two-part
    equations are left alone (`3x-y+13=0` keeps both sides)."""
    if "=" not in s and "\\approx" not in s or "," in s:  # a list of equations is reduced part by part
        return s
    pieces = re.split(r"((?<![<>!])=|\\approx)", s)
    if not all(pieces[0::2]):
        return s
    parts = [pieces[0]] + [pieces[i + 1] for i in range(1, len(pieces), 2) if pieces[i] == "="]
    if len(parts) == 1 and len(pieces) > 1 and is_name(parts[0]):
        parts.append(pieces[2])  # `x \approx 11` states x
    if len(parts) <= 2:
        return "=".join(parts)
    return f"{parts[0]}={parts[-1]}" if is_name(parts[0]) else parts[-1]


def is_name(s: str) -> bool:
    """Whether `s` is a bare name that introduces an answer (`x`, `a_3`, `AB`, `|AB|`, `f(x)`, `(p,q)`, `A:B`)."""
    return _NAME_RE.fullmatch(s) is not None


def named_equation(s: str) -> tuple[str, str] | None:
    """(name, value) for `name=value` or `value=name` with a bare name on one side; None otherwise."""
    sides = s.split("=")
    if len(sides) != 2 or not all(sides):
        return None
    if is_name(sides[0]) and is_name(sides[1]):
        return None  # `x=y` is a relation between two names, compared as an equation
    if is_name(sides[0]):
        return sides[0], sides[1]
    if is_name(sides[1]):
        return sides[1], sides[0]
    return None


def relation(s: str) -> tuple[str, str, str] | None:
    """(left, op, right) of a single inequality `a op b` read as `left op right` with op in `<`, `<=`, `!=`
    (`a > b` becomes `b < a`); None for anything else."""
    parts = _RELATION_RE.split(s)
    ops = _RELATION_RE.findall(s)
    if len(ops) != 1 or not all(parts) or "=" in _RELATION_RE.sub("", s):
        return None
    left, right = parts
    op = ops[0]
    if op in (">", ">="):
        return right, op.replace(">", "<"), left
    return left, op, right


def membership(s: str, chains: bool = True) -> tuple[str | None, str] | None:
    """(variable or None, interval) for `x\\in[a,b]`, a chain `a<=x<b` (-> `x`, `[a,b)`; only with `chains`) or a
    bare interval `(a,b)`; None for anything else."""
    if "\\in" in s:
        name, _, interval = s.partition("\\in")
        return (name, interval) if is_name(name) and _is_interval(interval) else None
    if _is_interval(s):
        return None, s
    ops = _RELATION_RE.findall(s) if chains else []
    parts = _RELATION_RE.split(s)
    ascending, descending = (all(op in pair for op in ops) for pair in (("<", "<="), (">", ">=")))
    if len(ops) != 2 or not (ascending or descending) or not all(parts):
        return None
    low, name, high = parts if ascending else parts[::-1]
    ops = ops if ascending else ops[::-1]
    brackets = ("[" if ops[0].endswith("=") else "(") + ("]" if ops[1].endswith("=") else ")")
    return name, f"{brackets[0]}{low},{high}{brackets[1]}"


def _is_interval(s: str) -> bool:
    return len(s) > 4 and s[0] in "([" and s[-1] in ")]" and s.count(",") == 1 and "\\cup" not in s


def decimal_comma(s: str) -> str | None:
    """`1,22` -> `1.22`, `0,111` -> `0.111`; None for a thousands separator (`1,000`), a list written with a space
    (`1, 22`) or anything else. Only for comparing with a single number, where a list of two could never be equal
    anyway; `s` is the answer before `normalise` removes the space."""
    match = _DECIMAL_COMMA_RE.fullmatch(s.strip().strip("$"))
    if not match:
        return None
    whole, fraction = match.groups()
    if len(fraction) == 3 and whole.lstrip("+-") != "0":
        return None
    return f"{whole}.{fraction}"


def significant_digits(decimal: str) -> int:
    """Significant digits of a decimal literal: `0.0833` -> 3, `2.6670` -> 5, `0.0` -> 0."""
    digits = decimal.lstrip("+-").replace(".", "").lstrip("0")
    return len(digits)


def rounds_to(decimal: str, exact: Fraction | Decimal) -> bool:
    """Whether the decimal literal `decimal` is `exact` correctly rounded to the literal's significant digits, with
    at least `MIN_DIGITS` of them. `exact` is an exact rational or an irrational value evaluated to well beyond
    those digits; a rational whose decimal expansion terminates never matches (it is compared exactly
    elsewhere: 0.13 is not 1/8). Two exact values never reach this rule, so 1/2004! and 1/2006! stay apart."""
    if not _DECIMAL_RE.fullmatch(decimal):
        return False
    digits = significant_digits(decimal)
    if digits < MIN_DIGITS or digits > 60:
        return False
    if isinstance(exact, Fraction):
        denominator = exact.denominator
        for prime in (2, 5):
            while denominator % prime == 0:
                denominator //= prime
        if denominator == 1:
            return False
        value = Context(prec=digits + 30).divide(Decimal(exact.numerator), Decimal(exact.denominator))
    else:
        value = exact
    if value == 0:
        return False
    stated = Decimal(decimal)
    exponent = stated.as_tuple().exponent
    context = Context(prec=200)
    step = Decimal(1).scaleb(exponent)
    return any(
        value.quantize(step, rounding=mode, context=context) == stated for mode in (ROUND_HALF_EVEN, ROUND_HALF_UP)
    )


def decimal_matches(gold: str, pred: str, gold_value: Fraction, pred_value: Fraction) -> bool:
    """Two plain numbers, one a decimal literal that correctly rounds the other (`0.0833333333333333` and 1/12)."""
    return rounds_to(gold, pred_value) or rounds_to(pred, gold_value)


def loose_equal(
    gold: str,
    pred: str,
    equal: Callable[[str, str], bool],
    proportional: Callable[[tuple[str, str], tuple[str, str], bool], bool],
    exact: Callable[[str], Fraction | Decimal | None],
) -> bool | None:
    """The non-strict rules for two normalised `loose_form` answers: True/False when one applies, None to fall
    through to the strict rules. `equal` is the full (non-strict) check for parts; `proportional(gold sides,
    pred sides, positive)` whether the side-differences are a (positive) constant multiple of each other;
    `exact` the exact value (or a 60-digit evaluation) of a constant."""
    reduced = reduce_chain(gold), reduce_chain(pred)
    if reduced != (gold, pred):
        return equal(*reduced)
    gold_relation, pred_relation = relation(gold), relation(pred)
    if gold_relation or pred_relation:
        if not gold_relation or not pred_relation or gold_relation[1] != pred_relation[1]:
            return False
        sides = (gold_relation[0], gold_relation[2]), (pred_relation[0], pred_relation[2])
        return proportional(*sides, gold_relation[1] != "!=")  # x<1 is -x>-1 but not x>1
    # A predicted chain only against a gold chain: the public labels refuse `-2<=x<=7` for a gold `x\\in[-2,7]`.
    gold_in = membership(gold)
    pred_in = membership(pred, chains=gold_in is not None and gold_in[1] != gold and "\\in" not in gold)
    if gold_in and pred_in and (gold_in[0] or pred_in[0]):
        same_name = not (gold_in[0] and pred_in[0]) or gold_in[0] == pred_in[0]
        return same_name and equal(gold_in[1], pred_in[1])
    gold_named, pred_named = named_equation(gold), named_equation(pred)
    if gold_named and pred_named:
        return gold_named[0] == pred_named[0] and equal(gold_named[1], pred_named[1])
    if gold_named and "=" not in pred:
        return equal(gold_named[1], pred)
    if pred_named and "=" not in gold:
        return equal(gold, pred_named[1])
    for a, b in ((gold, pred), (pred, gold)):
        if _DECIMAL_RE.fullmatch(a) and not _DECIMAL_RE.fullmatch(b):
            value = exact(b)
            if value is not None and rounds_to(a, value):
                return True
    return None

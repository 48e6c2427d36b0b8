"""Structured math answers: a normalised answer split into the parts `math.py` compares one by one (sets, lists,
tuples and intervals, unions, matrices, `a \\pm b`). Pure string functions."""

from __future__ import annotations

import re

_MAX_STRUCTURED_CHARS = 2000
_MATRIX_RE = re.compile(r"\\begin\{([pb])matrix\}(.*)\\end\{\1matrix\}")


def split_top_level(s: str, separator: str) -> list[str] | None:
    """`s` split at `separator` outside any brackets; None when the brackets do not balance."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s.startswith("\\{", i) or s.startswith("\\}", i):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(separator, i):
            parts.append(s[start:i])
            start = i + len(separator)
            i = start
            continue
        if depth < 0:
            return None
        i += 1
    parts.append(s[start:])
    return parts if depth == 0 else None


def structure(s: str) -> tuple | None:
    """("union"|"set"|"list", parts), ("seq", brackets, parts) or ("matrix", rows) for a structured answer."""
    if len(s) > _MAX_STRUCTURED_CHARS:
        return None
    union = split_top_level(s, "\\cup")
    if union and len(union) > 1:
        return ("union", union)
    matrix = _MATRIX_RE.fullmatch(s)
    if matrix:
        rows = [row.split("&") for row in matrix.group(2).split(";") if row]
        return ("matrix", rows) if rows and len({len(row) for row in rows}) == 1 else None
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = split_top_level(s[2:-2], ",")
        return ("set", inner) if inner else None
    if len(s) > 2 and s[0] in "([" and s[-1] in ")]":
        inner = split_top_level(s[1:-1], ",")  # None unless the outer brackets enclose everything
        if inner and len(inner) > 1:
            return ("seq", s[0] + s[-1], inner)
    parts = split_top_level(s, ",")
    if parts and len(parts) > 1:
        return ("list", parts)
    plus_minus = split_top_level(s, "\\pm")
    if plus_minus and len(plus_minus) == 2:  # 1\pm\sqrt{2}: the set of both signs
        return ("set", [s.replace("\\pm", "+"), s.replace("\\pm", "-")])
    return None

"""Finding the final answer in a math response: answer markers (strict) and, for `strict=False`, the last
mathematical answer of any kind. Pure text functions, linear in the response length; equivalence is in `math.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_IS_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE)
# A number standing on its own: never the tail of a word or name (`AZYUK2A`, `x2`, `v1.5`); `.4` counts.
_LAST_NUMBER_RE = re.compile(
    r"-?\\[dt]?frac\{\d+\}\{\d+\}|(?<![A-Za-z_\d.,])-?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:/\d+)?(?!\d)"
)
_FINAL_STATEMENT_RE = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*:)\s*:?\s*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE
)
# Math delimiters, one linear pass. `\\` and `\$` are tokens so that neither is read as half a delimiter.
_DELIMITER_RE = re.compile(r"\\\\|\\\$|\$\$|\$|\\\(|\\\)|\\\[|\\\]|\n")
_OPENER_RE = re.compile(r"(?<!\\)\$|\\\(|\\\[")
_CLOSER = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}
_INLINE = {"$", "\\("}  # an inline span never crosses a line break
# What may stand between two boxes for them to be one answer: `\boxed{1}, \boxed{2}`, `\boxed{a} \text{ and } ...`.
_BOX_JOINER_RE = re.compile(r"(?:\s|[,;$]|\\[()\[\]]|\\q?quad|\\[,;: ]|\\text\{\s*and\s*\}|\band\b)*")
MAX_WHOLE_CHARS = 100  # a response longer than this is never read as one expression


def _boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, contents) of every top-level `\\boxed{...}` / `\\fbox{...}` in `text`, in order."""
    closing: dict[int, int] = {}  # index of "{" -> index of its matching "}", one linear pass
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closing[stack.pop()] = i
    boxes, end = [], -1
    for match in _BOX_RE.finditer(text):
        open_at = match.end() - 1
        if open_at < end or open_at not in closing:  # nested inside the previous box, or never closed
            continue
        end = closing[open_at]
        boxes.append((match.start(), end + 1, text[open_at + 1 : end]))
    return boxes


def boxed_contents(text: str) -> list[str]:
    """Contents of every top-level `\\boxed{...}` / `\\fbox{...}` in `text`, in order (braces balanced)."""
    return [contents for _, _, contents in _boxes(text)]


def marked_answer(response: str) -> tuple[bool, str | None]:
    """(whether `response` has an answer marker, the answer it marks or None when that is empty).

    Markers, in priority order: the last `\\boxed{}`/`\\fbox{}`; the last `<answer>...</answer>`; the text after
    the last `####` up to the end of its line (GSM8K); "the answer is X".
    """
    tags_end = response.rfind("</answer>") + len("</answer>")  # so that every <answer> searched has a closing tag
    for found in (boxed_contents(response), _ANSWER_TAG_RE.findall(response[:tags_end])):
        if found:
            return True, found[-1].strip() or None
    if "####" in response:
        return True, response.rsplit("####", 1)[1].split("\n", 1)[0].strip() or None
    answer_is = _ANSWER_IS_RE.findall(response)
    if answer_is:
        return True, answer_is[-1].strip() or None
    return False, None


def _spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, contents) of the `$...$`, `$$...$$`, `\\(...\\)` and `\\[...\\]` spans of `text`, in order."""
    spans, opener, start = [], None, 0
    for token in _DELIMITER_RE.finditer(text):
        kind = token.group()
        if opener is None:
            if kind in _CLOSER:
                opener, start = kind, token.end()
        elif kind == _CLOSER[opener]:
            spans.append((start, token.start(), text[start : token.start()]))
            opener = None
        elif kind == "\n" and opener in _INLINE:
            opener = None
    return spans


def math_spans(text: str) -> list[str]:
    """Contents of the math spans of `text`, in order (unclosed ones and inline ones that cross a line break are
    dropped)."""
    return [contents for _, _, contents in _spans(text)]


def _last_boxes(response: str) -> tuple[int, str] | None:
    """(end, answer): the last box, joined with the boxes just before it when only commas, "and" or spacing stand
    between them (`\\boxed{(1,2)}, \\boxed{(2,1)}` is the one answer `(1,2), (2,1)`); None without a box."""
    boxes = _boxes(response)
    if not boxes:
        return None
    first = len(boxes) - 1
    while first > 0 and _BOX_JOINER_RE.fullmatch(response[boxes[first - 1][1] : boxes[first][0]]):
        first -= 1
    return boxes[-1][1], ", ".join(contents.strip() for _, _, contents in boxes[first:])


def gold_answer(gold: str) -> str:
    """The answer a reference solution gives: its boxes as `_last_boxes` joins them, else its marked answer, else
    all of it (a bare gold answer)."""
    boxed = _last_boxes(gold)
    return (boxed[1] if boxed else marked_answer(gold)[1]) or gold.strip()


def _statement_answer(statement: str, parses: Callable[[str], bool]) -> str:
    """The answer in a final statement ("The largest $n$ is 34"): all of it when it parses as one expression,
    else its last math span or standalone number, else all of it."""
    if parses(statement):
        return statement
    spans = [(start, end, contents.strip()) for start, end, contents in _spans(statement) if contents.strip()]
    items = [(end, contents) for _, end, contents in spans]
    first = len(spans) - 1  # `$12$ and $13$` is one answer, as adjacent boxes are
    while first > 0 and _BOX_JOINER_RE.fullmatch(statement[spans[first - 1][1] : spans[first][0]]):
        first -= 1
    if spans and first < len(spans) - 1:
        items[-1] = (spans[-1][1], ", ".join(contents for _, _, contents in spans[first:]))
    for number in _LAST_NUMBER_RE.finditer(statement):  # numbers inside a span are part of it
        if not any(start <= number.start() < end for start, end, _ in spans):
            items.append((number.end(), number.group()))
    return max(items, key=lambda item: item[0])[1] if items else statement


def _last_marked(response: str, parses: Callable[[str], bool]) -> tuple[bool, str | None]:
    """`marked_answer` for `strict=False`: whichever marker ends last wins (a final statement after an
    intermediate box), boxes are joined by `_last_boxes`, and a "Final Answer: ..." line counts as a marker."""
    candidates = []
    boxed = _last_boxes(response)
    if boxed:
        candidates.append(boxed)
    tags = list(_ANSWER_TAG_RE.finditer(response[: response.rfind("</answer>") + len("</answer>")]))
    if tags:
        candidates.append((tags[-1].end(), tags[-1].group(1)))
    if "####" in response:
        candidates.append((len(response), response.rsplit("####", 1)[1].split("\n", 1)[0]))
    statements = list(_FINAL_STATEMENT_RE.finditer(response))
    if statements and (not boxed or statements[-1].start(1) >= boxed[0]):  # a statement around a box: the box
        candidates.append((statements[-1].end(), _statement_answer(statements[-1].group(1).strip(), parses)))
    if not candidates:
        return False, None
    return True, max(candidates, key=lambda candidate: candidate[0])[1].strip() or None


def loose_answer(response: str, parses: Callable[[str], bool]) -> str | None:
    """The last mathematical answer in `response` (`strict=False`), or None.

    Candidates, in priority order: the answer markers (`_last_marked`); the last math span that parses as one
    expression (else the last math span); the whole response when it is at most `MAX_WHOLE_CHARS` long and
    parses; in a response with no math delimiters at all, the last number that is not part of a word; else the
    whole stripped response. An empty final marker gives None. `parses(text)`: whether text is one expression.
    """
    found, answer = _last_marked(response, parses)
    if found:
        return answer
    spans = [span.strip() for span in math_spans(response) if span.strip()]
    if spans:
        return next((span for span in reversed(spans) if parses(span)), spans[-1])
    whole = response.strip()
    if whole and len(whole) <= MAX_WHOLE_CHARS and parses(whole):
        return whole
    numbers = _LAST_NUMBER_RE.findall(response) if not _OPENER_RE.search(response) else []
    return numbers[-1] if numbers else (whole or None)

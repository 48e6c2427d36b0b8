"""Prompt sources: offline arithmetic problems, JSON/JSONL files, hub datasets and reasoning-gym tasks
(`data/reasoning_gym.py`), as lists of row dicts.

Every row has a `prompt` (a string or a list of chat messages) and any other columns (e.g. `answer`), which
are passed to reward functions as keyword lists, the way TRL's GRPOTrainer passes dataset columns.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from posttrain.config import ArithmeticSource, DataSource, FileSource, HubSource, ReasoningGymSource
from posttrain.data.reasoning_gym import reasoning_gym_rows

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class DataError(ValueError):
    """A dataset file or row is unusable; the message names the file and the row."""


def _arithmetic_triples(seed: int, count: int, src: ArithmeticSource) -> list[tuple[int, str, int]]:
    """`count` distinct (a, op, b) problems drawn with `seed` (fewer if the range has fewer distinct ones)."""
    rng = random.Random(seed)
    span = src.max_value - src.min_value + 1
    possible = span * span * len(src.ops)
    seen: dict[tuple[int, str, int], None] = {}
    while len(seen) < min(count, possible):
        triple = (
            rng.randint(src.min_value, src.max_value),
            rng.choice(src.ops),
            rng.randint(src.min_value, src.max_value),
        )
        seen.setdefault(triple, None)
    return list(seen)


def arithmetic_rows(src: ArithmeticSource) -> list[dict[str, Any]]:
    """Generate `src.num_problems` distinct problems (fewer if the ranges allow fewer); rows hold `prompt` and `answer`.

    With `few_shot`, the prompt is a list of chat messages: the examples as user/assistant turns, then the question.
    `exclude_seed` drops the problems this generator would draw with that seed and these ranges (an eval set).
    """
    if src.min_value > src.max_value:
        raise DataError(f"data.min_value ({src.min_value}) must be <= data.max_value ({src.max_value})")
    excluded: set[tuple[int, str, int]] = set()
    if src.exclude_seed is not None and src.exclude_num_problems > 0:
        excluded = set(_arithmetic_triples(src.exclude_seed, src.exclude_num_problems, src))
    # draw extra so that exclusions do not shrink the set; the draw order is fixed by the seed
    triples = [t for t in _arithmetic_triples(src.seed, src.num_problems + len(excluded), src) if t not in excluded]
    examples = []
    for question, answer in src.few_shot:
        examples += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    rows = []
    for a, op, b in triples[: src.num_problems]:
        question = src.template.format(a=a, op=op, b=b) + src.instruction
        prompt = [*examples, {"role": "user", "content": question}] if examples else question
        rows.append({"prompt": prompt, "answer": str(_OPS[op](a, b))})
    return rows


def read_json_rows(path: str | Path) -> list[Any]:
    """The rows of a JSONL file (one value per line; blank lines skipped) or of a `.json` file holding a list."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects")
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from None
    return rows


def file_rows(src: FileSource) -> list[dict[str, Any]]:
    """Read a JSONL file (one object per line) or a JSON list of objects; rename the prompt column to `prompt`."""
    path = Path(src.path)
    rows = read_json_rows(path)
    out = []
    for i, row in enumerate(rows[: src.limit] if src.limit else rows):
        if not isinstance(row, dict) or src.prompt_column not in row:
            raise DataError(f"{path}: row {i} has no `{src.prompt_column}` column (set data.prompt_column)")
        row = dict(row)
        row["prompt"] = row.pop(src.prompt_column)
        out.append(row)
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def hub_rows(src: HubSource) -> list[dict[str, Any]]:
    """Rows of a `datasets.load_dataset` dataset (hub id or local folder); prompt column renamed to `prompt`."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.kind=hub ({src.name}) needs the `datasets` package: pip install datasets") from None
    split = f"{src.split}[:{src.limit}]" if src.limit else src.split
    table = datasets.load_dataset(src.name, src.subset, split=split)
    if src.prompt_column not in table.column_names:
        raise DataError(f"{src.name}: no `{src.prompt_column}` column (has {table.column_names}); set prompt_column")
    rows = []
    for row in table:
        row = dict(row)
        prompt = row.pop(src.prompt_column)
        row["prompt"] = prompt + src.instruction if isinstance(prompt, str) else prompt
        rows.append(row)
    return rows


def load_rows(src: DataSource) -> list[dict[str, Any]]:
    """All rows of a prompt source."""
    if isinstance(src, ArithmeticSource):
        return arithmetic_rows(src)
    if isinstance(src, HubSource):
        return hub_rows(src)
    if isinstance(src, ReasoningGymSource):
        return reasoning_gym_rows(src)
    return file_rows(src)


def batch_indices(num_rows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step` (0-based): a fresh seeded shuffle every epoch, read in order.

    A pure function of (step, seed), so a resumed run continues exactly where it stopped: no batch repeated
    or skipped. A batch that crosses an epoch boundary takes the tail of one shuffle and the head of the next.
    """
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_rows)
        order = list(range(num_rows))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        indices.append(order[offset])
    return indices

"""Generate -> verify -> keep: a dataset of verified completions (teacher traces, or rejection sampling).

A teacher (or the model itself, for offline RFT) writes K completions per problem on the rollout workers; the
recipe's rewards score them; a selection rule keeps some; the kept rows are appended to a JSONL dataset
(`prompt`, `completion`, `source`, `reward`, `problem`, plus the problem's other columns) that the SFT trainer
reads directly and people can inspect.

Resumable: problems are processed in chunks; after a chunk's kept rows are written (and fsynced), one line in
`<dataset>.progress.jsonl` records the chunk's problems and counts. A restart reads that file, drops any rows of
a chunk that was written but never recorded, and continues with the first problem not done: no problem is
generated twice, none is lost.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.rewards.combine import RewardScores

KEEP_RULES = ("shortest", "best", "all")


@dataclass
class Candidate:
    """One generated completion of one problem, scored."""

    text: str
    tokens: int
    reward: float
    truncated: bool


def select(
    candidates: list[Candidate], keep: str, min_reward: float | None, max_per_problem: int | None, drop_truncated: bool
) -> list[int]:
    """Indices of the candidates to keep, in the order they are kept.

    `min_reward`: a candidate qualifies when its reward >= this (None: every candidate qualifies);
    `keep`: "shortest" -> the shortest qualifying one(s) first, "best" -> the highest reward first (ties: shorter
    first), "all" -> every qualifying one in generation order; `max_per_problem`: keep at most this many (None: 1
    for shortest/best, unlimited for all); `drop_truncated`: completions cut by the length limit never qualify.
    NaN rewards (a skipped sample) never qualify.
    """
    if keep not in KEEP_RULES:
        raise ValueError(f"keep must be one of {KEEP_RULES}, got {keep!r}")
    qualifying = [
        i
        for i, c in enumerate(candidates)
        if not math.isnan(c.reward)
        and (min_reward is None or c.reward >= min_reward)
        and not (drop_truncated and c.truncated)
    ]
    if keep == "shortest":
        qualifying.sort(key=lambda i: (candidates[i].tokens, i))
    elif keep == "best":
        qualifying.sort(key=lambda i: (-candidates[i].reward, candidates[i].tokens, i))
    limit = max_per_problem if max_per_problem is not None else (None if keep == "all" else 1)
    return qualifying[:limit]


@dataclass
class TraceStats:
    """What the generation stage did (over this run and any run it resumed)."""

    problems: int = 0
    generated: int = 0
    kept: int = 0
    problems_with_a_kept_trace: int = 0
    generated_tokens: int = 0
    kept_tokens: int = 0
    truncated: int = 0
    seconds_generate: float = 0.0
    seconds_score: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, other: dict[str, Any]) -> None:
        for key, value in other.items():
            if hasattr(self, key) and key != "extra":
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, float]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        out["kept_fraction"] = self.kept / self.generated if self.generated else 0.0
        out["problem_coverage"] = self.problems_with_a_kept_trace / self.problems if self.problems else 0.0
        return out


def progress_path(dataset: Path) -> Path:
    return dataset.with_name(dataset.name + ".progress.jsonl")


def read_progress(dataset: Path) -> tuple[set[int], TraceStats]:
    """Problems already done and the stats so far; trims rows of an unrecorded chunk off the dataset."""
    done: set[int] = set()
    stats = TraceStats()
    progress = progress_path(dataset)
    if progress.is_file():
        for number, line in enumerate(progress.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a torn last line: that chunk was not recorded
                if number == len(progress.read_text().splitlines()):
                    break
                raise ValueError(f"{progress}: line {number} is not JSON; delete the file to start over") from None
            done.update(record["problems"])
            stats.add(record["stats"])
    if dataset.is_file():
        kept_lines = [
            line for line in dataset.read_text().splitlines() if line.strip() and json.loads(line)["problem"] in done
        ]
        tmp = dataset.with_name(dataset.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept_lines))
        os.replace(tmp, dataset)
    return done, stats


def _append(path: Path, lines: list[str]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())


@dataclass
class TraceSettings:
    samples_per_prompt: int
    keep: str
    min_reward: float | None
    max_per_problem: int | None
    drop_truncated: bool
    chunk_problems: int
    source: str
    """recorded in each row (e.g. the teacher's path)"""


def write_traces(
    rows: list[dict[str, Any]],
    dataset: Path,
    settings: TraceSettings,
    generate: Callable[[list[int], list[dict[str, Any]]], list[list[Any]]],
    score: Callable[[list[dict[str, Any]], list[list[Any]]], RewardScores],
    on_chunk: Callable[[TraceStats], None] | None = None,
) -> TraceStats:
    """Generate, score, select and append rows for every problem of `rows` not already done in `dataset`.

    `generate(problem_indices, chunk_rows)` -> per row, its `Completion`s; `score(chunk_rows, completions)` ->
    scores of the flattened completions (row-major). Returns the stats including any earlier, resumed progress.
    """
    dataset.parent.mkdir(parents=True, exist_ok=True)
    done, stats = read_progress(dataset)
    todo = [i for i in range(len(rows)) if i not in done]
    for start in range(0, len(todo), settings.chunk_problems):
        indices = todo[start : start + settings.chunk_problems]
        chunk = [rows[i] for i in indices]
        t0 = time.perf_counter()
        completions = generate(indices, chunk)
        t1 = time.perf_counter()
        scores = score(chunk, completions)
        t2 = time.perf_counter()
        lines, chunk_stats = [], TraceStats(problems=len(indices), seconds_generate=t1 - t0, seconds_score=t2 - t1)
        position = 0
        for index, row, outs in zip(indices, chunk, completions, strict=True):
            candidates = [
                Candidate(c.text, len(c.token_ids), scores.total[position + j], c.finish_reason == "length")
                for j, c in enumerate(outs)
            ]
            position += len(outs)
            chosen = select(
                candidates, settings.keep, settings.min_reward, settings.max_per_problem, settings.drop_truncated
            )
            chunk_stats.generated += len(candidates)
            chunk_stats.generated_tokens += sum(c.tokens for c in candidates)
            chunk_stats.truncated += sum(c.truncated for c in candidates)
            chunk_stats.kept += len(chosen)
            chunk_stats.kept_tokens += sum(candidates[j].tokens for j in chosen)
            chunk_stats.problems_with_a_kept_trace += bool(chosen)
            columns = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
            for j in chosen:
                record = {
                    "prompt": row["prompt"],
                    "completion": candidates[j].text,
                    "source": settings.source,
                    "reward": candidates[j].reward,
                    "problem": index,
                    **columns,
                }
                lines.append(json.dumps(record, ensure_ascii=False))
        _append(dataset, lines)
        record = {"problems": indices, "stats": {k: v for k, v in chunk_stats.__dict__.items() if k != "extra"}}
        _append(progress_path(dataset), [json.dumps(record)])
        stats.add(record["stats"])
        if on_chunk is not None:
            on_chunk(stats)
    return stats

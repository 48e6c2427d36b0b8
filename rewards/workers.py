"""Reward scoring in Ray actors: off the driver, shards of a batch in parallel, a time limit per sample.

`RewardPool.score` has the signature of `combine.score_samples` (less the specs) and returns the same
`RewardScores`. Each `RewardWorker` actor loads the recipe's reward functions itself, scores a contiguous shard
of the batch (whole prompt groups when `group_size` is given), and sends back plain values and failures; the
pool applies the failure rules to the whole batch (`finish_scores`), so sharding never changes the result.

Timeouts: a shard of k samples may take `timeout * k` seconds. A shard that runs past that (or whose worker
dies) gets its worker killed and replaced, and its samples are scored again one at a time with `timeout` each;
a sample that still runs out of time (or kills its worker) becomes a failure pinned to that sample, which stops
the run (`on_error="raise"`) or drops the sample (`"skip"`) like any other reward failure. A hung reward
function can therefore never hang training.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal, Union

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from posttrain.rewards.combine import (
    PartialScores,
    RewardError,
    RewardScores,
    RewardSpec,
    finish_scores,
    score_partial,
    score_samples,
)
from posttrain.rewards.loading import build_reward_specs

_STARTUP_TIMEOUT_S = 300.0

Scorer = Union["RewardPool", "LocalScorer"]
"""what training and evaluation score rewards with: `.score(prompts, completions, columns, completion_ids=,
on_error=, group_size=) -> RewardScores` and `.close()`"""


@ray.remote(num_cpus=0)
class RewardWorker:
    """One process holding the recipe's reward functions."""

    def __init__(self, entries: list[dict[str, Any]], names: list[str], base_dir: str, env: dict[str, str]):
        os.environ.update(env)  # before any verifier pool starts (its size)
        self.specs = build_reward_specs(entries, names, base_dir)

    def ready(self) -> int:
        return os.getpid()

    def score(
        self, prompts: list, completions: list, columns: dict[str, list], completion_ids: list | None
    ) -> PartialScores:
        partial = score_partial(self.specs, prompts, completions, columns, completion_ids)
        partial.causes = []  # exceptions stay here: their messages are already in `failures`
        return partial


def shard_bounds(batch_size: int, shards: int, group_size: int = 1) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges covering the batch, at most `shards` of them, cut at group boundaries."""
    groups = -(-batch_size // group_size)
    per_shard = max(1, -(-groups // max(1, shards)))
    bounds = []
    for first in range(0, groups, per_shard):
        bounds.append((first * group_size, min(batch_size, (first + per_shard) * group_size)))
    return bounds


def _slice(values: Any, start: int, end: int) -> Any:
    return None if values is None else values[start:end]


class RewardPool:
    """`workers` reward actors. `score(...)` -> `RewardScores`, as `score_samples` would give in this process."""

    def __init__(
        self,
        entries: list[dict[str, Any]],
        specs: list[RewardSpec],
        workers: int = 1,
        timeout: float = 60.0,
        base_dir: str | None = None,
    ):
        if workers < 1:
            raise ValueError(f"a reward pool needs at least 1 worker, got {workers}")
        self.entries = entries
        self.specs = specs  # names and weights for combining; the functions run in the workers
        self.names = [spec.name for spec in specs]
        self.timeout = timeout
        self.base_dir = os.path.abspath(base_dir or os.getcwd())
        cpus = os.cpu_count() or 1
        self.env = {"POSTTRAIN_MATH_WORKERS": str(max(1, cpus // workers))}
        self.restarts = 0
        self.workers = [self._start() for _ in range(workers)]
        ray.get([worker.ready.remote() for worker in self.workers], timeout=_STARTUP_TIMEOUT_S)

    def _start(self):
        return RewardWorker.remote(self.entries, self.names, self.base_dir, self.env)

    def _replace(self, position: int) -> None:
        ray.kill(self.workers[position], no_restart=True)
        self.workers[position] = self._start()
        ray.get(self.workers[position].ready.remote(), timeout=_STARTUP_TIMEOUT_S)
        self.restarts += 1

    def score(
        self,
        prompts: list,
        completions: list,
        columns: dict[str, list],
        completion_ids: list[list[int]] | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        group_size: int = 1,
    ) -> RewardScores:
        """Score the batch on the workers (see the module docstring); raises `RewardError` like `score_samples`."""
        batch_size = len(completions)
        bounds = shard_bounds(batch_size, len(self.workers), group_size)
        start = time.monotonic()
        refs = [
            self.workers[i].score.remote(
                prompts[a:b], completions[a:b], {k: v[a:b] for k, v in columns.items()}, _slice(completion_ids, a, b)
            )
            for i, (a, b) in enumerate(bounds)
        ]
        parts: list[PartialScores] = []
        for i, ((a, b), ref) in enumerate(zip(bounds, refs, strict=True)):
            left = max(0.0, start + self.timeout * (b - a) - time.monotonic())
            part = self._get(ref, left)
            if part is None:  # out of time or the worker died: score this shard sample by sample
                self._replace(i)
                part = self._one_at_a_time(i, prompts[a:b], completions[a:b], columns, completion_ids, a)
            parts.append(part)
        return finish_scores(self.specs, _merge(self.names, parts, bounds), prompts, completions, on_error)

    def _get(self, ref: Any, timeout: float) -> PartialScores | None:
        try:
            return ray.get(ref, timeout=timeout)
        except GetTimeoutError:  # the caller kills the worker (actor tasks cannot be force-cancelled)
            return None
        except (ActorDiedError, RayActorError):
            return None
        except RayTaskError as error:  # the worker raised (e.g. a function returned the wrong shape): a bug
            raise RewardError(str(getattr(error, "cause", None) or error)) from None

    def _one_at_a_time(
        self, position: int, prompts: list, completions: list, columns: dict, completion_ids: list | None, offset: int
    ) -> PartialScores:
        merged = PartialScores({name: [] for name in self.names})
        for j in range(len(completions)):
            k = offset + j
            ref = self.workers[position].score.remote(
                [prompts[j]],
                [completions[j]],
                {key: values[k : k + 1] for key, values in columns.items()},
                _slice(completion_ids, k, k + 1),
            )
            part = self._get(ref, self.timeout)
            if part is None:
                self._replace(position)
                for values in merged.per_function.values():
                    values.append(None)
                merged.failures.append(
                    (None, j, f"scoring did not finish within {self.timeout:g} s (scoring.timeout) or crashed")
                )
                continue
            for name, values in part.per_function.items():
                merged.per_function[name] += values
            merged.failures += [(name, j, what) for name, _, what in part.failures]
        return merged

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []


def _merge(names: list[str], parts: list[PartialScores], bounds: list[tuple[int, int]]) -> PartialScores:
    merged = PartialScores({name: [] for name in names})
    for part, (a, _) in zip(parts, bounds, strict=True):
        for name, values in part.per_function.items():
            merged.per_function[name] += values
        merged.failures += [(name, a + index, what) for name, index, what in part.failures]
    return merged


class LocalScorer:
    """`RewardPool`'s interface, scoring in this process (`scoring.workers: 0`): no actors and no timeouts."""

    def __init__(self, specs: list[RewardSpec]):
        self.specs = specs

    def score(
        self,
        prompts: list,
        completions: list,
        columns: dict[str, list],
        completion_ids: list[list[int]] | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        group_size: int = 1,
    ) -> RewardScores:
        return score_samples(self.specs, prompts, completions, columns, completion_ids, on_error)

    def close(self) -> None:
        pass

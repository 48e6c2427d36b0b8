"""Reward scoring in Ray actors: off the driver, shards of a batch in parallel, a time limit per function call.

`RewardPool.score` has the signature of `combine.score_samples` (less the specs) and returns the same
`RewardScores`. Each `RewardWorker` actor loads the recipe's reward functions itself, scores a contiguous shard
of the batch (whole prompt groups when `group_size` is given), and sends back plain values and failures; the
pool applies the failure rules to the whole batch (`finish_scores`), so sharding never changes the result.

Timeouts: each worker calls the functions on its shard one after another, one call per function (the `async def`
ones in one call, awaited together as in-process), and each call may take `timeout` seconds. A call that runs
past it, or whose worker dies (`os._exit`, out of memory), fails that function on every sample of the shard (a
batch call cannot say which sample hung); the worker is killed and replaced and the shard's remaining functions
run on the new one, so the other functions' scores stand. A hung function thus costs one `timeout` per step
(the shards time out in parallel), never one per sample, and the failure stops the run (`on_error="raise"`,
naming the function, the samples and what happened) or drops those samples (`"skip"`) like any reward failure.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from typing import Any, Literal, Union

import ray
from ray.exceptions import RayActorError, RayTaskError

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
        self, which: list[int], prompts: list, completions: list, columns: dict[str, list], completion_ids: list | None
    ) -> PartialScores:
        """The functions `which` (positions in the recipe's `rewards`) on one shard."""
        partial = score_partial([self.specs[i] for i in which], prompts, completions, columns, completion_ids)
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


def scoring_calls(specs: list[RewardSpec]) -> list[list[int]]:
    """The calls a worker makes per shard, as spec positions: each plain function alone (a hang or a crash is then
    pinned to it), the `async def` ones together (awaited concurrently, as `score_samples` does)."""
    awaited = [i for i, spec in enumerate(specs) if inspect.iscoroutinefunction(spec.fn)]
    alone = [[i] for i in range(len(specs)) if i not in awaited]
    return alone + ([awaited] if awaited else [])


def _slice(values: Any, start: int, end: int) -> Any:
    return None if values is None else values[start:end]


@dataclass
class _Shard:
    """One worker's part of a batch: samples [start, end) and its calls not yet returned, in execution order."""

    position: int
    start: int
    end: int
    queue: list[tuple[list[int], Any]]
    """(spec positions, object ref) per pending call; the worker runs them one at a time in this order"""
    deadline: float
    """when the first pending call runs out of time (`timeout` after the call before it returned)"""


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
        self.calls = scoring_calls(specs)
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
        batch = (prompts, completions, columns, completion_ids)
        merged = PartialScores({name: [None] * len(completions) for name in self.names})
        shards = [
            self._submit(_Shard(i, a, b, [], 0.0), self.calls, batch)
            for i, (a, b) in enumerate(shard_bounds(len(completions), len(self.workers), group_size))
        ]
        while active := [shard for shard in shards if shard.queue]:
            heads = {shard.queue[0][1]: shard for shard in active}
            wait = max(0.0, min(shard.deadline for shard in active) - time.monotonic())
            ready, _ = ray.wait(list(heads), num_returns=1, timeout=wait)
            for shard in active:
                if shard.queue[0][1] in ready:
                    self._collect(shard, merged, batch)
                elif time.monotonic() >= shard.deadline:
                    what = f"did not finish within {self.timeout:g} s (scoring.timeout)"
                    self._lose(shard, merged, what, batch)
        return finish_scores(self.specs, merged, prompts, completions, on_error)

    def _submit(self, shard: _Shard, calls: list[list[int]], batch: tuple) -> _Shard:
        prompts, completions, columns, completion_ids = batch
        a, b = shard.start, shard.end
        args = (prompts[a:b], completions[a:b], {k: v[a:b] for k, v in columns.items()}, _slice(completion_ids, a, b))
        worker = self.workers[shard.position]
        shard.queue = [(which, worker.score.remote(which, *args)) for which in calls]
        shard.deadline = time.monotonic() + self.timeout
        return shard

    def _collect(self, shard: _Shard, merged: PartialScores, batch: tuple) -> None:
        """The first pending call returned: its values into `merged`, or its worker died (replaced)."""
        which, ref = shard.queue[0]
        try:
            part = ray.get(ref)
        except RayActorError:
            self._lose(shard, merged, "its reward worker process died (os._exit, a signal, out of memory)", batch)
            return
        except RayTaskError as error:  # the worker raised (e.g. a function returned the wrong shape): a bug
            raise RewardError(str(getattr(error, "cause", None) or error)) from None
        shard.queue.pop(0)
        for name, values in part.per_function.items():
            merged.per_function[name][shard.start : shard.end] = values
        merged.failures += [(name, shard.start + index, what) for name, index, what in part.failures]
        shard.deadline = time.monotonic() + self.timeout

    def _lose(self, shard: _Shard, merged: PartialScores, what: str, batch: tuple) -> None:
        """The first pending call never returned: fail its functions on the shard's samples, replace the worker and
        run the shard's remaining calls on the new one."""
        which, _ = shard.queue.pop(0)
        names = [self.names[i] for i in which]
        what = f"{what} on samples {shard.start}-{shard.end - 1}, scored in one call; the worker was replaced"
        if len(names) > 1:
            what += f" (the async functions {names} were awaited together in that call)"
        merged.lost += [(name, index, what) for name in names for index in range(shard.start, shard.end)]
        self._replace(shard.position)
        self._submit(shard, [call for call, _ in shard.queue], batch)

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []


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

"""A group of rollout workers seen as one engine: prompts are split across them, weights broadcast to all."""

from __future__ import annotations

import time
from dataclasses import replace

import ray

from posttrain.rollout.types import PromptResult, SamplingParams


class RolloutPool:
    """Driver-side handle on N `RolloutWorker` actors."""

    def __init__(self, workers: list, timeout_s: float = 3600.0):
        if not workers:
            raise ValueError("RolloutPool needs at least one worker")
        self.workers = workers
        self.timeout_s = timeout_s

    def generate(self, prompts: list[str], params: SamplingParams) -> list[PromptResult]:
        """Results in prompt order. Worker i gets a contiguous slice and the seed `params.seed + i`."""
        n = len(self.workers)
        chunk = -(-len(prompts) // n)  # ceil division
        futures = []
        for i, worker in enumerate(self.workers):
            part = prompts[i * chunk : (i + 1) * chunk]
            if part:
                seed = None if params.seed is None else params.seed + i
                futures.append(worker.generate.remote(part, replace(params, seed=seed)))
        results: list[PromptResult] = []
        for part in ray.get(futures, timeout=self.timeout_s):
            results.extend(part)
        return results

    def sleep(self, level: int, timeout_s: float = 600.0) -> float:
        """Put every worker's engine to sleep (`rollout.sleep_level`); returns wall seconds."""
        return self._on_all("sleep", (level,), timeout_s, "fall asleep")

    def wake_up(self, tags: list[str] | None = None, timeout_s: float = 600.0) -> float:
        """Wake every worker's engine (tags: "weights", "kv_cache"; None: all); returns wall seconds."""
        return self._on_all("wake_up", (tags,), timeout_s, f"wake up ({', '.join(tags or ['all'])})")

    def _on_all(self, method: str, args: tuple, timeout_s: float, what: str) -> float:
        """Call `method(*args)` on every worker and wait for all; wall seconds, or a TimeoutError saying `what`."""
        start = time.perf_counter()
        try:
            ray.get([getattr(w, method).remote(*args) for w in self.workers], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"{len(self.workers)} rollout workers did not {what} within {timeout_s:g} s (rollout.sync_timeout_s)"
            ) from None
        return time.perf_counter() - start

    def load_lora_adapter(self, adapter_ref: ray.ObjectRef, timeout_s: float = 600.0) -> float:
        """Broadcast a `LoraAdapter` already in the object store to every worker (adapter-only LoRA sync); returns
        wall seconds. Each worker fetches it itself, as in `load_weights`."""
        return self._on_all("load_lora_adapter", ([adapter_ref],), timeout_s, "load the LoRA adapter")

    def load_weights(self, weights_ref: ray.ObjectRef, timeout_s: float = 600.0) -> float:
        """Broadcast weights already in the object store to every worker; returns wall seconds.

        The reference is wrapped in a list so each worker fetches the tensors itself from the object store
        (one `put`, N reads) instead of the driver copying them once per worker.
        """
        return self._on_all("load_weights", ([weights_ref],), timeout_s, "load the weights")

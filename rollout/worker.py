"""The Ray rollout worker: one inference engine in its own process, driven by small explicit methods.

`RolloutWorkerImpl` is the plain class (usable and testable without Ray); `RolloutWorker` is the Ray actor class,
e.g. `RolloutWorker.options(num_gpus=1).remote(engine="hf", model_path=path)`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from os import PathLike

import ray
import torch

from posttrain.rollout.engine import InferenceEngine, Prompts
from posttrain.rollout.types import PromptResult, SamplingParams
from posttrain.rollout.weight_sync import WeightReceiver

ENGINES = ("hf", "vllm")


class RolloutWorkerImpl(WeightReceiver):
    """Holds one engine with the current policy weights.

    Args:
        engine: "hf" (transformers `generate`) or "vllm".
        model_path: a local HF folder or a name `posttrain.models.loading.load_model` resolves (required).
        dtype: "float32", "bfloat16" or "float16".
        max_batch_size: sequences generated together by the engine.
        num_threads: torch CPU threads in this worker's process; None keeps Ray's setting.
    """

    def __init__(
        self,
        engine: str = "hf",
        model_path: str | PathLike | None = None,
        dtype: str = "float32",
        max_batch_size: int = 64,
        num_threads: int | None = None,
    ):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; allowed: {', '.join(ENGINES)}")
        if model_path is None:
            raise ValueError("RolloutWorker needs a model_path")
        if engine == "vllm":
            raise NotImplementedError("the vllm engine is coming in the vLLM issue; use engine='hf' for now")
        from posttrain.rollout.hf_engine import HFEngine

        self.engine: InferenceEngine = HFEngine(
            model_path, dtype=dtype, max_batch_size=max_batch_size, num_threads=num_threads
        )

    def ready(self) -> bool:
        """True once the engine is loaded (call it to wait for the actor to start)."""
        return True

    def generate(self, prompts: Prompts, params: SamplingParams) -> list[PromptResult]:
        """See `InferenceEngine.generate`."""
        return self.engine.generate(prompts, params)

    def load_weights(self, weights_or_ref: Mapping[str, torch.Tensor] | Sequence[ray.ObjectRef]) -> float:
        """Replace the named tensors in the engine; returns the wall seconds it took, fetching included.

        Args:
            weights_or_ref: a (partial) state dict in plain HF names, or a list holding one `ray.ObjectRef` to such a
                dict. Ray resolves a bare ref passed as an argument before the call, once per worker; inside a list
                it is left alone, so each worker fetches the tensors from the object store itself: the driver can
                `ray.put` once and broadcast to N workers without copying the dict per worker.
        """
        start = time.perf_counter()
        if isinstance(weights_or_ref, Mapping):
            weights = weights_or_ref
        else:
            if len(weights_or_ref) != 1 or not isinstance(weights_or_ref[0], ray.ObjectRef):
                raise ValueError("load_weights takes a state dict or a list holding one ray.ObjectRef to one")
            weights = ray.get(weights_or_ref[0])
        self.engine.load_weights(weights)
        return time.perf_counter() - start

    def get_weights(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """See `InferenceEngine.get_weights`."""
        return self.engine.get_weights(names)


RolloutWorker = ray.remote(RolloutWorkerImpl)

"""The Ray rollout worker: one inference engine in its own process, driven by small explicit methods.

`RolloutWorkerImpl` is the plain class (usable and testable without Ray); `RolloutWorker` is the Ray actor class,
e.g. `RolloutWorker.options(num_gpus=1).remote(engine="hf", model_path=path)`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Any

import ray
import torch

from posttrain.models.loading import set_matmul_precision
from posttrain.models.lora_adapter import LoraAdapter
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
        matmul_precision: this process's float32 matmul precision (`models.loading.set_matmul_precision`): the hf
            engine's matmuls follow it; vLLM's own kernels and processes are not steered by it.
        engine_options: extra keyword arguments of the engine's class (vllm: `gpu_memory_utilization`, `kv_cache_gb`,
            `max_model_len`, `max_lora_rank`; see `rollout/vllm_engine.py`).
    """

    def __init__(
        self,
        engine: str = "hf",
        model_path: str | PathLike | None = None,
        dtype: str = "float32",
        max_batch_size: int = 64,
        num_threads: int | None = None,
        engine_options: Mapping[str, Any] | None = None,
        matmul_precision: str = "highest",
    ):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; allowed: {', '.join(ENGINES)}")
        if model_path is None:
            raise ValueError("RolloutWorker needs a model_path")
        set_matmul_precision(matmul_precision, "RolloutWorker matmul_precision")
        if engine == "vllm":
            from posttrain.rollout.vllm_engine import VLLMEngine as engine_class
        else:
            from posttrain.rollout.hf_engine import HFEngine as engine_class

        self.engine: InferenceEngine = engine_class(
            model_path, dtype=dtype, max_batch_size=max_batch_size, num_threads=num_threads, **(engine_options or {})
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

    def sleep(self, level: int) -> float:
        """Free the engine's GPU memory while the learner trains (`InferenceEngine.sleep`); returns wall seconds."""
        start = time.perf_counter()
        self.engine.sleep(level)
        return time.perf_counter() - start

    def wake_up(self, tags: Sequence[str] | None = None) -> float:
        """`InferenceEngine.wake_up` (tags: "weights", "kv_cache"; None: all); returns wall seconds."""
        start = time.perf_counter()
        self.engine.wake_up(tags)
        return time.perf_counter() - start

    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping

    def load_lora_adapter(self, adapter_or_ref: LoraAdapter | Sequence[ray.ObjectRef]) -> float:
        """Adapter-only LoRA sync (vllm engine): later generations use this adapter on the base weights; returns wall
        seconds. Takes the adapter or a list holding one `ray.ObjectRef` to it (as `load_weights`)."""
        start = time.perf_counter()
        if not hasattr(self.engine, "load_lora_adapter"):
            raise ValueError(f"{type(self.engine).__name__} takes merged weights only (rollout.lora_sync: merged)")
        adapter = adapter_or_ref if isinstance(adapter_or_ref, LoraAdapter) else ray.get(adapter_or_ref[0])
        self.engine.load_lora_adapter(adapter)
        return time.perf_counter() - start


RolloutWorker = ray.remote(RolloutWorkerImpl)

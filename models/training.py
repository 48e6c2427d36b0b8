"""What every trainer of a model shares, without Ray: AdamW and its LR schedule, mini-batch bounds, the running
metrics of a step, and the RNG / optimizer state of a checkpoint.

Used by the policy learner and the PPO critic (`learner/`, in or out of a Ray actor) and by the offline trainer
(`offline/trainer.py`), so online and offline training follow one optimizer, schedule and checkpoint convention.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from posttrain.models.lora import LoraSettings


@dataclass
class OptimizerSettings:
    """What every trained actor (policy learner, PPO critic) takes from the recipe: the checkpoint, LoRA/QLoRA, AdamW
    and its schedule, micro-batches, epochs x mini-batches (kept flat so actors do not depend on the config schema)."""

    model_path: str
    dtype: str = "float32"
    lora: LoraSettings | None = None
    quantize: str = "none"
    """QLoRA: "nf4" / "fp4" holds the base's linear layers in 4 bits (needs `lora`); the engines get the dequantized
    weights (`models.lora`), the final folder the adapter merged into the full-precision base"""
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    """in optimizer steps"""
    total_steps: int = 1
    """in optimizer steps"""
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8
    epochs_per_batch: int = 1
    mini_batches: int = 1
    seed: int = 0
    num_threads: int | None = None
    matmul_precision: str = "highest"
    """float32 matmul precision of this process (`models.loading.set_matmul_precision`; model.matmul_precision)"""


def make_optimizer(params: list[torch.nn.Parameter], s: OptimizerSettings):
    """AdamW over `params` and its LR schedule (stepped once per optimizer step): (optimizer, scheduler)."""
    # foreach: torch picks it only for CUDA tensors; on CPU the default is a Python loop of ~10 ops per tensor, which
    # with LoRA (2 tensors per adapted layer, 420 for SmolLM2's 7 projections) took 0.8-1.4 s per step on 2 loaded
    # cores against 0.03-0.15 s, with bit-identical results
    optimizer = torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_lambda(i, s.warmup_steps, s.total_steps, s.lr_schedule)
    )
    return optimizer, scheduler


def mini_batch_bounds(num_rows: int, mini_batches: int) -> list[int]:
    """Row bounds `[0, ..., num_rows]` of `mini_batches` near-equal mini-batches (fewer when rows are fewer)."""
    return [int(b) for b in np.linspace(0, num_rows, min(mini_batches, num_rows) + 1).round()]


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear warmup, then constant / linear / cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr_schedule {schedule!r}; allowed: constant, linear, cosine")


class Stats:
    """Running metrics of one training step (several optimizer updates): per-update sums, weighted means (e.g. by
    loss tokens), min/max. Plain data, so data-parallel ranks can gather and merge them (`learner/data_parallel.py`)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weighted: dict[str, list[tuple[float, float]]] = {}  # name -> [(masked mean, weight)]
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value

    def mean(self, name: str, value: float, weight: float) -> None:
        self.weighted.setdefault(name, []).append((value, weight))

    def extremes(self, name: str, low: float, high: float) -> None:
        self.low[name] = min(self.low.get(name, math.inf), low)
        self.high[name] = max(self.high.get(name, -math.inf), high)

    def result(self, updates: int) -> dict[str, float]:
        metrics = {name: total / updates for name, total in self.sums.items()}  # per-update means
        for name, pairs in self.weighted.items():
            metrics[name] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        metrics.update({f"{name}/min": v for name, v in self.low.items()})
        metrics.update({f"{name}/max": v for name, v in self.high.items()})
        return metrics


def rng_state() -> dict:
    """The torch, numpy and python RNG states, for a checkpoint (`restore_rng_state` puts them back)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng_state(rng: dict) -> None:
    """The torch, numpy and python RNG states a checkpoint saved (`rng_state`)."""
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def restore_training_state(state: dict, model, optimizer, scheduler, where: str | Path) -> None:
    """Load a checkpoint's `trainable` tensors, optimizer, scheduler and RNG states (torch, numpy, python) into a
    live model and optimizer; shared by the learner, the critic and the offline trainer."""
    params = dict(model.named_parameters())
    unknown = [n for n in state["trainable"] if n not in params]
    if unknown:
        raise ValueError(f"checkpoint {where} does not match the model: unknown parameters {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])

"""The learner: policy (+ LoRA), optimizer, LR schedule; one `train_step` per rollout batch.

Runs as a Ray actor (`Learner`) or in-process (`LearnerImpl`). The loss is GRPO's clipped surrogate with an
optional k3 KL to the reference (DeepSeekMath 2402.03300, eq. 3), reduced as the config says. With LoRA the
reference is the same model with the adapter disabled, so no second copy of the weights is held.

Deviation, stated: with one policy update per rollout batch, `lp_old` is the learner's own log-prob detached
(ratio == 1, so the clip only matters once several updates per batch exist). The sampler's log-probs are used
only to log how far the engine's numbers are from the learner's (`rollout/logprob_diff`), a weight-sync check.

Cost, stated: whenever a reference exists (always with LoRA; with full weights only when `kl_coef > 0`), each
micro-batch gets one extra no-grad forward pass so that `kl` is logged even when it is not in the loss.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from posttrain.models.loading import load_model, load_tokenizer
from posttrain.models.logprobs import token_logprobs
from posttrain.models.lora import LoraSettings, apply_lora, merged_state_dict, save_merged
from posttrain.rl.batch import TrainBatch
from posttrain.rl.kl import kl_k3
from posttrain.rl.losses.policy import clipped_policy_loss
from posttrain.rl.metrics import masked_mean
from posttrain.rl.reduction import reduce_loss


@dataclass
class LearnerSettings:
    """What the learner needs from the recipe (kept flat so the actor does not depend on the config schema)."""

    model_path: str
    dtype: str = "float32"
    lora: LoraSettings | None = None
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    max_grad_norm: float = 1.0
    micro_batch_size: int = 8
    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.0
    loss_reduction: str = "token-mean"
    seed: int = 0
    num_threads: int | None = None


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


class LearnerImpl:
    """Holds the policy and optimizer. Methods are the actor's RPC surface; see `Learner`."""

    def __init__(self, settings: LearnerSettings):
        self.settings = s = settings
        torch.set_num_threads(s.num_threads or os.cpu_count() or 1)
        torch.manual_seed(s.seed)
        self.tokenizer = load_tokenizer(s.model_path, padding_side="right")
        model = load_model(s.model_path, dtype=s.dtype)
        self.model = apply_lora(model, s.lora) if s.lora else model
        self.model.train()
        # With full weights and a KL term, the reference is a frozen copy; with LoRA it is the adapter switched off.
        self.ref_model = None
        if s.kl_coef > 0 and not s.lora:
            self.ref_model = load_model(s.model_path, dtype=s.dtype).eval().requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: lr_lambda(i, s.warmup_steps, s.total_steps, s.lr_schedule)
        )
        self.steps_done = 0

    # ------------------------------------------------------------------------------------------- training

    def ready(self) -> bool:
        return True

    def _reference_logprobs(self, mb: TrainBatch) -> torch.Tensor | None:
        """[B, C] log-probs of the completion tokens under the reference, or None without one."""
        s = self.settings
        if self.ref_model is not None:
            ctx, model = contextlib.nullcontext(), self.ref_model
        elif s.lora:  # the base model is the reference: switch the adapter off for this pass
            ctx, model = self.model.disable_adapter(), self.model
        else:
            return None
        with ctx, torch.no_grad():
            lp_ref, _ = token_logprobs(
                model, mb.input_ids_BT, mb.attention_mask_BT, s.temperature, False, mb.prompt_width
            )
        return lp_ref

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step over `batch`, in micro-batches; returns detached metrics."""
        s = self.settings
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens = float(batch.loss_mask_BC.sum())
        if num_tokens == 0:
            raise ValueError("train_step: the batch has no completion tokens with loss (all samples skipped?)")
        # normalisers of the whole optimizer step, so micro-batch losses sum to the full-batch value;
        # sequences without loss tokens (skipped samples) do not count
        num_seqs = int((batch.loss_mask_BC.sum(-1) > 0).sum())
        norm = dict(num_tokens=num_tokens, num_seqs=num_seqs, max_completion_tokens=batch.max_completion_tokens)
        sums = {"loss": 0.0, "pg_loss": 0.0}
        token_stats: dict[str, list[tuple[float, float]]] = {}  # name -> [(masked mean, weight)]
        ratio_min, ratio_max = math.inf, -math.inf
        for lo in range(0, len(batch), s.micro_batch_size):
            mb = batch.slice(lo, lo + s.micro_batch_size)
            mask = mb.loss_mask_BC
            weight = float(mask.sum())
            if weight == 0:
                continue
            # [B, C]: completion tokens only (the LM head skips prompt positions)
            lp, entropy = token_logprobs(
                self.model, mb.input_ids_BT, mb.attention_mask_BT, s.temperature, True, mb.prompt_width
            )
            per_token, pg_metrics = clipped_policy_loss(
                lp, lp.detach(), mb.advantages_B, mask, eps_low=s.eps_low, eps_high=s.eps_high
            )
            pg_loss = reduce_loss(per_token, mask, s.loss_reduction, **norm)
            loss = pg_loss
            lp_ref = self._reference_logprobs(mb)
            if lp_ref is not None:
                kl_BC = kl_k3(lp, lp_ref)
                if s.kl_coef > 0:
                    loss = loss + s.kl_coef * reduce_loss(kl_BC, mask, s.loss_reduction, **norm)
                token_stats.setdefault("kl", []).append((float(masked_mean(kl_BC.detach(), mask)), weight))
            loss.backward()
            sums["loss"] += float(loss.detach())
            sums["pg_loss"] += float(pg_loss.detach())
            token_stats.setdefault("entropy", []).append((float(masked_mean(entropy, mask)), weight))
            lp_diff = (lp.detach() - mb.sampler_logprobs_BC).abs()
            token_stats.setdefault("rollout/logprob_diff", []).append((float(masked_mean(lp_diff, mask)), weight))
            token_stats.setdefault("clip_fraction", []).append((pg_metrics["clip_fraction"], weight))
            ratio_min, ratio_max = min(ratio_min, pg_metrics["ratio/min"]), max(ratio_max, pg_metrics["ratio/max"])
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.steps_done += 1
        metrics = dict(sums, grad_norm=grad_norm, lr=lr, **{"ratio/min": ratio_min, "ratio/max": ratio_max})
        for name, pairs in token_stats.items():
            metrics[name] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        metrics.setdefault("kl", float("nan"))
        metrics["time/train_step"] = time.perf_counter() - start
        return metrics

    # ------------------------------------------------------------------------------------------- weights

    def get_weights(self, only_changed: bool = True) -> dict[str, torch.Tensor]:
        """Plain-model weights for the rollout engines (LoRA merged; with `only_changed`, just the adapted ones)."""
        return merged_state_dict(self.model, only_lora_targets=only_changed)

    def save_final(self, out_dir: str) -> str:
        """A plain HF folder (LoRA merged) loadable by `AutoModelForCausalLM.from_pretrained` and by vLLM."""
        return str(save_merged(self.model, self.tokenizer, out_dir))

    # ------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, out_dir: str) -> None:
        """Everything needed to continue exactly: trainable weights, optimizer, scheduler, RNG states."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        state = {
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps_done": self.steps_done,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }
        torch.save(state, out / "learner.pt.tmp")
        os.replace(out / "learner.pt.tmp", out / "learner.pt")

    def load_checkpoint(self, ckpt_dir: str) -> int:
        """Restore from `save_checkpoint`'s folder; returns the number of optimizer steps done."""
        state = torch.load(Path(ckpt_dir) / "learner.pt", weights_only=False)
        params = dict(self.model.named_parameters())
        missing = [n for n in state["trainable"] if n not in params]
        if missing:
            raise ValueError(f"checkpoint {ckpt_dir} does not match the model: unknown parameters {missing[:3]}")
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.steps_done = state["steps_done"]
        return self.steps_done


Learner = ray.remote(LearnerImpl)

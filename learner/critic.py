"""PPO's critic: a value model (the policy's backbone from the same checkpoint + a scalar head) with its own optimizer.

PPO (Schulman et al., 1707.06347) as applied to LMs (Ziegler et al. 1909.08593; InstructGPT 2203.02155): the critic
V_phi is trained by regression on the GAE returns with the clipped value loss of docs/algorithms.md#ppo
(`algorithms/gae.py`'s `value_loss`, as OpenAI baselines' PPO2, TRL and OpenRLHF clip it). Runs as a Ray actor
(`Critic`, `learner/actors.py`) or in-process (`CriticImpl`), next to the learner; the controller asks it for `values`
once per rollout batch and then `train_step`s it on the returns while the learner trains the policy.

The value of completion token t is read from the last hidden state at the position before it, i.e. the state in which
token t was chosen (TRL's PPOTrainer reads the same positions): for completion columns P..T-1, hidden states P-1..T-2.
The head is a float32 `Linear(hidden, 1)` with small random weights (std 1 / (hidden + 1), OpenRLHF's choice), so the
first values are near 0. With `lora` the backbone gets fresh LoRA adapters (peft) and only they and the head train.

Deviations, stated: the critic is a separate network with its own AdamW (no shared trunk), so there is no `vf_coef`
(a constant factor on a loss with its own Adam optimizer would barely change its steps); the LM head of the checkpoint
is dropped. Several updates per rollout batch split it exactly as the learner does (`epochs_per_batch` passes over
`mini_batches` contiguous row ranges), with the same LR schedule shape.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from posttrain.algorithms.gae import value_loss
from posttrain.learner.batch import TrainBatch
from posttrain.models.loading import load_model, set_matmul_precision
from posttrain.models.logprobs import position_ids_from_mask
from posttrain.models.lora import LoraSettings
from posttrain.models.training import (
    OptimizerSettings,
    Stats,
    make_optimizer,
    mini_batch_bounds,
    restore_training_state,
    rng_state,
)


@dataclass
class CriticSettings(OptimizerSettings):
    """What the critic needs from the recipe: the learner's `OptimizerSettings` (its own lr) and the value clip."""

    value_clip: float | None = 0.2
    """c in the clipped value loss; None = the plain squared error"""


class ValueModel(nn.Module):
    """A causal LM's backbone (no LM head) + a scalar value head: `values(ids) -> [B, C]` per completion token."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, completion_start: int):
        """Values of the completion tokens in columns `completion_start`..T-1, float32 [B, C] (0 on padding).

        Each is read from the hidden state one column earlier (the state before the token was sampled)."""
        if not 0 < completion_start < input_ids_BT.shape[1]:
            raise ValueError(f"completion_start must be in [1, {input_ids_BT.shape[1]}), got {completion_start}")
        hidden_BTH = self.backbone(
            input_ids=input_ids_BT,
            attention_mask=attention_mask_BT,
            position_ids=position_ids_from_mask(attention_mask_BT),
            use_cache=False,
        ).last_hidden_state
        state_BCH = hidden_BTH[:, completion_start - 1 : -1].float()  # column j predicts completion token j
        values_BC = self.value_head(state_BCH).squeeze(-1)
        return torch.where(attention_mask_BT[:, completion_start:].bool(), values_BC, 0.0)


def load_value_model(
    model_path: str, dtype: str = "float32", lora: LoraSettings | None = None, seed: int = 0, quantize: str = "none"
):
    """The checkpoint's backbone (its LM head dropped) + a fresh value head (seeded); with `lora`, adapters on the
    backbone and only they and the head trainable; `quantize` "nf4" / "fp4" (QLoRA, needs `lora`): the backbone's
    linear layers held in 4 bits (the value head stays float32)."""
    if quantize != "none" and lora is None:
        raise ValueError("CriticSettings.quantize: a 4-bit backbone (QLoRA) needs lora (model.lora)")
    torch.manual_seed(seed)
    causal_lm = load_model(model_path, dtype=dtype, quantize=quantize)
    backbone = causal_lm.base_model  # e.g. LlamaModel: the transformer without the LM head
    if lora is not None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
        )
        backbone = inject_adapter_in_model(config, backbone)  # freezes everything but the adapters
    return ValueModel(backbone, causal_lm.config.hidden_size)


class CriticImpl:
    """Holds the value model and its optimizer. Methods are the actor's RPC surface; see `Critic`."""

    def __init__(self, settings: CriticSettings):
        self.settings = s = settings
        torch.set_num_threads(s.num_threads or os.cpu_count() or 1)
        set_matmul_precision(s.matmul_precision, "CriticSettings.matmul_precision")
        self.model = load_value_model(s.model_path, s.dtype, s.lora, s.seed, s.quantize)
        self.model.train()
        self.optimizer, self.scheduler = make_optimizer([p for p in self.model.parameters() if p.requires_grad], s)
        self.steps_done = 0

    def ready(self) -> bool:
        return True

    def values(self, batch: TrainBatch) -> torch.Tensor:
        """No-grad values of the batch's completion tokens, [B, C] (eval mode; 0 where the loss mask is 0)."""
        values_BC = torch.zeros_like(batch.loss_mask_BC)
        self.model.eval()
        try:
            with torch.no_grad():
                for lo in range(0, len(batch), self.settings.micro_batch_size):
                    mb = batch.slice(lo, lo + self.settings.micro_batch_size)
                    rows, c = slice(lo, lo + len(mb)), mb.loss_mask_BC.shape[1]
                    values_BC[rows, :c] = self.model(mb.input_ids_BT, mb.attention_mask_BT, mb.prompt_width)
        finally:
            self.model.train()
        return torch.where(batch.loss_mask_BC.bool(), values_BC, 0.0)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """`epochs_per_batch` x `mini_batches` optimizer steps of the value loss on the batch's `returns_BC`, clipped
        around its `old_values_BC`; returns detached metrics named `critic/...`."""
        s = self.settings
        start = time.perf_counter()
        if batch.returns_BC is None or batch.old_values_BC is None:
            raise ValueError("Critic.train_step: the batch needs returns_BC and old_values_BC (see ppo_batch)")
        if float(batch.loss_mask_BC.sum()) == 0:
            raise ValueError("Critic.train_step: the batch has no completion tokens with loss (all samples skipped?)")
        stats = Stats()
        first_lr = self.scheduler.get_last_lr()[0]
        bounds = mini_batch_bounds(len(batch), s.mini_batches)
        updates = 0
        for _ in range(s.epochs_per_batch):
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                mini = batch.slice(lo, hi) if (lo, hi) != (0, len(batch)) else batch
                updates += self._update(mini, stats)
        metrics = {f"critic/{name}": value for name, value in stats.result(max(updates, 1)).items()}
        metrics.update({"critic/lr": first_lr, "critic/updates": float(updates)})
        metrics["time/critic_step"] = time.perf_counter() - start
        return metrics

    def _update(self, batch: TrainBatch, stats: Stats) -> int:
        """One optimizer step of the value loss over `batch`, in micro-batches; returns 1, or 0 without loss tokens."""
        s = self.settings
        num_tokens = float(batch.loss_mask_BC.sum())
        if num_tokens == 0:
            return 0
        clip = math.inf if s.value_clip is None else s.value_clip
        self.optimizer.zero_grad(set_to_none=True)
        for lo in range(0, len(batch), s.micro_batch_size):
            mb = batch.slice(lo, lo + s.micro_batch_size)
            weight = float(mb.loss_mask_BC.sum())
            if weight == 0:
                continue
            values_BC = self.model(mb.input_ids_BT, mb.attention_mask_BT, mb.prompt_width)
            loss, metrics = value_loss(values_BC, mb.old_values_BC, mb.returns_BC, mb.loss_mask_BC, clip, num_tokens)
            loss.backward()
            stats.add("value_loss", float(loss.detach()))
            stats.mean("value_clipfrac", metrics["value/clip_fraction"], weight)
            stats.mean("values_mean", metrics["value/mean"], weight)
            stats.mean("value_error", metrics["value/error"], weight)
        params = [p for p in self.model.parameters() if p.requires_grad]
        stats.add("grad_norm", float(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)))
        self.optimizer.step()
        self.scheduler.step()
        self.steps_done += 1
        return 1

    # ------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, out_dir: str) -> None:
        """`critic.pt` in `out_dir` (next to the learner's `learner.pt`): trainable weights (head included),
        optimizer, scheduler, RNG states."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {
            "trainable": {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps_done": self.steps_done,
            "rng": rng_state(),
        }
        torch.save(state, out / "critic.pt.tmp")
        os.replace(out / "critic.pt.tmp", out / "critic.pt")

    def load_checkpoint(self, ckpt_dir: str) -> int:
        """Restore from `save_checkpoint`'s folder; returns the number of optimizer steps done."""
        path = Path(ckpt_dir) / "critic.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: this checkpoint has no critic (was its run a ppo run?)")
        state = torch.load(path, weights_only=False)
        restore_training_state(state, self.model, self.optimizer, self.scheduler, path)
        self.steps_done = state["steps_done"]
        return self.steps_done

"""PPO, the controller's side: the critic actor and the batch that trains both the policy and the critic.

PPO (Schulman et al., 1707.06347) for LMs as InstructGPT (2203.02155) runs it, with the math of docs/algorithms.md#ppo:
per-token rewards `-kl_coef * KL_t` (k1/k2/k3 of `lp_old` vs `lp_ref`) plus the sequence score at the last completion
token, GAE(gamma, lam) with the critic's values, returns = advantages + values, advantages optionally whitened over
the batch. `OnlineTrainer` runs the loop; the learner takes the clipped-surrogate steps on the per-token advantages
(`token_advantages_BC`) and the critic (`learner/critic.py`) regresses on the returns, both over `epochs_per_batch` x
`mini_batches`. With `algorithm.kl_in: loss` the KL goes in the learner's loss instead and the rewards carry none.

On an environment's episodes (`env:`) the loss mask is 1 on the model's own tokens only, and so are the steps: the
episode's reward lands on its last model token, the KL, values and returns sit on the model's tokens, and GAE skips
the environment's replies between turns (`algorithms/gae.py`; docs/environments.md#ppo-on-episodes).
"""

from __future__ import annotations

import math
import time
from dataclasses import fields, replace

import ray
import torch

from posttrain.algorithms.gae import explained_variance, ppo_advantages
from posttrain.algorithms.kl import kl_estimate
from posttrain.algorithms.masked import masked_mean
from posttrain.config import RecipeConfig
from posttrain.data.types import Sample
from posttrain.learner.actors import Critic
from posttrain.learner.batch import TrainBatch, collate
from posttrain.learner.critic import CriticSettings
from posttrain.models.training import OptimizerSettings
from posttrain.online import components


def critic_settings(cfg: RecipeConfig, model_path: str) -> CriticSettings:
    """The critic's settings: the learner's (checkpoint, LoRA, optimizer, schedule in optimizer steps, micro-batch,
    epochs x mini-batches, seed) with `ppo.critic_lr` (default train.lr) and `ppo.value_clip`."""
    learner = components.learner_settings(cfg, model_path)
    shared = {f.name: getattr(learner, f.name) for f in fields(OptimizerSettings)}
    return CriticSettings(**{**shared, "lr": cfg.ppo.critic_lr or cfg.train.lr, "value_clip": cfg.ppo.value_clip})


def start_critic(cfg: RecipeConfig, model_path: str):
    """The critic actor, ready."""
    critic = Critic.options(num_cpus=0).remote(critic_settings(cfg, model_path))
    ray.get(critic.ready.remote())
    return critic


def ppo_batch(
    cfg: RecipeConfig, samples: list[Sample], totals: list[float], pad_token_id: int, learner, critic
) -> tuple[TrainBatch, dict[str, float]]:
    """The batch both actors train on: per-token advantages for the learner, returns and old values for the critic.

    `totals` are the samples' rewards (NaN = skipped: the sample stays in the batch with no loss tokens)."""
    algo, ppo = cfg.algorithm, cfg.ppo
    placeholder = [0.0 if t == t else math.nan for t in totals]  # NaN masks a skipped sample
    batch = collate(samples, placeholder, pad_token_id, components.completion_budget(cfg))
    mask_BC = batch.loss_mask_BC
    start = time.perf_counter()
    values_ref = critic.values.remote(batch)  # runs while the learner computes the log-probs
    kl_BC, metrics = torch.zeros_like(mask_BC), {}
    if algo.kl_in == "reward" and algo.kl_coef > 0:
        # lp_old and lp_ref before the first update, once per rollout batch; the learner reuses them
        old_BC, ref_BC = ray.get(learner.logprobs.remote(batch))
        batch = replace(batch, old_logprobs_BC=old_BC, ref_logprobs_BC=ref_BC)
        kl_BC = torch.where(mask_BC.bool(), kl_estimate(algo.kl_estimator, old_BC, ref_BC), 0.0)
        trained_B = mask_BC.sum(-1) > 0
        penalty_B = algo.kl_coef * kl_BC.sum(-1)
        metrics["kl/reward_penalty"] = float(penalty_B[trained_B].mean()) if trained_B.any() else 0.0
    values_BC = ray.get(values_ref)
    metrics["time/values"] = time.perf_counter() - start
    scores_B = torch.tensor(totals, dtype=torch.float32)
    advantages_BC, returns_BC = ppo_advantages(
        scores_B, values_BC, mask_BC, kl_BC, algo.kl_coef, ppo.gamma, ppo.lam, ppo.whiten_advantages
    )
    metrics.update(
        {
            "ppo/returns_mean": float(masked_mean(returns_BC, mask_BC)),
            "ppo/values_mean": float(masked_mean(values_BC, mask_BC)),
            "ppo/advantages_mean": float(masked_mean(returns_BC - values_BC, mask_BC)),  # before whitening
            "critic/explained_variance": explained_variance(values_BC, returns_BC, mask_BC),
        }
    )
    batch = replace(batch, token_advantages_BC=advantages_BC, returns_BC=returns_BC, old_values_BC=values_BC)
    return batch, metrics

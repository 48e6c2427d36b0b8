"""On-policy distillation (OPD), the controller's side: the student samples, the teacher actor grades its tokens.

GKD (Agarwal et al., 2306.13649, on-policy with lambda = 1) and the Qwen3 report's on-policy distillation, as
docs/algorithms.md#on-policy-distillation writes them. `OnlineTrainer` runs the loop; this module builds its OPD pieces:
  - `opd.loss: reverse_kl`: the teacher's log-probs of the sampled completion tokens go in the batch; the learner
    forms the per-token advantage `lp_teacher - lp_old` (`algorithms.losses.distill.opd_advantages`)
    and takes the policy step;
  - `opd.loss: jsd`: the learner asks the teacher for its logits one micro-batch at a time (`learner/teacher.py`);
  - with `opd.reward_coef > 0`, the recipe's rewards add their group-relative advantage (GRPO's, with
    `algorithm.advantage_std`) times `reward_coef` to every token of the completion.
`heldout_reverse_kl` measures the student's sampled reverse KL to the teacher on held-out prompts (`eval/reverse_kl`).
"""

from __future__ import annotations

import math
import time

import ray
import torch

from posttrain.algorithms.advantages import group_relative_advantages
from posttrain.algorithms.masked import masked_mean
from posttrain.config import RecipeConfig
from posttrain.data.types import Sample
from posttrain.learner.actors import start_teacher
from posttrain.learner.batch import TrainBatch, collate
from posttrain.learner.teacher import TeacherSettings, check_same_tokenizer
from posttrain.models.loading import resolve_model_path


def teacher_path(cfg: RecipeConfig, student_path: str) -> str:
    """The resolved teacher location, after checking that it shares the student's tokenizer (raises naming both)."""
    path = resolve_model_path(cfg.opd.teacher, "opd.teacher")
    check_same_tokenizer(student_path, path)
    return path


def start_opd_teacher(cfg: RecipeConfig, path: str):
    """The run's teacher actor (see `learner/teacher.py`)."""
    settings = TeacherSettings(
        model_path=path,
        dtype=cfg.opd.teacher_dtype or cfg.model.dtype,
        temperature=cfg.rollout.temperature,
        batch_size=cfg.opd.teacher_batch_size,
        num_threads=cfg.train.num_threads,
        matmul_precision=cfg.model.matmul_precision,
    )
    return start_teacher(settings)


def opd_batch(
    cfg: RecipeConfig, samples: list[Sample], totals: list[float], pad_token_id: int, teacher
) -> tuple[TrainBatch, dict[str, float]]:
    """The learner's batch for OPD: `advantages_B` = the rewards' group-relative advantage when `opd.reward_coef` > 0
    (else 0; the learner scales it), and for `reverse_kl` the teacher's log-probs of every completion token."""
    algo = cfg.algorithm
    placeholder = [0.0 if t == t else math.nan for t in totals]  # NaN (a skipped reward) masks the sample out
    batch = collate(samples, placeholder, pad_token_id, cfg.rollout.max_new_tokens)
    if cfg.opd.reward_coef > 0:
        rewards_BG = torch.tensor(totals, dtype=torch.float32).view(-1, algo.samples_per_prompt)  # [prompts, G]
        advantages_B = group_relative_advantages(rewards_BG, std=algo.advantage_std).reshape(-1)
        batch.advantages_B = torch.where(batch.loss_mask_BC.sum(-1) > 0, advantages_B, 0.0)
    metrics = {}
    if cfg.opd.loss == "reverse_kl":
        start = time.perf_counter()
        batch.teacher_logprobs_BC = ray.get(teacher.logprobs.remote(batch))
        metrics["time/teacher"] = time.perf_counter() - start
    return batch, metrics


def heldout_reverse_kl(samples: list[Sample], pad_token_id: int, learner, teacher) -> float:
    """Mean over completion tokens of `lp_student - lp_teacher` on samples the student generated (at the sampling
    temperature, so it estimates the per-token reverse KL(student || teacher))."""
    batch = collate(samples, [0.0] * len(samples), pad_token_id, 1)
    if float(batch.loss_mask_BC.sum()) == 0:
        return math.nan
    student_ref, teacher_ref = learner.logprobs.remote(batch), teacher.logprobs.remote(batch)
    (student_BC, _), teacher_BC = ray.get([student_ref, teacher_ref])
    return float(masked_mean(student_BC - teacher_BC, batch.loss_mask_BC))

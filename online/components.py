"""Build the run's parts from a recipe: Ray, rollout workers, the learner, reward functions, prompt rows.

Kept apart from the training loop so that `posttrain train` and `posttrain eval` wire the same pieces.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from posttrain.config import RecipeConfig
from posttrain.data.sources import load_rows
from posttrain.learner.actors import Learner, LearnerGroup
from posttrain.learner.learner import LearnerSettings
from posttrain.models.loading import format_prompt, load_tokenizer, resolve_model_path
from posttrain.models.lora import LoraSettings
from posttrain.online.placement import Placement
from posttrain.rewards.combine import RewardSpec
from posttrain.rewards.loading import build_reward_specs, check_columns
from posttrain.rewards.workers import LocalScorer, RewardPool, Scorer
from posttrain.rollout.pool import RolloutPool
from posttrain.rollout.worker import RolloutWorker


def init_ray(cfg: RecipeConfig) -> None:
    """Join `ray.address` or start a local Ray (no dashboard) unless one is already running in this process."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)


def load_reward_specs(cfg: RecipeConfig, base_dir: str = ".") -> list[RewardSpec]:
    """Resolve every `rewards[i].fn` before any work starts (a bad path fails here, naming the entry)."""
    return build_reward_specs([entry.model_dump() for entry in cfg.rewards], cfg.reward_names(), base_dir)


def start_scorer(cfg: RecipeConfig, specs: list[RewardSpec]) -> Scorer:
    """The reward scorer of a run: `scoring.workers` Ray actors, or this process when it is 0."""
    if cfg.scoring.workers == 0 or not specs:  # no rewards (on-policy distillation may have none): nothing to run
        return LocalScorer(specs)
    entries = [entry.model_dump() for entry in cfg.rewards]
    return RewardPool(entries, specs, workers=cfg.scoring.workers, timeout=cfg.scoring.timeout)


def accuracy_reward_name(cfg: RecipeConfig) -> str | None:
    """The reward that counts as accuracy in evaluation; None when the recipe has no reward (opd may have none)."""
    return cfg.eval.accuracy_reward or next(iter(cfg.reward_names()), None)


class PromptFormatter:
    """Dataset prompt (string or chat messages) -> the exact text the engines tokenize."""

    def __init__(self, cfg: RecipeConfig, model_path: str):
        self.tokenizer = load_tokenizer(model_path)
        self.system_prompt = cfg.model.system_prompt
        self.use_chat_template = cfg.model.use_chat_template

    def __call__(self, rows: list[dict[str, Any]]) -> list[str]:
        return [format_prompt(self.tokenizer, r["prompt"], self.system_prompt, self.use_chat_template) for r in rows]


def check_reward_columns(specs: list[RewardSpec], train_rows: list[dict], eval_rows: list[dict] = ()) -> None:
    """The columns the built-in rewards need are in the data (`rewards.loading.check_columns`), before any work."""
    check_columns(specs, train_rows, "data")
    check_columns(specs, list(eval_rows), "eval.data")


def completion_budget(cfg: RecipeConfig) -> int:
    """What one sample may hold after its prompt (the fixed normaliser of seq-mean-token-sum-norm): a completion's
    `rollout.max_new_tokens`, or a whole episode's `env.max_episode_tokens` (every turn and reply after the prompt)."""
    return cfg.env.max_episode_tokens if cfg.env.path is not None else cfg.rollout.max_new_tokens


def load_data(cfg: RecipeConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, eval rows)."""
    train_rows = load_rows(cfg.data)
    eval_rows = load_rows(cfg.eval.data) if cfg.eval.data is not None else []
    return train_rows, eval_rows


def start_rollout_pool(cfg: RecipeConfig, model_path: str, placement: Placement | None = None) -> RolloutPool:
    """`rollout.workers` rollout actors, ready, placed as `placement` says (None: unplaced, 0 CPUs each)."""
    placement = placement or Placement.unplaced(cfg)
    workers = [
        RolloutWorker.options(**placement.rollout_options(i)).remote(
            engine=cfg.rollout.engine,
            model_path=model_path,
            dtype=cfg.rollout.dtype or cfg.model.dtype,
            max_batch_size=cfg.rollout.max_batch_size,
            # generation and training alternate, so each role may use every core while it runs
            num_threads=cfg.rollout.num_threads or max(1, (os.cpu_count() or 1) // cfg.rollout.workers),
            engine_options=rollout_engine_options(cfg),
            # no model.matmul_precision: the hf engine's decoding measured 1.6x slower with `medium`
        )
        for i in range(cfg.rollout.workers)
    ]
    ray.get([w.ready.remote() for w in workers])
    return RolloutPool(workers)


def rollout_engine_options(cfg: RecipeConfig) -> dict[str, Any]:
    """The engine-specific settings of the rollout workers: vllm's memory and, for adapter syncs, its LoRA rank."""
    r = cfg.rollout
    if r.engine != "vllm":
        return {}
    options: dict[str, Any] = {"gpu_memory_utilization": r.gpu_memory_utilization, "kv_cache_gb": r.kv_cache_gb}
    if r.lora_sync == "adapter":
        options["max_lora_rank"] = cfg.model.lora.rank
    if r.sleep_level:
        options["sleep_mode"] = True
    return options


def learner_settings(cfg: RecipeConfig, model_path: str) -> LearnerSettings:
    """The learner's settings for an online recipe. The LR schedule counts optimizer steps, so `train.steps` and
    `train.warmup_steps` (in rollout batches) are scaled by the updates each rollout batch makes."""
    lora = cfg.model.lora
    algo, train = cfg.algorithm, cfg.train
    updates = algo.epochs_per_batch * algo.mini_batches
    learners = cfg.placement.learners
    return LearnerSettings(
        model_path=model_path,
        dtype=cfg.model.dtype,
        lora=LoraSettings(lora.rank, lora.alpha, lora.dropout, list(lora.target_modules)) if lora else None,
        quantize=cfg.model.quantize,
        lr=train.lr,
        betas=tuple(train.adam_betas),
        weight_decay=train.weight_decay,
        lr_schedule=train.lr_schedule,
        warmup_steps=train.warmup_steps * updates,
        total_steps=train.steps * updates,
        max_grad_norm=train.max_grad_norm,
        micro_batch_size=train.micro_batch_size,
        micro_batch_tokens=train.micro_batch_tokens,
        autocast=train.autocast,
        matmul_precision=cfg.model.matmul_precision,
        temperature=cfg.rollout.temperature,
        loss=f"opd_{cfg.opd.loss}" if algo.spec.learner_loss == "opd" else algo.spec.learner_loss,
        opd_beta=cfg.opd.beta,
        reward_coef=cfg.opd.reward_coef,
        tis_cap=algo.tis_cap,
        eps_low=algo.eps_low,
        eps_high=algo.eps_high,
        dual_clip=algo.dual_clip,
        ratio_level=algo.ratio_level,
        kl_coef=algo.kl_coef if algo.kl_in == "loss" else 0.0,
        kl_estimator=algo.kl_estimator,
        reference=algo.kl_coef > 0,
        loss_reduction=algo.loss_reduction,
        epochs_per_batch=algo.epochs_per_batch,
        mini_batches=algo.mini_batches,
        seed=cfg.seed,
        # several learners on one machine share its cores unless told otherwise
        num_threads=train.num_threads or (max(1, (os.cpu_count() or 1) // learners) if learners > 1 else None),
        device="cuda" if cfg.placement.learner_gpus > 0 else "cpu",
        empty_cuda_cache=cfg.rollout.sleep_level > 0,
    )


def start_learner(cfg: RecipeConfig, model_path: str, teacher=None, placement: Placement | None = None):
    """The learner, ready: one actor, or with `placement.learners` > 1 a `LearnerGroup` (data parallel; same calls).
    `teacher` is on-policy distillation's teacher actor (the jsd loss asks it); `placement` None: unplaced."""
    placement = placement or Placement.unplaced(cfg)
    settings = learner_settings(cfg, model_path)
    if cfg.placement.learners > 1:
        options = [placement.learner_options(rank) for rank in range(cfg.placement.learners)]
        p = cfg.placement
        return LearnerGroup(settings, p.learners, teacher, options, p.timeout_s, p.sharding).start()
    learner = Learner.options(**placement.learner_options(0)).remote(settings, teacher)
    ray.get(learner.ready.remote())
    return learner


def model_path_of(cfg: RecipeConfig, key: str = "model.path") -> str:
    """The resolved model location (the demo alias becomes its converted local folder); a missing folder or an
    unreachable hub id fails here, naming `key`."""
    return resolve_model_path(cfg.model.path, key)

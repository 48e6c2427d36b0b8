"""Build the run's parts from a recipe: Ray, rollout workers, the learner, reward functions, prompt rows.

Kept apart from the training loop so that `posttrain train` and `posttrain eval` wire the same pieces.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import ray

from posttrain.config import RecipeConfig
from posttrain.data.sources import load_rows
from posttrain.models.loading import format_prompt, load_tokenizer, resolve_model_path
from posttrain.models.lora import LoraSettings
from posttrain.rewards.combine import RewardSpec
from posttrain.rewards.loading import RewardLoadError, load_reward_function
from posttrain.rl.learner import Learner, LearnerSettings
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
    specs = []
    for i, (entry, name) in enumerate(zip(cfg.rewards, cfg.reward_names(), strict=True)):
        try:
            fn = load_reward_function(entry.fn, base_dir=base_dir)
        except Exception as err:
            raise RewardLoadError(f"rewards[{i}].fn = {entry.fn!r}: {err}") from None
        fn = _bind_args(fn, entry.args, f"rewards[{i}] ({entry.fn})")
        specs.append(RewardSpec(fn=fn, name=name, weight=entry.weight))
    return specs


def _bind_args(fn, args: dict, where: str):
    """`functools.partial(fn, **args)` (or `fn` itself without args), refusing arguments the function cannot take
    and missing required keyword-only ones, so a wrong `args:` fails before any work rather than mid-run."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return functools.partial(fn, **args) if args else fn
    params = signature.parameters.values()
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    unknown = [k for k in args if k not in signature.parameters and not takes_any]
    missing = [
        p.name
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty and p.name not in args
    ]
    if unknown or missing:
        problem = f"takes no argument {unknown}" if unknown else f"needs {missing}"
        raise RewardLoadError(f"{where}.args: {fn.__name__} {problem}; its parameters: {list(signature.parameters)}")
    return functools.partial(fn, **args) if args else fn


def accuracy_reward_name(cfg: RecipeConfig) -> str:
    return cfg.eval.accuracy_reward or cfg.reward_names()[0]


class PromptFormatter:
    """Dataset prompt (string or chat messages) -> the exact text the engines tokenize."""

    def __init__(self, cfg: RecipeConfig, model_path: str):
        self.tokenizer = load_tokenizer(model_path)
        self.system_prompt = cfg.model.system_prompt
        self.use_chat_template = cfg.model.use_chat_template

    def __call__(self, rows: list[dict[str, Any]]) -> list[str]:
        return [format_prompt(self.tokenizer, r["prompt"], self.system_prompt, self.use_chat_template) for r in rows]


def load_data(cfg: RecipeConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, eval rows)."""
    train_rows = load_rows(cfg.data)
    eval_rows = load_rows(cfg.eval.data) if cfg.eval.data is not None else []
    return train_rows, eval_rows


def start_rollout_pool(cfg: RecipeConfig, model_path: str) -> RolloutPool:
    workers = [
        RolloutWorker.options(num_cpus=0).remote(
            engine=cfg.rollout.engine,
            model_path=model_path,
            dtype=cfg.model.dtype,
            max_batch_size=cfg.rollout.max_batch_size,
            # generation and training alternate, so each role may use every core while it runs
            num_threads=cfg.rollout.num_threads or max(1, (os.cpu_count() or 1) // cfg.rollout.workers),
        )
        for _ in range(cfg.rollout.workers)
    ]
    ray.get([w.ready.remote() for w in workers])
    return RolloutPool(workers)


def learner_settings(cfg: RecipeConfig, model_path: str) -> LearnerSettings:
    lora = cfg.model.lora
    algo, train = cfg.algorithm, cfg.train
    return LearnerSettings(
        model_path=model_path,
        dtype=cfg.model.dtype,
        lora=LoraSettings(lora.rank, lora.alpha, lora.dropout, list(lora.target_modules)) if lora else None,
        lr=train.lr,
        betas=tuple(train.adam_betas),
        weight_decay=train.weight_decay,
        lr_schedule=train.lr_schedule,
        warmup_steps=train.warmup_steps,
        total_steps=train.steps,
        max_grad_norm=train.max_grad_norm,
        micro_batch_size=train.micro_batch_size,
        temperature=cfg.rollout.temperature,
        eps_low=algo.eps_low,
        eps_high=algo.eps_high,
        kl_coef=algo.kl_coef,
        loss_reduction=algo.loss_reduction,
        seed=cfg.seed,
        num_threads=train.num_threads,
    )


def start_learner(cfg: RecipeConfig, model_path: str):
    learner = Learner.options(num_cpus=0).remote(learner_settings(cfg, model_path))
    ray.get(learner.ready.remote())
    return learner


def model_path_of(cfg: RecipeConfig) -> str:
    """The resolved model location (the demo alias becomes its converted local folder)."""
    return resolve_model_path(cfg.model.path)

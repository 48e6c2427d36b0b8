"""The online GRPO controller: prompts -> rollout workers -> rewards -> advantages -> learner -> weight sync.

Group Relative Policy Optimization (Shao et al., DeepSeekMath, 2402.03300): sample G completions per prompt,
score them, normalise each reward within its group, and take a clipped policy-gradient step. This module only
wires components; the math lives in `rl/advantages.py`, `rl/losses/` and `rl/reduction.py`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import ray
import torch
from tqdm import tqdm

from posttrain.config import RecipeConfig, check_resumable, dump_config
from posttrain.data.sources import batch_indices
from posttrain.data.types import Sample
from posttrain.rewards.combine import RewardScores, reward_metrics, trl_completion
from posttrain.rewards.workers import Scorer
from posttrain.rl import components
from posttrain.rl.advantages import group_relative_advantages, zero_variance_group_fraction
from posttrain.rl.batch import collate
from posttrain.rl.evaluation import eval_params, score_eval
from posttrain.rl.report import plot_curves, summary_table
from posttrain.rl.run_dir import (
    RunLogger,
    checkpoint_staging,
    commit_checkpoint,
    latest_checkpoint,
    new_run_dir,
    read_metrics,
)
from posttrain.rollout.pool import RolloutPool
from posttrain.rollout.types import PromptResult, SamplingParams


def to_samples(rows: list[dict[str, Any]], results: list[PromptResult]) -> list[Sample]:
    """Flatten per-prompt results into samples; samples of prompt i share group_id i."""
    samples = []
    for group_id, (row, res) in enumerate(zip(rows, results, strict=True)):
        columns = {k: v for k, v in row.items() if k != "prompt"}
        for c in res.completions:
            samples.append(
                Sample(
                    row["prompt"],
                    res.prompt_token_ids,
                    c.text,
                    c.token_ids,
                    c.logprobs,
                    c.finish_reason,
                    group_id,
                    columns,
                )
            )
    return samples


def score(samples: list[Sample], scorer: Scorer, on_error: str, group_size: int = 1) -> RewardScores:
    """Run every reward function on the samples, TRL style (dataset columns as keyword lists)."""
    columns: dict[str, list] = {}
    for key in sorted({k for s in samples for k in s.columns}):
        columns[key] = [s.columns.get(key) for s in samples]
    return scorer.score(
        [s.prompt for s in samples],
        [trl_completion(s.prompt, s.completion) for s in samples],
        columns,
        completion_ids=[s.completion_token_ids for s in samples],
        on_error=on_error,
        group_size=group_size,
    )


class GRPOTrainer:
    """Owns one run: its folder, actors and step loop. `run()` trains to `train.steps` and returns the folder."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.specs = components.load_reward_specs(cfg)
        self.train_rows, self.eval_rows = components.load_data(cfg)
        self.model_path = components.model_path_of(cfg)
        self.format = components.PromptFormatter(cfg, self.model_path)
        self.accuracy_name = components.accuracy_reward_name(cfg)
        self.run_dir, self.start_step, resume_ckpt = self._open_run_dir()
        components.init_ray(cfg)
        self.scorer = components.start_scorer(cfg, self.specs)
        self.pool: RolloutPool = components.start_rollout_pool(cfg, self.model_path)
        self.learner = components.start_learner(cfg, self.model_path)
        if resume_ckpt is not None:
            ray.get(self.learner.load_checkpoint.remote(str(resume_ckpt)))
            self._sync_weights()
        # resuming drops the rows of steps after the checkpoint (all rows if there was no checkpoint yet)
        keep_until = (self.start_step if resume_ckpt else -1) if cfg.resume else None
        self.logger = RunLogger(self.run_dir, resume_after_step=keep_until)

    def _open_run_dir(self) -> tuple[Path, int, Path | None]:
        cfg = self.cfg
        if cfg.resume:
            run_dir = Path(cfg.resume)
            if not (run_dir / "config.yaml").is_file():
                raise FileNotFoundError(f"resume: {run_dir} is not a run folder (no config.yaml)")
            check_resumable((run_dir / "config.yaml").read_text(), cfg, str(run_dir))
            (run_dir / "config.yaml").write_text(dump_config(cfg))  # e.g. a raised train.steps
            found = latest_checkpoint(run_dir)
            if found is None:
                print(f"resume: {run_dir} has no complete checkpoint; starting it from step 0", file=sys.stderr)
                return run_dir, 0, None
            ckpt, state = found
            print(f"resuming {run_dir} from {ckpt.name} (step {state['step']})", file=sys.stderr)
            return run_dir, int(state["step"]), ckpt
        run_dir = new_run_dir(cfg.output_dir, cfg.name)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        return run_dir, 0, None

    # ------------------------------------------------------------------------------------------------ steps

    def _sampling(self, step: int) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(
            n=self.cfg.algorithm.samples_per_prompt,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            stop=tuple(r.stop),
            seed=self.cfg.seed * 100_003 + step,
        )

    def score_samples(self, samples: list[Sample]):
        """Every reward function on the samples (the one place training scores rewards)."""
        return score(samples, self.scorer, self.cfg.algorithm.on_reward_error, self.cfg.algorithm.samples_per_prompt)

    def _sync_weights(self) -> float:
        weights_ref = self.learner.get_weights.remote()
        return self.pool.load_weights(weights_ref)

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.eval_rows:
            return {}
        e, r = self.cfg.eval, self.cfg.rollout
        start = time.perf_counter()
        params = eval_params(e.n, e.temperature, e.max_new_tokens or r.max_new_tokens, r.stop, self.cfg.seed + step)
        results = self.pool.generate(self.format(self.eval_rows), params)
        metrics, _ = score_eval(
            self.eval_rows, results, self.scorer, self.accuracy_name, self.cfg.algorithm.on_reward_error
        )
        metrics["time/eval"] = time.perf_counter() - start
        return metrics

    def train_step(self, step: int) -> tuple[dict[str, float], list[Sample], list[float]]:
        """One GRPO step (1-based `step`); returns metrics, the samples and their total rewards."""
        cfg, algo = self.cfg, self.cfg.algorithm
        indices = batch_indices(len(self.train_rows), algo.prompts_per_step, step - 1, cfg.seed)
        rows = [self.train_rows[i] for i in indices]
        t0 = time.perf_counter()
        results = self.pool.generate(self.format(rows), self._sampling(step))
        t1 = time.perf_counter()
        samples = to_samples(rows, results)
        scores = self.score_samples(samples)
        t2 = time.perf_counter()
        rewards_BG = torch.tensor(scores.total, dtype=torch.float32).view(len(rows), algo.samples_per_prompt)
        advantages = group_relative_advantages(rewards_BG, std=algo.advantage_std).flatten().tolist()
        advantages = [a if t == t else float("nan") for a, t in zip(advantages, scores.total, strict=True)]
        batch = collate(samples, advantages, self.format.tokenizer.pad_token_id, cfg.rollout.max_new_tokens)
        train_metrics = ray.get(self.learner.train_step.remote(batch))
        t3 = time.perf_counter()
        sync_s = self._sync_weights()
        lengths = [len(s.completion_token_ids) for s in samples]
        metrics = {
            **train_metrics,
            **reward_metrics(scores),
            "zero_variance_groups": zero_variance_group_fraction(rewards_BG),
            "skipped_samples": len(scores.skipped),
            "response_length/mean": sum(lengths) / len(lengths),
            "response_length/max": max(lengths),
            "truncated_fraction": sum(s.finish_reason == "length" for s in samples) / len(samples),
            "data/first_index": indices[0],
            "time/generate": t1 - t0,
            "time/reward": t2 - t1,
            "time/train": t3 - t2,
            "time/sync": sync_s,
            "tokens_per_second/generate": sum(lengths) / max(t1 - t0, 1e-9),
        }
        return metrics, samples, scores.total

    def _checkpoint(self, step: int) -> None:
        staging = checkpoint_staging(self.run_dir, step)
        ray.get(self.learner.save_checkpoint.remote(str(staging)))
        state = {"step": step, "data_position": step * self.cfg.algorithm.prompts_per_step, "seed": self.cfg.seed}
        commit_checkpoint(self.run_dir, staging, step, state, self.cfg.checkpoint.keep_last)

    def run(self) -> Path:
        cfg = self.cfg
        total = cfg.train.steps
        if self.start_step == 0 and self.eval_rows:
            before = self.evaluate(0)
            self.logger.log(0, before)
            print(f"eval before training: accuracy {before['eval/accuracy']:.3f}", file=sys.stderr)
        bar = tqdm(
            total=total,
            initial=self.start_step,
            desc="grpo",
            disable=not cfg.logging.progress,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        for step in range(self.start_step + 1, total + 1):
            t0 = time.perf_counter()
            metrics, samples, totals = self.train_step(step)
            every = cfg.eval.every_steps
            if self.eval_rows and (step == total or (every and step % every == 0)):
                metrics.update(self.evaluate(step))
            metrics["time/step"] = time.perf_counter() - t0
            self.logger.log(step, metrics)
            self.logger.log_samples(
                step,
                [
                    {"prompt": s.prompt, "completion": s.completion, "reward": r}
                    for s, r in zip(samples[: cfg.logging.samples_per_step], totals, strict=False)
                ],
            )
            if step % cfg.checkpoint.every_steps == 0 or step == total:
                self._checkpoint(step)
            postfix = {"reward": f"{metrics['reward/mean']:.3f}", "s/step": f"{metrics['time/step']:.1f}"}
            if "eval/accuracy" in metrics:
                postfix["eval_acc"] = f"{metrics['eval/accuracy']:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)
        bar.close()
        return self.finish()

    def finish(self) -> Path:
        ray.get(self.learner.save_final.remote(str(self.run_dir / "final")))
        self.scorer.close()
        self.logger.close()
        rows = read_metrics(self.run_dir)
        plot_curves(rows, self.run_dir / "curves.png")
        print(summary_table(rows))
        print(f"run folder: {self.run_dir}")
        return self.run_dir


def run_grpo(cfg: RecipeConfig) -> Path:
    """Train a GRPO recipe end to end; returns the run folder."""
    return GRPOTrainer(cfg).run()

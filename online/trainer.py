"""The online controller: prompts -> rollout workers -> rewards -> advantages -> learner -> weight sync.

One trainer runs every online `algorithm.name`:
  - `grpo` (DeepSeekMath 2402.03300): G completions per prompt, rewards normalised within the group, clipped
    policy-gradient step; with the config's variants (clip-higher, dual clip, GSPO ratio, reductions, std);
  - `rloo` (2402.14740) and `reinforce_pp` / `reinforce_pp_baseline` (2501.03262): other advantages, same loss;
  - `rft`: keep the best / verified completions per prompt and take an SFT step on them (`algorithms/rft.py`);
  - `opd`: on-policy distillation, a teacher actor grades every sampled token (`online/opd.py`, `learner/teacher.py`);
  - `ppo` (1707.06347): a critic actor's values, GAE per token, the policy and the critic trained side by side
    (`online/ppo.py`, `learner/critic.py`).
Options shared by the policy-gradient ones: DAPO's dynamic sampling (drop zero-variance groups, generate more
prompts to refill, at most `max_refill_rounds` extra rounds), several updates per rollout batch, and the KL to the
reference in the loss or in the reward. This module only wires components, as the algorithm's registry entry says
(`algorithms/registry.py`); the math lives in `algorithms/advantages.py`, `algorithms/reinforce_pp.py`,
`algorithms/rft.py`, `algorithms/losses/` and `algorithms/reduction.py`.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch
from tqdm import tqdm

from posttrain.algorithms.advantages import informative_groups
from posttrain.algorithms.kl import kl_estimate
from posttrain.algorithms.registry import online_advantages
from posttrain.algorithms.rft import rft_keep_mask
from posttrain.config import RecipeConfig
from posttrain.data.sources import batch_indices
from posttrain.data.types import Sample, columns_of
from posttrain.learner.batch import TrainBatch, collate
from posttrain.online import components
from posttrain.online.env_rollout import EnvRollout, episode_metrics
from posttrain.online.evaluation import eval_params, evaluate_episodes, score_eval
from posttrain.online.opd import heldout_reverse_kl, opd_batch, start_opd_teacher, teacher_path
from posttrain.online.placement import Placement
from posttrain.online.ppo import ppo_batch, start_critic
from posttrain.rewards.combine import RewardScores, reward_metrics, trl_completion
from posttrain.rewards.workers import Scorer
from posttrain.rollout.pool import RolloutPool
from posttrain.rollout.types import PromptResult, SamplingParams
from posttrain.rollout.weight_sync import WeightSync
from posttrain.run_folder.report import CURVES, OPD_CURVES, plot_curves, summary_table
from posttrain.run_folder.run_dir import (
    RunLogger,
    checkpoint_staging,
    commit_checkpoint,
    failure_marker,
    open_run_dir,
    read_metrics,
)


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
    return scorer.score(
        [s.prompt for s in samples],
        [trl_completion(s.prompt, s.completion) for s in samples],
        columns_of(samples),
        completion_ids=[s.completion_token_ids for s in samples],
        on_error=on_error,
        group_size=group_size,
    )


def concat_scores(parts: list[RewardScores]) -> RewardScores:
    """The scores of several scoring calls as one batch, in order (skipped indices shifted)."""
    total, per_function, skipped, errors, failed, offset = [], {}, [], [], {}, 0
    for part in parts:
        total += part.total
        for name, count in part.failed.items():
            failed[name] = failed.get(name, 0) + count
        for name, values in part.per_function.items():
            per_function.setdefault(name, [None] * offset)
            per_function[name] += values
        skipped += [offset + i for i in part.skipped]
        errors += part.errors
        offset += len(part.total)
    for values in per_function.values():
        values += [None] * (offset - len(values))
    return RewardScores(total, per_function, skipped, errors, failed)


@dataclass
class StepRollout:
    """What one step generated and kept: `rows[g]`'s completions are `samples[g*G:(g+1)*G]` (group_id g)."""

    rows: list[dict[str, Any]]
    samples: list[Sample]
    totals: list[float]
    """[len(samples)] total reward per kept sample (NaN = skipped)"""
    generated: list[Sample]
    """every sample the step generated, kept or not (for the metrics and samples.jsonl)"""
    scores: RewardScores
    """the scores of `generated`"""
    first_index: int
    metrics: dict[str, float] = field(default_factory=dict)


class OnlineTrainer:
    """Owns one run: its folder, actors and step loop. `run()` trains to `train.steps` and returns the folder."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.specs = components.load_reward_specs(cfg)
        self.train_rows, self.eval_rows = components.load_data(cfg)
        components.check_reward_columns(self.specs, self.train_rows, self.eval_rows)
        self.model_path = components.model_path_of(cfg)
        self.spec = cfg.algorithm.spec  # the algorithm's registry entry: what this run wires and which batch it builds
        teacher = teacher_path(cfg, self.model_path) if self.spec.needs_teacher else None  # tokenizers checked
        self.format = components.PromptFormatter(cfg, self.model_path)
        self.env = EnvRollout(cfg, self.format.tokenizer) if cfg.env.path is not None else None  # episodes, not prompts
        self.completion_budget = components.completion_budget(cfg)
        self.accuracy_name = components.accuracy_reward_name(cfg)
        needs = ("learner.pt", "critic.pt") if self.spec.needs_critic else ("learner.pt",)
        self.run_dir, self.start_step, resume_ckpt = open_run_dir(cfg, needs=needs)
        self.step, self._no_signal = self.start_step, False  # the step in progress; the last one had no signal
        self.policy_version = self.rollout_version = self.start_step  # learner updates; the workers' weights' version
        self._next: Future | None = None  # async mode: the next step's rollout, generating while this step trains
        components.init_ray(cfg)
        self.placement = Placement.create(cfg)  # checks the request against the cluster, reserves the bundles
        self.scorer = components.start_scorer(cfg, self.specs)
        self.pool: RolloutPool = components.start_rollout_pool(cfg, self.model_path, self.placement)
        self.teacher = start_opd_teacher(cfg, teacher) if teacher else None
        self.learner = components.start_learner(cfg, self.model_path, self.teacher, self.placement)
        self.critic = start_critic(cfg, self.model_path) if self.spec.needs_critic else None
        if resume_ckpt is not None:
            ray.get(self.learner.load_checkpoint.remote(str(resume_ckpt)))
            if self.critic is not None:
                ray.get(self.critic.load_checkpoint.remote(str(resume_ckpt)))
        quantized = cfg.model.quantize != "none"
        if resume_ckpt is not None or quantized:
            # QLoRA: the engines loaded the checkpoint's full-precision weights, but the learner computes with their
            # 4-bit rounding, so the first sync (before any rollout) sends every layer dequantized; later syncs send
            # the adapted layers only (the quantized base never changes)
            self._sync_weights(full=quantized)
        # resuming drops the rows of steps after the checkpoint (all rows if there was no checkpoint yet)
        keep_until = (self.start_step if resume_ckpt else -1) if cfg.resume else None
        self.logger = RunLogger(self.run_dir, resume_after_step=keep_until)

    # ------------------------------------------------------------------------------------------------ steps

    def _sampling(self, step: int, round_: int = 0) -> SamplingParams:
        r = self.cfg.rollout
        seed = self.cfg.seed * 100_003 + step
        return SamplingParams(
            n=self.cfg.algorithm.samples_per_prompt,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_new_tokens,
            stop=tuple(r.stop),
            seed=seed if round_ == 0 else seed * 1_000 + round_,
        )

    def _prompt_indices(self, step: int, round_: int) -> list[int]:
        """Round 0 reads the run's resumable order; refill rounds read other seeded shuffles (also pure)."""
        seed = self.cfg.seed if round_ == 0 else self.cfg.seed * 1_009 + 7_919 * round_
        return batch_indices(len(self.train_rows), self.cfg.algorithm.prompts_per_step, step - 1, seed)

    def score_samples(self, samples: list[Sample]):
        """Every reward function on the samples (the one place training scores rewards)."""
        if not self.specs:  # on-policy distillation without rewards: the teacher is the only signal
            return RewardScores([0.0] * len(samples))
        return score(samples, self.scorer, self.cfg.algorithm.on_reward_error, self.cfg.algorithm.samples_per_prompt)

    def _sync_weights(self, full: bool = False) -> float:
        """Bring the engines to the learner's weights; `full`: every weight (else what LoRA training changes).

        Never while async mode's next rollout is generating: that rollout's samples are logged as drawn from
        `rollout_version`, and an episode's later turns would otherwise be drawn from other weights than its first."""
        if self._next is not None and not self._next.done():
            raise RuntimeError(
                "weight sync while the next step's rollout is still generating: its samples (every turn of an "
                "episode) must come from one weights version; wait for it first (_finish_next_rollout)"
            )
        if self.cfg.rollout.lora_sync == "adapter":  # the adapter alone; the engines keep their base weights
            adapter_ref = self.learner.get_lora_adapter.remote()
            seconds = self.pool.load_lora_adapter(adapter_ref, self.cfg.rollout.sync_timeout_s)
        else:
            seconds = self.weight_sync(only_changed=not full)["time/sync"]
        self.rollout_version = self.policy_version
        return seconds

    @functools.cached_property
    def weight_sync(self) -> WeightSync:
        """Streams the learner's weights into the workers in buckets (`rollout/weight_sync.py`), with a timeout."""
        r = self.cfg.rollout
        sender = getattr(self.learner, "weight_sender", self.learner)  # a LearnerGroup: rank 0, or all ranks if sharded
        return WeightSync(sender, self.pool.workers, r.sync_transport, r.sync_bucket_mb, r.sync_timeout_s)

    def evaluate(self, step: int) -> dict[str, float]:
        if not self.eval_rows:
            return {}
        e, r = self.cfg.eval, self.cfg.rollout
        start = time.perf_counter()
        params = eval_params(e.n, e.temperature, e.max_new_tokens or r.max_new_tokens, r.stop, self.cfg.seed + step)
        metrics = {}
        if self.env is not None:  # held-out episodes; the environment's reward says which are correct
            metrics, _ = evaluate_episodes(
                self.env, self.pool, self.eval_rows, params, self.scorer, self.cfg.eval.accuracy_reward
            )
        elif self.accuracy_name is not None:
            results = self.pool.generate(self.format(self.eval_rows), params)
            metrics, _ = score_eval(
                self.eval_rows, results, self.scorer, self.accuracy_name, self.cfg.algorithm.on_reward_error
            )
        if self.teacher is not None:  # sampled at the training temperature: a reverse-KL estimate needs samples
            sampled = self.pool.generate(self.format(self.eval_rows), replace(self._sampling(step), n=1))
            samples = to_samples(self.eval_rows, sampled)
            pad_id = self.format.tokenizer.pad_token_id
            metrics["eval/reverse_kl"] = heldout_reverse_kl(samples, pad_id, self.learner, self.teacher)
        metrics["time/eval"] = time.perf_counter() - start
        return metrics

    def collect(self, step: int) -> StepRollout:
        """Generate and score this step's groups; with dynamic sampling, keep only groups whose rewards differ and
        generate more prompts until `prompts_per_step` are kept or `max_refill_rounds` extra rounds are spent."""
        algo, G = self.cfg.algorithm, self.cfg.algorithm.samples_per_prompt
        rounds = 1 + (algo.max_refill_rounds if algo.dynamic_sampling else 0)
        rows, samples, totals, generated, scored, first_index = [], [], [], [], [], None
        seconds = {"generate": 0.0, "reward": 0.0}
        num_generated = zero_variance = 0
        for round_ in range(rounds):
            indices = self._prompt_indices(step, round_)
            first_index = indices[0] if first_index is None else first_index
            round_rows = [self.train_rows[i] for i in indices]
            t0 = time.perf_counter()
            if self.env is not None:  # the environment's rewards come with the episodes, `rewards:` score them after
                params = self._sampling(step, round_)
                episodes = self.env.play(self.pool, round_rows, params, where=f"step {step}")
                t1 = time.perf_counter()
                round_samples = self.env.samples(round_rows, episodes)
                scores = self.env.score(round_samples, episodes, self.scorer, G)
            else:
                results = self.pool.generate(self.format(round_rows), self._sampling(step, round_))
                t1 = time.perf_counter()
                round_samples = to_samples(round_rows, results)
                scores = self.score_samples(round_samples)
            seconds["generate"] += t1 - t0
            seconds["reward"] += time.perf_counter() - t1
            scored.append(scores)
            generated += round_samples
            rewards_BG = torch.tensor(scores.total, dtype=torch.float32).view(len(round_rows), G)
            informative_B = informative_groups(rewards_BG)
            num_generated += len(round_rows)
            zero_variance += int((~informative_B).sum())
            for g, row in enumerate(round_rows):
                if (algo.dynamic_sampling and not informative_B[g]) or len(rows) == algo.prompts_per_step:
                    continue
                group = round_samples[g * G : (g + 1) * G]
                samples += [replace(sample, group_id=len(rows)) for sample in group]
                totals += scores.total[g * G : (g + 1) * G]
                rows.append(row)
            if len(rows) == algo.prompts_per_step:
                break
        metrics = {
            "zero_variance_groups": zero_variance / num_generated,
            "time/generate": seconds["generate"],
            "time/reward": seconds["reward"],
        }
        if algo.dynamic_sampling:
            metrics.update(
                {
                    "dynamic_sampling/extra_rounds": float(len(scored) - 1),
                    "dynamic_sampling/generated_groups": float(num_generated),
                    "dynamic_sampling/kept_groups": float(len(rows)),
                }
            )
        return StepRollout(rows, samples, totals, generated, concat_scores(scored), first_index, metrics)

    def policy_batch(self, rollout: StepRollout) -> tuple[TrainBatch, dict[str, float]]:
        """The learner's batch for a policy-gradient algorithm: advantages (with the KL in the reward if so set)."""
        algo, G = self.cfg.algorithm, self.cfg.algorithm.samples_per_prompt
        placeholder = [0.0 if t == t else math.nan for t in rollout.totals]  # NaN masks a skipped sample
        batch = collate(rollout.samples, placeholder, self.format.tokenizer.pad_token_id, self.completion_budget)
        rewards_BG = torch.tensor(rollout.totals, dtype=torch.float32).view(len(rollout.rows), G)
        kl_BC, metrics = None, {}
        if algo.kl_in == "reward" and algo.kl_coef > 0:
            # lp_old and lp_ref before the first update, once per rollout batch; the learner reuses them
            old_BC, ref_BC = ray.get(self.learner.logprobs.remote(batch))
            batch = replace(batch, old_logprobs_BC=old_BC, ref_logprobs_BC=ref_BC)
            kl_BC = torch.where(batch.loss_mask_BC.bool(), kl_estimate(algo.kl_estimator, old_BC, ref_BC), 0.0)
            penalty_B = algo.kl_coef * kl_BC.sum(-1)
            trained_B = batch.loss_mask_BC.sum(-1) > 0
            metrics["kl/reward_penalty"] = float(penalty_B[trained_B].mean()) if trained_B.any() else 0.0
        adv = online_advantages(algo.name, rewards_BG, batch.loss_mask_BC, kl_BC, algo.kl_coef, algo.advantage_std)
        if adv.sequence_B is not None:
            batch = replace(batch, advantages_B=torch.where(batch.loss_mask_BC.sum(-1) > 0, adv.sequence_B, 0.0))
        else:
            batch = replace(batch, token_advantages_BC=adv.token_BC)
        return batch, metrics

    def rft_batch(self, rollout: StepRollout) -> tuple[TrainBatch | None, dict[str, float]]:
        """Online RFT: the kept completions (best / verified per prompt) as an SFT batch; None if none is kept."""
        algo, G = self.cfg.algorithm, self.cfg.algorithm.samples_per_prompt
        rewards_BG = torch.tensor(rollout.totals, dtype=torch.float32).view(len(rollout.rows), G)
        keep_BG = rft_keep_mask(rewards_BG, algo.rft_keep, algo.rft_min_reward)
        kept = [
            s for s, k in zip(rollout.samples, keep_BG.flatten().tolist(), strict=True) if k and s.completion_token_ids
        ]
        metrics = {
            "rft/kept_samples": float(len(kept)),
            "rft/kept_fraction": len(kept) / len(rollout.samples),
            "rft/prompts_with_kept": float(keep_BG.any(-1).sum()),
        }
        if not kept:
            return None, metrics
        return collate(kept, [1.0] * len(kept), self.format.tokenizer.pad_token_id, self.completion_budget), metrics

    def _versioned_collect(self, step: int) -> tuple[StepRollout, float]:
        """`collect(step)` with the version of the weights it sampled from recorded; (rollout, wall seconds)."""
        start, version = time.perf_counter(), self.rollout_version
        rollout = self.collect(step)
        rollout.metrics["rollout/policy_version"] = float(version)
        return rollout, time.perf_counter() - start

    def _take_rollout(self, step: int) -> StepRollout:
        """This step's rollout: generated now, or in async mode while the previous step trained. Async mode then starts
        generating step + 1's with the current weights, so training step `step` overlaps it (one step off-policy)."""
        pending, self._next = self._next, None
        rollout = pending.result()[0] if pending is not None else self._versioned_collect(step)[0]
        if self.cfg.rollout.async_mode and step < self.cfg.train.steps:
            self._executor = getattr(self, "_executor", None) or ThreadPoolExecutor(1, thread_name_prefix="rollout")
            self._next = self._executor.submit(self._versioned_collect, step + 1)
        return rollout

    def _finish_next_rollout(self) -> dict[str, float]:
        """Async mode: wait for the next step's rollout before the weights change; the generation time it hid."""
        if self._next is None:
            return {}
        start = time.perf_counter()
        _, seconds = self._next.result()
        waited = time.perf_counter() - start
        return {"time/overlap": max(seconds - waited, 0.0), "time/wait_rollout": waited}

    def _sleep_engines(self) -> float:
        """`rollout.sleep_level`: once the step's generation is done, the engines free their GPU memory for the
        learner (the config refuses it in async mode, where generation overlaps training); wall seconds."""
        r = self.cfg.rollout
        return self.pool.sleep(r.sleep_level, r.sync_timeout_s) if r.sleep_level else 0.0

    def _wake_engines(self, tags: list[str] | None = None) -> float:
        """Wake what `_sleep_engines` freed: `tags` "weights" (before a sync) and "kv_cache" (after), None both."""
        r = self.cfg.rollout
        return self.pool.wake_up(tags, r.sync_timeout_s) if r.sleep_level else 0.0

    def train_step(self, step: int) -> tuple[dict[str, float], list[Sample], list[float]]:
        """One step (1-based `step`): generate, score, learn, sync; returns metrics, the samples and their rewards."""
        rollout = self._take_rollout(step)
        sleep_s = self._sleep_engines()  # rollout.sleep_level: the learner has the GPU to itself until the sync
        staleness = self.policy_version - rollout.metrics["rollout/policy_version"]
        t2 = time.perf_counter()
        if self.spec.learner_loss == "sft":  # online RFT: an SFT step on the kept samples
            batch, batch_metrics = self.rft_batch(rollout)
        elif self.teacher is not None:
            pad_id = self.format.tokenizer.pad_token_id
            batch, batch_metrics = opd_batch(self.cfg, rollout.samples, rollout.totals, pad_id, self.teacher)
        elif self.critic is not None:
            pad_id = self.format.tokenizer.pad_token_id
            batch, batch_metrics = ppo_batch(
                self.cfg, rollout.samples, rollout.totals, pad_id, self.learner, self.critic
            )
        elif rollout.rows:
            batch, batch_metrics = self.policy_batch(rollout)
        else:
            batch, batch_metrics = None, {}
        self._say_if_no_signal(step, rollout, batch)
        if batch is not None:
            critic_ref = self.critic.train_step.remote(batch) if self.critic is not None else None  # side by side
            train_metrics = ray.get(self.learner.train_step.remote(batch))
            train_metrics.update(ray.get(critic_ref) if critic_ref is not None else {})
            t3 = time.perf_counter()
            self.policy_version += 1
            overlap = self._finish_next_rollout()
            wake_s = self._wake_engines(["weights"])  # the weights first: the sync writes into them
            sync_s = self._sync_weights()
            wake_s += self._wake_engines(["kv_cache"])
        else:  # nothing to learn from (no group kept): no update, weights unchanged
            train_metrics, t3, sync_s = {"loss": math.nan, "kl": math.nan, "updates": 0.0}, time.perf_counter(), 0.0
            overlap = self._finish_next_rollout()
            wake_s = self._wake_engines()
        samples = rollout.generated
        lengths = [len(s.completion_token_ids) for s in samples]
        metrics = {
            **train_metrics,
            **batch_metrics,
            **rollout.metrics,
            **(reward_metrics(rollout.scores) if self.specs or self.env else {}),
            **episode_metrics(samples),
            "skipped_samples": len(rollout.scores.skipped),
            "response_length/mean": sum(lengths) / len(lengths),
            "response_length/max": max(lengths),
            "truncated_fraction": sum(s.finish_reason == "length" for s in samples) / len(samples),
            "data/first_index": rollout.first_index,
            "time/train": t3 - t2,
            "time/sync": sync_s,
            **overlap,
            **({"time/sleep": sleep_s, "time/wake": wake_s} if self.cfg.rollout.sleep_level else {}),
            "async/staleness": staleness,
            "tokens_per_second/generate": sum(lengths) / max(rollout.metrics["time/generate"], 1e-9),
        }
        return metrics, samples, rollout.scores.total

    def _say_if_no_signal(self, step: int, rollout: StepRollout, batch: TrainBatch | None) -> None:
        """Once per streak of such steps, in the terminal: every group scored alike, so no advantage is nonzero (the
        rewards teach nothing; e.g. a task too hard or too easy for the model, or a reward that is constant)."""
        flat = rollout.metrics["zero_variance_groups"] == 1.0 and (batch is None or not batch.advantages.any())
        if flat and not self._no_signal:
            tqdm.write(
                f"step {step}: every group has zero reward variance (all samples of each prompt scored alike): no "
                "learning signal from the rewards",
                file=sys.stderr,
            )
        self._no_signal = flat

    def _checkpoint(self, step: int) -> None:
        staging = checkpoint_staging(self.run_dir, step)
        ray.get(self.learner.save_checkpoint.remote(str(staging)))
        if self.critic is not None:
            ray.get(self.critic.save_checkpoint.remote(str(staging)))
        state = {"step": step, "data_position": step * self.cfg.algorithm.prompts_per_step, "seed": self.cfg.seed}
        commit_checkpoint(self.run_dir, staging, step, state, self.cfg.checkpoint.keep_last)

    def run(self) -> Path:
        with failure_marker(self.run_dir, lambda: self.step):
            return self._run()

    def _run(self) -> Path:
        cfg = self.cfg
        total = cfg.train.steps
        if self.start_step == 0 and self.eval_rows:
            before = self.evaluate(0)
            self.logger.log(0, before)
            labels = {"eval/accuracy": "accuracy", "eval/reverse_kl": "reverse KL to the teacher"}
            shown = ", ".join(f"{label} {before[key]:.3f}" for key, label in labels.items() if key in before)
            print(f"eval before training: {shown}", file=sys.stderr)
        bar = tqdm(
            total=total,
            initial=self.start_step,
            desc=cfg.algorithm.name,
            disable=not cfg.logging.progress,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        for step in range(self.start_step + 1, total + 1):
            t0, self.step = time.perf_counter(), step
            metrics, samples, totals = self.train_step(step)
            every = cfg.eval.every_steps
            if self.eval_rows and (step == total or (every and step % every == 0)):
                metrics.update(self.evaluate(step))
            metrics["time/step"] = time.perf_counter() - t0
            self.logger.log(step, metrics)
            self.logger.log_samples(
                step,
                [
                    {"prompt": s.prompt, "completion": s.completion, "reward": r, **(s.episode or {})}
                    for s, r in zip(samples[: cfg.logging.samples_per_step], totals, strict=False)
                ],
            )
            if step % cfg.checkpoint.every_steps == 0 or step == total:
                self._checkpoint(step)
            postfix = {"reward": f"{metrics.get('reward/mean', math.nan):.3f}", "s/step": f"{metrics['time/step']:.1f}"}
            if "eval/accuracy" in metrics:
                postfix["eval_acc"] = f"{metrics['eval/accuracy']:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)
        bar.close()
        return self.finish()

    def finish(self) -> Path:
        if getattr(self, "_executor", None) is not None:
            self._executor.shutdown(wait=True)
        ray.get(self.learner.save_final.remote(str(self.run_dir / "final")))
        self.scorer.close()
        self.logger.close()
        rows = read_metrics(self.run_dir)
        plot_curves(rows, self.run_dir / "curves.png", OPD_CURVES if self.teacher is not None else CURVES)
        print(summary_table(rows))
        print(f"run folder: {self.run_dir}")
        return self.run_dir


GRPOTrainer = OnlineTrainer
"""the name this trainer had when GRPO was its only algorithm"""


def run_online(cfg: RecipeConfig) -> Path:
    """Train an online recipe (an algorithm of family `online`) end to end; returns the run folder."""
    return OnlineTrainer(cfg).run()


run_grpo = run_online

"""Evaluation: generate on held-out prompts, score with the reward functions (or run held-out episodes of the recipe's
environment), report accuracy and pass@k."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from posttrain.config import RecipeConfig
from posttrain.online import components
from posttrain.online.env_rollout import REWARD_NAME, EnvRollout, episode_metrics
from posttrain.rewards.combine import trl_completion
from posttrain.rewards.workers import LocalScorer, Scorer
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.types import PromptResult, SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2107.03374, eq. 1)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def eval_metrics(correct: list[bool], n: int, per_function: dict[str, list[float | None]]) -> dict[str, float]:
    """`eval/accuracy` (the mean of `correct`, = pass@1), `eval/pass@k` for k = 2, 4, ... n (and n) from the n samples
    of each problem (`correct` is problem-major: problem i's samples are `correct[i*n:(i+1)*n]`), and
    `eval/<name>/mean` of each reward's values (None ones left out)."""
    num_problems = len(correct) // n
    metrics: dict[str, float] = {"eval/accuracy": sum(correct) / max(1, len(correct))}
    for k in [k for k in (2, 4, 8, 16, 32, 64) if k <= n] + ([n] if n > 1 and n & (n - 1) else []):
        per_problem = [pass_at_k(n, sum(correct[i * n : (i + 1) * n]), k) for i in range(num_problems)]
        metrics[f"eval/pass@{k}"] = sum(per_problem) / max(1, num_problems)
    for name, values in per_function.items():
        numbers = [v for v in values if v is not None]
        if numbers:
            metrics[f"eval/{name}/mean"] = sum(numbers) / len(numbers)
    return metrics


def evaluate_episodes(
    env: EnvRollout,
    engine,
    rows: list[dict[str, Any]],
    params: SamplingParams,
    scorer: Scorer | None = None,
    accuracy_reward: str | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out episodes: `params.n` per row on `engine` through the training's episode runner (their transcripts
    scored by the recipe's `rewards:` too, on `scorer`). An episode is correct when the environment's reward (or the
    reward `accuracy_reward` names) is >= 1; besides `eval_metrics`, the `env/*` episode metrics as `eval/env/*`.
    A failed episode counts as not correct (or raises `EpisodeFailed` under `env.on_error: raise`)."""
    samples, scores = env.generate(engine, rows, params, group_size=params.n, scorer=scorer)
    accuracy = scores.per_function[accuracy_reward or REWARD_NAME]
    correct = [value is not None and value >= 1.0 for value in accuracy]  # None: failed, skipped or not applicable
    metrics = eval_metrics(correct, params.n, scores.per_function)
    metrics.update({f"eval/{key}": value for key, value in episode_metrics(samples).items()})
    records = [
        {"prompt": s.prompt, "completion": s.completion, "correct": ok, "reward": t, **s.episode}
        for s, ok, t in zip(samples, correct, scores.total, strict=True)
    ]
    return metrics, records


def score_eval(
    rows: list[dict[str, Any]],
    results: list[PromptResult],
    scorer: Scorer,
    accuracy_name: str,
    on_error: str = "raise",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics (`eval/accuracy`, `eval/pass@k`, `eval/<reward>/mean`) and one record per completion.

    A completion is correct when the accuracy reward gives it >= 1. With n completions per prompt,
    `eval/accuracy` is the mean over all completions (= pass@1) and pass@k is reported for k = 2, 4, ... n.
    """
    prompts, completions, ids, columns = [], [], [], {}
    other_keys = sorted({k for row in rows for k in row if k != "prompt"})
    for row, res in zip(rows, results, strict=True):
        for c in res.completions:
            prompts.append(row["prompt"])
            completions.append(trl_completion(row["prompt"], c.text))
            ids.append(c.token_ids)
            for key in other_keys:
                columns.setdefault(key, []).append(row.get(key))
    scores = scorer.score(
        prompts,
        completions,
        columns,
        completion_ids=ids,
        on_error=on_error,
        group_size=len(results[0].completions) if results else 1,
    )
    n = len(results[0].completions) if results else 1
    correct = [v is not None and v >= 1.0 for v in scores.per_function[accuracy_name]]
    metrics = eval_metrics(correct, n, scores.per_function)
    records = [
        {"prompt": p, "completion": c.text, "correct": ok, "reward": t}
        for p, c, ok, t in zip(
            prompts, [c for res in results for c in res.completions], correct, scores.total, strict=True
        )
    ]
    return metrics, records


def eval_params(n: int, temperature: float, max_new_tokens: int, stop: list[str], seed: int) -> SamplingParams:
    """Sampling parameters of an evaluation (temperature 0 = greedy)."""
    return SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens, stop=tuple(stop), seed=seed)


def evaluate_recipe(cfg: RecipeConfig) -> dict:
    """Evaluate `cfg.model` on `cfg.eval.data` in this process (no Ray needed) with the recipe's rewards (or its
    environment's episodes): what
    `posttrain eval` prints and the distill pipeline records before and after the student's SFT."""
    specs = components.load_reward_specs(cfg)
    _, rows = components.load_data(cfg)
    components.check_reward_columns(specs, [], rows)
    model_path = components.model_path_of(cfg)
    fmt = components.PromptFormatter(cfg, model_path)
    engine = HFEngine(
        model_path,
        dtype=cfg.model.dtype,
        max_batch_size=cfg.rollout.max_batch_size,
        num_threads=cfg.rollout.num_threads or os.cpu_count(),
    )
    e, r = cfg.eval, cfg.rollout
    params = eval_params(e.n, e.temperature, e.max_new_tokens or r.max_new_tokens, r.stop, cfg.seed)
    start = time.perf_counter()
    if cfg.env.path is not None:  # held-out episodes of the recipe's environment
        env = EnvRollout(cfg, fmt.tokenizer)
        metrics, records = evaluate_episodes(env, engine, rows, params, LocalScorer(specs), e.accuracy_reward)
    else:
        results = engine.generate(fmt(rows), params)
        metrics, records = score_eval(
            rows, results, LocalScorer(specs), components.accuracy_reward_name(cfg), cfg.algorithm.on_reward_error
        )
    metrics["time/eval"] = time.perf_counter() - start
    return {
        "model": cfg.model.path,
        "num_prompts": len(rows),
        "n": e.n,
        "temperature": e.temperature,
        "metrics": metrics,
        "samples": records,
    }

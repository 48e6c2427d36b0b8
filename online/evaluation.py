"""Evaluation: generate on held-out prompts, score with the reward functions, report accuracy and pass@k."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from posttrain.config import RecipeConfig
from posttrain.models.loading import set_matmul_precision
from posttrain.online import components
from posttrain.rewards.combine import trl_completion
from posttrain.rewards.workers import LocalScorer, Scorer
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.types import PromptResult, SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2107.03374, eq. 1)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


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
    acc_values = scores.per_function[accuracy_name]
    correct = [v is not None and v >= 1.0 for v in acc_values]
    n = len(results[0].completions) if results else 1
    metrics: dict[str, float] = {"eval/accuracy": sum(correct) / max(1, len(correct))}
    for k in [k for k in (2, 4, 8, 16, 32, 64) if k <= n] + ([n] if n > 1 and n & (n - 1) else []):
        per_prompt = [pass_at_k(n, sum(correct[i * n : (i + 1) * n]), k) for i in range(len(results))]
        metrics[f"eval/pass@{k}"] = sum(per_prompt) / len(per_prompt)
    for name, values in scores.per_function.items():
        numbers = [v for v in values if v is not None]
        if numbers:
            metrics[f"eval/{name}/mean"] = sum(numbers) / len(numbers)
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
    """Evaluate `cfg.model` on `cfg.eval.data` in this process (no Ray needed) with the recipe's rewards: what
    `posttrain eval` prints and the distill pipeline records before and after the student's SFT."""
    specs = components.load_reward_specs(cfg)
    _, rows = components.load_data(cfg)
    components.check_reward_columns(specs, [], rows)
    model_path = components.model_path_of(cfg)
    fmt = components.PromptFormatter(cfg, model_path)
    set_matmul_precision(cfg.model.matmul_precision, "model.matmul_precision")  # the engine runs in this process
    engine = HFEngine(
        model_path,
        dtype=cfg.model.dtype,
        max_batch_size=cfg.rollout.max_batch_size,
        num_threads=cfg.rollout.num_threads or os.cpu_count(),
    )
    e, r = cfg.eval, cfg.rollout
    params = eval_params(e.n, e.temperature, e.max_new_tokens or r.max_new_tokens, r.stop, cfg.seed)
    start = time.perf_counter()
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

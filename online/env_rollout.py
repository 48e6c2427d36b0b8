"""The online trainer's side of environments (`env:` in a recipe): episodes on the rollout pool, turned into samples
and reward scores shaped like single-turn ones, so grouping, advantages, dynamic sampling and logging stay as they
are. The episode runner itself is `posttrain.envs.episodes` (engine-agnostic, no Ray).

The environment runs in the driver process (its `reset`/`step` in threads, under `env.step_timeout`); each turn of
all live episodes is one `RolloutPool.generate` call, split over the rollout workers.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from posttrain.config import RecipeConfig
from posttrain.data.types import Sample
from posttrain.envs.episodes import EpisodeLimits, EpisodeResult, run_episodes
from posttrain.envs.loading import load_environment
from posttrain.envs.template import decode
from posttrain.rewards.combine import RewardScores
from posttrain.rollout.types import SamplingParams

REWARD_NAME = "env"
"""the environment's reward in the logs (`reward/env/mean`)"""


class EpisodeFailed(RuntimeError):
    """An episode failed and the recipe says `env.on_error: raise`."""


class EnvRollout:
    """Loads `env.path` once (a bad path or `args` fails before any model is loaded) and runs a step's episodes."""

    def __init__(self, cfg: RecipeConfig, tokenizer):
        env = cfg.env
        self.make_env = load_environment(env.path, env.args)
        self.tokenizer = tokenizer
        self.limits = EpisodeLimits(env.max_turns, env.max_episode_tokens, env.step_timeout)
        self.on_error = env.on_error
        self.group_size = cfg.algorithm.samples_per_prompt

    def generate(
        self,
        engine,
        rows: list[dict[str, Any]],
        params: SamplingParams,
        group_size: int | None = None,
        where: str = "this step",
    ) -> tuple[list[Sample], RewardScores]:
        """`group_size` (default `algorithm.samples_per_prompt`; evaluation: `eval.n`) episodes per row on `engine`
        (the rollout pool): their samples, row-major (the episodes of row g have group_id g) and their scores (a
        failed episode is a skipped sample, or `EpisodeFailed` naming the rows as those of `where`: in async mode a
        step's episodes run while the previous step trains, so "this step" would name the wrong one)."""
        group_size = group_size or self.group_size
        episodes = run_episodes(engine, self.tokenizer, self.make_env, rows, group_size, params, self.limits)
        failed = [(i, e) for i, e in enumerate(episodes) if e.error is not None]
        if failed and self.on_error == "raise":
            i, episode = failed[0]
            raise EpisodeFailed(
                f"episode {i} (data row {episode.row_index} of {where}) failed: {episode.error} "
                f"({len(failed)} of {len(episodes)} episodes failed; env.on_error=skip would skip them)"
            )
        samples = [self._sample(rows[e.row_index], e) for e in episodes]
        rewards = [e.reward for e in episodes]
        scores = RewardScores(
            total=[math.nan if r is None else r for r in rewards],
            per_function={REWARD_NAME: rewards},
            skipped=[i for i, _ in failed],
            errors=[f"episode {i}: {e.error}" for i, e in failed],
            failed={REWARD_NAME: len(failed)} if failed else {},
        )
        return samples, scores

    def _sample(self, row: dict[str, Any], episode: EpisodeResult) -> Sample:
        """The episode as a `Sample`: the prompt's ids, then every later token (loss only on the model's)."""
        prompt = row.get("prompt")
        return Sample(
            prompt=prompt if isinstance(prompt, str) else decode(self.tokenizer, episode.prompt_token_ids),
            prompt_token_ids=episode.prompt_token_ids,
            completion=decode(self.tokenizer, episode.token_ids),
            completion_token_ids=episode.token_ids,
            sampler_logprobs=episode.logprobs,
            finish_reason=episode.finish,
            group_id=episode.row_index,
            columns={k: v for k, v in row.items() if k != "prompt"},
            completion_mask=episode.loss_mask,
            episode={
                "turns": episode.turns,
                "finish": episode.finish,
                "error": episode.error,
                "step_rewards": episode.step_rewards,
            },
        )


def episode_metrics(samples: list[Sample]) -> dict[str, float]:
    """`env/*` metrics of a step's episodes: failed ones (and per error kind), turns, finish reasons, and the model's
    and the environment's token counts."""
    episodes = [s.episode for s in samples if s.episode is not None]
    if not episodes:
        return {}
    n = len(episodes)
    kinds = Counter(e["error"].split(":", 1)[0] for e in episodes if e["error"] is not None)
    finishes = Counter(e["finish"] for e in episodes)
    model_tokens = [sum(s.completion_mask) for s in samples if s.completion_mask is not None]
    env_tokens = [len(s.completion_mask) - sum(s.completion_mask) for s in samples if s.completion_mask is not None]
    metrics = {
        "env/failed_episodes": float(sum(kinds.values())),
        "env/turns/mean": sum(e["turns"] for e in episodes) / n,
        "env/model_tokens/mean": sum(model_tokens) / n,
        "env/env_tokens/mean": sum(env_tokens) / n,
    }
    metrics.update({f"env/finish/{name}": count / n for name, count in sorted(finishes.items())})
    metrics.update({f"env/errors/{kind}": float(count) for kind, count in sorted(kinds.items())})
    return metrics

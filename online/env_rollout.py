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
from posttrain.data.types import Sample, columns_of
from posttrain.envs.base import Message
from posttrain.envs.episodes import EpisodeLimits, EpisodeResult, run_episodes
from posttrain.envs.loading import load_environment
from posttrain.envs.template import decode
from posttrain.rewards.combine import RewardScores
from posttrain.rewards.workers import Scorer
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
        self.has_rewards = bool(cfg.rewards)  # `rewards:` also score each episode's transcript
        self.on_reward_error = cfg.algorithm.on_reward_error

    def generate(
        self,
        engine,
        rows: list[dict[str, Any]],
        params: SamplingParams,
        group_size: int | None = None,
        scorer: Scorer | None = None,
        where: str = "this step",
    ) -> tuple[list[Sample], RewardScores]:
        """`play`, then `samples` and `score`: the episodes' samples, row-major, and their scores."""
        episodes = self.play(engine, rows, params, group_size, where)
        samples = self.samples(rows, episodes)
        return samples, self.score(samples, episodes, scorer, group_size or self.group_size)

    def play(
        self,
        engine,
        rows: list[dict[str, Any]],
        params: SamplingParams,
        group_size: int | None = None,
        where: str = "this step",
    ) -> list[EpisodeResult]:
        """`group_size` (default `algorithm.samples_per_prompt`; evaluation: `eval.n`) episodes per row on `engine`
        (the rollout pool), row-major (the episodes of row g have group_id g); a failed episode keeps its error, or
        with `env.on_error: raise` the first one raises `EpisodeFailed` naming the rows as those of `where` (in async
        mode a step's episodes run while the previous step trains, so "this step" would name the wrong one)."""
        episodes = run_episodes(
            engine, self.tokenizer, self.make_env, rows, group_size or self.group_size, params, self.limits
        )
        failed = [(i, e) for i, e in enumerate(episodes) if e.error is not None]
        if failed and self.on_error == "raise":
            i, episode = failed[0]
            raise EpisodeFailed(
                f"episode {i} (data row {episode.row_index} of {where}) failed: {episode.error} "
                f"({len(failed)} of {len(episodes)} episodes failed; env.on_error=skip would skip them)"
            )
        return episodes

    def samples(self, rows: list[dict[str, Any]], episodes: list[EpisodeResult]) -> list[Sample]:
        return [self._sample(rows[e.row_index], e) for e in episodes]

    def score(
        self, samples: list[Sample], episodes: list[EpisodeResult], scorer: Scorer | None = None, group_size: int = 1
    ) -> RewardScores:
        """The episodes' scores: the environment's reward (`env`), plus, when the recipe has `rewards:`, their weighted
        scores of each transcript that did not fail (`scorer`: the run's; see `score_transcripts`). A failed episode
        is a skipped sample and gets no reward call."""
        failed = [i for i, e in enumerate(episodes) if e.error is not None]
        rewards = [e.reward for e in episodes]
        env_scores = RewardScores(
            total=[math.nan if r is None else r for r in rewards],
            per_function={REWARD_NAME: rewards},
            skipped=failed,
            errors=[f"episode {i}: {episodes[i].error}" for i in failed],
            failed={REWARD_NAME: len(failed)} if failed else {},
        )
        played = [i for i, e in enumerate(episodes) if e.error is None]
        if not self.has_rewards or not played:
            return env_scores
        if scorer is None:
            raise ValueError("EnvRollout.score: the recipe has `rewards:`, so it needs the run's scorer")
        # whole groups on one scoring worker only while no episode is missing from them
        group = group_size if not failed else 1
        scores = score_transcripts(
            scorer, [samples[i] for i in played], [episodes[i] for i in played], self.on_reward_error, group
        )
        return add_transcript_scores(env_scores, scores, played)

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


def transcript(episode: EpisodeResult) -> tuple[list[Message], list[Message]]:
    """An episode as the `rewards:` functions see it, in TRL's conversational form: the prompt is `reset`'s messages,
    the completion every message after them (the model's `assistant` turns and the environment's replies, the last
    reply included)."""
    return episode.messages[: episode.prompt_messages], episode.messages[episode.prompt_messages :]


def score_transcripts(
    scorer: Scorer, samples: list[Sample], episodes: list[EpisodeResult], on_error: str, group_size: int = 1
) -> RewardScores:
    """The `rewards:` functions on the episodes' transcripts, through the run's scorer (its workers, timeouts and
    named failures): `prompts` and `completions` as `transcript` says, `completion_ids` every token id after the
    prompt (the model's and the environment's), and the dataset row's columns as for completions."""
    prompts, completions = zip(*(transcript(e) for e in episodes), strict=True)
    return scorer.score(
        list(prompts),
        list(completions),
        columns_of(samples),
        completion_ids=[s.completion_token_ids for s in samples],
        on_error=on_error,
        group_size=group_size,
    )


def add_transcript_scores(env: RewardScores, rewards: RewardScores, scored: list[int]) -> RewardScores:
    """`env` (the environment's scores of every episode) plus `rewards` (the reward functions' scores of the episodes
    `scored`, in that order): each total is the environment's reward plus the weighted rewards; an episode skipped
    by either is skipped (NaN, its error kept, one per episode) and its per-function values are None."""
    total = list(env.total)
    per_function = {name: list(values) for name, values in env.per_function.items()}
    per_function.update({name: [None] * len(total) for name in rewards.per_function})
    errors = dict(zip(env.skipped, env.errors, strict=True))
    for k, i in enumerate(scored):
        total[i] += rewards.total[k]  # NaN when a function failed on it
        for name, values in rewards.per_function.items():
            per_function[name][i] = values[k]
    for k, message in zip(rewards.skipped, rewards.errors, strict=True):
        errors.setdefault(scored[k], f"episode {scored[k]}: {message}")
    for i in errors:
        total[i] = math.nan
        for values in per_function.values():
            values[i] = None
    failed = {**env.failed}
    for name, count in rewards.failed.items():
        failed[name] = failed.get(name, 0) + count
    skipped = sorted(errors)
    return RewardScores(total, per_function, skipped, [errors[i] for i in skipped], failed)

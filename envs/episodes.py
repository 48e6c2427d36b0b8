"""Run multi-turn episodes against any `InferenceEngine`-like object: one engine call per turn for every live episode.

For each of `rows` x `group_size` episodes: `reset(row)` gives the opening messages, rendered with the chat template
and tokenized once (the prompt). Then, turn after turn, every live episode's token ids so far go to ONE `generate`
call (n=1 per episode; `group_size` copies of a row are separate prompts), the model's ids and log-probs are appended
exactly as sampled, `step` runs for all of them concurrently under `step_timeout`, and the ids of the template's
text for the environment's reply (`template.turn_suffix`) are appended with loss mask 0 and log-prob 0.

Engine-agnostic and Ray-free: `engine.generate(prompts: list[list[int]], params) -> list[PromptResult]` is all it
uses (an `HFEngine`, a `VLLMEngine`, a `RolloutWorker`'s or a `RolloutPool`'s `generate`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from posttrain.envs.base import EpisodeError, Message, StepResult, call_all, check_messages, check_step_result
from posttrain.envs.template import decode, encode, render, turn_suffix
from posttrain.rollout.types import Completion, SamplingParams


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 4
    """model turns per episode"""
    max_episode_tokens: int = 1024
    """tokens after the prompt (the model's and the environment's together); a model turn is cut to fit"""
    step_timeout: float = 30.0
    """seconds `reset` / `step` may take (all episodes of a turn run concurrently; one deadline for the turn)"""

    def __post_init__(self):
        if self.max_turns < 1 or self.max_episode_tokens < 1 or not self.step_timeout > 0:
            raise ValueError(f"EpisodeLimits: max_turns, max_episode_tokens and step_timeout must be > 0: {self}")


@dataclass
class EpisodeResult:
    """One finished episode. `token_ids`, `loss_mask` and `logprobs` are aligned, after `prompt_token_ids`."""

    row_index: int
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    """1 on the model's own tokens, 0 on the environment's (template text, tool output, feedback)"""
    logprobs: list[float] = field(default_factory=list)
    """the engine's log-prob of each model token; 0.0 on the environment's tokens"""
    messages: list[Message] = field(default_factory=list)
    """the conversation, the model's turns as `assistant` messages"""
    prompt_messages: int = 0
    """how many of `messages` are `reset`'s (the prompt); the rest are the model's and the environment's turns"""
    step_rewards: list[float] = field(default_factory=list)
    """the rewards `step` returned (None ones left out)"""
    turns: int = 0
    """model turns taken"""
    finish: str = "running"
    """`done` (the environment ended it), `max_turns`, `length` (the token budget ran out on a model turn) or
    `error`"""
    error: str | None = None
    """`"<kind>: <message>"` (`base.ERROR_KINDS`) when the episode failed"""
    end_text: str = field(default="", repr=False)
    """the text of the end-of-turn token the last model turn stopped on ("" if none)"""

    @property
    def reward(self) -> float | None:
        """The sum of the step rewards (0.0 if the environment gave none); None for a failed episode."""
        return None if self.error is not None else sum(self.step_rewards)

    @property
    def live(self) -> bool:
        return self.finish == "running"

    def fail(self, error: EpisodeError) -> None:
        self.finish, self.error = "error", str(error)


def run_episodes(
    engine,
    tokenizer,
    make_env: Callable[[], Any],
    rows: list[dict[str, Any]],
    group_size: int,
    params: SamplingParams,
    limits: EpisodeLimits,
) -> list[EpisodeResult]:
    """`group_size` episodes per row (row-major: row 0's episodes first); see the module docstring.

    Args:
        engine: has `generate(prompts, params)` as `InferenceEngine`.
        tokenizer: the engine's tokenizer, with a chat template.
        make_env: returns a fresh environment (`reset`, `step`) for each episode.
        params: sampling settings; `n` is ignored (one sample per episode per turn), `max_new_tokens` caps each turn,
            and the seed of turn t > 0 is derived from `params.seed` so turns do not repeat each other's draws.
    """
    episodes = [EpisodeResult(row_index=i) for i, _ in enumerate(rows) for _ in range(group_size)]
    envs = [make_env() for _ in episodes]
    name = type(envs[0]).__name__ if envs else "env"
    resets = [
        functools.partial(env.reset, rows[episode.row_index]) for env, episode in zip(envs, episodes, strict=True)
    ]
    for episode, opening in zip(episodes, call_all(resets, limits.step_timeout, f"{name}.reset"), strict=True):
        try:
            episode.messages = check_messages(_raise_error(opening), f"{name}.reset", allow_empty=False)
            episode.prompt_messages = len(episode.messages)
            episode.prompt_token_ids = encode(tokenizer, _render(tokenizer, episode.messages, f"{name}.reset"))
        except EpisodeError as error:
            episode.fail(error)
    for turn in range(limits.max_turns):
        live = [i for i, episode in enumerate(episodes) if episode.live]
        if not live:
            break
        completions = _generate(engine, [episodes[i] for i in live], params, turn, limits)
        for i, completion in zip(live, completions, strict=True):
            _add_model_turn(tokenizer, episodes[i], completion, limits)
        stepped = [i for i in live if episodes[i].live or episodes[i].finish == "length"]
        steps = [functools.partial(envs[i].step, list(episodes[i].messages)) for i in stepped]
        for i, result in zip(stepped, call_all(steps, limits.step_timeout, f"{name}.step"), strict=True):
            try:
                result = check_step_result(_raise_error(result), f"{name}.step")
                _add_env_turn(tokenizer, episodes[i], result, limits, f"{name}.step")
            except EpisodeError as error:
                episodes[i].fail(error)
    for episode in episodes:
        if episode.live:
            episode.finish = "max_turns"
    return episodes


def _raise_error(outcome: Any) -> Any:
    if isinstance(outcome, EpisodeError):
        raise outcome
    return outcome


def _render(tokenizer, messages: list[Message], where: str) -> str:
    """`template.render`; a template that refuses the messages (e.g. an unknown role) fails the episode."""
    try:
        return render(tokenizer, messages)
    except Exception as error:  # noqa: BLE001 - jinja's errors, and whatever a template raises on purpose
        raise EpisodeError("env_malformed", f"the chat template refused the messages of {where}: {error!r}") from None


def _generate(engine, live: list[EpisodeResult], params: SamplingParams, turn: int, limits: EpisodeLimits):
    """One engine call for every live episode's next turn; at most the largest remaining budget is generated."""
    room = max(limits.max_episode_tokens - len(e.token_ids) for e in live)
    seed = params.seed if params.seed is None or turn == 0 else params.seed * 1_009 + turn
    turn_params = replace(params, n=1, max_new_tokens=min(params.max_new_tokens, room), seed=seed)
    results = engine.generate([e.prompt_token_ids + e.token_ids for e in live], turn_params)
    if len(results) != len(live):
        raise RuntimeError(f"run_episodes: the engine returned {len(results)} results for {len(live)} prompts")
    return [result.completions[0] for result in results]


def _add_model_turn(tokenizer, episode: EpisodeResult, completion: Completion, limits: EpisodeLimits) -> None:
    """Append the model's ids and log-probs as sampled (cut to the budget: a prefix keeps its log-probs valid) and
    its text as an `assistant` message; the end-of-turn token it stopped on stays in the ids, not in the text."""
    room = limits.max_episode_tokens - len(episode.token_ids)
    ids, logprobs = list(completion.token_ids[:room]), list(completion.logprobs[:room])
    ended = completion.finish_reason == "stop" and len(ids) == len(completion.token_ids)
    end_id = ids[-1] if ended and ids and ids[-1] in tokenizer.all_special_ids else None
    text = decode(tokenizer, ids[:-1] if end_id is not None else ids)
    episode.token_ids += ids
    episode.loss_mask += [1] * len(ids)
    episode.logprobs += logprobs
    episode.messages.append({"role": "assistant", "content": text})
    episode.turns += 1
    episode.end_text = decode(tokenizer, [end_id]) if end_id is not None else ""  # for the next suffix
    if len(episode.token_ids) >= limits.max_episode_tokens:
        episode.finish = "length"  # the environment still scores the turn; no further turn fits


def _add_env_turn(tokenizer, episode: EpisodeResult, result: StepResult, limits: EpisodeLimits, where: str) -> None:
    """Record the step's reward and messages; unless the episode ends here, append the template's ids for them."""
    if result.reward is not None:
        episode.step_rewards.append(result.reward)
    before = render(tokenizer, episode.messages[:-1])
    model_text = episode.messages[-1]["content"]
    episode.messages += result.messages
    if result.done:
        episode.finish = "done"
    if not episode.live or episode.turns == limits.max_turns:
        return  # no model turn follows: the environment's text would carry no loss
    suffix = turn_suffix(before, _render(tokenizer, episode.messages, where), model_text, episode.end_text)
    ids = encode(tokenizer, suffix)
    if len(episode.token_ids) + len(ids) >= limits.max_episode_tokens:
        raise EpisodeError(
            "budget_exceeded",
            f"the environment's reply is {len(ids)} tokens; with the {len(episode.token_ids)} so far it leaves no room "
            f"for another model turn within max_episode_tokens={limits.max_episode_tokens}",
        )
    episode.token_ids += ids
    episode.loss_mask += [0] * len(ids)
    episode.logprobs += [0.0] * len(ids)

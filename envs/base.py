"""The environment interface: `reset(row) -> messages`, `step(messages) -> StepResult`, and how a bad answer from an
environment becomes a named episode error.

An environment object lives for one episode: the runner builds one per episode (`make_env()`), calls `reset` with the
dataset row once, then `step` after each model turn with the whole conversation so far (the model's turn last, as an
`assistant` message). What `step` returns is checked here, so an environment that returns the wrong thing ends its
own episode with a message saying what was wrong instead of failing somewhere in the tokenizer.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
"""one chat message: `{"role": ..., "content": ...}`"""

ERROR_KINDS = ("env_raised", "env_timeout", "env_malformed", "budget_exceeded")
"""the named ways an episode fails (the prefix of `EpisodeResult.error` and of the `env/errors/<kind>` metrics):
reset/step raised, did not return within `step_timeout`, returned something that is not a `StepResult` of
messages, or its messages did not fit the episode's token budget"""


@dataclass
class StepResult:
    """What the environment says after a model turn."""

    messages: list[Message] = field(default_factory=list)
    """the environment's new messages (tool output, feedback, the next question); may be empty only when `done`"""
    reward: float | None = None
    """this step's reward, or None; the episode's reward is the sum of the rewards its steps returned (0 if none)"""
    done: bool = False
    """the episode ends here (no further model turn)"""


class Environment:
    """Base class of a multi-turn environment; override `reset` and `step` (docs/environments.md).

    One instance per episode, so an environment may keep the episode's state (the row's answer, a counter) on `self`.
    Constructor keyword arguments come from the recipe's `env.args`.
    """

    def reset(self, row: dict[str, Any]) -> list[Message]:
        """The opening messages of an episode on dataset `row` (e.g. a system prompt and the first user turn)."""
        raise NotImplementedError(f"{type(self).__name__}.reset")

    def step(self, messages: list[Message]) -> StepResult:
        """React to the model's turn, which is `messages[-1]` (role `assistant`); `messages` is the whole episode."""
        raise NotImplementedError(f"{type(self).__name__}.step")


class EpisodeError(Exception):
    """One episode failed in a named way (`kind`, one of `ERROR_KINDS`); `str()` is `"<kind>: <message>"`."""

    def __init__(self, kind: str, message: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"EpisodeError: unknown kind {kind!r}; allowed: {', '.join(ERROR_KINDS)}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def check_messages(value: Any, where: str, allow_empty: bool) -> list[Message]:
    """`value` as a list of `{"role": str, "content": str}` dicts, else `EpisodeError("env_malformed")` naming
    `where` (e.g. `MyEnv.step`) and the first bad item."""
    if not isinstance(value, list | tuple):
        raise EpisodeError("env_malformed", f"{where} returned {type(value).__name__}, not a list of messages")
    if not value and not allow_empty:
        raise EpisodeError("env_malformed", f"{where} returned no messages (allowed only with done=True)")
    for i, message in enumerate(value):
        ok = isinstance(message, dict) and isinstance(message.get("role"), str) and message["role"]
        if not ok or not isinstance(message.get("content"), str):
            raise EpisodeError(
                "env_malformed", f"{where}: message {i} is {message!r}; expected {{'role': str, 'content': str}}"
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def check_step_result(value: Any, where: str) -> StepResult:
    """A `StepResult` (or a `(messages, reward, done)` tuple) with checked messages, a finite number or None as
    reward and a bool `done`; else `EpisodeError("env_malformed")`."""
    if isinstance(value, tuple) and len(value) == 3:
        value = StepResult(*value)
    if not isinstance(value, StepResult):
        raise EpisodeError("env_malformed", f"{where} returned {type(value).__name__}, not a StepResult")
    reward = value.reward
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
            raise EpisodeError("env_malformed", f"{where} returned reward {reward!r}; expected a finite number or None")
        reward = float(reward)
    if not isinstance(value.done, bool):
        raise EpisodeError("env_malformed", f"{where} returned done={value.done!r}; expected True or False")
    return StepResult(check_messages(value.messages, where, allow_empty=value.done), reward, value.done)


def call_all(calls: list[Callable[[], Any]], timeout: float, what: str) -> list[Any]:
    """Run the calls concurrently, each in its own daemon thread, and wait at most `timeout` seconds in all.

    Returns one entry per call: its result, or an `EpisodeError` (`env_raised` with the exception, `env_timeout` when it
    had not returned by the deadline). A call that hangs is abandoned, not killed (Python cannot stop a thread): its
    daemon thread lives on until it returns or the process ends, and does not keep the process alive.
    """
    outcomes: list[Any] = [None] * len(calls)
    finished = [False] * len(calls)

    def run(i: int) -> None:
        try:
            outcomes[i] = calls[i]()
        except Exception as error:  # noqa: BLE001 - any failure of user code ends only its own episode
            outcomes[i] = EpisodeError("env_raised", f"{what} raised {error!r}")
        finished[i] = True

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"env-{what}-{i}") for i in range(len(calls))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [
        outcome if finished[i] else EpisodeError("env_timeout", f"{what} did not return within {timeout:g} s")
        for i, outcome in enumerate(outcomes)
    ]


class EnvLoadError(ValueError):
    """`env.path` / `env.args` name no usable environment; the message says which and what was wrong."""

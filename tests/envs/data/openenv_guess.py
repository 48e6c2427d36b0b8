"""Guess the number written for OpenEnv (`openenv-core`), as its users write environments: pydantic Action and
Observation classes and a Gym-style `Environment` (reset / step / state), nothing of posttrain. The tests run these
unchanged through `env.path: openenv:<this file>:<Class>`."""

import asyncio
import re
import threading
from uuid import uuid4

from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State
from openenv.core.rubrics import Rubric
from pydantic import Field


class GuessAction(Action):
    guess: str = Field(..., description="the player's reply; the first integer in it is the guess")


class GuessObservation(Observation):
    prompt: str = Field(default="", description="what the game says")
    guesses: int = Field(default=0, description="guesses so far")


class GuessEnvironment(Environment[GuessAction, GuessObservation, State]):
    """Hints "higher" / "lower"; reward 1 and done on the right number. A reply of "crash" raises (for the tests)."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self, high: int = 9):
        super().__init__()
        self.high = high
        self._state = State(episode_id=str(uuid4()), step_count=0)

    def reset(self, seed=None, episode_id=None, target=None, **kwargs) -> GuessObservation:
        self._state = State(episode_id=episode_id or str(uuid4()), step_count=0)
        self.target = int(target) if target is not None else (seed or 0) % (self.high + 1)
        return GuessObservation(prompt=f"I picked a number from 0 to {self.high}. Guess it: answer with the number.")

    def step(self, action: GuessAction, timeout_s=None, **kwargs) -> GuessObservation:
        self._state.step_count += 1
        if action.guess == "crash":
            raise RuntimeError("the game crashed")
        found = re.search(r"-?\d+", action.guess)
        guesses = self._state.step_count
        if found is None:
            return GuessObservation(prompt="That is not a number. Guess again.", guesses=guesses, reward=0.0)
        guess = int(found.group())
        if guess == self.target:
            return GuessObservation(prompt="Correct!", guesses=guesses, done=True, reward=1.0)
        hint = "higher" if guess < self.target else "lower"
        return GuessObservation(prompt=f"No, {hint}. Guess again.", guesses=guesses, reward=0.0)

    @property
    def state(self) -> State:
        return self._state


class ClosenessRubric(Rubric):
    """1 for the right number, else 1 / (1 + distance); scores asynchronously."""

    def __init__(self):
        super().__init__()
        self.target = 0

    async def forward(self, action: GuessAction, observation: GuessObservation) -> float:
        await asyncio.sleep(0)
        found = re.search(r"-?\d+", action.guess)
        return 0.0 if found is None else 1.0 / (1 + abs(int(found.group()) - self.target))


class AsyncGuessEnvironment(GuessEnvironment):
    """The same game through `reset_async` / `step_async` only (the sync ones refuse), scored by a Rubric; ends
    after two guesses."""

    def __init__(self, high: int = 9):
        super().__init__(high)
        self.rubric = ClosenessRubric()

    def reset(self, seed=None, episode_id=None, **kwargs):
        raise NotImplementedError("use reset_async")

    def step(self, action, timeout_s=None, **kwargs):
        raise NotImplementedError("use step_async")

    async def reset_async(self, seed=None, episode_id=None, target=None, **kwargs) -> GuessObservation:
        await self._reset_rubric_async()
        self.loop = asyncio.get_running_loop()  # the tests check that both calls of an episode share one loop
        observation = GuessEnvironment.reset(self, seed, episode_id, target)
        self.rubric.target = self.target
        return observation

    async def step_async(self, action: GuessAction, timeout_s=None, **kwargs) -> GuessObservation:
        assert asyncio.get_running_loop() is self.loop
        self._state.step_count += 1
        observation = GuessObservation(prompt="Noted.", guesses=self._state.step_count)
        observation.reward = await self._apply_rubric_async(action, observation)
        observation.done = self._state.step_count == 2
        return observation


class SharedStateEnvironment(GuessEnvironment):
    """Does not declare its instances independent (OpenEnv's default)."""

    SUPPORTS_CONCURRENT_SESSIONS = False


class TwoTextObservation(Observation):
    board: str = ""
    note: str = ""


class TwoTextEnvironment(Environment[GuessAction, TwoTextObservation, State]):
    """Its observations have two text fields: the adapter must be told which one to show."""

    SUPPORTS_CONCURRENT_SESSIONS = True

    @property
    def state(self) -> State:
        return State()

    def reset(self, seed=None, episode_id=None, **kwargs) -> TwoTextObservation:
        return TwoTextObservation(board="...", note="your move")

    def step(self, action, timeout_s=None, **kwargs) -> TwoTextObservation:
        return TwoTextObservation(board=f"{action.guess}..", note="again", done=True, reward=0.5)


class SingleThreadEnvironment(GuessEnvironment):
    """Must be called from one thread (as Playwright-based environments must); records which thread ran each call."""

    REQUIRES_SINGLE_THREAD_EXECUTOR = True

    def reset(self, seed=None, episode_id=None, **kwargs):
        self.threads = [threading.get_ident()]
        return super().reset(seed, episode_id, **kwargs)


class DictStepEnvironment(GuessEnvironment):
    """Its step returns a dict instead of an Observation."""

    def step(self, action, timeout_s=None, **kwargs):
        return {"prompt": "oops"}

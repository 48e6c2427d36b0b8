"""Guess the number: the docs' example environment (docs/environments.md), used by the tests as a user's file."""

import re

from posttrain.envs import Environment, StepResult


class GuessNumber(Environment):
    def __init__(self, low: int = 0, high: int = 9):
        self.low, self.high = low, high

    def reset(self, row):
        self.target = int(row["answer"])
        question = f"I picked a number from {self.low} to {self.high}. Guess it: answer with the number only."
        return [{"role": "user", "content": question}]

    def step(self, messages):
        found = re.search(r"-?\d+", messages[-1]["content"])
        if found is None:
            return StepResult([{"role": "user", "content": "That is not a number. Guess again."}], reward=None)
        guess = int(found.group())
        if guess == self.target:
            return StepResult([], reward=1.0, done=True)
        hint = "higher" if guess < self.target else "lower"
        return StepResult([{"role": "user", "content": f"No, {hint}. Guess again."}], reward=None)


class ShapedGuessNumber(GuessNumber):
    """GuessNumber plus a partial reward per turn: the share of digits in the model's answer (a random model rarely
    guesses right, so this gives a tiny model's groups reward variance, hence a gradient)."""

    def step(self, messages):
        result = super().step(messages)
        text = messages[-1]["content"]
        shaped = sum(ch.isdigit() for ch in text) / max(len(text), 1)
        result.reward = (result.reward or 0.0) + shaped
        return result

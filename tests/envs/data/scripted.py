"""Environments that behave badly on purpose, chosen per dataset row (`row["mode"]`), for the error-handling tests."""

import threading

from posttrain.envs import Environment, StepResult

RELEASE = threading.Event()
"""set by the tests when they finish, so a `hang` step's thread returns instead of lingering"""


class Scripted(Environment):
    def reset(self, row):
        self.mode, self.turn = row["mode"], 0
        if self.mode == "reset_raises":
            raise KeyError("no such task")
        return [{"role": "user", "content": "start"}]

    def step(self, messages):
        self.turn += 1
        if self.mode == "raises" and self.turn == 2:
            raise ValueError("tool crashed")
        if self.mode == "hangs" and self.turn == 2:
            RELEASE.wait(60)
        if self.mode == "malformed" and self.turn == 2:
            return StepResult([{"role": "user", "text": "no content key"}])
        if self.mode == "bad_reward":
            return StepResult([{"role": "user", "content": "next"}], reward=float("nan"))
        if self.mode == "huge_reply":
            return StepResult([{"role": "user", "content": "x" * 500}])
        if self.mode == "no_messages":
            return StepResult([], reward=1.0, done=False)
        done = self.turn == 3
        return StepResult([{"role": "user", "content": f"ok {self.turn}"}], reward=1.0 if done else None, done=done)


class Graded(Environment):
    """Two turns whatever the model says, then reward 1.0 for a row whose `answer` is "yes", 0.0 for "no"; a "boom"
    row's first step raises (the evaluation tests: which episodes are correct is known in advance)."""

    def reset(self, row):
        self.answer, self.turn = row["answer"], 0
        return [{"role": "user", "content": "Say something."}]

    def step(self, messages):
        self.turn += 1
        if self.answer == "boom":
            raise RuntimeError("grader down")
        if self.turn == 1:
            return StepResult([{"role": "user", "content": "And once more."}])
        return StepResult([], reward=float(self.answer == "yes"), done=True)

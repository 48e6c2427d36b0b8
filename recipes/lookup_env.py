"""A lookup tool (`env.path: recipes/lookup_env.py:Lookup`): the task of the CPU learning proof
(recipes/lookup_sft.yaml, then recipes/lookup.yaml; docs/environments.md, "Learning proof").

Each row is a box (`prompt`, e.g. "box 37") holding a hidden digit (`answer`). The model cannot know the digit: it
replies `lookup`, the tool answers with the digit, and the model's next reply is graded (1.0 if it is that digit).
Every SFT demo calls the tool; `COPY_SHARE` of them answer with the tool's digit, the others with the next digit
(9 -> 0). The SFT model so reads the tool's reply but mostly answers wrong, and GRPO has to move it to copying.
On a tiny model (hidden 128, 2 layers) 2 SFT epochs give held-out success 0.09-0.23 (sampled at temperature 1) and
20 GRPO steps 0.32-0.60 (seeds 0 to 2). Demos whose wrong answers are random digits teach too little attention to
the tool's reply in such an SFT (the copy probability stayed at chance on one data draw), and GRPO then cannot find
the copy.

`python -m posttrain.recipes.lookup_env` rewrites the three data files under recipes/data/ (deterministic).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from posttrain.envs import Environment, StepResult

CALL = "lookup"
COPY_SHARE = 0.2
"""share of SFT demos whose answer is the tool's digit (the others answer the next digit)"""
_DIGIT = re.compile(r"\s*(\d)\s*")


class Lookup(Environment):
    """`lookup` gets the row's digit back (role `role`); a digit ends the episode, reward 1.0 if it is the row's
    `answer`, else 0.0 (guessing before the lookup is allowed, and right one time in ten); anything else ends it
    with no reward."""

    def __init__(self, role: str = "tool"):
        self.role = role

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        self.answer = str(row["answer"]).strip()
        if not re.fullmatch(r"\d", self.answer):
            raise ValueError(f"lookup: row {row.get('prompt')!r} has answer {row['answer']!r}, not one digit")
        return [{"role": "user", "content": str(row["prompt"])}]

    def step(self, messages: list[dict[str, str]]) -> StepResult:
        text = messages[-1]["content"]
        digit = _DIGIT.fullmatch(text)
        if digit is not None:
            return StepResult([], reward=float(digit.group(1) == self.answer), done=True)
        if text.strip() == CALL:
            return StepResult([{"role": self.role, "content": self.answer}], reward=None)
        return StepResult([], reward=0.0, done=True)


def rows(boxes: list[int], rng: random.Random) -> list[dict[str, Any]]:
    """One row per box: `{"prompt": "box <n>", "answer": "<random digit>"}`."""
    return [{"prompt": f"box {box}", "answer": str(rng.randrange(10))} for box in boxes]


def demo(row: dict[str, Any], copy: bool, role: str = "tool") -> dict[str, Any]:
    """An SFT conversation on `row`: the lookup, the tool's digit, then that digit (`copy`) or the next one, a wrong
    answer that is a fixed function of the tool's reply (so the SFT learns to read it)."""
    answer = row["answer"] if copy else str((int(row["answer"]) + 1) % 10)
    return {
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": CALL},
            {"role": role, "content": row["answer"]},
            {"role": "assistant", "content": answer},
        ]
    }


def write_data(folder: Path, *, seed: int = 0, sft: int = 600, train: int = 300, held_out: int = 64) -> None:
    """`lookup_sft.jsonl` (`sft` demos), `lookup_train.jsonl` and `lookup_eval.jsonl` (RL and held-out rows) on
    disjoint boxes; exactly round(`COPY_SHARE` * sft) demos copy the tool's digit."""
    rng = random.Random(seed)
    boxes = rng.sample(range(10000), sft + train + held_out)
    sft_rows = rows(boxes[:sft], rng)
    copies = set(rng.sample(range(sft), round(COPY_SHARE * sft)))
    files = {
        "lookup_sft.jsonl": [demo(row, i in copies) for i, row in enumerate(sft_rows)],
        "lookup_train.jsonl": rows(boxes[sft : sft + train], rng),
        "lookup_eval.jsonl": rows(boxes[sft + train :], rng),
    }
    for name, lines in files.items():
        (folder / name).write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    write_data(Path(__file__).parent / "data")

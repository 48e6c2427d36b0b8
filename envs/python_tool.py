"""`python_tool`: math word problems with a sandboxed Python interpreter as a tool.

Each model turn either writes a ```python block, which runs in the code sandbox (`verifiers/sandbox.py`: a fresh
bubblewrap-isolated interpreter per block, no network, no host files, rlimits, a wall-clock timeout, output read with
a byte cap) and whose stdout/stderr come back as the next message; or gives the final answer in `\\boxed{}`, which
ends the episode with reward 1.0 if `posttrain.verifiers.math.verify` (strict, as the `math_accuracy` reward) finds
it equal to the row's `answer`, else 0.0. A turn with neither gets a nudge; the runner's `env.max_turns` ends an
episode that never answers (reward 0, finish `max_turns`).

When a turn holds several blocks, the last one runs. Every block runs in a fresh interpreter: variables of earlier
blocks are gone (the model re-states what it needs). Only the standard library is importable (the sandbox masks
site-packages).
"""

from __future__ import annotations

import re
from typing import Any

from posttrain.envs.base import Environment, Message, StepResult
from posttrain.verifiers.math import verify
from posttrain.verifiers.math_answer import boxed_contents
from posttrain.verifiers.sandbox import ALLOW_KEY, INSTALL_HINT, RawRun, SandboxUnavailable, bwrap_problem, run_python

INSTRUCTION = (
    "Solve the problem. You may run Python: write a ```python code block and you will get its printed output back "
    "(only the standard library; each block runs in a fresh interpreter, so print what you need). When you know the "
    "answer, give it as \\boxed{answer}."
)
NUDGE = "Write a ```python block to compute something, or give your final answer as \\boxed{answer}."

_CODE_RE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
"""a python block; the last one may be unclosed (generation stopped inside it or at a ``` stop string)"""
_LAUNCHER_FRAME_RE = re.compile(r'  File "[^"\n]*/launcher\.py", line \d+, in <module>\n    exec\(code, g\)\n')
"""the sandbox launcher's own frame in a traceback: noise to the model"""


def code_blocks(text: str) -> list[str]:
    """The contents of the ```python (or ```py) blocks of `text`, in order."""
    return [block for block in _CODE_RE.findall(text) if block.strip()]


def final_answer_given(text: str) -> bool:
    """Whether `text` has a `\\boxed{}` outside its code blocks (a box printed by code is not an answer)."""
    return bool(boxed_contents(_CODE_RE.sub("", text)))


def tool_reply(run: RawRun, timeout: float, max_chars: int) -> str:
    """What the model sees after a run: stdout, then stderr, cut to `max_chars` each, and a note when the run
    timed out, was cut or failed."""
    parts = []
    for name, data, cut in (("stdout", run.stdout, run.stdout_truncated), ("stderr", run.stderr, False)):
        text = _LAUNCHER_FRAME_RE.sub("", data.decode("utf-8", errors="replace"))
        if len(text) > max_chars or cut:
            text = text[:max_chars] + f"\n... ({name} cut)"
        if text.strip():
            parts.append(f"{name}:\n{text.rstrip()}")
    if run.timed_out:
        parts.append(f"(stopped: the code ran past the {timeout:g} s limit)")
    elif run.returncode not in (0, None) and not run.stderr:
        parts.append(f"(the process exited with status {run.returncode})")
    if not parts:
        parts.append("(no output: print the values you need)")
    return "Output:\n" + "\n".join(parts)


class PythonTool(Environment):
    """A math word problem (the row's `prompt`, gold answer in `answer`) with a Python tool; see the module docstring.

    Args (the recipe's `env.args`):
        timeout: wall-clock seconds one code block may run (CPU seconds are capped alike).
        max_output_chars: characters of stdout and of stderr shown back to the model.
        allow_unsandboxed: run code without bubblewrap where it cannot run (only rlimits remain; the code can then
            read host files and reach the network). Default: refuse, at load time.
        role: the role of the tool's reply messages (`user` works with every chat template; `tool` where the
            template supports it).
        instruction: the system message put before the problem ("" for none).
        answer_timeout: seconds the answer check may take.
    """

    def __init__(
        self,
        timeout: float = 5.0,
        max_output_chars: int = 1000,
        allow_unsandboxed: bool = False,
        role: str = "user",
        instruction: str = INSTRUCTION,
        answer_timeout: float = 5.0,
    ):
        if not timeout > 0 or max_output_chars < 1:
            raise ValueError(
                f"python_tool: timeout ({timeout}) must be > 0 and max_output_chars ({max_output_chars}) >= 1"
            )
        problem = bwrap_problem()
        if problem is not None and not allow_unsandboxed:
            raise SandboxUnavailable(
                f"python_tool refuses to run model-written code: {problem}. To fix it, {INSTALL_HINT}; or accept "
                f"running it WITHOUT isolation with env.args `{ALLOW_KEY}: true`"
            )
        self.timeout, self.max_output_chars, self.allow_unsandboxed = timeout, max_output_chars, allow_unsandboxed
        self.role, self.instruction, self.answer_timeout = role, instruction, answer_timeout

    def reset(self, row: dict[str, Any]) -> list[Message]:
        if "answer" not in row or row["answer"] is None:
            raise KeyError(f"python_tool needs the dataset column `answer` (the gold answer); the row has {list(row)}")
        self.answer = str(row["answer"])
        prompt = row["prompt"]
        messages = [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if not self.instruction:
            return messages
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{self.instruction}"
            return messages
        return [{"role": "system", "content": self.instruction}, *messages]

    def step(self, messages: list[Message]) -> StepResult:
        text = messages[-1]["content"]
        if final_answer_given(text):
            correct = verify(self.answer, _CODE_RE.sub("", text), strict=True, timeout=self.answer_timeout)
            return StepResult([], reward=1.0 if correct else 0.0, done=True)
        blocks = code_blocks(text)
        if not blocks:
            return StepResult([{"role": self.role, "content": NUDGE}])
        run = run_python(
            {"program.py": blocks[-1]},
            "program.py",
            timeout=self.timeout,
            stdout_cap=self.max_output_chars * 4 + 16,  # bytes: room for max_output_chars of UTF-8 and the cut mark
            allow_unsandboxed=self.allow_unsandboxed,
        )
        return StepResult([{"role": self.role, "content": tool_reply(run, self.timeout, self.max_output_chars)}])

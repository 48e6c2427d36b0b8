"""The built-in `python_tool` environment, driven with scripted model turns (reset/step directly), then one episode
through the runner on a tiny random model: code blocks run in the sandbox and their output comes back, loops and
host-file reads are stopped or denied, a boxed answer ends the episode with reward 1 or 0."""

from __future__ import annotations

import pytest

from posttrain.envs import EnvLoadError, EpisodeLimits, load_environment, run_episodes
from posttrain.envs.python_tool import NUDGE, PythonTool, code_blocks, final_answer_given
from posttrain.models.tiny import tiny_model_path
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.types import SamplingParams
from posttrain.verifiers import sandbox

ROW = {"prompt": "Tom has 12 apples and gives away 5. How many are left?", "answer": "7"}


def turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": ROW["prompt"]}, {"role": "assistant", "content": text}]


def started(**args) -> PythonTool:
    env = load_environment("python_tool", {"timeout": 2.0, **args})()  # a bare built-in name, as in a recipe
    env.reset(ROW)
    return env


def test_reset_puts_the_instruction_before_the_problem_and_needs_an_answer_column():
    env = PythonTool(instruction="Use python.")
    assert env.reset(ROW) == [{"role": "system", "content": "Use python."}, {"role": "user", "content": ROW["prompt"]}]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    assert env.reset({"prompt": chat, "answer": 1})[0] == {"role": "system", "content": "Be brief.\n\nUse python."}
    assert PythonTool(instruction="").reset(ROW) == [{"role": "user", "content": ROW["prompt"]}]
    with pytest.raises(KeyError, match="needs the dataset column `answer`.*'prompt'"):
        env.reset({"prompt": "q"})


def test_code_blocks_and_final_answers_are_found_outside_code():
    text = "First\n```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```\nand ```python\nprint(3)"  # last unclosed
    assert code_blocks(text) == ["print(1)\n", "print(2)\n", "print(3)"]
    assert final_answer_given("so it is \\boxed{7}.")
    assert not final_answer_given("```python\nprint('\\\\boxed{7}')\n```")  # a box the code prints is no answer
    assert not final_answer_given("the answer is 7")


@pytest.mark.bwrap
def test_a_code_block_gets_its_stdout_and_stderr_back():
    env = started()
    result = env.step(turn("Let me compute.\n```python\nprint(12 - 5)\nprint(sum(range(4)))\n```"))
    assert (result.done, result.reward) == (False, None)
    assert result.messages == [{"role": "user", "content": "Output:\nstdout:\n7\n6"}]
    failed = env.step(turn("```python\nx = 1\nprint(x)\n1 / 0\n```")).messages[0]["content"]
    assert failed.startswith("Output:\nstdout:\n1\nstderr:\nTraceback") and "ZeroDivisionError" in failed
    assert "launcher.py" not in failed  # the sandbox's own frame is not shown
    silent = env.step(turn("```python\nx = 3\n```")).messages[0]["content"]
    assert silent == "Output:\n(no output: print the values you need)"


@pytest.mark.bwrap
def test_long_output_is_cut_to_max_output_chars():
    reply = started(max_output_chars=50).step(turn("```python\nprint('a' * 100000)\n```")).messages[0]["content"]
    assert reply == "Output:\nstdout:\n" + "a" * 50 + "\n... (stdout cut)"


@pytest.mark.bwrap
def test_a_looping_block_is_stopped_and_host_files_are_not_readable(tmp_path):
    env = started(timeout=1.0)
    looped = env.step(turn("```python\nwhile True:\n    pass\n```"))
    assert looped.messages[0]["content"] == "Output:\n(stopped: the code ran past the 1 s limit)" and not looped.done
    bait = tmp_path / "secret.txt"
    bait.write_text("BAIT-7f3a")
    program = f"```python\nfor p in [{str(bait)!r}, {__file__!r}]:\n    try:\n        print(open(p).read()[:40])\n"
    program += "    except OSError as e:\n        print(type(e).__name__)\n```"
    reply = env.step(turn(program)).messages[0]["content"]
    assert "BAIT-7f3a" not in reply and '"""The built-in' not in reply
    assert reply == "Output:\nstdout:\nFileNotFoundError\nFileNotFoundError", reply


def test_a_boxed_answer_ends_the_episode_with_the_strict_math_check():
    assert started(allow_unsandboxed=True).step(turn("12 - 5 = 7, so \\boxed{7}.")).__dict__ == {
        "messages": [], "reward": 1.0, "done": True
    }  # fmt: skip
    wrong = started(allow_unsandboxed=True).step(turn("\\boxed{8}"))
    assert (wrong.messages, wrong.reward, wrong.done) == ([], 0.0, True)
    both = "```python\nprint('\\\\boxed{7}')\n```\nThe answer is \\boxed{7}"
    printed = started(allow_unsandboxed=True).step(turn(both))
    assert (printed.reward, printed.done) == (1.0, True)  # the boxed answer wins over a block in the same turn


def test_a_turn_with_neither_code_nor_answer_gets_a_nudge():
    result = started(allow_unsandboxed=True, role="tool").step(turn("Hmm, apples. The answer is 7."))
    assert result.messages == [{"role": "tool", "content": NUDGE}] and (result.reward, result.done) == (None, False)


def test_without_bubblewrap_it_refuses_at_load_time_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "BWRAP", "/no/such/bwrap")
    with pytest.raises(EnvLoadError, match=r"env.args = None: building python_tool.*bubblewrap is not installed.*"
                       r"allow_unsandboxed: true"):  # fmt: skip
        load_environment("python_tool")
    assert load_environment("python_tool", {"allow_unsandboxed": True})().allow_unsandboxed


def test_an_unknown_bare_name_lists_the_built_ins():
    built_ins = r"\['calculator', 'python_tool'\]"
    with pytest.raises(EnvLoadError, match=rf"env.path = 'python_tools': not a built-in environment.*{built_ins}"):
        load_environment("python_tools")
    with pytest.raises(EnvLoadError, match=r"env.args = \{'timeout': 0, .*timeout \(0\) must be > 0"):
        load_environment("python_tool", {"timeout": 0, "allow_unsandboxed": True})


@pytest.mark.bwrap
def test_an_episode_on_a_tiny_random_model_ends_at_max_turns_with_reward_zero():
    engine = HFEngine(tiny_model_path(), num_threads=1)
    make_env = load_environment("python_tool", {"timeout": 2.0, "instruction": "Use python."})  # short: 512 positions
    rows = [ROW, {"prompt": "What is 3 * 4?", "answer": "12"}]
    params = SamplingParams(max_new_tokens=8, seed=0)
    episodes = run_episodes(engine, engine.tokenizer, make_env, rows, 2, params, EpisodeLimits(max_turns=3))
    assert len(episodes) == 4
    for episode in episodes:
        assert (episode.finish, episode.error, episode.turns, episode.reward) == ("max_turns", None, 3, 0.0)
        roles = [m["role"] for m in episode.messages]
        assert roles == ["system", "user", *["assistant", "user"] * 3]  # the last nudge is kept in the transcript
        assert [m["content"] for m in episode.messages[3::2]] == [NUDGE] * 3  # random text: neither code nor box
        assert 0 < sum(episode.loss_mask) < len(episode.loss_mask)  # the nudges carry no loss

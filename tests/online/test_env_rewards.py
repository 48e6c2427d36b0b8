"""`rewards:` next to `env:`: each episode's final transcript (prompt = `reset`'s messages, completion = the turns after
them, as chat messages) is scored by the reward functions, and the sample's reward is the environment's plus theirs,
weighted. On the tiny random model's hf engine, in this process (no Ray); the trainer's path is in
tests/online/test_env_training.py."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from posttrain.config import validate_config
from posttrain.models.tiny import tiny_model_path
from posttrain.online.components import load_reward_specs
from posttrain.online.env_rollout import EnvRollout, add_transcript_scores
from posttrain.online.evaluation import eval_params, evaluate_episodes
from posttrain.rewards.combine import RewardScores
from posttrain.rewards.workers import LocalScorer
from posttrain.rollout.hf_engine import HFEngine

GRADED = Path(__file__).parents[1] / "envs" / "data" / "scripted.py"
REWARD = Path(__file__).parent / "data" / "transcript_reward.py"
ROWS = [{"prompt": "p", "answer": answer} for answer in ("yes", "no", "boom", "yes")]
WEIGHT = 5.0  # large enough that a "no" episode's total (0 + 5 * 0.21) passes 1, its environment reward does not


def recipe() -> dict:
    return {
        "model": {"path": str(tiny_model_path())},
        "data": {"kind": "arithmetic", "num_problems": 4},
        "env": {"path": f"{GRADED}:Graded", "max_turns": 3},
        "rewards": [{"fn": f"{REWARD}:transcript_reward", "weight": WEIGHT}],
        "rollout": {"max_new_tokens": 5, "num_threads": 1},
    }


def test_add_transcript_scores_sums_per_episode_and_skips_what_either_side_failed():
    env = RewardScores([1.0, math.nan, 0.5, 0.0], {"env": [1.0, None, 0.5, 0.0]}, [1], ["episode 1: env_raised: x"])
    env.failed = {"env": 1}
    # the functions saw episodes 0, 2, 3 only; `judge` failed on the second of them (episode 2)
    rewards = RewardScores(
        [0.5, math.nan, -1.0],
        {"judge": [0.25, None, 0.0], "fmt": [0.5, None, -1.0]},
        [1],
        ["reward function 'judge' failed on sample 1: VerdictError: no score"],
        {"judge": 1, "fmt": 0},
    )
    scores = add_transcript_scores(env, rewards, [0, 2, 3])
    assert scores.total[0] == 1.5 and scores.total[3] == -1.0
    assert math.isnan(scores.total[1]) and math.isnan(scores.total[2])
    assert scores.per_function == {
        "env": [1.0, None, None, 0.0],
        "judge": [0.25, None, None, 0.0],
        "fmt": [0.5, None, None, -1.0],
    }
    assert scores.skipped == [1, 2]
    assert scores.errors == [
        "episode 1: env_raised: x",
        "episode 2: reward function 'judge' failed on sample 1: VerdictError: no score",
    ]
    assert scores.failed == {"env": 1, "judge": 1, "fmt": 0}


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    return HFEngine(str(tiny_model_path()), num_threads=1)


def test_the_functions_get_each_played_episodes_transcript_and_the_sum_is_the_samples_reward(engine):
    cfg = validate_config(recipe())
    specs = load_reward_specs(cfg)
    calls = sys.modules[getattr(specs[0].fn, "func", specs[0].fn).__module__].CALLS  # the file the recipe loaded
    env = EnvRollout(cfg, engine.tokenizer)
    episodes = env.play(engine, ROWS, eval_params(2, 1.0, 5, [], seed=3), group_size=2)
    samples = env.samples(ROWS, episodes)
    calls.clear()
    scores = env.score(samples, episodes, LocalScorer(specs), group_size=2)
    # 2 episodes per row, row-major: yes yes | no no | boom boom (failed: no reward call) | yes yes
    played = [0, 1, 2, 3, 6, 7]
    (call,) = calls
    assert call["prompts"] == [[{"role": "user", "content": "Say something."}]] * 6  # reset's messages
    for k, i in enumerate(played):
        completion = call["completions"][k]
        assert [m["role"] for m in completion] == ["assistant", "user", "assistant"]  # Graded's done step adds none
        assert completion == episodes[i].messages[1:] and completion[1]["content"] == "And once more."
        assert call["completion_ids"][k] == samples[i].completion_token_ids  # the model's and the environment's ids
    assert call["answer"] == ["yes", "yes", "no", "no", "yes", "yes"]  # the rows' columns, as for completions
    env_rewards = [1.0, 1.0, 0.0, 0.0, None, None, 1.0, 1.0]
    judged = [0.21 if r is not None else None for r in env_rewards]  # 2 assistant turns / 10 + 1 prompt message / 100
    assert scores.per_function["env"] == env_rewards
    assert scores.per_function["transcript_reward"] == pytest.approx(judged, abs=1e-12)
    for total, env_reward in zip(scores.total, env_rewards, strict=True):
        if env_reward is None:
            assert math.isnan(total)
        else:
            assert total == pytest.approx(env_reward + WEIGHT * 0.21, abs=1e-12)
    assert scores.skipped == [4, 5] and scores.errors[0].startswith("episode 4: env_raised: Graded.step raised")
    assert scores.failed == {"env": 2, "transcript_reward": 0}


def test_held_out_accuracy_reads_the_environments_reward_or_the_named_reward(engine):
    cfg = validate_config(recipe())
    specs = load_reward_specs(cfg)
    env, params = EnvRollout(cfg, engine.tokenizer), eval_params(2, 1.0, 5, [], seed=3)
    metrics, records = evaluate_episodes(env, engine, ROWS, params, LocalScorer(specs))
    # the "no" episodes' totals pass 1 (0 + 5 * 0.21) but their environment reward does not: not correct
    assert [r["correct"] for r in records] == [True, True, False, False, False, False, True, True]
    assert metrics["eval/accuracy"] == 0.5 and metrics["eval/env/mean"] == pytest.approx(4 / 6)
    assert metrics["eval/transcript_reward/mean"] == pytest.approx(0.21, abs=1e-12)
    assert records[2]["reward"] == pytest.approx(WEIGHT * 0.21, abs=1e-12)
    metrics, _ = evaluate_episodes(env, engine, ROWS, params, LocalScorer(specs), "transcript_reward")
    assert metrics["eval/accuracy"] == 0.0  # 0.21 < 1 everywhere
    with pytest.raises(ValueError, match="the recipe has `rewards:`, so it needs the run's scorer"):
        env.generate(engine, ROWS[:1], params, group_size=1)

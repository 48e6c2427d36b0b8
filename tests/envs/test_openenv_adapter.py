"""OpenEnv environments (`openenv-core`) run unchanged: `env.path: openenv:<file or module>:<Class>` loads one written
in OpenEnv's own API (tests/envs/data/openenv_guess.py), and its observations, rewards and done reach the episode
runner and GRPO as those of a native environment."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

pytest.importorskip("openenv.core", reason="openenv-core is not installed (pip install 'posttrain[envs]')")

from posttrain.config import validate_config  # noqa: E402
from posttrain.envs import EnvLoadError, EpisodeLimits, load_environment, run_episodes  # noqa: E402
from posttrain.models.tiny import tiny_model_path  # noqa: E402
from posttrain.online.trainer import OnlineTrainer  # noqa: E402
from posttrain.rollout.types import SamplingParams  # noqa: E402
from posttrain.run_folder.run_dir import read_metrics  # noqa: E402

GAME = Path(__file__).parent / "data" / "openenv_guess.py"
BY_ANSWER = {"reset_kwargs": {"target": "answer"}}


def game(name: str = "GuessEnvironment", **args):
    return load_environment(f"openenv:{GAME}:{name}", {**BY_ANSWER, **args})


def said(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_an_openenv_game_plays_through_reset_and_step_with_its_rewards_and_done():
    factory = game(env_args={"high": 5})
    env, other = factory(), factory()
    assert type(env).__name__ == "OpenEnv:GuessEnvironment" and env.env is not other.env and env.env.high == 5
    opening = env.reset({"answer": 3, "prompt": "ignored"})
    assert opening == [{"role": "user", "content": "I picked a number from 0 to 5. Guess it: answer with the number."}]
    first = env.step([*opening, said("maybe 1?")])
    assert (first.messages, first.reward, first.done) == (
        [{"role": "user", "content": "No, higher. Guess again."}],
        0.0,
        False,
    )
    second = env.step([*opening, said("maybe 1?"), *first.messages, said("3")])
    assert (second.messages, second.reward, second.done) == ([{"role": "user", "content": "Correct!"}], 1.0, True)
    assert env.env.state.step_count == 2 and other.env.state.step_count == 0  # the action reached that instance only
    with pytest.raises(RuntimeError, match="the game crashed"):
        env.step([*opening, said("crash")])


def test_async_methods_and_a_rubric_score_the_game_on_one_event_loop_per_episode():
    env = game("AsyncGuessEnvironment", system_prompt="Be brief.", role="tool")()
    opening = env.reset({"answer": 7})  # the sync reset/step of this class raise: only the async ones run
    assert opening[0] == {"role": "system", "content": "Be brief."} and opening[1]["role"] == "tool"
    first = env.step([*opening, said("5")])
    assert (first.messages, first.reward, first.done) == ([{"role": "tool", "content": "Noted."}], 1 / 3, False)
    last = env.step([*opening, said("5"), *first.messages, said("7")])
    assert (last.reward, last.done) == (1.0, True)
    assert env.loop is None and env.env.loop.is_closed()  # done closed the episode's loop


@pytest.mark.parametrize(
    "name,args,words",
    [
        ("GuessAction", {}, ["env.path", "is not an openenv Environment subclass"]),
        ("SharedStateEnvironment", {}, ["SUPPORTS_CONCURRENT_SESSIONS is False", "env.args.concurrent: true"]),
        ("TwoTextEnvironment", {}, ["env.args.observation_field", "TwoTextObservation has 2 str fields"]),
        ("GuessEnvironment", {"high": 5}, ["env.args of", "env.args.env_args", "high"]),
        ("GuessEnvironment", {"env_args": {"hihg": 5}}, ["env.args", "building", "hihg"]),
        (
            "GuessEnvironment",
            {"action_field": "nope"},
            ["env.args.action_field = 'nope'", "GuessAction has no such str field"],
        ),
        ("GuessEnvironment", {"observation_field": "guesses"}, ["env.args.observation_field"]),
        ("Missing", {}, ["env.path", "has no 'Missing'"]),
    ],
)
def test_a_foreign_environment_that_cannot_run_is_named_at_load(name, args, words):
    with pytest.raises(EnvLoadError) as info:
        load_environment(f"openenv:{GAME}:{name}", args)
    for word in words:
        assert word in str(info.value)


def test_the_recipe_resolves_what_the_class_leaves_open():
    assert type(game("SharedStateEnvironment", concurrent=True)()).__name__ == "OpenEnv:SharedStateEnvironment"
    env = game("TwoTextEnvironment", observation_field="note")()
    assert env.reset({"answer": 1}) == [{"role": "user", "content": "your move"}]
    assert env.step([said("x")]).messages == [{"role": "user", "content": "again"}]


def test_a_single_thread_class_runs_every_call_on_one_thread_and_a_non_observation_is_named():
    factory = game("SingleThreadEnvironment")
    threads = []
    for env in (factory(), factory()):
        worker = threading.Thread(target=lambda env=env: env.reset({"answer": 1}))
        worker.start()
        worker.join()
        threads += [env.env.threads[0], worker.ident]
    assert threads[0] == threads[2] and threads[0] not in (threads[1], threads[3], threading.get_ident())
    env = game("DictStepEnvironment")()
    env.reset({"answer": 1})
    with pytest.raises(TypeError, match="DictStepEnvironment.step returned dict, not an openenv Observation"):
        env.step([said("1")])


def test_episodes_on_the_tiny_model_get_the_games_replies_and_a_raising_reset_is_named():
    from posttrain.rollout.hf_engine import HFEngine

    engine = HFEngine(tiny_model_path(), num_threads=1)
    rows = [{"answer": 2}, {"answer": "two"}]
    limits = EpisodeLimits(max_turns=3, max_episode_tokens=200, step_timeout=10)
    episodes = run_episodes(engine, engine.tokenizer, game(), rows, 2, SamplingParams(max_new_tokens=6, seed=0), limits)
    replies = {"That is not a number. Guess again.", "No, higher. Guess again.", "No, lower. Guess again.", "Correct!"}
    for episode in episodes[:2]:
        assert episode.error is None and 1 <= episode.turns <= 3
        env_messages = [m["content"] for m in episode.messages[1:] if m["role"] == "user"]
        assert len(env_messages) == episode.turns and set(env_messages) <= replies
        assert episode.reward == (1.0 if episode.finish == "done" else 0.0)
        assert len(episode.step_rewards) == episode.turns  # the game rewards every step (0.0 until it is won)
        assert (0 in episode.loss_mask) == (episode.turns > 1)  # the game's replies are in the ids, masked
    for episode in episodes[2:]:
        assert episode.error == (
            'env_raised: OpenEnv:GuessEnvironment.reset raised ValueError("invalid literal for int() with base 10: '
            "'two'\")"
        )


def test_grpo_trains_one_step_on_the_openenv_game(tmp_path, ray_session):
    recipe = {
        "name": "openenv-guess",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path()), "lora": {"rank": 4, "alpha": 8}},
        "data": {"kind": "arithmetic", "num_problems": 4, "seed": 1, "max_value": 4},
        "env": {
            "path": f"openenv:{GAME}:GuessEnvironment",
            "max_turns": 2,
            "max_episode_tokens": 120,
            "args": BY_ANSWER,
        },
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 2},
        "rollout": {"max_new_tokens": 6, "num_threads": 1},
        "train": {"steps": 1, "lr": 1e-2, "micro_batch_size": 4, "num_threads": 1},
        "logging": {"progress": False, "samples_per_step": 4},
    }
    run_dir = OnlineTrainer(validate_config(recipe)).run()
    (row,) = read_metrics(run_dir)
    assert row["env/failed_episodes"] == 0 and row["reward/env/count"] == 4 and 1 <= row["env/turns/mean"] <= 2
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["error"] is None for s in samples)
    assert "Guess again." in "".join(s["completion"] for s in samples)  # the game's replies reached the model

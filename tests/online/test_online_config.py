"""`algorithm:` for the online menu: defaults, and impossible combinations refused naming the key."""

from pathlib import Path

import pytest

from posttrain.config import ONLINE_ALGORITHMS, ConfigError, load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
BASE = {"model": {"path": "m"}, "data": {"kind": "arithmetic"}, "rewards": [{"fn": "math_accuracy"}]}
ONLINE_RECIPES = ["rloo.yaml", "reinforce_pp.yaml", "rft.yaml", "dapo.yaml", "gspo.yaml", "ppo.yaml"]


def _algo(**algorithm):
    opd = {"opd": {"teacher": "t"}} if algorithm.get("name") == "opd" else {}  # opd needs its teacher
    return validate_config({**BASE, **opd, "algorithm": algorithm}).algorithm


def _error(**algorithm) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config({**BASE, "algorithm": algorithm})
    return str(info.value)


def test_defaults_are_plain_grpo():
    a = _algo()
    assert (a.name, a.dual_clip, a.ratio_level, a.kl_in, a.kl_estimator) == ("grpo", None, "token", "loss", "k3")
    assert (a.dynamic_sampling, a.max_refill_rounds, a.epochs_per_batch, a.mini_batches) == (False, 3, 1, 1)
    assert (a.rft_keep, a.rft_min_reward) == ("best", 1.0)


@pytest.mark.parametrize("name", ONLINE_ALGORITHMS)
def test_every_online_name_validates(name):
    assert _algo(name=name).name == name


@pytest.mark.parametrize(
    "algorithm, fragment",
    [
        ({"name": "rloo", "samples_per_prompt": 1}, "algorithm.samples_per_prompt: rloo needs >= 2"),
        ({"name": "reinforce_pp_baseline", "samples_per_prompt": 1}, "reinforce_pp_baseline needs >= 2"),
        ({"name": "grpo", "samples_per_prompt": 1}, "group-relative advantages need >= 2"),
        ({"dynamic_sampling": True, "name": "rft"}, "algorithm.dynamic_sampling"),
        ({"dynamic_sampling": True, "name": "reinforce_pp", "samples_per_prompt": 1}, "algorithm.dynamic_sampling"),
        ({"name": "rloo", "advantage_std": "none"}, "algorithm.advantage_std: only grpo"),
        ({"name": "rft", "kl_in": "reward"}, "algorithm.kl_in: rft"),
        ({"name": "rft", "rft_keep": "all", "rft_min_reward": None}, "algorithm.rft_min_reward"),
        ({"dual_clip": 1.0}, "`algorithm.dual_clip`"),
        ({"ratio_level": "group"}, "`algorithm.ratio_level`"),
        ({"kl_estimator": "k4"}, "`algorithm.kl_estimator`"),
        ({"mini_batches": 0}, "`algorithm.mini_batches`"),
        ({"name": "ppo", "dynamic_sampling": True}, "algorithm.dynamic_sampling: ppo learns from every sample"),
        ({"name": "ppo_v2"}, "`algorithm.name`"),
    ],
)
def test_impossible_combinations_name_the_key(algorithm, fragment):
    assert fragment in _error(**algorithm)


def test_plain_reinforce_pp_and_batch_std_grpo_work_with_one_sample_per_prompt():
    assert _algo(name="reinforce_pp", samples_per_prompt=1).samples_per_prompt == 1
    assert _algo(name="rft", samples_per_prompt=1).samples_per_prompt == 1
    assert _algo(advantage_std="batch", samples_per_prompt=1).samples_per_prompt == 1
    assert _algo(name="ppo", samples_per_prompt=1).samples_per_prompt == 1


def test_ppo_section_defaults_and_refusals():
    cfg = validate_config({**BASE, "algorithm": {"name": "ppo"}})
    assert (cfg.ppo.critic_lr, cfg.ppo.value_clip, cfg.ppo.gamma, cfg.ppo.lam) == (None, 0.2, 1.0, 0.95)
    assert cfg.ppo.whiten_advantages
    with pytest.raises(ConfigError, match="ppo: only algorithm.name=ppo uses this section"):
        validate_config({**BASE, "ppo": {"lam": 0.9}})
    for bad, key in [({"lam": 1.5}, "ppo.lam"), ({"value_clip": 0}, "ppo.value_clip"), ({"gama": 1}, "ppo.gamma")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_config({**BASE, "algorithm": {"name": "ppo"}, "ppo": bad})


@pytest.mark.parametrize("recipe", ONLINE_RECIPES)
def test_online_recipes_validate(recipe):
    cfg = load_config(ROOT / "recipes" / recipe)
    assert cfg.algorithm.name in ONLINE_ALGORITHMS and cfg.rewards

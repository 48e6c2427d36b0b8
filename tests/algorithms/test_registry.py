"""The algorithm registry: a new advantage estimator is one function + one registry line, and the config and the
advantage dispatch take it from there (this test touches no other file)."""

import math

import pytest
import torch

from posttrain.algorithms import registry
from posttrain.algorithms.registry import ALGORITHMS, POLICY_GRADIENT, AlgorithmSpec, online_advantages
from posttrain.config import ConfigError, validate_config

BASE = {"model": {"path": "m"}, "data": {"kind": "arithmetic"}, "rewards": [{"fn": "math_accuracy"}]}


def median_loo_advantage(rewards_BG: torch.Tensor, std: str) -> torch.Tensor:
    """Reward minus the median of the other samples of its group (skipped samples: NaN in, left out, 0 out)."""
    num_prompts, group = rewards_BG.shape
    others_BGK = rewards_BG.unsqueeze(1).expand(num_prompts, group, group)  # [i, j, k] = r[i, k]
    keep_GK = ~torch.eye(group, dtype=torch.bool)
    others_BGk = others_BGK[:, keep_GK].view(num_prompts, group, group - 1)  # every k but j
    return torch.nan_to_num(rewards_BG - others_BGk.nanmedian(dim=-1).values, nan=0.0)


@pytest.fixture
def median_loo(monkeypatch):
    """What a user adds to `algorithms/registry.py` (here undone after the test): the function above and this line."""
    spec = AlgorithmSpec(
        name="median_loo",
        family="online",
        doc="reward minus the median of the rest of the group",
        reads=POLICY_GRADIENT,
        learner_loss="policy",
        advantage=median_loo_advantage,
        advantage_level="sequence",
        min_group_size=2,
    )
    monkeypatch.setitem(ALGORITHMS, spec.name, spec)
    return spec


def test_the_config_accepts_a_registered_name_and_applies_its_spec(median_loo):
    cfg = validate_config({**BASE, "algorithm": {"name": "median_loo", "samples_per_prompt": 3, "eps_high": 0.28}})
    assert cfg.algorithm.spec is median_loo
    message = str(_error({**BASE, "algorithm": {"name": "median_loo", "samples_per_prompt": 1}}))
    assert "algorithm.samples_per_prompt: median_loo needs >= 2 samples per prompt (got 1)" in message
    message = str(_error({**BASE, "algorithm": {"name": "median_loo", "advantage_std": "batch"}}))
    assert "algorithm.advantage_std: only grpo, opd read this key (got median_loo); remove it" in message


def test_the_dispatch_runs_the_registered_estimator_with_the_kl_in_the_reward(median_loo):
    rewards_BG = torch.tensor([[1.0, 0.0, 4.0], [2.0, math.nan, 2.0]])
    mask_BC = torch.ones(6, 2)
    mask_BC[4] = 0  # the skipped sample
    adv = online_advantages("median_loo", rewards_BG, mask_BC)
    # torch's median of two is the lower one. Group 1: 1 - median{0, 4} = 1, 0 - median{1, 4} = -1,
    # 4 - median{1, 0} = 4; group 2: 2 - 2 = 0, skipped -> 0, 2 - 2 = 0
    assert adv.token_BC is None
    assert adv.sequence_B.tolist() == [1.0, -1.0, 4.0, 0.0, 0.0, 0.0]
    kl_BC = torch.zeros(6, 2)
    kl_BC[0] = 0.5  # sample 0's reward less kl_coef * (0.5 + 0.5) = 2: group 1 becomes [-1, 0, 4]
    with_kl = online_advantages("median_loo", rewards_BG, mask_BC, kl_BC, kl_coef=2.0)
    # -1 - median{0, 4} = -1, 0 - median{-1, 4} = 1, 4 - median{-1, 0} = 5
    assert with_kl.sequence_B.tolist() == [-1.0, 1.0, 5.0, 0.0, 0.0, 0.0]


def test_builtin_specs_are_consistent():
    for name, spec in ALGORITHMS.items():
        assert spec.name == name and spec.reads >= registry.RUN
        assert (spec.advantage is not None) == (spec.family == "online" and spec.advantage_level is not None)
    assert registry.names_of("traces") == ("distill", "rft_offline")
    assert registry.readers("preference.beta") == ["dpo"] and registry.readers("ppo") == ["ppo"]
    with pytest.raises(ValueError, match="exists already"):
        registry.register(ALGORITHMS["grpo"])
    with pytest.raises(ValueError, match="advantage and advantage_level go together"):
        AlgorithmSpec("x", "online", "", frozenset(), "policy", advantage=median_loo_advantage)


def _error(raw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return info.value

"""Advantage estimators against hand-computed values (ALGORITHMS.md's worked values included)."""

import math

import pytest
import torch

from posttrain.algorithms.advantages import group_relative_advantages, rloo_advantages, zero_variance_group_fraction

NAN = float("nan")


def test_group_std_worked_value():
    # [1, 0, 0]: mean 1/3; centred [2/3, -1/3, -1/3]; unbiased var (4/9 + 1/9 + 1/9) / 2 = 1/3, std 0.5773503
    # -> (2/3) / (0.5773503 + 1e-4) = 1.1545006, (-1/3) / 0.5774503 = -0.5772503
    adv = group_relative_advantages(torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[1.1545006, -0.5772503, -0.5772503]]), atol=1e-6, rtol=0)
    # ALGORITHMS.md quotes it to five decimals
    torch.testing.assert_close(adv, torch.tensor([[1.15450, -0.57725, -0.57725]]), atol=1e-5, rtol=0)


def test_std_none_is_mean_centred_only():
    # Dr. GRPO: [1, 0, 0] - 1/3 = [2/3, -1/3, -1/3]; [2, 4] - 3 = [-1, 1]
    adv = group_relative_advantages(torch.tensor([[1.0, 0.0, 0.0], [2.0, 4.0, NAN]]), std="none")
    torch.testing.assert_close(adv, torch.tensor([[2 / 3, -1 / 3, -1 / 3], [-1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_batch_std_divides_by_the_std_of_all_rewards():
    # rewards [[1,0,0],[1,1,1]]: batch mean 4/6 = 2/3; squared deviations 1/9,4/9,4/9,1/9,1/9,1/9 sum to 4/3;
    # unbiased var (4/3)/5 = 4/15, std 0.5163978. Group means 1/3 and 1 are still what is subtracted:
    # row 0 -> [2/3, -1/3, -1/3] / 0.5164978 = [1.2907445, -0.6453722, -0.6453722]; row 1 -> 0
    adv = group_relative_advantages(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), std="batch")
    expected = torch.tensor([[1.2907445, -0.6453722, -0.6453722], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("std", ["group", "batch", "none"])
def test_zero_variance_group_gives_zero(std):
    adv = group_relative_advantages(torch.tensor([[0.7, 0.7, 0.7, 0.7]]), std=std)
    assert torch.equal(adv, torch.zeros(1, 4))


@pytest.mark.parametrize("std", ["group", "batch", "none"])
def test_nan_rewards_are_skipped_and_get_zero(std):
    # a NaN sample must behave as if absent: [1, nan, 0, 0] scores like [1, 0, 0], and the NaN slot gets 0;
    # a group with one valid sample ([nan, 1, nan]) or none has no baseline: all 0
    rewards = torch.tensor([[1.0, NAN, 0.0, 0.0], [NAN, 1.0, NAN, NAN], [NAN, NAN, NAN, NAN]])
    adv = group_relative_advantages(rewards, std=std)
    assert not adv.isnan().any()
    clean = group_relative_advantages(torch.tensor([[1.0, 0.0, 0.0]]), std=std)
    if std != "batch":  # the batch std sees the other rows' valid rewards, so only "group"/"none" match exactly
        torch.testing.assert_close(adv[0, [0, 2, 3]], clean[0], atol=1e-6, rtol=0)
    assert adv[0, 1] == 0 and torch.equal(adv[1:], torch.zeros(2, 4))


def test_batch_std_ignores_nan():
    # valid rewards 1, 0, 0, 1 (NaN dropped): mean 1/2, unbiased var (4 * 1/4) / 3 = 1/3, std 0.5773503;
    # group 0 [1, 0, 0] centred [2/3, -1/3, -1/3]; group 1 has one valid sample -> 0
    adv = group_relative_advantages(torch.tensor([[1.0, 0.0, 0.0], [NAN, 1.0, NAN]]), std="batch")
    expected = torch.tensor([[1.1545006, -0.5772503, -0.5772503], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


def test_group_std_matches_a_plain_loop():
    # twin: torch.mean / torch.std one group at a time
    rewards = torch.rand(5, 6, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([(r - r.mean()) / (r.std() + 1e-4) for r in rewards])
    torch.testing.assert_close(group_relative_advantages(rewards), expected, atol=1e-6, rtol=0)


def test_unknown_std_raises():
    with pytest.raises(ValueError, match="advantage std"):
        group_relative_advantages(torch.zeros(1, 2), std="global")


def test_rloo_worked_value():
    # [1, 0, 0.5], sum 1.5: 1 - (0.5 / 2) = 0.75; 0 - (1.5 / 2) = -0.75; 0.5 - (1 / 2) = 0
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.5]]))
    torch.testing.assert_close(adv, torch.tensor([[0.75, -0.75, 0.0]]), atol=1e-6, rtol=0)


def test_rloo_skips_nan_and_equals_scaled_centring():
    # with the NaN dropped the group is [1, 0, 0.5] again; a lone valid sample gets 0
    adv = rloo_advantages(torch.tensor([[1.0, NAN, 0.0, 0.5], [NAN, 2.0, NAN, NAN]]))
    torch.testing.assert_close(adv, torch.tensor([[0.75, 0.0, -0.75, 0.0], [0.0, 0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)
    # identity: r_i - (S - r_i)/(G-1) = G/(G-1) * (r_i - S/G)
    rewards = torch.rand(4, 5, generator=torch.Generator().manual_seed(1))
    expected = 5 / 4 * (rewards - rewards.mean(-1, keepdim=True))
    torch.testing.assert_close(rloo_advantages(rewards), expected, atol=1e-6, rtol=0)


def test_zero_variance_group_fraction():
    # equal: [1,1,1]; [0.5, nan, 0.5] (valid ones equal); [nan, 1, nan] (one valid); varied: [1, 0, 0] -> 3/4
    rewards = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.5, NAN, 0.5], [NAN, 1.0, NAN]])
    assert math.isclose(zero_variance_group_fraction(rewards), 0.75)
    assert zero_variance_group_fraction(torch.tensor([[0.0, 1.0]])) == 0.0
    assert zero_variance_group_fraction(torch.zeros(0, 4)) == 0.0

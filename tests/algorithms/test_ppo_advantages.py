"""GAE (scan vs an explicit loop twin), whitening, PPO's advantage assembly, explained variance, REINFORCE++
advantages and the clipped value loss."""

import math

import pytest
import torch

from posttrain.algorithms.gae import (
    explained_variance,
    gae,
    gae_token_rewards,
    ppo_advantages,
    value_loss,
    whiten,
)
from posttrain.algorithms.reinforce_pp import reinforce_pp_advantages


def test_gae_by_hand():
    # rewards [0, 0, 1], V = 0.5 everywhere, gamma 1, lambda 0.95; V after the last token is 0:
    # delta_2 = 1 - 0.5 = 0.5 -> A_2 = 0.5; delta_1 = 0 + 0.5 - 0.5 = 0 -> A_1 = 0.95 * 0.5 = 0.475;
    # delta_0 = 0 -> A_0 = 0.95 * 0.475 = 0.45125; returns = A + V = [0.95125, 0.975, 1.0]; padding 0
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    adv, ret = gae(rewards, values, torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.45125, 0.475, 0.5, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.95125, 0.975, 1.0, 0.0]]), atol=1e-6, rtol=0)


def _gae_loop(rewards, values, mask, gamma, lam):
    """Python-float twin: walk each row's completion tokens backwards."""
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[i, t]]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(positions):
            delta = rewards[i, t].item() + gamma * next_value - values[i, t].item()
            next_adv = delta + gamma * lam * next_adv
            next_value = values[i, t].item()
            adv[i, t] = next_adv
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_scan_matches_loop_twin_with_padding(gamma, lam):
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    values = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    # right padding of various lengths, one row with a masked-out prompt prefix, one empty row, one episode whose
    # model turns are split by environment tokens (the twin walks the masked tokens only, so they are skipped)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 1, 0]],
        dtype=torch.float64,
    )
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    adv_twin, ret_twin = _gae_loop(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_twin, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, ret_twin, atol=1e-6, rtol=0)


def test_gae_over_a_multi_turn_episode_skips_the_environment_tokens():
    # model turn [0, 1], the environment's reply [2, 3] (mask 0), model turn [4, 5], padding [6]; gamma 0.9, lam 0.5.
    # The steps are the model's tokens 0, 1, 4, 5 (V 0.2, 0.4, 0.5, 0.6); the reply's rewards and values are ignored:
    # A_5 = 1 - 0.6 = 0.4
    # A_4 = (0 + 0.9 * 0.6 - 0.5) + 0.45 * 0.4 = 0.04 + 0.18 = 0.22
    # A_1 = (0 + 0.9 * 0.5 - 0.4) + 0.45 * 0.22 = 0.05 + 0.099 = 0.149   (bootstraps from token 4, over the reply)
    # A_0 = (0 + 0.9 * 0.4 - 0.2) + 0.45 * 0.149 = 0.16 + 0.06705 = 0.22705
    # returns = A + V = [0.42705, 0.549, 0, 0, 0.72, 1.0, 0]
    rewards = torch.tensor([[0.0, 0.0, 7.0, 7.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.2, 0.4, 9.0, 9.0, 0.5, 0.6, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    expected_adv = torch.tensor([[0.22705, 0.149, 0.0, 0.0, 0.22, 0.4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected_adv, atol=1e-9, rtol=0)
    expected_ret = torch.tensor([[0.42705, 0.549, 0.0, 0.0, 0.72, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ret, expected_ret, atol=1e-9, rtol=0)
    # the same as GAE over the model's tokens alone, as one contiguous completion
    steps = mask[0].bool()
    adv_alone, _ = gae(rewards[:, steps], values[:, steps], torch.ones(1, 4), gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv[:, steps], adv_alone, atol=1e-12, rtol=0)


def test_ppo_advantages_put_an_episodes_score_and_kl_on_the_model_tokens_only():
    # kl_coef 0.5, gamma 1, lam 1: rewards at the model's tokens [-0.05, -0.1, 1 - 0.15 = 0.85] (token 3, the last
    # model token, gets the score; the environment's tokens 1, 2 and the padding carry neither KL nor score);
    # with lam = 1 and gamma = 1, A_t = (rewards still to come) - V_t: [0.7 - 0.2, 0.75 - 0.4, 0.85 - 0.5]
    values = torch.tensor([[0.2, 9.0, 9.0, 0.4, 0.5, 9.0]])
    kl = torch.tensor([[0.1, 5.0, 5.0, 0.2, 0.3, 5.0]])
    mask = torch.tensor([[1, 0, 0, 1, 1, 0]])
    adv, ret = ppo_advantages(torch.tensor([1.0]), values, mask, kl, 0.5, gamma=1.0, lam=1.0, whiten_advantages=False)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.0, 0.0, 0.35, 0.35, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.7, 0.0, 0.0, 0.75, 0.85, 0.0]]), atol=1e-6, rtol=0)


def test_gae_token_rewards_adds_score_at_last_token():
    # -0.1 * kl, score at the last masked token: row 0 [-0.01, 1 - 0.02, 0], row 1 [-0.05, -0.05, 2 - 0.05]
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    out = gae_token_rewards(torch.tensor([1.0, 2.0]), kl, torch.tensor([[1, 1, 0], [1, 1, 1]]), kl_coef=0.1)
    torch.testing.assert_close(out, torch.tensor([[-0.01, 0.98, 0.0], [-0.05, -0.05, 1.95]]), atol=1e-6, rtol=0)


def test_whiten_by_hand():
    # [1, 2, 3]: mean 2, unbiased var 1 -> [-1, 0, 1]; padding stays 0
    out = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_reinforce_pp_by_hand():
    # rewards [1, 0], kl_coef 1; KL-to-go: row 0 [0.1 + 0.2, 0.2] -> returns [0.7, 0.8]; row 1 [0.3] -> [-0.3]
    # whiten over the 3 tokens: mean 0.4, deviations [0.3, 0.4, -0.7], unbiased var 0.74 / 2 = 0.37,
    # std 0.6082763 -> [0.4931970, 0.6575959, -1.1507929]
    kl = torch.tensor([[0.1, 0.2], [0.3, 5.0]])
    adv = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), kl, torch.tensor([[1, 1], [1, 0]]), kl_coef=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.4931970, 0.6575959], [-1.1507929, 0.0]]), atol=1e-6, rtol=0)


def test_reinforce_pp_group_baseline_subtracts_group_mean_first():
    # groups of 2: [1, 0] -> [0.5, -0.5]; [1, 1] -> [0, 0]; then the same as plain REINFORCE++ on those rewards
    gen = torch.Generator().manual_seed(1)
    kl = torch.rand(4, 3, generator=gen)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    grouped = reinforce_pp_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), kl, mask, 0.1, group_size=2)
    plain = reinforce_pp_advantages(torch.tensor([0.5, -0.5, 0.0, 0.0]), kl, mask, 0.1)
    torch.testing.assert_close(grouped, plain, atol=1e-6, rtol=0)


def test_value_loss_by_hand():
    # token 0: V 1, V_old 0.5, R 2, c 0.2: unclipped (1-2)^2 = 1, clipped V 0.7 -> 1.69; 0.5 * 1.69 = 0.845 (clipped)
    # token 1: V 0 = V_old, R 1: both 1 -> 0.5;  token 2 padding. mean (0.845 + 0.5) / 2 = 0.6725
    values = torch.tensor([[1.0, 0.0, 3.0]])
    loss, metrics = value_loss(
        values, torch.tensor([[0.5, 0.0, 0.0]]), torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[1, 1, 0]]), clip=0.2
    )
    assert loss.item() == pytest.approx(0.6725, abs=1e-6)
    assert metrics["value/clip_fraction"] == 0.5


def _ppo_inputs():
    # row 0: 3 completion tokens + padding; row 1: a skipped sample (NaN score, no loss tokens)
    scores = torch.tensor([1.0, float("nan")])
    values = torch.tensor([[0.2, 0.4, 0.5, 9.0], [3.0, 3.0, 3.0, 3.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 5.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    return scores, values, mask, kl


def test_ppo_advantages_by_hand_kl_in_the_reward():
    # kl_coef 0.5: rewards [-0.05, -0.1, 1 - 0.15 = 0.85]; gamma 1, lam 0.5, V = [0.2, 0.4, 0.5], V after = 0:
    # delta_2 = 0.85 - 0.5 = 0.35 -> A_2 = 0.35; delta_1 = -0.1 + 0.5 - 0.4 = 0 -> A_1 = 0.5 * 0.35 = 0.175;
    # delta_0 = -0.05 + 0.4 - 0.2 = 0.15 -> A_0 = 0.15 + 0.5 * 0.175 = 0.2375; returns = A + V = [0.4375, 0.575, 0.85]
    scores, values, mask, kl = _ppo_inputs()
    adv, ret = ppo_advantages(scores, values, mask, kl, kl_coef=0.5, gamma=1.0, lam=0.5, whiten_advantages=False)
    torch.testing.assert_close(adv, torch.tensor([[0.2375, 0.175, 0.35, 0.0], [0.0] * 4]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.4375, 0.575, 0.85, 0.0], [0.0] * 4]), atol=1e-6, rtol=0)


def test_ppo_advantages_whitening_leaves_the_returns_and_ignores_padding_and_skipped_rows():
    # whitened [0.2375, 0.175, 0.35]: mean 0.2541667, unbiased var 0.0078646 (std 0.0886825)
    # -> [-0.187938, -0.892705, 1.080643]; the returns are formed before whitening, so they stay as above
    scores, values, mask, kl = _ppo_inputs()
    adv, ret = ppo_advantages(scores, values, mask, kl, kl_coef=0.5, gamma=1.0, lam=0.5, whiten_advantages=True)
    torch.testing.assert_close(adv[0, :3], torch.tensor([-0.187938, -0.892705, 1.080643]), atol=1e-5, rtol=0)
    assert adv[0, 3] == 0 and torch.equal(adv[1], torch.zeros(4))
    torch.testing.assert_close(ret[0], torch.tensor([0.4375, 0.575, 0.85, 0.0]), atol=1e-6, rtol=0)


def test_ppo_advantages_without_kl_coef_ignore_the_kl():
    # kl_coef 0, gamma 0.9, lam 1: rewards [0, 0, 1]; A_t = sum_k (0.9)^k delta_{t+k} = 0.9^(2-t) * 1 - V_t
    # (telescoping with lam = 1): A = [0.81 - 0.2, 0.9 - 0.4, 1 - 0.5] = [0.61, 0.5, 0.5]
    scores, values, mask, kl = _ppo_inputs()
    adv, _ = ppo_advantages(scores, values, mask, kl, kl_coef=0.0, gamma=0.9, lam=1.0, whiten_advantages=False)
    torch.testing.assert_close(adv[0, :3], torch.tensor([0.61, 0.5, 0.5]), atol=1e-6, rtol=0)


def test_explained_variance_by_hand():
    # R = [1, 2, 4]: var 14/9; R - V = [0, 0, 1]: var 2/9 -> 1 - 1/7 = 6/7; padding (garbage) ignored
    values = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    returns = torch.tensor([[1.0, 2.0, 4.0, -7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(values, returns, mask) == pytest.approx(6 / 7, abs=1e-6)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0, abs=1e-6)
    assert explained_variance(torch.full_like(values, 7 / 3), returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask))  # constant returns

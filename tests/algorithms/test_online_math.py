"""The online menu's pure pieces: GSPO's sequence ratio, clip/dual-clip properties, KL in the reward, dynamic
sampling's group filter, RFT's selection and the per-algorithm advantage dispatch.

Hand values are derived in the comments; float64 where exp/log round trips would otherwise cost digits.
"""

import math

import pytest
import torch

from posttrain.algorithms.advantages import group_relative_advantages, informative_groups, rloo_advantages
from posttrain.algorithms.kl import kl_estimate, kl_penalized_rewards
from posttrain.algorithms.losses import clipped_policy_loss, gspo_policy_loss, sequence_log_ratio
from posttrain.algorithms.reduction import reduce_loss
from posttrain.algorithms.registry import online_advantages
from posttrain.algorithms.reinforce_pp import reinforce_pp_advantages
from posttrain.algorithms.rft import rft_keep_mask

NAN = float("nan")
REDUCTIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def _f64(x):
    return torch.tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ GSPO


def test_gspo_by_hand():
    # row 0: token log-ratios [0.1, 0.3] -> mean 0.2 -> s = e^0.2 = 1.2214028 > 1.2; A = 1 -> min(1.2214, 1.2)
    #        -> L = -1.2 on both tokens, clipped, gradient 0
    # row 1: log-ratios [0, -0.2] (third token masked, garbage) -> mean -0.1 -> s = e^-0.1 = 0.9048374, inside
    #        [0.8, 1.2]; A = -2 -> L = -(s * -2) = 1.8096748 on both tokens. Summing the row's two tokens gives
    #        2 * (-A s); d/d lp_t = 2 * (-A) * s * (1/2) = -A s = 1.8096748 for each token
    lp = _f64([[0.1, 0.3, 0.0], [0.0, -0.2, 50.0]]).requires_grad_(True)
    mask = _f64([[1, 1, 0], [1, 1, 0]])
    loss_BT, metrics = gspo_policy_loss(lp, torch.zeros_like(lp), _f64([1.0, -2.0]), mask, eps_low=0.2, eps_high=0.2)
    loss_BT.sum().backward()
    s1 = math.exp(-0.1)
    torch.testing.assert_close(loss_BT.detach(), _f64([[-1.2, -1.2, 0], [2 * s1, 2 * s1, 0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(lp.grad, _f64([[0, 0, 0], [2 * s1, 2 * s1, 0]]), atol=1e-6, rtol=0)
    assert metrics["clip_fraction"] == 0.5  # the 2 tokens of row 0 out of 4
    assert math.isclose(metrics["ratio/max"], math.exp(0.2), abs_tol=1e-6)
    assert math.isclose(metrics["ratio/min"], s1, abs_tol=1e-6)
    # with seq-mean-token-mean the reduced loss is the paper's mean over sequences: (-1.2 + 1.8096748) / 2
    reduced = reduce_loss(loss_BT, mask, "seq-mean-token-mean")
    assert math.isclose(float(reduced.detach()), (-1.2 + 2 * s1) / 2, abs_tol=1e-6)


def test_sequence_log_ratio_is_the_masked_mean_per_row():
    log_ratio = _f64([[0.1, 0.3, 9.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = _f64([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    out = sequence_log_ratio(log_ratio, mask)
    torch.testing.assert_close(out, _f64([[0.2] * 3, [0.5] * 3, [0.0] * 3]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_sequence_ratio_equals_token_ratio_when_all_tokens_share_it(reduction, dual_clip):
    # every row's tokens share one log-ratio, so both ratios are the same number; gradients agree too, because
    # each reduction weighs the tokens of one row equally (sum_t w * L'(s) / |o| = w * L'(s))
    gen = torch.Generator().manual_seed(0)
    row_log_ratio_B1 = torch.tensor([[0.3], [-0.4], [0.05], [0.0]], dtype=torch.float64)  # clipped, clipped, inside
    old = -torch.rand(4, 5, generator=gen, dtype=torch.float64)
    mask = _f64([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    adv = _f64([1.5, -2.0, 0.7, -0.3])
    results = []
    for loss_fn in (clipped_policy_loss, gspo_policy_loss):
        lp = (old + row_log_ratio_B1).requires_grad_(True)
        loss_BT, metrics = loss_fn(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip)
        reduce_loss(loss_BT, mask, reduction, max_completion_tokens=5).backward()
        results.append((loss_BT.detach(), lp.grad, metrics))
    (token_loss, token_grad, token_metrics), (seq_loss, seq_grad, seq_metrics) = results
    torch.testing.assert_close(seq_loss, token_loss, atol=1e-12, rtol=0)
    torch.testing.assert_close(seq_grad, token_grad, atol=1e-12, rtol=0)
    assert seq_metrics.keys() == token_metrics.keys()
    for key in token_metrics:
        assert math.isclose(seq_metrics[key], token_metrics[key], abs_tol=1e-12), key


def test_gspo_padding_changes_nothing():
    gen = torch.Generator().manual_seed(3)
    lp, old = -torch.rand(2, 4, generator=gen), -torch.rand(2, 4, generator=gen)
    adv, mask = torch.tensor([0.7, -1.3]), torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    loss, metrics = gspo_policy_loss(lp, old, adv, mask, eps_low=0.01, eps_high=0.02)
    garbage = torch.tensor([[float("inf"), NAN, -50.0]] * 2)
    padded, padded_metrics = gspo_policy_loss(
        torch.cat([lp, garbage], 1),
        torch.cat([old, -garbage], 1),
        adv,
        torch.cat([mask, torch.zeros(2, 3)], 1),
        0.01,
        0.02,
    )
    assert torch.equal(padded[:, :4], loss) and torch.equal(padded[:, 4:], torch.zeros(2, 3))
    assert padded_metrics == metrics


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gspo_micro_batches_1x6_and_6x1_give_the_same_gradient(reduction):
    # the sequence ratio lives inside a row, so splitting rows across micro-batches with the step's normalisers
    # (as the learner does) must reproduce the full-batch gradient
    gen = torch.Generator().manual_seed(7)
    lp0 = -torch.rand(6, 5, generator=gen, dtype=torch.float64)
    old = lp0 + 0.3 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    adv = torch.randn(6, generator=gen, dtype=torch.float64)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]).double()
    norm = dict(num_tokens=float(mask.sum()), num_seqs=6, max_completion_tokens=5)

    def grad(rows_per_micro_batch):
        lp = lp0.clone().requires_grad_(True)
        for lo in range(0, 6, rows_per_micro_batch):
            rows = slice(lo, lo + rows_per_micro_batch)
            loss, _ = gspo_policy_loss(lp[rows], old[rows], adv[rows], mask[rows], eps_low=0.1, eps_high=0.1)
            reduce_loss(loss, mask[rows], reduction, **norm).backward()
        return lp.grad

    torch.testing.assert_close(grad(1), grad(6), atol=1e-12, rtol=0)


def test_gspo_gradient_at_ratio_one_is_the_sequence_mean_of_reinforce():
    # lp == lp_old: s = 1, inside any clip range; per token d/d lp_t of sum_t L = |o| * (-A) / |o| = -A
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, metrics = gspo_policy_loss(lp, lp.detach(), torch.tensor([2.0, -1.0]), mask)
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-2.0, -2.0, -2.0], [1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    assert metrics["clip_fraction"] == 0.0 and metrics["ratio/min"] == metrics["ratio/max"] == 1.0


# ------------------------------------------------------------------------------------------------ clip properties


def _token_grad(ratio, advantage, **kw):
    lp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    loss, _ = clipped_policy_loss(lp, torch.zeros_like(lp), _f64([advantage]), torch.ones_like(lp), **kw)
    loss.sum().backward()
    return float(loss.detach()), float(lp.grad)


@pytest.mark.parametrize("eps_low, eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_clip_boundaries(eps_low, eps_high):
    kw = dict(eps_low=eps_low, eps_high=eps_high)
    d = 1e-6
    # A > 0: the gradient vanishes just above 1 + eps_high and is -A r just below it; nothing clips below 1
    assert _token_grad(1 + eps_high + d, 1.0, **kw)[1] == 0.0
    assert math.isclose(_token_grad(1 + eps_high - d, 1.0, **kw)[1], -(1 + eps_high - d), rel_tol=1e-9)
    assert math.isclose(_token_grad(0.1, 1.0, **kw)[1], -0.1, rel_tol=1e-9)
    # A < 0: the gradient vanishes just below 1 - eps_low and is -A r just above it; nothing clips above 1
    assert _token_grad(1 - eps_low - d, -1.0, **kw)[1] == 0.0
    assert math.isclose(_token_grad(1 - eps_low + d, -1.0, **kw)[1], 1 - eps_low + d, rel_tol=1e-9)
    assert math.isclose(_token_grad(5.0, -1.0, **kw)[1], 5.0, rel_tol=1e-9)
    # the loss is continuous across each boundary
    assert math.isclose(
        _token_grad(1 + eps_high + d, 1.0, **kw)[0], _token_grad(1 + eps_high - d, 1.0, **kw)[0], abs_tol=3e-6
    )


def test_dual_clip_only_acts_on_negative_advantages():
    gen = torch.Generator().manual_seed(4)
    lp = 2 * torch.randn(6, 8, generator=gen, dtype=torch.float64)  # ratios from ~e^-6 to ~e^6
    old, mask = torch.zeros_like(lp), torch.ones_like(lp)
    adv = _f64([1.0, 0.5, 2.0, -1.0, -0.5, -2.0])
    plain, _ = clipped_policy_loss(lp, old, adv, mask)
    dual, metrics = clipped_policy_loss(lp, old, adv, mask, dual_clip=3.0)
    assert torch.equal(dual[:3], plain[:3])  # A > 0: untouched
    cap_B1 = 3.0 * adv[3:, None].abs()
    torch.testing.assert_close(dual[3:], torch.minimum(plain[3:], cap_B1), atol=0, rtol=0)  # A < 0: capped at c|A|
    assert metrics["dual_clip_fraction"] == float((plain[3:] > cap_B1).sum()) / 48 > 0


# ------------------------------------------------------------------------------------------------ KL in the reward


def test_kl_penalized_rewards_by_hand():
    # coef 0.5: row 0 sums KL 0.1 + 0.2 (the masked 5.0 is not counted) -> 1 - 0.15 = 0.85;
    # row 1: 0.3 -> 0 - 0.15 = -0.15; row 2 is skipped (NaN reward) and stays NaN
    kl = torch.tensor([[0.1, 0.2, 5.0], [0.3, 7.0, 7.0], [0.1, 0.1, 0.1]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    out = kl_penalized_rewards(torch.tensor([1.0, 0.0, NAN]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(out[:2], torch.tensor([0.85, -0.15]), atol=1e-6, rtol=0)
    assert math.isnan(out[2])
    with pytest.raises(ValueError, match="kl_penalized_rewards"):
        kl_penalized_rewards(torch.zeros(2), kl, mask, 0.1)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_in_the_reward_for_grpo_and_rloo_is_the_penalised_reward_then_the_baseline(estimator):
    gen = torch.Generator().manual_seed(5)
    lp, lp_ref = -torch.rand(6, 4, generator=gen), -torch.rand(6, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    kl = torch.where(mask.bool(), kl_estimate(estimator, lp, lp_ref), 0.0)
    rewards_BG = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    penalised_BG = kl_penalized_rewards(rewards_BG.flatten(), kl, mask, 0.1).view(2, 3)
    grpo = online_advantages("grpo", rewards_BG, mask, kl, 0.1, "group").sequence_B
    torch.testing.assert_close(grpo, group_relative_advantages(penalised_BG).flatten())
    rloo = online_advantages("rloo", rewards_BG, mask, kl, 0.1).sequence_B
    torch.testing.assert_close(rloo, rloo_advantages(penalised_BG).flatten())


# ------------------------------------------------------------------------------------------------ advantage dispatch


def test_dispatch_without_kl_is_the_plain_estimators():
    rewards_BG = torch.tensor([[1.0, 0.0, 0.5], [1.0, 0.0, 0.0]])
    mask = torch.ones(6, 2)
    rloo = online_advantages("rloo", rewards_BG, mask).sequence_B
    torch.testing.assert_close(rloo[:3], torch.tensor([0.75, -0.75, 0.0]))  # ALGORITHMS.md's worked value
    grpo = online_advantages("grpo", rewards_BG, mask).sequence_B
    torch.testing.assert_close(grpo[3:], torch.tensor([1.15450, -0.57725, -0.57725]), atol=1e-5, rtol=0)
    adv = online_advantages("reinforce_pp", rewards_BG, mask)
    assert adv.sequence_B is None
    torch.testing.assert_close(
        adv.token_BC, reinforce_pp_advantages(rewards_BG.flatten(), torch.zeros(6, 2), mask, kl_coef=0.0)
    )
    with pytest.raises(ValueError, match="unknown algorithm"):
        online_advantages("ppo", rewards_BG, mask)


def test_reinforce_pp_baseline_equals_the_grouped_estimator_and_leaves_skipped_samples_out():
    gen = torch.Generator().manual_seed(6)
    kl = torch.rand(6, 3, generator=gen)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    rewards_BG = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    ours = online_advantages("reinforce_pp_baseline", rewards_BG, mask, kl, 0.2).token_BC
    torch.testing.assert_close(ours, reinforce_pp_advantages(rewards_BG.flatten(), kl, mask, 0.2, group_size=3))

    # a skipped sample (NaN reward, masked row): its group's mean is over the other two, and it gets 0
    skipped_BG = torch.tensor([[1.0, NAN, 0.5], [0.0, 0.0, 1.0]])
    skipped_mask = mask.clone()
    skipped_mask[1] = 0
    ours = online_advantages("reinforce_pp_baseline", skipped_BG, skipped_mask, kl, 0.2).token_BC
    centred = torch.tensor([0.25, 0.0, -0.25, -1 / 3, -1 / 3, 2 / 3])  # group 0 mean 0.75, group 1 mean 1/3
    torch.testing.assert_close(ours, reinforce_pp_advantages(centred, kl, skipped_mask, 0.2), atol=1e-6, rtol=0)
    assert torch.equal(ours[1], torch.zeros(3))


# ------------------------------------------------------------------------------------------------ dynamic sampling


def test_informative_groups():
    # all equal; spread; equal once NaN is ignored; one valid sample; spread with a NaN
    rewards = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [NAN, 1.0, 1.0], [NAN, NAN, 0.0], [0.5, NAN, 0.2]])
    assert informative_groups(rewards).tolist() == [False, True, False, False, True]


# ------------------------------------------------------------------------------------------------ RFT selection


def test_rft_keep_worked_values():
    rewards = torch.tensor([[0.0, 1.0, 1.0], [0.5, 0.0, 0.2]])
    assert rft_keep_mask(rewards, "best", 0.5).tolist() == [[False, True, False], [True, False, False]]
    assert rft_keep_mask(rewards, "all", 0.5).tolist() == [[False, True, True], [True, False, False]]
    assert rft_keep_mask(rewards, "best", 1.0).tolist() == [[False, True, False], [False, False, False]]
    assert rft_keep_mask(rewards, "best", None).tolist() == [[False, True, False], [True, False, False]]


def test_rft_never_keeps_skipped_samples():
    rewards = torch.tensor([[NAN, 0.3, 0.1], [NAN, NAN, NAN]])
    assert rft_keep_mask(rewards, "best", None).tolist() == [[False, True, False], [False, False, False]]
    assert rft_keep_mask(rewards, "all", 0.0).tolist() == [[False, True, True], [False, False, False]]


def test_rft_refuses_keep_all_without_a_threshold():
    with pytest.raises(ValueError, match="min_reward"):
        rft_keep_mask(torch.zeros(1, 2), "all", None)

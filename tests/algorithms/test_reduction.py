"""Loss reduction: hand values per mode, 1x8 vs 8x1 micro-batch invariance, padding invariance."""

import pytest
import torch

from posttrain.algorithms.masked import masked_mean, masked_sum
from posttrain.algorithms.reduction import reduce_loss

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
NAN, INF = float("nan"), float("inf")

# two sequences: |o_0| = 3 (1, 2, 3), |o_1| = 1 (5); garbage at masked positions must not leak
LOSS = torch.tensor([[1.0, 2.0, 3.0, NAN], [5.0, INF, -INF, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_hand_values():
    # token-mean: (1 + 2 + 3 + 5) / 4 tokens = 2.75
    # seq-mean-token-mean: (6/3 + 5/1) / 2 seqs = 3.5
    # seq-mean-token-sum-norm: 11 / (2 seqs * 8 max tokens) = 0.6875; default max = longest row (3): 11/6
    assert torch.isclose(reduce_loss(LOSS, MASK, "token-mean"), torch.tensor(2.75), atol=1e-6, rtol=0)
    assert torch.isclose(reduce_loss(LOSS, MASK, "seq-mean-token-mean"), torch.tensor(3.5), atol=1e-6, rtol=0)
    value = reduce_loss(LOSS, MASK, "seq-mean-token-sum-norm", max_completion_tokens=8)
    assert torch.isclose(value, torch.tensor(0.6875), atol=1e-6, rtol=0)
    default = reduce_loss(LOSS, MASK, "seq-mean-token-sum-norm")
    assert torch.isclose(default, torch.tensor(11 / 6), atol=1e-6, rtol=0)


def test_explicit_normalisers():
    # token-mean with num_tokens=11: 11 / 11 = 1; seq-mean with num_seqs=7: 7 / 7 = 1; sum-norm 11 / (2 * 11)
    kw = dict(num_tokens=11.0, num_seqs=7, max_completion_tokens=11)  # each mode ignores what it does not use
    assert torch.isclose(reduce_loss(LOSS, MASK, "token-mean", **kw), torch.tensor(1.0), atol=1e-6, rtol=0)
    assert torch.isclose(reduce_loss(LOSS, MASK, "seq-mean-token-mean", **kw), torch.tensor(1.0), atol=1e-6, rtol=0)
    value = reduce_loss(LOSS, MASK, "seq-mean-token-sum-norm", **kw)
    assert torch.isclose(value, torch.tensor(1 / 7), atol=1e-6, rtol=0)


def _toy_batch(seed=0, num_seqs=8, width=10, budget=12):
    """8 right-padded sequences of lengths 3..10 with a 2-token 'prompt' (mask 0) in front of the completion.

    The per-token loss depends on a shared parameter `w` [4] through features X [8, width, 4], so that the
    gradient of every micro-batch lands on the same tensor, as with a model's weights.
    """
    gen = torch.Generator().manual_seed(seed)
    features_BTD = torch.randn(num_seqs, width, 4, generator=gen)
    lengths = [3, 10, 5, 4, 9, 6, 8, 7][:num_seqs]  # prompt + completion, unsorted
    mask_BT = torch.zeros(num_seqs, width)
    for i, n in enumerate(lengths):
        mask_BT[i, 2:n] = 1.0
    w = torch.randn(4, generator=gen, requires_grad=True)
    return features_BTD, mask_BT, lengths, w, budget


def _per_token_loss(features_BTD, w):
    return torch.tanh(features_BTD @ w) + 0.1 * (features_BTD @ w).square()  # [B, T]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_micro_batches_sum_to_the_full_batch(mode, micro_batch_size):
    features_BTD, mask_BT, lengths, w, budget = _toy_batch()
    norm = dict(num_tokens=float(mask_BT.sum()), num_seqs=len(lengths), max_completion_tokens=budget)

    full = reduce_loss(_per_token_loss(features_BTD, w), mask_BT, mode, **norm)
    (full_grad,) = torch.autograd.grad(full, w)
    # one batch, normalisers left to default, is the same step (except the fixed budget of sum-norm)
    defaults = {"max_completion_tokens": budget} if mode == "seq-mean-token-sum-norm" else {}
    own = reduce_loss(_per_token_loss(features_BTD, w), mask_BT, mode, **defaults)
    assert torch.isclose(own, full, atol=1e-6, rtol=0)

    total = torch.zeros(())
    for lo in range(0, len(lengths), micro_batch_size):
        width = max(lengths[lo : lo + micro_batch_size])  # columns trimmed per micro-batch, as TrainBatch.slice
        part = reduce_loss(
            _per_token_loss(features_BTD[lo : lo + micro_batch_size, :width], w),
            mask_BT[lo : lo + micro_batch_size, :width],
            mode,
            **norm,
        )
        part.backward()  # gradient accumulation
        total = total + part.detach()
    assert torch.isclose(total, full.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.grad, full_grad, atol=1e-6, rtol=0)


def test_averaging_micro_batch_token_means_is_wrong():
    # the check above is not vacuous: 8 per-micro-batch token-means, averaged, weigh short sequences up
    features_BTD, mask_BT, lengths, w, _ = _toy_batch()
    loss_BT = _per_token_loss(features_BTD, w).detach()
    full = reduce_loss(loss_BT, mask_BT, "token-mean")
    naive = sum(reduce_loss(loss_BT[i : i + 1], mask_BT[i : i + 1], "token-mean") for i in range(8)) / 8
    assert not torch.isclose(naive, full, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_padding_changes_nothing(mode):
    # extra columns and an extra row, all with mask 0 and garbage values: same value, same gradient
    features_BTD, mask_BT, _, w, budget = _toy_batch()
    loss_BT = _per_token_loss(features_BTD, w)
    base = reduce_loss(loss_BT, mask_BT, mode, max_completion_tokens=budget)
    (base_grad,) = torch.autograd.grad(base, w)

    padded_BT = torch.cat([_per_token_loss(features_BTD, w), torch.full((8, 3), NAN)], dim=1)  # [8, 13]
    padded_BT = torch.cat([padded_BT, torch.full((1, 13), INF)], dim=0)  # [9, 13]
    padded_mask_BT = torch.zeros(9, 13)
    padded_mask_BT[:8, :10] = mask_BT
    padded = reduce_loss(padded_BT, padded_mask_BT, mode, max_completion_tokens=budget)
    (padded_grad,) = torch.autograd.grad(padded, w)
    assert torch.isclose(padded, base, atol=1e-6, rtol=0)
    torch.testing.assert_close(padded_grad, base_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_masked_positions_get_zero_gradient(mode):
    loss_BT = LOSS.nan_to_num(0.0, 0.0, 0.0).requires_grad_(True)
    reduce_loss(loss_BT, MASK, mode).backward()
    assert torch.equal(loss_BT.grad[MASK == 0], torch.zeros(4))
    assert (loss_BT.grad[MASK == 1] > 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_empty_mask_gives_zero(mode):
    assert reduce_loss(torch.ones(2, 3), torch.zeros(2, 3), mode) == 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown loss reduction"):
        reduce_loss(LOSS, MASK, "sequence-sum")
    with pytest.raises(ValueError, match="num_tokens must be > 0"):
        reduce_loss(LOSS, MASK, "token-mean", num_tokens=0)
    with pytest.raises(ValueError, match="same shape|one shape"):
        reduce_loss(LOSS, MASK[:, :3], "token-mean")


def test_masked_mean_and_sum():
    # row sums 1 + 2 + 3 = 6 and 5; total 11 over 4 tokens; per-row means 2 and 5
    assert masked_sum(LOSS, MASK) == 11.0
    assert masked_mean(LOSS, MASK) == 2.75
    torch.testing.assert_close(masked_mean(LOSS, MASK, dim=-1), torch.tensor([2.0, 5.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_sum(LOSS, MASK.bool(), dim=-1), torch.tensor([6.0, 5.0]), atol=1e-6, rtol=0)
    assert masked_mean(LOSS, torch.zeros_like(MASK)) == 0  # empty selection: 0, not NaN

"""Truncated importance sampling: hand-computed weights, masking, and its effect inside the learner's loss."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms.losses.tis import tis_weights
from posttrain.data.types import Sample
from posttrain.learner.batch import collate
from posttrain.learner.learner import LearnerImpl, LearnerSettings
from posttrain.models.tiny import tiny_model_path

INF = float("inf")


def test_hand_computed_weights_and_metrics():
    # row 0: log-ratios lp_old - lp_sampler = [0, -1, 1.5] -> exp [1, 0.367879, 4.481689] -> capped at 2: [1, .3679, 2]
    # row 1: 0.5 -> 1.648721; its padding holds -inf in both (inf - inf would be NaN) and must come out 0
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -INF, -INF]])
    sampler = torch.tensor([[-1.0, -1.0, -2.0], [-0.7, -INF, -INF]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    weights, metrics = tis_weights(old, sampler, mask, cap=2.0)
    expected = torch.tensor([[1.0, math.exp(-1), 2.0], [math.exp(0.5), 0.0, 0.0]])
    torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)
    # mean over the 4 masked tokens: (1 + 0.3678794 + 2 + 1.6487213) / 4 = 1.2541502
    assert metrics["tis/weight_mean"] == pytest.approx(1.2541502, abs=1e-6)
    assert metrics["tis/truncated_fraction"] == pytest.approx(0.25)  # only the 4.48 token
    assert metrics["tis/log_ratio_abs_mean"] == pytest.approx((0 + 1 + 1.5 + 0.5) / 4)


def test_equal_logprobs_give_weight_one_and_a_cap_below_one_caps_everything():
    lp = torch.tensor([[-0.3, -1.2]])
    mask = torch.ones(1, 2)
    weights, metrics = tis_weights(lp, lp.clone(), mask, cap=2.0)
    assert torch.equal(weights, torch.ones(1, 2)) and metrics["tis/truncated_fraction"] == 0
    weights, metrics = tis_weights(lp, lp.clone(), mask, cap=0.5)
    assert torch.equal(weights, torch.full((1, 2), 0.5)) and metrics["tis/truncated_fraction"] == 1.0


def test_weights_carry_no_gradient_and_bad_inputs_are_refused():
    old = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    weights, _ = tis_weights(old, torch.tensor([[-1.5, -1.0]]), torch.ones(1, 2), cap=3.0)
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="cap must be > 0"):
        tis_weights(old, old, torch.ones(1, 2), cap=0.0)
    with pytest.raises(ValueError, match="same \\[batch, tokens\\] shape"):
        tis_weights(old, torch.zeros(1, 3), torch.ones(1, 2), cap=2.0)


def test_learner_weights_its_policy_loss_by_the_truncated_ratio():
    """With one update, lp_old is the learner's own log-prob; a sampler that found every token twice as likely
    (lp_sampler = lp_old + ln 2) gives weight 1/2 on every token, so the policy loss halves; a cap of 1/4 below
    that gives 1/4 everywhere."""
    batch = _batch()
    plain = _learner()
    lp_BC, _ = plain.logprobs(batch)
    batch.sampler_logprobs_BC = torch.where(batch.loss_mask_BC.bool(), lp_BC + math.log(2), 0.0)
    baseline = plain.train_step(batch)
    halved = _learner(tis_cap=10.0).train_step(batch)
    assert halved["tis/weight_mean"] == pytest.approx(0.5, abs=1e-5)
    assert halved["tis/truncated_fraction"] == 0.0
    assert halved["pg_loss"] == pytest.approx(0.5 * baseline["pg_loss"], rel=1e-4)
    capped = _learner(tis_cap=0.25).train_step(batch)
    assert capped["tis/weight_mean"] == pytest.approx(0.25) and capped["tis/truncated_fraction"] == 1.0
    assert capped["pg_loss"] == pytest.approx(0.25 * baseline["pg_loss"], rel=1e-4)
    assert baseline["pg_loss"] != pytest.approx(0.0, abs=1e-3)


def _batch():
    """Six random samples with advantages of both signs."""
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(6):
        prompt = torch.randint(3, 90, (3 + i % 3,), generator=gen).tolist()
        completion = torch.randint(3, 90, (2 + (2 * i) % 5,), generator=gen).tolist()
        samples.append(Sample("p", prompt, "c", completion, [0.0] * len(completion), "stop", i // 2))
    return collate(samples, [1.0, -1.0, 0.5, -0.5, 2.0, 0.3], pad_token_id=0, max_completion_tokens=8)


def _learner(**kw) -> LearnerImpl:
    settings = dict(model_path=str(tiny_model_path()), lr=5e-2, micro_batch_size=4, num_threads=1, seed=0)
    return LearnerImpl(LearnerSettings(**{**settings, **kw}))

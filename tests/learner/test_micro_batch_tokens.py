"""Length-bucketed micro-batches (`train.micro_batch_tokens`): fewer padded tokens, the same loss and gradients."""

import pytest
import torch

from posttrain.data.types import Sample
from posttrain.learner.batch import collate, length_buckets, micro_batches
from posttrain.learner.learner import LearnerImpl, LearnerSettings
from posttrain.models.tiny import tiny_model_path

PROMPTS = [3, 5, 4, 3, 5, 4, 3, 5]
COMPLETIONS = [12, 2, 9, 3, 11, 1, 7, 4]


def _batch():
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        prompt, completion = (
            torch.randint(3, 90, (p,), generator=gen).tolist(),
            torch.randint(3, 90, (c,), generator=gen).tolist(),
        )
        samples.append(Sample("p", prompt, "c", completion, [-1.0] * c, "stop", i // 2))
    advantages = torch.randn(len(samples), generator=gen).tolist()
    return collate(samples, advantages, pad_token_id=0, max_completion_tokens=12)


def _padded(mbs) -> int:
    return sum(mb.input_ids_BT.numel() for mb in mbs)


def test_buckets_sort_by_length_and_respect_both_budgets():
    order, bounds = length_buckets(PROMPTS, COMPLETIONS, max_rows=3, max_tokens=40)
    assert order == [5, 1, 3, 7, 6, 2, 4, 0]  # by completion length (then prompt length)
    assert bounds == [0, 3, 5, 7, 8]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        rows = order[lo:hi]
        assert len(rows) <= 3
        assert len(rows) == 1 or len(rows) * (max(PROMPTS[i] for i in rows) + max(COMPLETIONS[i] for i in rows)) <= 40


def test_a_row_over_the_budget_gets_a_micro_batch_of_its_own():
    assert length_buckets([5, 5], [20, 30], max_rows=8, max_tokens=10) == ([0, 1], [0, 1, 2])
    assert length_buckets([], [], max_rows=8, max_tokens=10) == ([], [0])
    with pytest.raises(ValueError, match="length_buckets: max_rows and max_tokens"):
        length_buckets([1], [1], max_rows=0, max_tokens=10)


def test_micro_batches_hold_every_row_once_with_less_padding():
    batch = _batch()
    bucketed = micro_batches(batch, max_rows=8, max_tokens=40)
    assert len(bucketed) > 1
    seen = sorted(int(n) for mb in bucketed for n in mb.completion_lengths_B)
    assert seen == sorted(COMPLETIONS)
    assert _padded(bucketed) < _padded(micro_batches(batch, max_rows=8)) == 8 * (5 + 12)


def _learner(**kw) -> LearnerImpl:
    settings = dict(model_path=str(tiny_model_path()), lr=5e-2, micro_batch_size=8, num_threads=1, seed=0)
    return LearnerImpl(LearnerSettings(**{**settings, **kw}))


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_bucketed_step_has_the_loss_and_gradients_of_the_whole_batch(reduction):
    whole, bucketed = _learner(loss_reduction=reduction), _learner(loss_reduction=reduction, micro_batch_tokens=40)
    a, b = whole.train_step(_batch()), bucketed.train_step(_batch())
    for key in ("loss", "pg_loss", "grad_norm", "entropy", "rollout/logprob_diff"):
        assert b[key] == pytest.approx(a[key], abs=1e-6, rel=0), key
    grads = [(p.grad, q.grad) for p, q in zip(whole.model.parameters(), bucketed.model.parameters(), strict=True)]
    assert all(g is not None for g, _ in grads)
    for g, h in grads:
        torch.testing.assert_close(h, g, atol=1e-6, rtol=0)

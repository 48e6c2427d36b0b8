"""Batch layout: left-padded prompts, right-padded completions, skipped samples masked out."""

import math

import torch

from posttrain.data.types import Sample
from posttrain.learner.batch import collate


def _sample(prompt_ids, completion_ids):
    lps = [-0.5 * (i + 1) for i in range(len(completion_ids))]
    return Sample("p", prompt_ids, "c", completion_ids, lps, "stop", 0)


def test_collate_aligns_completions_at_one_column_and_masks_skipped():
    samples = [_sample([5, 6, 7], [8, 9]), _sample([5], [8, 9, 10, 11]), _sample([5, 6], [])]
    batch = collate(samples, [1.0, math.nan, -1.0], pad_token_id=0, max_completion_tokens=4)
    assert batch.input_ids_BT.tolist() == [[5, 6, 7, 8, 9, 0, 0], [0, 0, 5, 8, 9, 10, 11], [0, 5, 6, 0, 0, 0, 0]]
    assert batch.attention_mask_BT.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0]]
    assert batch.prompt_width == 3
    # the NaN-advantage sample keeps its tokens but carries no loss; the empty completion none either
    assert batch.loss_mask_BC.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert batch.advantages_B.tolist() == [1.0, 0.0, 0.0]
    assert batch.sampler_logprobs_BC[1].tolist() == [-0.5, -1.0, -1.5, -2.0]


def test_slice_trims_padding_columns_on_both_sides():
    samples = [_sample([5, 6, 7], [8]), _sample([5], [8, 9, 10, 11]), _sample([4], [3])]
    batch = collate(samples, [1.0, 2.0, 3.0], pad_token_id=0, max_completion_tokens=4)
    mb = batch.slice(2, 3)
    assert mb.input_ids_BT.tolist() == [[4, 3]] and mb.prompt_width == 1
    assert mb.loss_mask_BC.tolist() == [[1]] and mb.advantages_B.tolist() == [3.0]
    mb = batch.slice(0, 2)
    assert torch.equal(mb.input_ids_BT, batch.input_ids_BT[:2])  # already as tight as it gets

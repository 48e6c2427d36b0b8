"""The grouped layout (each distinct prompt once, its samples' completions after it) against the padded layout."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import posttrain.models.logprobs as logprobs_module
from posttrain.models.logprobs import token_logprobs
from posttrain.models.shared_prefix import group_rows, supports_grouping


@pytest.fixture(scope="module")
def model(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="sdpa")
    assert supports_grouping(model)
    return model


def grpo_batch(seed=0, prompts=(5, 3, 7), samples=3, max_completion=6, vocab=50):
    """Left-padded prompts (each repeated `samples` times), right-padded completions of random lengths (one empty)."""
    g = torch.Generator().manual_seed(seed)
    P, C = max(prompts), max_completion
    rows, masks = [], []
    for p in prompts:
        prompt = torch.randint(3, vocab, (p,), generator=g)
        for _ in range(samples):
            c = int(torch.randint(0, C + 1, (), generator=g))
            ids = torch.zeros(P + C, dtype=torch.long)
            mask = torch.zeros(P + C, dtype=torch.long)
            ids[P - p : P] = prompt
            ids[P : P + c] = torch.randint(3, vocab, (c,), generator=g)
            mask[P - p : P + c] = 1
            rows.append(ids)
            masks.append(mask)
    ids_BT, mask_BT = torch.stack(rows), torch.stack(masks)
    mask_BT[1, P:] = 0  # an empty completion
    ids_BT[1, P:] = 0
    return ids_BT, mask_BT, P


def padded(monkeypatch):
    monkeypatch.setattr(logprobs_module, "group_rows", lambda *a, **k: None)


def test_layout_by_hand():
    # two samples of prompt [7, 8] (one left-padded copy), completions [1, 2, 3] and [4]; one sample of prompt [9]
    ids_BT = torch.tensor([[7, 8, 1, 2, 3], [7, 8, 4, 0, 0], [0, 9, 5, 6, 0]])
    mask_BT = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    grouped = group_rows(ids_BT, mask_BT, start=2, min_saving=0.0)
    # rows: [7 8 | 1 2 3 | 4] and [9 | 5 6 | pad pad pad]
    assert grouped.input_ids_GL[0].tolist() == [7, 8, 1, 2, 3, 4]
    assert grouped.input_ids_GL[1, :3].tolist() == [9, 5, 6]
    assert grouped.position_ids_GL.tolist() == [[0, 1, 2, 3, 4, 2], [0, 1, 2, 0, 0, 0]]
    # completion tokens in padded row-major order: 1 2 3 (predicted at 1, 2, 3), 4 (at 1), 5 6 (at 6 + 0, 6 + 1)
    assert grouped.predicting_N.tolist() == [1, 2, 3, 1, 6, 7]
    m = grouped.mask_G1LL[0, 0].int()
    assert m[5].tolist() == [1, 1, 0, 0, 0, 1]  # completion [4] sees the prompt and itself, not [1, 2, 3]
    assert m[4].tolist() == [1, 1, 1, 1, 1, 0]
    assert grouped.mask_G1LL[1, 0].diagonal().all()  # padded positions attend to themselves: no empty row


def test_no_saving_or_other_layouts_keep_the_padded_layout():
    # three distinct prompts, one full-width row: the grouped layout is as large as the padded one
    ids_BT = torch.tensor([[7, 8, 1, 2, 3], [0, 9, 4, 5, 0], [0, 6, 4, 0, 0]])
    mask_BT = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 1, 1, 0, 0]])
    assert group_rows(ids_BT, mask_BT, start=2) is None
    assert group_rows(ids_BT, mask_BT, start=2, min_saving=0.0) is not None
    repeated_BT, repeated_mask_BT = ids_BT[[0, 0, 0]], mask_BT[[0, 0, 0]]
    assert group_rows(repeated_BT, repeated_mask_BT, start=2) is not None  # 3 x 5 positions -> 1 x 11
    # long completions: one row of n completions has ~n^2 / n times the attention area of n padded rows
    long_BT = torch.cat([torch.full((8, 2), 7), torch.arange(8 * 60).view(8, 60) % 50 + 3], dim=1)
    assert group_rows(long_BT, torch.ones_like(long_BT), start=2) is None
    assert group_rows(long_BT[:2], torch.ones_like(long_BT[:2]), start=2) is None  # 1 x 122 vs 2 x 62: no saving
    gap_BT = repeated_mask_BT.clone()
    gap_BT[1, 3] = 0  # a hole inside a completion: not the left/right-padded layout
    assert group_rows(repeated_BT, gap_BT, start=2) is None


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_grouped_logprobs_and_gradients_equal_the_padded_ones(model, monkeypatch, temperature):
    ids_BT, mask_BT, P = grpo_batch(seed=3)
    assert group_rows(ids_BT, mask_BT, P) is not None
    weights_BC = torch.randn(ids_BT.shape[0], ids_BT.shape[1] - P, generator=torch.Generator().manual_seed(1))
    seen = []
    probe = model.lm_head.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    try:
        model.zero_grad()
        lp_BC, ent_BC = token_logprobs(model, ids_BT, mask_BT, temperature, completion_start=P)
    finally:
        probe.remove()
    assert seen == [(int(mask_BT[:, P:].sum()), model.config.hidden_size)]  # the head on completion tokens only
    (lp_BC * weights_BC).sum().backward()
    grouped = {name: p.grad.clone() for name, p in model.named_parameters()}

    padded(monkeypatch)
    model.zero_grad()
    ref_lp, ref_ent = token_logprobs(model, ids_BT, mask_BT, temperature, completion_start=P)
    (ref_lp * weights_BC).sum().backward()
    torch.testing.assert_close(lp_BC, ref_lp, atol=2e-6, rtol=0)
    torch.testing.assert_close(ent_BC, ref_ent, atol=2e-6, rtol=1e-6)  # entropies ~5.8 nats
    assert lp_BC[1].abs().sum() == 0 and (lp_BC[~mask_BT[:, P:].bool()] == 0).all()  # padding exactly 0
    # gradients of size ~10 (the embedding's) summed in another order; float32 rounding alone differs by ~1e-5 from
    # the float64 values in either layout, and a lost or doubled completion would differ by ~1
    for name, p in model.named_parameters():
        torch.testing.assert_close(grouped[name], p.grad, atol=2e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert not model.lm_head._forward_pre_hooks


def test_a_model_without_sdpa_keeps_the_padded_layout(tiny_path):
    eager = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="eager")
    assert not supports_grouping(eager)
    ids_BT, mask_BT, P = grpo_batch(seed=3)
    seen = []
    probe = eager.get_input_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    try:
        token_logprobs(eager, ids_BT, mask_BT, completion_start=P)
    finally:
        probe.remove()
    assert seen == [ids_BT.shape]

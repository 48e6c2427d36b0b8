"""Per-token log-probs and entropy against a direct log_softmax computation, under padding, chunking and bf16."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import posttrain.models.logprobs as logprobs_module
from posttrain.models.logprobs import autocast_body, position_ids_from_mask, token_logprobs


@pytest.fixture(scope="module")
def model(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path)


def random_ids(batch, length, seed=0):
    return torch.randint(3, 356, (batch, length), generator=torch.Generator().manual_seed(seed))


def direct(model, input_ids_BT, temperature):
    """Reference: full log_softmax over the vocabulary, unpadded batch."""
    logits_BTV = model(input_ids_BT).logits / temperature
    logp_BTV = torch.log_softmax(logits_BTV[:, :-1], dim=-1)
    logprobs_BT = logp_BTV.gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)
    entropy_BT = -(logp_BTV.exp() * logp_BTV).sum(-1)
    return logprobs_BT, entropy_BT


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_direct_log_softmax(model, temperature):
    input_ids_BT = random_ids(3, 12)
    logprobs_BT, entropy_BT = token_logprobs(model, input_ids_BT, torch.ones_like(input_ids_BT), temperature)
    expected_logprobs, expected_entropy = direct(model, input_ids_BT, temperature)
    assert logprobs_BT.shape == entropy_BT.shape == (3, 12)
    assert torch.all(logprobs_BT[:, 0] == 0) and torch.all(entropy_BT[:, 0] == 0)
    torch.testing.assert_close(logprobs_BT[:, 1:], expected_logprobs, atol=1e-6, rtol=0)
    # entropies are ~5.5 nats: allow a few float32 ulps (rtol 1e-6) on top of atol
    torch.testing.assert_close(entropy_BT[:, 1:], expected_entropy, atol=1e-6, rtol=1e-6)
    assert expected_logprobs.std() > 0.3  # a peaked enough model that misalignment by one would show


def test_temperature_changes_values_and_must_be_positive(model):
    input_ids_BT = random_ids(1, 8)
    mask_BT = torch.ones_like(input_ids_BT)
    cold, cold_entropy = token_logprobs(model, input_ids_BT, mask_BT, temperature=0.5)
    hot, hot_entropy = token_logprobs(model, input_ids_BT, mask_BT, temperature=2.0)
    assert (cold - hot).abs().max() > 0.1
    assert torch.all(cold_entropy[:, 1:] < hot_entropy[:, 1:])  # sharper distribution, lower entropy
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(model, input_ids_BT, mask_BT, temperature=bad)


def test_left_and_right_padding_match_unpadded(model):
    short_T, long_T = 6, 10
    short, long = random_ids(1, short_T, seed=1), random_ids(1, long_T, seed=2)
    alone, alone_entropy = token_logprobs(model, short, torch.ones_like(short))
    pad = torch.zeros(1, long_T - short_T, dtype=torch.long)

    left_ids = torch.cat([torch.cat([pad, short], 1), long])
    left_mask = torch.cat([torch.cat([pad, torch.ones_like(short)], 1), torch.ones_like(long)])
    left, left_entropy = token_logprobs(model, left_ids, left_mask)
    # column long_T - short_T is the first real token: no prediction for it, like column 0 alone
    torch.testing.assert_close(left[:1, -short_T + 1 :], alone[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(left_entropy[:1, -short_T + 1 :], alone_entropy[:, 1:], atol=1e-5, rtol=0)
    assert torch.all(left[0, : long_T - short_T] == 0)  # padding is 0, never NaN

    right_ids = torch.cat([torch.cat([short, pad], 1), long])
    right_mask = torch.cat([torch.cat([torch.ones_like(short), pad], 1), torch.ones_like(long)])
    right, _ = token_logprobs(model, right_ids, right_mask)
    torch.testing.assert_close(right[:1, :short_T], alone, atol=1e-5, rtol=0)
    assert torch.all(right[0, short_T:] == 0)
    # the long row is unaffected by the other row's padding
    long_alone, _ = token_logprobs(model, long, torch.ones_like(long))
    torch.testing.assert_close(left[1:], long_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right[1:], long_alone, atol=1e-5, rtol=0)


def test_position_ids_from_mask():
    mask_BT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]])
    assert torch.equal(position_ids_from_mask(mask_BT), expected)


def test_gradients_flow_through_logprobs_not_entropy(model):
    input_ids_BT = random_ids(2, 7)
    model.zero_grad()
    logprobs_BT, entropy_BT = token_logprobs(model, input_ids_BT, torch.ones_like(input_ids_BT), temperature=0.9)
    assert logprobs_BT.requires_grad and not entropy_BT.requires_grad
    logprobs_BT[:, 1:].sum().backward()
    # d/d logits of sum_t log p(x_t): check one lm_head gradient row against the analytic form
    with torch.no_grad():
        hidden_BTH = model.model(input_ids_BT).last_hidden_state[:, :-1]
        probs_BTV = torch.softmax(model.lm_head(hidden_BTH) / 0.9, -1)
        onehot_BTV = torch.nn.functional.one_hot(input_ids_BT[:, 1:], probs_BTV.shape[-1]).float()
        grad_VH = torch.einsum("btv,bth->vh", (onehot_BTV - probs_BTV) / 0.9, hidden_BTH)
    torch.testing.assert_close(model.lm_head.weight.grad, grad_VH, atol=1e-5, rtol=1e-4)
    model.zero_grad()
    _, no_entropy = token_logprobs(model, input_ids_BT, torch.ones_like(input_ids_BT), with_entropy=False)
    assert no_entropy is None


def test_chunked_rows_give_the_same_values(model, monkeypatch):
    input_ids_BT = random_ids(2, 9)
    mask_BT = torch.ones_like(input_ids_BT)
    whole = token_logprobs(model, input_ids_BT, mask_BT, temperature=0.8)
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", 3 * 356)  # 3 rows per chunk, 16 rows in all
    chunked = token_logprobs(model, input_ids_BT, mask_BT, temperature=0.8)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_bf16_model_gives_fp32_logprobs(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16)
    input_ids_BT = random_ids(2, 8)
    logprobs_BT, entropy_BT = token_logprobs(model, input_ids_BT, torch.ones_like(input_ids_BT), temperature=0.7)
    assert logprobs_BT.dtype == entropy_BT.dtype == torch.float32
    logits_BTV = model(input_ids_BT).logits.float() / 0.7  # same bf16 logits, normalised in fp32
    expected = torch.log_softmax(logits_BTV[:, :-1], -1).gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs_BT[:, 1:], expected, atol=1e-6, rtol=0)
    logprobs_BT[:, 1:].sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_completion_start_gives_the_same_values_on_completion_columns_only(model):
    # prompts left-padded to column S = 5, completions right-padded after it
    torch.manual_seed(0)
    ids_BT = torch.randint(3, 50, (3, 9))
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[0, :2] = 0  # left padding of a short prompt
    mask_BT[1, 7:] = 0  # right padding of a short completion
    full_lp, full_ent = token_logprobs(model, ids_BT, mask_BT, temperature=0.7)
    lp_BC, ent_BC = token_logprobs(model, ids_BT, mask_BT, temperature=0.7, completion_start=5)
    assert lp_BC.shape == (3, 4)
    torch.testing.assert_close(lp_BC, full_lp[:, 5:], atol=1e-6, rtol=0)
    torch.testing.assert_close(ent_BC, full_ent[:, 5:], atol=1e-5, rtol=1e-6)
    assert lp_BC[1, 2:].abs().sum() == 0  # padding stays exactly 0


def test_completion_start_runs_the_head_on_real_completion_tokens_only(model):
    """With `completion_start` the LM head gets the N real completion positions (not the right padding), and the
    log-probs and their gradients equal the full path's."""
    torch.manual_seed(1)
    ids_BT = torch.randint(3, 50, (3, 10))
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[0, :3] = 0
    mask_BT[1, 6:] = 0  # completion of 2 tokens after column 4
    mask_BT[2, 8:] = 0
    weights_BT = torch.randn(3, 10)
    seen = []
    probe = model.lm_head.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    try:
        lp_BC, _ = token_logprobs(model, ids_BT, mask_BT, completion_start=4)
    finally:
        probe.remove()
    assert seen == [(int(mask_BT[:, 4:].sum()), model.config.hidden_size)]
    model.zero_grad()
    (lp_BC * weights_BT[:, 4:]).sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    full_BT, _ = token_logprobs(model, ids_BT, mask_BT)
    (full_BT[:, 4:] * weights_BT[:, 4:]).sum().backward()
    torch.testing.assert_close(lp_BC, full_BT[:, 4:], atol=1e-6, rtol=0)
    for name, p in model.named_parameters():
        # these rows lay out one per prompt (models/shared_prefix.py): the same sums in another order, so the embedding
        # gradients (up to ~9 here) differ by float32 rounding, ~3e-6 at most
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert not model.lm_head._forward_pre_hooks


def test_autocast_body_keeps_the_lm_head_in_float32(model):
    """Under `autocast_body` the body's matmuls run in bf16 but the head gets float32 hidden states and weights:
    float32 logits, log-probs within bf16's rounding of the float32 ones, and the hooks gone afterwards."""
    input_ids_BT = random_ids(2, 8)
    mask_BT = torch.ones_like(input_ids_BT)
    fp32_lp, _ = token_logprobs(model, input_ids_BT, mask_BT, completion_start=3)
    seen = []
    probe = model.lm_head.register_forward_hook(lambda _m, args, out: seen.append((args[0].dtype, out.dtype)))
    try:
        with autocast_body(model, "cpu", torch.bfloat16):
            bf16_lp, _ = token_logprobs(model, input_ids_BT, mask_BT, completion_start=3)
            assert model.model.layers[0].mlp.up_proj(torch.ones(1, 64)).dtype == torch.bfloat16  # the body: bf16
    finally:
        probe.remove()
    assert seen == [(torch.float32, torch.float32)]
    assert 0 < (bf16_lp - fp32_lp).abs().max() < 0.05  # not float32 (the body rounds), but close
    assert not model.lm_head._forward_pre_hooks and not model.lm_head._forward_hooks
    with autocast_body(model, "cpu", None):  # None: no autocast at all
        assert torch.equal(token_logprobs(model, input_ids_BT, mask_BT, completion_start=3)[0], fp32_lp)


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 16])
def test_selected_logprobs_equal_autograd_gather_minus_logsumexp(monkeypatch, rows_per_chunk):
    """The fused function gives bitwise the values and logits gradient of the plain autograd formula."""
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", rows_per_chunk * 50)
    generator = torch.Generator().manual_seed(0)
    logits_NV = (torch.randn(16, 50, generator=generator) * 4).requires_grad_()
    targets_N = torch.randint(0, 50, (16,), generator=generator)
    weights_N = torch.randn(16, generator=generator)
    ours, entropy = logprobs_module._selected_logprobs_and_entropy(logits_NV, targets_N, True)
    (ours * weights_N).sum().backward()
    grad, logits_NV.grad = logits_NV.grad, None
    plain = logits_NV.gather(-1, targets_N[:, None]).squeeze(-1) - torch.logsumexp(logits_NV, -1)
    (plain * weights_N).sum().backward()
    assert torch.equal(ours, plain) and torch.equal(grad, logits_NV.grad)
    logp = torch.log_softmax(logits_NV.detach(), -1)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1), rtol=1e-6, atol=1e-6)
    assert not entropy.requires_grad


def test_selected_logprobs_gradcheck():
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    assert torch.autograd.gradcheck(lambda x: logprobs_module._SelectedLogprobs.apply(x, targets, False)[0], (logits,))

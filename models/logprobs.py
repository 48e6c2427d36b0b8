"""Per-token log-probabilities and entropies of a causal LM on padded batches, aligned with the input ids.

Memory: the vocabulary is large (49k for SmolLM2) and B*T can be thousands, so besides the model's logits at most
one more full [B, T, V] float tensor is alive (the tempered logits when temperature != 1 or the logits are not
fp32); log-normalisers and entropies are computed in row chunks, so their temporaries are chunk-sized.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from posttrain.models.shared_prefix import group_rows, supports_grouping

# rows of [*, V] processed at once in the chunked loops: ~16M elements (64 MB fp32) of temporaries per chunk
_CHUNK_ELEMENTS = 1 << 24


@contextlib.contextmanager
def autocast_body(model: nn.Module, device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """Calls of `model` inside the block run under autocast to `dtype`, except its LM head (output embedding), which
    runs in float32 on float32 hidden states, so the logits (and the log-probs, entropies and their gradients) lose
    no digits to bf16 beyond what the body's matmuls already cost. `dtype` None: no autocast, no hooks.

    The head's hooks leave autocast for its forward only (the pre-hook enters a disabled autocast and casts the
    input; the forward hook leaves it), and are removed when the block ends.
    """
    if dtype is None:
        yield
        return
    head, inner = model.get_output_embeddings(), torch.autocast(device_type, enabled=False)

    def enter(_module, args):
        inner.__enter__()
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def leave(*_) -> None:  # returns None: a forward hook's return value would replace the logits
        inner.__exit__(None, None, None)

    hooks = [head.register_forward_pre_hook(enter), head.register_forward_hook(leave)]
    try:
        with torch.autocast(device_type, dtype=dtype):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def position_ids_from_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, 2, ... counted over real tokens only, so left padding does not shift them.

    attention_mask_BT: [B, T], 1 for tokens, 0 for padding (left or right). Returns [B, T] long; padding gets the
    position of its nearest earlier token (0 before the first token); its value is irrelevant as it is masked.
    """
    return (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(
    model: nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    completion_start: int | None = None,
    position_ids_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each token under the model's tempered next-token distribution, and that entropy.

    Args:
        model: a causal LM (plain or peft); called with `input_ids`, `attention_mask` and `position_ids`.
        input_ids_BT: [B, T] token ids, padded left or right.
        attention_mask_BT: [B, T], 1 for tokens, 0 for padding.
        temperature: logits are divided by it (> 0), matching the sampler's temperature.
        with_entropy: also return the entropy (nats) of the same tempered distribution (no gradient; a metric).
        completion_start: column S where every row's completion starts (prompts left-padded to S, completions
            right-padded after it). The LM head then runs only on positions S-1..T-2 (`logits_to_keep`), which
            with a large vocabulary saves most of its cost, and both outputs cover columns S..T-1 only: [B, T-S].
        position_ids_BT: packed rows (several sequences one after the other, right-padded): each sequence's positions
            restart at 0. The model then gets no attention mask, so transformers builds a block-diagonal causal mask
            from the restarts (`find_packed_sequence_indices`); `attention_mask_BT` still marks the padding to zero.
    Returns:
        logprobs_BT: [B, T] float32, `log softmax(logits[:, t-1] / temperature)[input_ids[:, t]]`; column 0 (no
            prediction) and padded positions are 0. Gradients flow into the model. Callers mask prompt positions.
        entropy_BT: [B, T] float32 (column 0 and padding 0), or None when `with_entropy` is False.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    start = completion_start or 0
    if not 0 <= start < input_ids_BT.shape[1]:
        raise ValueError(f"completion_start must be in [1, {input_ids_BT.shape[1]}), got {completion_start}")
    packed = position_ids_BT is not None
    valid_BC = attention_mask_BT[:, start:].bool() if start else None
    grouped = group_rows(input_ids_BT, attention_mask_BT, start) if start and supports_grouping(model) else None
    if grouped is not None:  # each distinct prompt once (models/shared_prefix.py); the head on completion tokens
        with _head_on(model, grouped.input_ids_GL.shape, grouped.select):
            output = model(
                input_ids=grouped.input_ids_GL,
                attention_mask=grouped.mask_G1LL,
                position_ids=grouped.position_ids_GL,
                use_cache=False,
            )
    else:
        extra = {"logits_to_keep": _predicting_positions(input_ids_BT, start)} if start else {}
        with _head_on_rows(model, valid_BC):
            output = model(
                input_ids=input_ids_BT,
                attention_mask=None if packed else attention_mask_BT,
                position_ids=position_ids_BT if packed else position_ids_from_mask(attention_mask_BT),
                use_cache=False,
                **extra,
            )
    logits_BTV = output.logits
    del output  # keep only the logits alive
    if logits_BTV.dtype != torch.float32:
        logits_BTV = logits_BTV.float()  # log-probs in bf16 lose ~3 digits
        if temperature != 1.0:
            logits_BTV.div_(temperature)  # in place: ToCopyBackward keeps no tensor, so this is autograd-safe
    elif temperature != 1.0:
        logits_BTV = logits_BTV / temperature

    batch_size = input_ids_BT.shape[0]
    if start and logits_BTV.dim() == 2:  # the head ran on the completion's real tokens only: [N, V]
        targets_N = input_ids_BT[:, start:][valid_BC]
        logprobs_N, entropy_N = _selected_logprobs_and_entropy(logits_BTV, targets_N, with_entropy)
        zeros_BC = logprobs_N.new_zeros(valid_BC.shape)
        entropy_BC = zeros_BC.masked_scatter(valid_BC, entropy_N) if entropy_N is not None else None
        return zeros_BC.masked_scatter(valid_BC, logprobs_N), entropy_BC

    # position t-1 predicts token t (from S on, the logits are already those positions only)
    pred_BTV = logits_BTV[:, :-1] if not start else logits_BTV
    pred_NV = pred_BTV.reshape(-1, logits_BTV.shape[-1])  # N = B*(T-1), or B*(T-S) from S on: then a view
    targets_N = input_ids_BT[:, max(1, start) :].reshape(-1)
    logprobs_N, entropy_N = _selected_logprobs_and_entropy(pred_NV, targets_N, with_entropy)

    if start:  # columns S..T-1 only, each predicted by the column before it
        zeros = torch.zeros_like(logprobs_N.view(batch_size, -1))
        logprobs_BC = torch.where(valid_BC, logprobs_N.view(batch_size, -1), zeros)
        entropy_BC = torch.where(valid_BC, entropy_N.view(batch_size, -1), zeros) if entropy_N is not None else None
        return logprobs_BC, entropy_BC
    valid_BT = attention_mask_BT.bool().clone()
    valid_BT[:, 0] = False
    logprobs_BT = _align(logprobs_N.view(batch_size, -1), valid_BT)
    entropy_BT = _align(entropy_N.view(batch_size, -1), valid_BT) if entropy_N is not None else None
    return logprobs_BT, entropy_BT


@contextlib.contextmanager
def _head_on_rows(model: nn.Module, valid_BC: torch.Tensor | None) -> Iterator[None]:
    """Inside the block the model's LM head (output embedding) runs on the hidden states of `valid_BC`'s True
    positions only, so the model returns logits [N, V] for those N positions instead of [B, C, V]; `valid_BC` None,
    or a model without an output embedding: no change.

    A batch's completions are right-padded to the longest (on the GRPO bench 37% of the [B, C] positions were
    padding): the head's matmuls, the log-softmax over the vocabulary and its gradient skip them.
    """
    if valid_BC is None:
        yield
        return
    with _head_on(model, valid_BC.shape, lambda hidden_BCH: hidden_BCH[valid_BC]):
        yield


@contextlib.contextmanager
def _head_on(model: nn.Module, shape: torch.Size, select) -> Iterator[None]:
    """Inside the block the model's LM head runs on `select(hidden)` instead of its input `hidden` when that input's
    first two dimensions are `shape` (any other call is left alone); a model without an output embedding: no change."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return

    def hook(_module, args):
        if not args or args[0].shape[:2] != shape:  # not the [B, C, H] call this expects: leave it
            return None
        return (select(args[0]), *args[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def completion_logits(
    model: nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, completion_start: int
) -> torch.Tensor:
    """The untempered next-token logits that predict each completion token, float32 [B, C, V] (C = T - start):
    column j predicts `input_ids[:, start + j]`. The LM head runs on those positions only (`logits_to_keep`), as in
    `token_logprobs`. Memory: B * C * V floats (with a 150k vocabulary, 0.6 MB per token), so keep B * C small."""
    if not 0 < completion_start < input_ids_BT.shape[1]:
        raise ValueError(f"completion_start must be in [1, {input_ids_BT.shape[1]}), got {completion_start}")
    output = model(
        input_ids=input_ids_BT,
        attention_mask=attention_mask_BT,
        position_ids=position_ids_from_mask(attention_mask_BT),
        use_cache=False,
        logits_to_keep=_predicting_positions(input_ids_BT, completion_start),
    )
    return output.logits.float()  # positions start-1 .. T-2 predict columns start .. T-1


def _predicting_positions(input_ids_BT: torch.Tensor, start: int) -> torch.Tensor:
    """The positions S-1..T-2 that predict completion columns S..T-1, as indices for `logits_to_keep`: the LM head's
    logits then come out contiguous [B, T-S, V]. (The int form keeps the last T-S+1 positions, whose [:, :-1] slice
    costs a full-size copy forward and a zero-filled gradient of that size backward.)"""
    return torch.arange(start - 1, input_ids_BT.shape[1] - 1, device=input_ids_BT.device)


def logprobs_from_logits(
    logits_BCV: torch.Tensor, targets_BC: torch.Tensor, valid_BC: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, C] of `targets_BC` under `softmax(logits / temperature)` (with gradient), entropy [B, C] (no
    gradient)); both 0 where `valid_BC` is 0. The same numbers `token_logprobs` gives from the same logits."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tempered_NV = (logits_BCV / temperature).reshape(-1, logits_BCV.shape[-1])  # N = B*C
    logprobs_N, entropy_N = _selected_logprobs_and_entropy(tempered_NV, targets_BC.reshape(-1), True)
    valid = valid_BC.bool()
    zeros = torch.zeros_like(targets_BC, dtype=logprobs_N.dtype)
    return torch.where(valid, logprobs_N.view_as(zeros), zeros), torch.where(valid, entropy_N.view_as(zeros), zeros)


class _SelectedLogprobs(torch.autograd.Function):
    """`logits[n, target_n] - logsumexp(logits[n])` per row of [N, V] logits, and (no gradient) the entropy, in row
    chunks, with a backward that writes the logits' gradient once.

    The same numbers as `logits.gather(target) - logsumexp(logits)` through autograd, forward and backward (the
    gradient `g * (onehot - exp(logits - lse))` is computed with the same operations in the same order), without
    what autograd builds for the chunked form: a zero-filled [N, V] gradient per chunk for its slice, another for the
    gather, and their sums. On a GRPO micro-batch of 2048 completion positions x 49k vocabulary those were ~2.4 GB of
    fills and adds per step.
    """

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, targets_N: torch.Tensor, with_entropy: bool):
        rows = _rows_per_chunk(logits_NV)
        lse_N = logits_NV.new_empty(logits_NV.shape[0])
        entropy_N = logits_NV.new_empty(logits_NV.shape[0]) if with_entropy else None
        for start in range(0, logits_NV.shape[0], rows):
            chunk_nV = logits_NV[start : start + rows]
            lse_n = torch.logsumexp(chunk_nV, dim=-1)
            lse_N[start : start + rows] = lse_n
            if with_entropy:
                logp_nV = chunk_nV - lse_n.unsqueeze(-1)
                entropy_N[start : start + rows] = -(logp_nV.exp() * logp_nV).sum(-1)
        logprobs_N = logits_NV.gather(-1, targets_N.unsqueeze(-1)).squeeze(-1) - lse_N
        ctx.save_for_backward(logits_NV, targets_N, lse_N)
        if entropy_N is not None:
            ctx.mark_non_differentiable(entropy_N)
        return logprobs_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logprobs_N, _grad_entropy):
        logits_NV, targets_N, lse_N = ctx.saved_tensors
        grad_NV = torch.empty_like(logits_NV)
        minus_grad_N = -grad_logprobs_N
        rows = _rows_per_chunk(logits_NV)
        for start in range(0, logits_NV.shape[0], rows):
            end = start + rows
            out_nV = grad_NV[start:end]
            torch.sub(logits_NV[start:end], lse_N[start:end].unsqueeze(-1), out=out_nV)
            out_nV.exp_().mul_(minus_grad_N[start:end].unsqueeze(-1))
        grad_NV.scatter_add_(-1, targets_N.unsqueeze(-1), grad_logprobs_N.unsqueeze(-1))
        return grad_NV, None, None


def _rows_per_chunk(logits_NV: torch.Tensor) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, logits_NV.shape[-1]))


def _selected_logprobs_and_entropy(
    logits_NV: torch.Tensor, targets_N: torch.Tensor, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs [N] of `targets_N` under `softmax(logits_NV)` (differentiable), entropies [N] (no grad) or None)."""
    if logits_NV.shape[0] == 0:
        empty = logits_NV.new_zeros(0)
        return empty + logits_NV.sum(), (empty if with_entropy else None)
    return _SelectedLogprobs.apply(logits_NV, targets_N, with_entropy)


def _align(values_BTm1: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """Shift [B, T-1] per-prediction values to [B, T] token columns, with 0 where `valid_BT` is False.

    torch.where (not a multiply) so that garbage at padded positions can never leak as NaN * 0.
    """
    padded_BT = torch.cat([values_BTm1.new_zeros(values_BTm1.shape[0], 1), values_BTm1], dim=1)
    return torch.where(valid_BT, padded_BT, torch.zeros_like(padded_BT))

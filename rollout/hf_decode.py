"""The hf engine's decoding loop: one token per row per step from a KV cache, with the sampler's log-probs, and rows
that finished dropped from the batch.

transformers `generate` keeps every row in the batch until the longest is done: finished rows are fed padding and
computed to the end. In a GRPO batch completions end at very different lengths (on the 8 prompts x 4 samples bench
work, 10 to 64 tokens, 43 on average), so a third of `generate`'s row-steps were spent on rows already finished.
`decode` removes them: once enough rows are done (`COMPACT_FRACTION` of the batch) the live rows' KV-cache rows,
attention mask and positions are gathered into a smaller batch. A row's logits do not depend on the other rows, so the
tokens and log-probs are those of keeping every row (up to float32 rounding of a different batch shape).

Sampling: `Sampler` draws each row's token from `softmax(logits / T)` restricted by top-k and then top-p
(transformers' warpers, applied to the log-probs, in `generate`'s order) by inverse transform sampling (`draw`), with
one uniform number per row of the full batch at every step, so a row's draws do not depend on which rows were
dropped. `generate`'s own sampler (`torch.multinomial`) draws an exponential number per vocabulary entry: 30 ms of each
step of 32 rows x 49k vocabulary on 2 CPU cores, against 2 ms. Greedy picks the argmax of the float32 logits.

Log-probs are `log_softmax(logits / T)` of each chosen token (raw logits when greedy), from the float32 logits of
the step that chose it: what a teacher-forced recomputation of the same model gives, which RL importance ratios need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from posttrain.models.logprobs import position_ids_from_mask
from posttrain.rollout.kv_cache import select_rows
from posttrain.rollout.types import FinishReason, SamplingParams

COMPACT_FRACTION = 1 / 8
"""Finished rows are dropped once they are at least this fraction of the batch. Dropping copies the live rows' KV
cache (about 20 ms for 32 rows x 100 positions of SmolLM2-135M on 2 CPU cores); a finished row kept costs a row's
share of a step (about 3 ms of a 140 ms step)."""

StopCheck = Callable[[torch.Tensor], torch.Tensor]
"""sequences `[b, S]` (prompt and tokens so far) -> bool `[b]`: the row's text now ends with a stop string."""


@dataclass
class Decoded:
    """One row's generated tokens, their log-probs and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


class Sampler:
    """Chooses each step's tokens for the rows of a batch of `batch_size` sequences and gives their log-probs."""

    def __init__(self, params: SamplingParams, batch_size: int):
        self.temperature = params.temperature or 1.0  # greedy log-probs come from the raw logits
        self.sample = params.temperature > 0
        self.batch_size = batch_size
        self.warpers = []
        if self.sample and params.top_k:
            self.warpers.append(TopKLogitsWarper(params.top_k))
        if self.sample and params.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(params.top_p))

    def __call__(self, logits_bV: torch.Tensor, rows_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens `[b]`, their log-probs `[b]`) for the batch rows holding sequences `rows_b` of the full batch."""
        logits_bV = logits_bV.float()
        logprobs_bV = torch.log_softmax(logits_bV / self.temperature, dim=-1)
        if self.sample:
            warped_bV = logprobs_bV
            for warper in self.warpers:
                warped_bV = warper(None, warped_bV)
            # one number per sequence of the full batch, every step: dropping rows does not shift the others' draws
            uniform_B1 = torch.rand((self.batch_size, 1), dtype=torch.float64, device=logits_bV.device)
            tokens_b = draw(warped_bV, uniform_B1[rows_b]).squeeze(1)
        else:
            tokens_b = logits_bV.argmax(dim=-1)
        return tokens_b, logprobs_bV.gather(1, tokens_b[:, None]).squeeze(1)


def draw(logits_BV: torch.Tensor, uniform_B1: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from `softmax(logits_BV)` (-inf entries never), `[B, 1]` long, by inverse transform sampling.

    `uniform_B1`: float64 numbers in [0, 1), one per row; None draws them with `torch.rand` (the caller's generator
    state decides the draw). The cumulative sum is float64 so that tokens of probability ~1e-9 keep their share (in
    float32, increments below ~3e-8 vanish next to a running sum near 1). Each row needs at least one finite entry.
    """
    cdf_BV = (logits_BV.double() - logits_BV.max(dim=-1, keepdim=True).values.double()).exp_().cumsum_(dim=-1)
    total_B1 = cdf_BV[:, -1:]
    if uniform_B1 is None:
        uniform_B1 = torch.rand_like(total_B1)
    # u < total strictly, so the first cdf entry above u is a token with non-zero probability
    u_B1 = torch.minimum(uniform_B1 * total_B1, torch.nextafter(total_B1, torch.zeros_like(total_B1)))
    return torch.searchsorted(cdf_BV, u_B1, right=True).clamp_(max=logits_BV.shape[-1] - 1)


def decode(
    model: torch.nn.Module,
    input_ids_BP: torch.Tensor,
    attention_mask_BP: torch.Tensor,
    cache,
    sampler: Sampler,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    stop: StopCheck | None = None,
) -> list[Decoded]:
    """Generate up to `max_new_tokens` tokens after each left-padded prompt row; a row ends after an EOS token or the
    token that completes a stop string (both kept).

    Args:
        model: a causal LM taking `past_key_values`, `position_ids` and `logits_to_keep`.
        input_ids_BP, attention_mask_BP: the prompts, right-aligned, on the model's device.
        cache: a `preallocated_cache` (`kv_cache.py`), empty or holding every row's prompt but its last token.
        sampler: a `Sampler` for B rows.
        stop: see `StopCheck`; None when there are no stop strings.
    Returns:
        B `Decoded`, in row order.
    """
    B, P = input_ids_BP.shape
    device = input_ids_BP.device
    sequences_BS = torch.cat([input_ids_BP, input_ids_BP.new_zeros(B, max_new_tokens)], dim=1)
    logprobs_BL = torch.zeros(B, max_new_tokens, device=device)
    lengths = [max_new_tokens] * B
    reasons: list[FinishReason] = ["length"] * B
    eos_E = torch.tensor(list(eos_token_ids), device=device)

    rows_b = torch.arange(B, device=device)  # batch row -> sequence
    live_b = torch.ones(B, dtype=torch.bool, device=device)
    live = B
    mask_bS = attention_mask_BP
    positions_bP = position_ids_from_mask(attention_mask_BP)
    cached = cache.get_seq_length()  # 0, or P - 1 when the prompts were prefilled
    step_ids_bT, step_positions_bT = input_ids_BP[:, cached:], positions_bP[:, cached:]
    next_position_b1 = positions_bP[:, -1:] + 1
    for t in range(max_new_tokens):
        logits_bV = model(
            input_ids=step_ids_bT,
            attention_mask=mask_bS,
            position_ids=step_positions_bT,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        tokens_b, logprobs_b = sampler(logits_bV, rows_b)
        # rows finished but not yet dropped write past their end, which is cut off below
        sequences_BS[rows_b, P + t] = tokens_b
        logprobs_BL[rows_b, t] = logprobs_b
        done_b = torch.isin(tokens_b, eos_E)
        if stop is not None:
            done_b |= stop(sequences_BS[rows_b, : P + t + 1]).to(device)
        done_b &= live_b
        done = rows_b[done_b].tolist()
        for row in done:
            lengths[row], reasons[row] = t + 1, "stop"
        live -= len(done)
        if not live:
            break
        live_b &= ~done_b
        mask_bS = torch.cat([mask_bS, mask_bS.new_ones(len(rows_b), 1)], dim=1)
        step_ids_bT, step_positions_bT = tokens_b[:, None], next_position_b1
        next_position_b1 = next_position_b1 + 1
        if len(rows_b) - live >= COMPACT_FRACTION * len(rows_b):
            keep_b = live_b.nonzero().squeeze(1)
            if select_rows(cache, keep_b):  # False for a cache that cannot drop rows: keep computing them
                rows_b, live_b, mask_bS = rows_b[keep_b], live_b[keep_b], mask_bS[keep_b]
                step_ids_bT, step_positions_bT = step_ids_bT[keep_b], step_positions_bT[keep_b]
                next_position_b1 = next_position_b1[keep_b]

    tokens_BL = sequences_BS[:, P:].tolist()
    logprobs = logprobs_BL.tolist()
    return [Decoded(tokens_BL[row][: lengths[row]], logprobs[row][: lengths[row]], reasons[row]) for row in range(B)]

"""One forward pass over a batch of n samples per prompt that computes each distinct prompt once.

A GRPO rollout batch holds n completions of each prompt, laid out for the learner as `[B, P + C]` rows: the prompt
left-padded to P, the completion right-padded to C after it (`learner.batch`). The model's body (every layer below
the LM head) then runs on B x (P + C) positions, of which (n - 1) copies of every prompt and the completions' padding
change nothing: on the GRPO bench (8 prompts x 4 samples, prompts of ~45 tokens, completions of <= 64) that is about
half of them.

`group_rows` lays such a batch out as one row per distinct prompt: the prompt once, then each of its samples'
completions one after the other. A 4D attention mask lets every completion token see the prompt and its own
completion's earlier tokens, and nothing else; its position ids restart at the prompt's length in each completion.
Every completion token then meets the same keys and values at the same positions as in the padded layout, so its
log-prob, and every gradient, is the same up to float summation order, from G x L positions (G distinct prompts, L
the longest of their rows). The LM head runs on the positions that predict a completion token only (the prompt's
last position once per completion), as `models.logprobs._head_on_rows` does in the padded layout.

The mask is a boolean `[G, 1, L, L]` tensor, which transformers hands to the attention function as it is; only
SDPA attention (`sdpa`, `posttrain_sdpa`) reads a boolean mask that way, so other implementations keep the padded
layout (`supports_grouping`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# attention implementations that take a custom boolean 4D mask (True = may attend) as transformers passes it
_MASK_READERS = ("sdpa", "posttrain_sdpa")

MIN_SAVING = 0.2
"""the grouped layout is used when it has at least this fraction fewer positions than the padded one"""
MAX_ATTENTION_GROWTH = 2.0
"""... and at most this many times the padded layout's attention area (query x key positions, G x L^2 against
B x T^2): one row holds n completions, so long completions make its attention grow as n^2 where the padded rows'
grows as n"""
MAX_MASK_ELEMENTS = 1 << 26
"""... and a mask of at most this many booleans (64 MB)"""


@dataclass
class GroupedRows:
    """A `[B, P + C]` batch laid out one row per distinct prompt; G rows of L positions."""

    input_ids_GL: torch.Tensor
    position_ids_GL: torch.Tensor
    mask_G1LL: torch.Tensor
    """bool: position q may attend to position k"""
    predicting_N: torch.Tensor
    """flat indices into the G*L positions: the one whose output predicts each completion token, in the row-major
    order of the padded batch's completion tokens (`attention_mask_BT[:, P:]` True)"""

    def select(self, hidden_GLH: torch.Tensor) -> torch.Tensor:
        """`[N, H]`: the hidden states that predict the completion tokens, in their order."""
        return hidden_GLH.reshape(-1, hidden_GLH.shape[-1]).index_select(0, self.predicting_N)


def supports_grouping(model: nn.Module) -> bool:
    """Whether `model`'s attention takes the grouped layout's boolean 4D mask."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in _MASK_READERS


def group_rows(
    input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, start: int, min_saving: float = MIN_SAVING
) -> GroupedRows | None:
    """The grouped layout of a batch whose prompts are left-padded to column `start` and completions right-padded
    after it, or None when it would not save `min_saving` of the positions (few repeated prompts, little padding),
    would cost too much attention (`MAX_ATTENTION_GROWTH`, `MAX_MASK_ELEMENTS`) or the rows are not laid out that
    way (a gap in a row's attention mask)."""
    B, T = input_ids_BT.shape
    ids, mask = input_ids_BT.tolist(), attention_mask_BT.tolist()
    prompt_len_B = [sum(row[:start]) for row in mask]
    completion_len_B = [sum(row[start:]) for row in mask]
    for b in range(B):  # left-padded prompt, right-padded completion: anything else keeps the padded layout
        p, c = prompt_len_B[b], completion_len_B[b]
        if mask[b] != [0] * (start - p) + [1] * (p + c) + [0] * (T - start - c) or p == 0:
            return None
    groups: dict[tuple[int, ...], int] = {}
    owner_B = [groups.setdefault(tuple(ids[b][start - prompt_len_B[b] : start]), len(groups)) for b in range(B)]
    prompts = list(groups)
    row_len_G = [len(prompt) for prompt in prompts]
    for b in range(B):
        row_len_G[owner_B[b]] += completion_len_B[b]
    G, L = len(prompts), max(row_len_G)
    if G * L > (1 - min_saving) * B * T or G * L * L > min(MAX_ATTENTION_GROWTH * B * T * T, MAX_MASK_ELEMENTS):
        return None

    pad = ids[0][0] if mask[0][0] == 0 else 0  # any id: padded positions are never read
    row_ids = [list(prompt) + [pad] * (L - len(prompt)) for prompt in prompts]
    row_pos = [list(range(len(prompt))) + [0] * (L - len(prompt)) for prompt in prompts]
    segment = [[0] * len(prompt) + [-1] * (L - len(prompt)) for prompt in prompts]  # 0 prompt, b + 1 row b, -1 pad
    cursor = [len(prompt) for prompt in prompts]
    predicting: list[int] = []
    for b in range(B):
        g, p, c = owner_B[b], prompt_len_B[b], completion_len_B[b]
        s = cursor[g]
        row_ids[g][s : s + c] = ids[b][start : start + c]
        row_pos[g][s : s + c] = range(p, p + c)
        segment[g][s : s + c] = [b + 1] * c
        if c:  # token 0 is predicted by the prompt's last position, token j by the completion's token j - 1
            predicting += [g * L + p - 1] + [g * L + s + j for j in range(c - 1)]
        cursor[g] += c

    device = input_ids_BT.device
    seg_GL = torch.tensor(segment, device=device)
    query_GL1, key_G1L = seg_GL.unsqueeze(2), seg_GL.unsqueeze(1)
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    # a padded query attends to itself (and earlier padding and the prompt): never an empty row, so never a NaN
    mask_GLL = causal_LL & ((key_G1L == 0) | (key_G1L == query_GL1))
    return GroupedRows(
        input_ids_GL=torch.tensor(row_ids, dtype=input_ids_BT.dtype, device=device),
        position_ids_GL=torch.tensor(row_pos, dtype=torch.long, device=device),
        mask_G1LL=mask_GLL.unsqueeze(1),
        predicting_N=torch.tensor(predicting, dtype=torch.long, device=device),
    )

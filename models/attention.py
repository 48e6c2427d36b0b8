"""`posttrain_sdpa`: transformers' SDPA attention that hands grouped key/value heads to the kernel as they are.

transformers repeats the key and value heads of a grouped-query model (`repeat_kv`, a full copy of the keys and values
of every layer) unless the device is CUDA with no attention mask; a batch of left- or right-padded sequences always
has a mask, so on CPU every layer of every forward copied the whole KV cache (during decoding: at every token). torch's
`scaled_dot_product_attention(enable_gqa=True)` takes the grouped heads directly: the same outputs bitwise (forward;
the key/value gradients are summed in another order, within 1e-6), without the copy. On a batch of 32 SmolLM2-135M
decodes (9 query heads, 3 key/value heads) the attention call took 0.25 instead of 4.2 ms at 112 positions.

`use_grouped_sdpa(model)` switches a loaded model that uses `sdpa` to it; anything else (eager, flash, a model
without grouped heads, a position bias, a paged cache) goes through transformers' own function.
"""

from __future__ import annotations

import torch

NAME = "posttrain_sdpa"


def grouped_sdpa_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' `sdpa_attention_forward` with `enable_gqa=True` instead of `repeat_kv` (see the module docstring).

    Shapes as transformers passes them: query `[B, H, Q, D]`, key and value `[B, KV, K, D]`; returns
    (`[B, Q, H, D]`, None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if groups == 1 or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `NAME` known to transformers (the attention function and sdpa's mask format); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, grouped_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_grouped_sdpa(model):
    """Switch `model` from transformers' `sdpa` attention to `NAME`; other implementations are left alone.

    Returns `model`.
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return model
    register()
    model.set_attn_implementation(NAME)
    return model

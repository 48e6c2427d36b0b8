"""Masked reductions used by losses and logging: sums and means over the tokens a mask selects.

The mask selects with `torch.where`, not by multiplication, so NaN/inf sitting at masked-out positions (padding,
skipped samples) can neither leak into the value nor into the gradient of the selected entries.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x_BT: Tensor, mask_BT: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x_BT` over the positions where `mask_BT` is nonzero.

    Args:
        x_BT: values, any shape (typically [batch, tokens]).
        mask_BT: same shape as `x_BT`; bool or 0/1. Nonzero entries are included, whatever their value.
        dim: reduce only this dimension (e.g. `-1` for per-sequence sums); `None` reduces everything.
    """
    _check_same_shape(x_BT, mask_BT, "masked_sum")
    selected = torch.where(mask_BT.bool(), x_BT, torch.zeros((), dtype=x_BT.dtype, device=x_BT.device))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x_BT: Tensor, mask_BT: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x_BT` over the positions where `mask_BT` is nonzero; 0 where nothing is selected.

    An empty selection gives 0 rather than NaN so that an all-masked micro-batch cannot poison a loss or a
    running average; callers that need to tell "empty" from "zero" check the mask count themselves.

    Args:
        x_BT: values, any shape (typically [batch, tokens]).
        mask_BT: same shape as `x_BT`; bool or 0/1. Nonzero entries are included with weight 1.
        dim: average only over this dimension; `None` averages over everything.
    """
    count = masked_sum(torch.ones_like(x_BT), mask_BT, dim)
    return masked_sum(x_BT, mask_BT, dim) / count.clamp(min=1)


def _check_same_shape(x: Tensor, mask: Tensor, who: str) -> None:
    if x.shape != mask.shape:
        raise ValueError(f"{who}: values have shape {tuple(x.shape)} but the mask has {tuple(mask.shape)}")


def check_bt(mask_BT: Tensor, who: str, *tensors_BT: Tensor) -> None:
    if mask_BT.dim() != 2 or any(t.shape != mask_BT.shape for t in tensors_BT):
        raise ValueError(f"{who}: inputs must all be [batch, tokens] like the mask {tuple(mask_BT.shape)}")

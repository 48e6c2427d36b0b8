"""LoRA wrapping (peft) and merged weights for syncing into inference engines or saving a plain HF folder.

LoRA (Hu et al. 2021, eq. 3): a target linear layer computes `W x + scale * B A x` with `A: [r, in]`,
`B: [out, r]` and `scale = alpha / r`. The merged weight `W + scale * B @ A` makes a plain copy of the base
architecture compute the same function (up to float rounding), which is what rollout engines load.

QLoRA (Dettmers et al. 2023): the base linear layers hold W in 4 bits (bitsandbytes `Params4bit`) and compute with
`dequantize(Q(W))` in the compute dtype, so the plain weights that reproduce such a model are
`dequantize(Q(W)) + scale * B @ A` for an adapted layer and `dequantize(Q(W))` for every other 4-bit layer (not the
full-precision W of the checkpoint: the rounding differs by up to half a quantization step).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (peft `LoraConfig` subset)."""

    rank: int = 16
    """r: the inner dimension of the low-rank update."""
    alpha: float = 32.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input during training."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    """Names (suffixes) of the linear layers that get an adapter."""


def apply_lora(model: nn.Module, settings: LoraSettings):
    """Wrap `model` with fresh LoRA adapters (B = 0, so the output is unchanged at first); returns a `PeftModel`.

    Only the adapter weights are trainable afterwards. The base model is modified in place (layers replaced).
    A sequence-classification model (a reward model) also trains its new `score` head in full (peft's
    `modules_to_save`): a random head frozen under LoRA could not learn.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    classifier = _is_sequence_classifier(model)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type=TaskType.SEQ_CLS if classifier else TaskType.CAUSAL_LM,
        modules_to_save=["score"] if classifier else None,
    )
    return fuse_lora_branches(get_peft_model(model, config))


def fuse_lora_branches(model: nn.Module) -> nn.Module:
    """Turn every plain peft `lora.Linear` of `model` into a `FusedLoraLinear` (same state, same function; the
    branch is added inside one matmul); returns `model`. 4-bit and other LoRA layer types are left as they are."""
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = _fused_linear_class()
    return model


def _fused_linear_class():
    global _FUSED_LINEAR
    if _FUSED_LINEAR is None:
        from peft.tuners.lora.layer import Linear

        class FusedLoraLinear(Linear):
            """peft's `lora.Linear`, whose forward computes `W x + scale * B (A x)` with the branch's second matmul,
            its scaling and the sum in one `torch.addmm` (peft: a matmul, a multiply and an add over the layer's
            whole output, and both again backward). Anything but one plain active adapter (merged, disabled,
            adapter variants, mixed batches, a bias on B) takes peft's own forward."""

            def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                names = self.active_adapters
                name = names[0] if len(names) == 1 else None
                if (
                    args
                    or kwargs
                    or self.disable_adapters
                    or self.merged
                    or name not in self.lora_A
                    or name in self.lora_variant
                    or self.lora_B[name].bias is not None
                ):
                    return super().forward(x, *args, **kwargs)
                result = self.base_layer(x)
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                low_rank = lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype)))
                fused = torch.addmm(
                    result.reshape(-1, result.shape[-1]),
                    low_rank.reshape(-1, low_rank.shape[-1]),
                    lora_B.weight.t(),
                    alpha=self.scaling[name],
                )
                return fused.view(result.shape).to(result.dtype)

        FusedLoraLinear.__qualname__ = "FusedLoraLinear"  # pickled by name, found through the module __getattr__
        _FUSED_LINEAR = FusedLoraLinear
    return _FUSED_LINEAR


_FUSED_LINEAR = None


def __getattr__(name: str):
    if name == "FusedLoraLinear":  # built on first use: importing peft is slow and not every caller needs it
        return _fused_linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_sequence_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def merged_state_dict(model: nn.Module, only_lora_targets: bool = False) -> dict[str, torch.Tensor]:
    """Weights that a plain (non-peft) copy of the base architecture loads to compute what `model` computes.

    Args:
        model: a `PeftModel` with LoRA adapters, or a plain `nn.Module`.
        only_lora_targets: for a PeftModel, return only the layers that carry adapters (their merged weight and
            their unchanged bias, if any): the part of a sync that changes during LoRA training. Ignored for plain
            models.
    Returns:
        `{plain parameter name: tensor}` keyed like the base model's own `state_dict()` (e.g.
        `model.layers.0.self_attn.q_proj.weight`; no `base_model.model.` prefix, no `base_layer`, no lora keys);
        tensors are detached, contiguous CPU copies in the base weights' dtype (a 4-bit layer's: its compute dtype,
        dequantized as it computes). `model` is not modified: the merge `W + sum over active adapters of
        scale * B @ A` is computed out of place.
    """
    return {name: _cpu_copy(tensor) for name, tensor in iter_merged_tensors(model, only_lora_targets)}


def iter_merged_tensors(model: nn.Module, only_lora_targets: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """`merged_state_dict`'s (name, tensor) pairs one at a time, without copying what needs no merge.

    Plain tensors come as detached views of the live parameters (copy them before the model changes); a LoRA
    layer's merged weight is computed when its turn comes, so a consumer that packs and drops them (the bucketed
    weight sync) can drop them as it goes (its tie check, `skip_tied`, holds only weak references).
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel) and not any(_is_4bit(p) for p in model.parameters()):
        yield from ((name, tensor.detach()) for name, tensor in model.state_dict().items())
        return
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    with torch.no_grad():
        yield from _iter_plain(base, "", only_lora_targets and isinstance(model, PeftModel))


def _iter_plain(module: nn.Module, prefix: str, only_lora_targets: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Walk `module` (a peft-injected model) yielding plain-named tensors (views, or merged copies for LoRA)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    if isinstance(module, LoraLayer):
        yield from _merged_lora_layer(module, prefix).items()
        return
    if isinstance(module, ModulesToSaveWrapper):
        # a fully trained copy of a module (e.g. lm_head): the plain model loads the copy that forward uses
        chosen = module.modules_to_save[module.active_adapter] if module.active_adapters else module.original_module
        yield from _iter_plain(chosen, prefix, only_lora_targets)
        return
    if not only_lora_targets:
        yield from _plain_tensors(module, prefix)
    for name, child in module.named_children():
        yield from _iter_plain(child, f"{prefix}{name}.", only_lora_targets)


def _plain_tensors(module: nn.Module, prefix: str, weight: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """`module`'s own parameters and persistent buffers (not its children's) under plain names, `weight` left out if
    not `weight`; a 4-bit weight comes dequantized (a fresh tensor), everything else as a detached view."""
    for name, param in module.named_parameters(recurse=False):
        if name == "weight" and not weight:
            continue
        yield prefix + name, dequantized_weight(module) if _is_4bit(param) else param.detach()
    for name, buffer in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            yield prefix + name, buffer.detach()


def _is_4bit(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "Params4bit"  # bitsandbytes, imported only where it is used


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a linear layer computes with: a plain weight as is (detached); a bitsandbytes 4-bit weight
    dequantized with its quant state (`bitsandbytes.functional.dequantize_4bit`) and cast to the layer's compute
    dtype, exactly as `Linear4bit`'s training forward does. Other weight types raise NotImplementedError."""
    weight = layer.weight
    if type(weight) in (torch.Tensor, nn.Parameter):
        return weight.detach()
    if not _is_4bit(weight):
        raise NotImplementedError(f"merging a {type(weight).__name__} weight is not supported (plain or 4-bit only)")
    from bitsandbytes.functional import dequantize_4bit

    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # `models.loading.keep_4bit_layout` prevents this layout
        raise NotImplementedError("a 4-bit weight repacked for CPU inference (bfloat16 block scales) cannot be merged")
    compute_dtype = getattr(layer, "compute_dtype", None) or state.dtype
    return dequantize_4bit(weight.data, state).to(compute_dtype)


def _merged_lora_layer(layer, prefix: str) -> dict[str, torch.Tensor]:
    """The base layer's tensors with `weight` replaced by W + sum(scale * B @ A) over the active, unmerged adapters
    (W dequantized for a 4-bit base layer)."""
    base = layer.get_base_layer()
    weight = dequantized_weight(base)
    merged = weight.to(torch.float32)
    if not layer.disable_adapters:
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A or adapter in layer.merged_adapters:
                continue  # adapter not on this layer, or already folded into W by peft's merge_adapter()
            if layer.use_dora.get(adapter, False) or layer.lora_bias.get(adapter, False):
                raise NotImplementedError(f"merging DoRA / lora_bias adapters is not supported ({prefix})")
            merged = merged + layer.get_delta_weight(adapter).to(torch.float32)
    tensors = {f"{prefix}weight": _cpu_copy(merged.to(weight.dtype))}
    tensors.update({name: _cpu_copy(tensor) for name, tensor in _plain_tensors(base, prefix, weight=False)})
    return tensors


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU tensor that shares no memory with `tensor`."""
    tensor = tensor.detach()
    tensor = tensor.cpu() if tensor.device.type != "cpu" else tensor.clone()
    return tensor.contiguous()


def save_merged(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Write a plain HF folder (merged weights for a PeftModel) loadable by `AutoModelForCausalLM.from_pretrained`.

    Args:
        model: a `PeftModel` or a plain `PreTrainedModel`.
        tokenizer: saved next to the weights; None to skip.
        out_dir: the folder to (re)place. It is written into a temporary sibling folder and renamed at the end, so a
            crash never leaves a half-written `out_dir`; an existing `out_dir` is replaced.
    Returns:
        `out_dir` as a Path.
    """
    from peft import PeftModel

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-tmp-", dir=out_dir.parent))
    try:
        plain = _plain_copy(model) if isinstance(model, PeftModel) else model
        plain.save_pretrained(tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
        os.chmod(tmp_dir, 0o755)
        _replace_dir(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _plain_copy(peft_model) -> nn.Module:
    """A fresh plain model of the base architecture on CPU holding the merged weights (costs one model of memory)."""
    return plain_model(peft_model.get_base_model(), merged_state_dict(peft_model))


def plain_model(base: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh plain (non-peft) model of `base`'s architecture, config, dtype and generation config, on CPU, loaded
    with `state` (its full plain-named state dict, strictly)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if _is_sequence_classifier(base) else AutoModelForCausalLM
    plain = auto.from_config(base.config, dtype=base.dtype)
    plain.load_state_dict(state, strict=True)
    if getattr(base, "generation_config", None) is not None:
        plain.generation_config = base.generation_config
    return plain


def full_precision_copy(qlora_model, plain_base: nn.Module):
    """`qlora_model`'s trained adapters (and fully trained modules such as a reward head) on `plain_base`, a fresh
    full-precision load of the same checkpoint: a `PeftModel` to save as a plain merged folder (`save_merged`).

    Deviation, stated: the merge then uses the checkpoint's full-precision base weights, not their 4-bit rounding
    that the adapter was trained against (the usual QLoRA export; peft's own merge would re-quantize the result), so
    the saved model differs from the trained one by the base's quantization error (`merged_state_dict` of the QLoRA
    model itself gives the exact dequantized merge, which is what the rollout engines run during training).
    """
    from copy import deepcopy

    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    name = qlora_model.active_adapter
    copy = get_peft_model(plain_base, deepcopy(qlora_model.peft_config[name]), adapter_name=name)
    set_peft_model_state_dict(copy, get_peft_model_state_dict(qlora_model, adapter_name=name), adapter_name=name)
    return copy


def _replace_dir(new_dir: Path, out_dir: Path) -> None:
    """Move `new_dir` to `out_dir`, replacing an existing `out_dir` (renamed aside first, then deleted)."""
    if not out_dir.exists():
        os.rename(new_dir, out_dir)
        return
    old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
    os.rename(out_dir, old_dir / "previous")
    os.rename(new_dir, out_dir)
    shutil.rmtree(old_dir, ignore_errors=True)

"""LoRA adapters as data: what a learner ships to inference engines that apply adapters themselves (vLLM).

The alternative, merged weights (`models.lora.merged_state_dict`), ships every adapted layer in full; an adapter
ships only `A: [r, in]` and `B: [out, r]` per layer, and the engine computes `W x + scale * B A x` on its base `W`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class LoraAdapter:
    """One LoRA adapter in peft's own format (what `PeftModel.save_pretrained` writes)."""

    tensors: dict[str, torch.Tensor]
    """peft state-dict names (`base_model.model.<module>.lora_A.weight` / `lora_B.weight`) -> CPU tensors"""
    config: dict
    """peft's `LoraConfig.to_dict()` (JSON-ready: r, lora_alpha, target_modules, ...)"""

    def save(self, folder: str | Path) -> None:
        """Write `adapter_config.json` and `adapter_model.safetensors` into `folder` (what `LoRARequest` reads)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        (folder / "adapter_config.json").write_text(json.dumps(self.config, indent=1))
        save_file(
            {name: tensor.contiguous() for name, tensor in self.tensors.items()}, folder / "adapter_model.safetensors"
        )


def lora_adapter(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> LoraAdapter:
    """The active adapter of a peft `model` as a `LoraAdapter` (detached CPU copies). ValueError for a plain model.
    `state_dict`: read the tensors from it instead of `model.state_dict()` (FSDP, whose hook would reshard them)."""
    from peft import PeftModel, get_peft_model_state_dict

    if not isinstance(model, PeftModel):
        raise ValueError("lora_adapter needs a peft model (model.lora set); this model has no adapter")
    adapter_state = get_peft_model_state_dict(model, state_dict=state_dict)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in adapter_state.items()}
    config = model.peft_config[model.active_adapter].to_dict()
    return LoraAdapter(tensors=tensors, config=json.loads(json.dumps(config, default=_json_default)))


def _json_default(value):
    """peft configs hold sets (target_modules) and enums (task_type): lists and their values in JSON."""
    if isinstance(value, set | frozenset):
        return sorted(value)
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"cannot write {type(value).__name__} to a LoRA adapter config")

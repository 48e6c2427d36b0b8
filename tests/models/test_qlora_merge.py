"""QLoRA merge: a 4-bit (bitsandbytes nf4/fp4) base's plain weights are its dequantized weights, plus scale * B @ A
on the adapted layers, so a plain model holding them computes what the QLoRA model computes."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.loading import load_model
from posttrain.models.lora import LoraSettings, apply_lora, dequantized_weight, merged_state_dict

bnb = pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "v_proj"]


def _qlora(tiny_path, quantize: str = "nf4"):
    """A QLoRA model on the tiny Llama with random (non-zero) B, so every adapter changes its layer."""
    torch.manual_seed(0)
    settings = LoraSettings(rank=4, alpha=8, target_modules=TARGETS)
    model = apply_lora(load_model(str(tiny_path), quantize=quantize), settings)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model.eval()


@pytest.mark.parametrize("quantize", ["nf4", "fp4"])
def test_merged_weight_is_the_dequantized_base_plus_scale_b_a(tiny_path, quantize):
    model = _qlora(tiny_path, quantize)
    full = load_model(str(tiny_path)).state_dict()
    merged = merged_state_dict(model)
    assert set(merged) == set(full)  # plain names only: no quant-state entries, no lora keys
    layer = model.get_base_model().model.layers[1].self_attn.q_proj
    w4 = layer.base_layer.weight
    assert type(w4).__name__ == "Params4bit"
    dequant = bnb.functional.dequantize_4bit(w4.data, w4.quant_state)  # by hand: [64, 64] float32
    expected = dequant + (8 / 4) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.1.self_attn.q_proj.weight"], expected, atol=1e-6, rtol=1e-6)
    # the 4-bit rounding is real (the merge does not fall back to the checkpoint's W) and is not the adapter's delta
    assert not torch.allclose(dequant, full["model.layers.1.self_attn.q_proj.weight"], atol=1e-4)
    # a layer without an adapter (MLP) is its dequantized weight; embeddings and norms are as loaded
    up = model.get_base_model().model.layers[0].mlp.up_proj
    up_dequant = bnb.functional.dequantize_4bit(up.weight.data, up.weight.quant_state)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], up_dequant)
    assert torch.equal(dequantized_weight(up), up_dequant)
    assert torch.equal(merged["model.embed_tokens.weight"], full["model.embed_tokens.weight"])
    only = merged_state_dict(model, only_lora_targets=True)
    assert set(only) == {n for n in full if any(f"{t}." in n for t in TARGETS)}
    assert all(torch.equal(only[n], merged[n]) for n in only)


def test_a_plain_model_with_the_merged_weights_computes_the_qlora_logits(tiny_path):
    model = _qlora(tiny_path)
    plain = load_model(str(tiny_path)).eval()
    before = plain(torch.tensor([[1, 5, 9, 20, 7, 3]])).logits
    plain.load_state_dict(merged_state_dict(model), strict=True)
    ids = torch.tensor([[1, 5, 9, 20, 7, 3], [4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, plain(input_ids=ids).logits
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        assert (theirs[:1] - before).abs().max() > 1e-2  # the merge changed the model (adapters and 4-bit rounding)


def test_the_merged_weights_are_in_the_compute_dtype(tiny_path):
    model = apply_lora(load_model(str(tiny_path), dtype="bfloat16", quantize="nf4"), LoraSettings(rank=4))
    merged = merged_state_dict(model)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}

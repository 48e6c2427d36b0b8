"""LoRA: wrapping, merged weights that make a plain model compute what the policy computes, saving a plain folder."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from posttrain.models.lora import LoraSettings, apply_lora, merged_state_dict, save_merged
from posttrain.models.tiny import build_tiny_tokenizer

RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2


@pytest.fixture
def input_ids_BT():
    return torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def lora_model(tiny_path):
    """Peft model whose B matrices are random (at init B = 0 and the adapter would be invisible)."""
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_path), LoraSettings(rank=RANK, alpha=ALPHA))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def test_apply_lora_wraps_targets_and_starts_as_identity(tiny_path, input_ids_BT):
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    expected = base(input_ids_BT).logits
    model = apply_lora(base, LoraSettings(rank=RANK, alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
    assert isinstance(model, PeftModel)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all("lora_A" in name or "lora_B" in name for name in trainable)
    assert torch.equal(model(input_ids_BT).logits, expected)  # B = 0 at init
    assert LoraSettings().target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_merged_state_dict_reproduces_the_policy(tiny_path, lora_model, input_ids_BT):
    before = lora_model(input_ids_BT).logits.detach()
    params_before = {name: param.detach().clone() for name, param in lora_model.named_parameters()}
    plain = AutoModelForCausalLM.from_pretrained(tiny_path)
    untouched = plain(input_ids_BT).logits.detach()
    assert (untouched - before).abs().max() > 0.1  # the adapter really changes the outputs

    state = merged_state_dict(lora_model)
    assert set(state) == set(plain.state_dict())  # plain names: no base_model prefix, base_layer or lora keys
    plain.load_state_dict(state, strict=True)
    torch.testing.assert_close(plain(input_ids_BT).logits, before, atol=1e-5, rtol=0)

    # the peft model is left exactly as it was
    assert torch.equal(lora_model(input_ids_BT).logits, before)
    assert all(torch.equal(param, params_before[name]) for name, param in lora_model.named_parameters())


def test_merge_formula_and_tensor_properties(lora_model):
    state = merged_state_dict(lora_model)
    layer = lora_model.base_model.model.model.layers[1].self_attn.v_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # [r, in], [out, r]
    expected = layer.base_layer.weight + (ALPHA / RANK) * B @ A
    torch.testing.assert_close(state["model.layers.1.self_attn.v_proj.weight"], expected, atol=1e-7, rtol=0)
    for tensor in state.values():
        assert tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.requires_grad
    # copies: writing into the result never touches the model
    state["model.embed_tokens.weight"].zero_()
    assert lora_model.base_model.model.model.embed_tokens.weight.abs().sum() > 0


def test_only_lora_targets(lora_model):
    full = merged_state_dict(lora_model)
    targets = merged_state_dict(lora_model, only_lora_targets=True)
    expected = {
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert set(targets) == expected
    assert all(torch.equal(targets[key], full[key]) for key in targets)


def test_plain_model_state_dict_is_a_copy(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    state = merged_state_dict(model, only_lora_targets=True)  # ignored for plain models
    assert set(state) == set(model.state_dict())
    weight = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], weight)
    assert state["model.layers.0.mlp.up_proj.weight"].data_ptr() != weight.data_ptr()


def test_disabled_adapter_merges_nothing(tiny_path, lora_model):
    plain = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    with lora_model.disable_adapter():
        state = merged_state_dict(lora_model)
    assert all(torch.equal(state[key], plain[key]) for key in plain)


def test_save_merged_reloads_as_plain_model(lora_model, input_ids_BT, tmp_path):
    expected = lora_model(input_ids_BT).logits.detach()
    out = tmp_path / "final"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier save")
    assert save_merged(lora_model, build_tiny_tokenizer(), out) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temp or old folders left
    assert not (out / "stale.txt").exists() and not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not isinstance(reloaded, PeftModel)
    torch.testing.assert_close(reloaded(input_ids_BT).logits, expected, atol=1e-5, rtol=0)
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()


def test_fused_lora_layers_compute_peft_forward_and_gradients(tiny_path, input_ids_BT):
    """`apply_lora` swaps peft's `lora.Linear` for `FusedLoraLinear`: the same outputs and gradients (the branch's
    matmul, scale and sum in one addmm), peft's own forward when the adapter is disabled, and copies keep the class."""
    import copy

    from peft.tuners.lora.layer import Linear

    from posttrain.models.lora import FusedLoraLinear

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_path), LoraSettings(rank=4, alpha=8))
    fused = [m for m in model.modules() if isinstance(m, Linear)]
    assert fused and all(type(m) is FusedLoraLinear for m in fused)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))

    def run():
        model.zero_grad()
        logits = model(input_ids=input_ids_BT).logits
        logits.pow(2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = run()
    for m in fused:
        m.__class__ = Linear
    theirs = run()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) == 2 * len(fused)
    for name, grad in ours[1].items():
        torch.testing.assert_close(grad, theirs[1][name], rtol=1e-5, atol=1e-7, msg=name)
    for m in fused:
        m.__class__ = FusedLoraLinear
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=input_ids_BT).logits
    plain = AutoModelForCausalLM.from_pretrained(tiny_path)
    with torch.no_grad():
        torch.testing.assert_close(base, plain(input_ids=input_ids_BT).logits, rtol=0, atol=1e-6)
    assert type(copy.deepcopy(model).base_model.model.model.layers[0].self_attn.q_proj) is FusedLoraLinear

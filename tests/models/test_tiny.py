"""Tiny offline models: tokenizer round-trips, special tokens, chat template, config, caching and racing builders."""

import string
import tempfile
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.tiny import CHATML_TEMPLATE, build_tiny_model, build_tiny_tokenizer, tiny_model_path


def test_build_is_fast_and_loadable(tmp_path):
    build_tiny_tokenizer()  # warm imports so the timing measures the build
    start = time.perf_counter()
    out = build_tiny_model(tmp_path / "m")
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"build took {elapsed:.2f} s"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (
        model.config.vocab_size == len(tokenizer) == 3 + 97 + 256
    )  # specials, 94 visible chars + space, \n, \t, bytes
    assert model.config.max_position_embeddings == 512
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0


def test_tokenizer_round_trips_any_text_and_specials_are_single_tokens(tiny_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    ascii_text = string.ascii_letters + string.digits + string.punctuation + " \n\t"
    ids = tokenizer(ascii_text)["input_ids"]
    assert len(ids) == len(ascii_text)  # one token per character, nothing added
    assert tokenizer.decode(ids) == ascii_text
    unicode_text = "héllo ✓ 𝔁 日本"
    assert tokenizer.decode(tokenizer(unicode_text)["input_ids"]) == unicode_text  # via <0xNN> byte tokens
    a_id, b_id = tokenizer.convert_tokens_to_ids(["a", "b"])
    assert tokenizer("a<|im_end|>b<|pad|>")["input_ids"] == [a_id, 2, b_id, 0]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<|pad|>", "<|im_start|>", "<|im_end|>")
    assert tokenizer.decode([1, b_id, 2, 0], skip_special_tokens=True) == "b"


def test_chat_template(tiny_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert full == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert (
        prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_seed_determines_weights(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "a", seed=3)).state_dict()
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "b", seed=3)).state_dict()
    c = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "c", seed=4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    # init std 0.1 (not 0.02) so tests see real differences between positions and weights
    assert 0.08 < a["model.layers.0.self_attn.q_proj.weight"].std().item() < 0.12


def test_build_does_not_disturb_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_path_caches_per_kwargs_and_survives_a_race(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # gettempdir() -> tmp_path
    results, errors = [], []

    def build():
        try:
            results.append(tiny_model_path(hidden_size=32, num_layers=1, num_heads=2, seed=5))
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert results[0].parent == tmp_path / "posttrain-tiny"
    assert [p.name for p in results[0].parent.iterdir()] == [results[0].name]  # no leftover build folders
    model = AutoModelForCausalLM.from_pretrained(results[0])
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert tiny_model_path(hidden_size=32, num_layers=1, num_heads=2, seed=5) == results[0]
    assert tiny_model_path(hidden_size=32, num_layers=1, num_heads=2, seed=6) != results[0]


@pytest.mark.heavy  # the SmolLM2 demo model's tokenizer
def test_a_tiny_model_can_take_a_real_models_tokenizer(tmp_path):
    pytest.importorskip("gguf")  # the demo model (SmolLM2) is converted from its GGUF file
    from posttrain.learner.teacher import check_same_tokenizer

    out = build_tiny_model(tmp_path / "m", hidden_size=32, seed=1, tokenizer="smollm2-135m-instruct")
    check_same_tokenizer(str(out), "smollm2-135m-instruct")  # on-policy distillation accepts it as SmolLM2's student
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) == 49152 and model.config.hidden_size == 32
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert "<|im_start|>system" in tokenizer.chat_template  # SmolLM2's template, not the tiny one
    assert tokenizer.chat_template != CHATML_TEMPLATE

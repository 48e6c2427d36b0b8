"""`posttrain_sdpa` (models/attention.py): grouped key/value heads handed to SDPA as they are, same outputs."""

import pytest
import torch

from posttrain.models.attention import NAME
from posttrain.models.loading import load_model, load_tokenizer


def _padded_batch(tiny_path, padding_side):
    tokenizer = load_tokenizer(str(tiny_path), padding_side=padding_side)
    texts = ["a longer first prompt, padded least", "short", "a middle one here"]
    return tokenizer(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_loaded_models_use_it_and_match_transformers_sdpa(tiny_path, padding_side):
    grouped = load_model(str(tiny_path)).eval()
    plain = load_model(str(tiny_path)).eval()
    plain.set_attn_implementation("sdpa")
    assert grouped.config._attn_implementation == NAME
    assert grouped.config.num_key_value_heads < grouped.config.num_attention_heads  # the case it changes
    batch = _padded_batch(tiny_path, padding_side)
    with torch.no_grad():
        assert torch.equal(grouped(**batch).logits, plain(**batch).logits)
    # causal without a mask (one unpadded row) and the gradients, which are summed in another order
    for model in (grouped, plain):
        model.zero_grad()
        model(**batch).logits.pow(2).mean().backward()
    for (name, p), q in zip(grouped.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    one = {key: value[:1, :4] for key, value in batch.items()}
    with torch.no_grad():
        assert torch.equal(grouped(input_ids=one["input_ids"]).logits, plain(input_ids=one["input_ids"]).logits)


def test_eager_models_are_left_alone(tiny_path):
    from transformers import AutoModelForCausalLM

    from posttrain.models.attention import use_grouped_sdpa

    model = AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="eager")
    assert use_grouped_sdpa(model).config._attn_implementation == "eager"

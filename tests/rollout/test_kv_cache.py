"""The hf engine's preallocated KV cache (rollout/kv_cache.py): no copy per token, outputs bitwise transformers'."""

import pytest
import torch

from posttrain.models.loading import load_model, load_tokenizer
from posttrain.rollout.kv_cache import PreallocatedLayer, preallocated_cache


def _generate(model, batch, cache, seed):
    torch.manual_seed(seed or 0)
    return model.generate(
        **batch,
        do_sample=seed is not None,
        top_k=0,
        max_new_tokens=12,
        past_key_values=cache,
        pad_token_id=0,
        eos_token_id=[],
        output_logits=True,
        return_dict_in_generate=True,
    )


@pytest.mark.parametrize("seed", [None, 0, 1])
@pytest.mark.parametrize("spare", [0, -5])  # exactly the final length; too short (the copying fallback)
def test_generation_equals_the_dynamic_cache(model_path, seed, spare):
    model = load_model(str(model_path)).eval()
    tokenizer = load_tokenizer(str(model_path), padding_side="left")
    batch = tokenizer(["a long prompt, padded least", "hi", "middle one"], return_tensors="pt", padding=True)
    capacity = batch["input_ids"].shape[1] + 12 + spare
    with torch.inference_mode():
        ours = _generate(model, batch, preallocated_cache(model.config, capacity), seed)
        theirs = _generate(model, batch, None, seed)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits, strict=True):
        assert torch.equal(a, b)


def test_steps_write_into_one_buffer(model_path):
    model = load_model(str(model_path)).eval()
    cache = preallocated_cache(model.config, capacity=10)
    assert all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
    layer = cache.layers[0]
    k, v = torch.randn(2, 2, 4, 16), torch.randn(2, 2, 4, 16)
    keys, _ = layer.update(k, v)
    pointer = keys.data_ptr()
    step_k, step_v = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    keys, values = layer.update(step_k, step_v)
    assert keys.data_ptr() == pointer and keys.shape == (2, 2, 5, 16)  # a view of the same buffer, not a copy
    assert torch.equal(keys, torch.cat([k, step_k], dim=2)) and torch.equal(values, torch.cat([v, step_v], dim=2))
    assert layer.get_seq_length() == 5
    keys, _ = layer.update(torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16))  # past capacity: concatenated
    assert keys.shape[2] == 11 and torch.equal(keys[:, :, :5], torch.cat([k, step_k], dim=2))

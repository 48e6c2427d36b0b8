"""QLoRA online learners (`model.quantize: nf4` with `model.lora`): the rollout engine samples with exactly the
weights the learner computes with (the dequantized 4-bit base + the merged adapter), from the first rollout on; a
run checkpoints, resumes and saves a plain full-precision folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.config import validate_config
from posttrain.data.types import Sample
from posttrain.learner.actors import LearnerGroup
from posttrain.learner.batch import collate
from posttrain.learner.learner import LearnerImpl, LearnerSettings
from posttrain.models.loading import load_model
from posttrain.models.lora import LoraSettings, merged_state_dict
from posttrain.models.tiny import tiny_model_path
from posttrain.online.trainer import OnlineTrainer, to_samples
from posttrain.rollout.types import SamplingParams
from posttrain.run_folder.run_dir import read_metrics

pytest.importorskip("bitsandbytes")

LENGTH_REWARD = Path(__file__).parent / "data" / "length_reward.py"
MLP = "model.layers.0.mlp.up_proj.weight"  # not a LoRA target: 4-bit, never trained
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"  # a LoRA target


def _recipe(tmp_path: Path, steps: int, **extra) -> dict:
    return {
        "name": "qlora",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path()), "lora": {"rank": 4, "alpha": 8}, "quantize": "nf4"},
        "seed": 1,  # the first step's completions differ in length: reward variance, so the step moves the weights
        "data": {"kind": "arithmetic", "num_problems": 8, "seed": 1, "max_value": 9},
        "rewards": [{"fn": f"{LENGTH_REWARD}:length_reward"}],  # varies on a random model: a real gradient
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 4, "advantage_std": "none"},
        "rollout": {"max_new_tokens": 10, "num_threads": 1, "sync_bucket_mb": 0.05},
        "train": {"steps": steps, "lr": 5e-2, "micro_batch_size": 4, "num_threads": 1},
        "checkpoint": {"every_steps": 1},
        "scoring": {"workers": 0},
        "logging": {"progress": False},
        **extra,
    }


def _engine_vs_learner_gap(trainer: OnlineTrainer, ray) -> float:
    """Greedy-decode a few prompts on the engine; the largest |engine log-prob - learner log-prob| over the chosen
    tokens, the learner's computed by the learner actor itself (its 4-bit model, adapter on)."""
    rows = trainer.train_rows[:3]
    results = trainer.pool.generate(trainer.format(rows), SamplingParams(n=1, temperature=0, max_new_tokens=10))
    samples = to_samples(rows, results)
    assert all(s.completion_token_ids for s in samples)
    batch = collate(samples, [0.0] * len(samples), trainer.format.tokenizer.pad_token_id, 10)
    learner_BC, _ = ray.get(trainer.learner.logprobs.remote(batch))
    mask = batch.loss_mask_BC.bool()
    return float((learner_BC - batch.sampler_logprobs_BC)[mask].abs().max())


def test_the_engine_samples_with_the_learners_dequantized_weights_from_the_first_rollout(tmp_path, ray_session):
    ray = ray_session
    trainer = OnlineTrainer(validate_config(_recipe(tmp_path, steps=2)))
    try:
        worker = trainer.pool.workers[0]
        checkpoint_w = load_model(str(tiny_model_path())).state_dict()
        learner_w = ray.get(trainer.learner.get_weights.remote(False))
        worker_w = ray.get(worker.get_weights.remote())
        # before any rollout the engine holds every layer as the learner computes it: the 4-bit rounding of the
        # checkpoint (MLP included, which no adapter touches), not the checkpoint's full-precision weights
        assert all(torch.equal(worker_w[name], tensor) for name, tensor in learner_w.items())
        assert (worker_w[MLP] - checkpoint_w[MLP]).abs().max() > 1e-3
        assert _engine_vs_learner_gap(trainer, ray) < 1e-4
        initial_w = learner_w

        for step in (1, 2):
            metrics, _, _ = trainer.train_step(step)
            # the learner's log-probs of the sampled tokens equal the engine's (a full-precision engine base would
            # differ by the quantization error)
            assert metrics["rollout/logprob_diff"] < 1e-5, metrics["rollout/logprob_diff"]
            learner_w = ray.get(trainer.learner.get_weights.remote(False))
            worker_w = ray.get(worker.get_weights.remote())
            assert all(torch.equal(worker_w[name], tensor) for name, tensor in learner_w.items())
        # training moved the adapted layers (the later syncs carried them); the 4-bit base stayed as it was
        assert not torch.equal(learner_w[Q_PROJ], initial_w[Q_PROJ])
        assert torch.equal(learner_w[MLP], initial_w[MLP])
        assert _engine_vs_learner_gap(trainer, ray) < 1e-4
        # control: an engine with the checkpoint's full-precision base (what it would hold without the first full
        # sync) and the learner's merged adapters is measurably off the learner
        full_base = {name: checkpoint_w[name] for name in learner_w if name not in _adapted(learner_w)}
        ray.get(worker.load_weights.remote(full_base))
        assert _engine_vs_learner_gap(trainer, ray) > 1e-3
    finally:
        trainer.scorer.close()


def _adapted(weights: dict) -> set[str]:
    return {name for name in weights if any(f".{t}." in name for t in ("q_proj", "k_proj", "v_proj", "o_proj"))}


@pytest.mark.slow  # two trainers (a run, then its resume): ~85 s on 2 loaded cores
def test_a_qlora_grpo_run_checkpoints_resumes_and_saves_a_full_precision_model(tmp_path, ray_session):
    from transformers import AutoModelForCausalLM

    ray = ray_session
    run_dir = OnlineTrainer(validate_config(_recipe(tmp_path, steps=2))).run()
    saved = torch.load(run_dir / "checkpoints" / "step-2" / "learner.pt", weights_only=False)
    assert saved["trainable"] and all("lora_" in name for name in saved["trainable"])

    resumed = OnlineTrainer(validate_config(_recipe(tmp_path, steps=3, resume=str(run_dir))))
    try:
        assert resumed.start_step == 2
        # the checkpoint's adapter is back in the learner, and the engine (restarted from the full-precision
        # checkpoint) got the dequantized base + that adapter before its first rollout
        learner_w = ray.get(resumed.learner.get_weights.remote(False))
        worker_w = ray.get(resumed.pool.workers[0].get_weights.remote())
        assert all(torch.equal(worker_w[name], tensor) for name, tensor in learner_w.items())
        assert _engine_vs_learner_gap(resumed, ray) < 1e-4
        assert resumed.run() == run_dir
    finally:
        resumed.scorer.close()
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/logprob_diff"] < 1e-5 for r in rows)

    final = run_dir / "final"
    assert "quantization_config" not in json.loads((final / "config.json").read_text())  # a plain HF folder
    final_w = AutoModelForCausalLM.from_pretrained(final).state_dict()
    checkpoint_w = load_model(str(tiny_model_path())).state_dict()
    assert {t.dtype for t in final_w.values()} == {torch.float32}
    # merged into the full-precision base: untouched layers are the checkpoint's exact weights, adapted ones moved
    assert torch.equal(final_w[MLP], checkpoint_w[MLP])
    assert not torch.equal(final_w[Q_PROJ], checkpoint_w[Q_PROJ])
    assert (final_w[Q_PROJ] - learner_w[Q_PROJ]).abs().max() < 0.1  # the same adapter, on the unrounded base


@pytest.mark.slow  # ~2 min on 2 shared cores (vLLM starts in a Ray actor)
def test_two_qlora_grpo_steps_with_vllm_rollouts(tmp_path, ray_session):
    recipe = _recipe(tmp_path, steps=2, checkpoint={"every_steps": 2})
    # two heads of size 32: vLLM's CPU attention needs a head size of at least 32
    recipe["model"]["path"] = str(tiny_model_path(num_heads=2))
    recipe["rollout"]["engine"] = "vllm"
    rows = read_metrics(OnlineTrainer(validate_config(recipe)).run())
    assert [r["step"] for r in rows] == [1, 2]
    # step 1 samples right after the first (full, dequantized) sync, step 2 after the adapted layers' sync: vLLM's
    # log-probs are the 4-bit learner's at both
    assert all(r["rollout/logprob_diff"] < 1e-4 for r in rows), [r["rollout/logprob_diff"] for r in rows]


def test_two_qlora_learners_take_the_step_of_one(ray_session):
    """Data-parallel QLoRA: 2 gloo learners on a split batch hold the merged (dequantized) weights of 1 learner on the
    whole batch; each quantizes the same checkpoint to the same 4-bit base, and only the adapters' gradients meet."""
    ray = ray_session
    gen = torch.Generator().manual_seed(0)
    samples, advantages = [], []
    for i in range(5):
        prompt = torch.randint(3, 90, (2 + i % 3,), generator=gen).tolist()
        completion = torch.randint(3, 90, (1 + (3 * i) % 5,), generator=gen).tolist()
        samples.append(Sample("p", prompt, "c", completion, [-1.0] * len(completion), "stop", i))
        advantages.append(float(torch.randn((), generator=gen)))
    batch = collate(samples, advantages, pad_token_id=0, max_completion_tokens=6)
    settings = LearnerSettings(
        model_path=str(tiny_model_path()),
        lora=LoraSettings(rank=4, alpha=8),
        quantize="nf4",
        lr=1e-2,
        micro_batch_size=2,
        num_threads=1,
        device="cpu",
    )
    single = LearnerImpl(settings)
    before = merged_state_dict(single.model)
    group = LearnerGroup(settings, world_size=2, timeout_s=60).start()
    try:
        expected = single.train_step(batch)
        got = ray.get(group.train_step.remote(batch), timeout=120)
        ranks = [ray.get(actor.get_weights.remote(False), timeout=60) for actor in group.actors]
    finally:
        group.shutdown()
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    after = merged_state_dict(single.model)
    assert not torch.equal(after[Q_PROJ], before[Q_PROJ])
    for name, tensor in after.items():
        torch.testing.assert_close(ranks[0][name], tensor, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(ranks[0][name], ranks[1][name]), name

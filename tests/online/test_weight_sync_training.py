"""After a training step and a bucketed sync, the rollout worker holds the learner's new weights bitwise and
greedy-decodes with them: each token it picks should be the learner model's argmax (up to fp32 near-ties)
with the learner's log-prob."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.config import validate_config
from posttrain.models.loading import load_model
from posttrain.models.tiny import tiny_model_path
from posttrain.online.trainer import OnlineTrainer
from posttrain.rollout.types import SamplingParams

LENGTH_REWARD = Path(__file__).parent / "data" / "length_reward.py"


def _recipe(tmp_path, lora: bool) -> dict:
    return {
        "name": "sync",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path()), **({"lora": {"rank": 4, "alpha": 8}} if lora else {})},
        "seed": 1,  # the first step's completions differ in length: reward variance, so the step moves the weights
        "data": {"kind": "arithmetic", "num_problems": 8, "seed": 1, "max_value": 9},
        "rewards": [{"fn": f"{LENGTH_REWARD}:length_reward"}],  # varies on a random model: a real gradient
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 2, "advantage_std": "none"},
        # 0.05 MiB buckets: the tiny model's ~0.4 MB (LoRA: its adapted layers) goes in several
        "rollout": {"max_new_tokens": 10, "num_threads": 1, "temperature": 1.0, "sync_bucket_mb": 0.05},
        "train": {"steps": 1, "lr": 5e-2, "micro_batch_size": 4, "num_threads": 1},
        "scoring": {"workers": 0},
        "logging": {"progress": False},
    }


def _learner_logprobs(weights: dict[str, torch.Tensor], prompt_ids: list[int], completion: list[int]) -> torch.Tensor:
    """log_softmax of a plain transformers model holding the learner's weights at each completion position ([L, V]),
    the completion fed back in (teacher forcing)."""
    model = load_model(str(tiny_model_path())).eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : len(prompt_ids) + len(completion) - 1], dim=-1)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_worker_greedy_equals_learner_greedy_after_a_step(tmp_path, ray_session, lora):
    ray = ray_session
    trainer = OnlineTrainer(validate_config(_recipe(tmp_path, lora)))
    try:
        prompts = trainer.format(trainer.eval_rows or trainer.train_rows[:3])
        greedy = SamplingParams(n=1, temperature=0, max_new_tokens=10)
        initial = ray.get(trainer.pool.workers[0].get_weights.remote())
        metrics, _, _ = trainer.train_step(1)
        assert metrics["time/sync"] > 0
        assert trainer.weight_sync.bucket_bytes == int(0.05 * 2**20)

        learner_w = ray.get(trainer.learner.get_weights.remote(False))
        # the step changed the weights and the worker holds exactly the learner's (merged) new ones
        assert metrics["reward/std"] > 0
        worker_w = ray.get(trainer.pool.workers[0].get_weights.remote())
        assert all(torch.equal(worker_w[name], tensor) for name, tensor in learner_w.items())
        assert any(not torch.equal(initial[name], tensor) for name, tensor in learner_w.items())
        gaps = []
        for result in trainer.pool.generate(prompts, greedy):
            completion = result.completions[0]
            assert len(completion.token_ids) > 0
            lp_LV = _learner_logprobs(learner_w, result.prompt_token_ids, completion.token_ids)
            chosen_lp = lp_LV.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
            # every token the worker chose greedily should be the argmax under the learner's new weights (up to fp32
            # summation noise: a random model's near-flat logits have near-ties, so no exact token-list comparison),
            # with the learner's log-prob
            gaps.append(float((lp_LV.max(-1).values - chosen_lp).max()))
            gaps.append(float((torch.tensor(completion.logprobs) - chosen_lp).abs().max()))
        assert max(gaps) <= 1e-4, gaps
    finally:
        trainer.scorer.close()

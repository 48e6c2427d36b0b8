"""After a training step and a bucketed sync, the rollout worker generates exactly what the learner's model does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.config import validate_config
from posttrain.models.loading import load_model
from posttrain.models.tiny import tiny_model_path
from posttrain.rl.grpo import OnlineTrainer
from posttrain.rollout.types import SamplingParams

LENGTH_REWARD = Path(__file__).parent / "data" / "length_reward.py"


def _recipe(tmp_path, lora: bool) -> dict:
    return {
        "name": "sync",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path()), **({"lora": {"rank": 4, "alpha": 8}} if lora else {})},
        "data": {"kind": "arithmetic", "num_problems": 8, "seed": 1, "max_value": 9},
        "rewards": [{"fn": f"{LENGTH_REWARD}:length_reward"}],  # varies on a random model: a real gradient
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 2, "advantage_std": "none"},
        # 0.05 MiB buckets: the tiny model's ~0.4 MB (LoRA: its adapted layers) goes in several
        "rollout": {"max_new_tokens": 10, "num_threads": 1, "temperature": 1.0, "sync_bucket_mb": 0.05},
        "train": {"steps": 1, "lr": 5e-2, "micro_batch_size": 4, "num_threads": 1},
        "scoring": {"workers": 0},
        "logging": {"progress": False},
    }


def _learner_greedy(weights: dict[str, torch.Tensor], prompt_ids: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy tokens from a plain transformers model holding the learner's weights, one prompt at a time."""
    model = load_model(str(tiny_model_path())).eval()
    model.load_state_dict(weights, strict=True)
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            seq = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=max_new, eos_token_id=2, pad_token_id=0
            )
            outs.append(seq[0, len(ids) :].tolist())
    return outs


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_worker_greedy_equals_learner_greedy_after_a_step(tmp_path, ray_session, lora):
    ray = ray_session
    trainer = OnlineTrainer(validate_config(_recipe(tmp_path, lora)))
    try:
        prompts = trainer.format(trainer.eval_rows or trainer.train_rows[:3])
        greedy = SamplingParams(n=1, temperature=0, max_new_tokens=10)
        before = [r.completions[0].token_ids for r in trainer.pool.generate(prompts, greedy)]
        metrics, _, _ = trainer.train_step(1)
        assert metrics["time/sync"] > 0
        assert trainer.weight_sync.bucket_bytes == int(0.05 * 2**20)

        learner_w = ray.get(trainer.learner.get_weights.remote(False))
        results = trainer.pool.generate(prompts, greedy)
        after = [r.completions[0].token_ids for r in results]
        expected = _learner_greedy(learner_w, [r.prompt_token_ids for r in results], 10)
        assert after == expected
        assert metrics["reward/std"] > 0
        assert after != before  # the step changed the policy, and the worker generates with the new one
    finally:
        trainer.scorer.close()

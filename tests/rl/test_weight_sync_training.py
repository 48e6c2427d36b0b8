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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's thread count: same summation order, so no argmax flips on near-ties
    with torch.no_grad():
        for ids in prompt_ids:
            seq = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=max_new, eos_token_id=2, pad_token_id=0
            )
            outs.append(seq[0, len(ids) :].tolist())
    torch.set_num_threads(threads)
    return outs


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
        # one prompt per call, like the reference: a left-padded batch sums in another order, and on a random model's
        # near-flat logits that alone can flip a greedy argmax
        results = [trainer.pool.generate([prompt], greedy)[0] for prompt in prompts]
        after = [r.completions[0].token_ids for r in results]
        expected = _learner_greedy(learner_w, [r.prompt_token_ids for r in results], 10)
        assert after == expected
        # the step changed the weights and the worker holds exactly the learner's (merged) new ones
        assert metrics["reward/std"] > 0
        worker_w = ray.get(trainer.pool.workers[0].get_weights.remote())
        assert all(torch.equal(worker_w[name], tensor) for name, tensor in learner_w.items())
        assert any(not torch.equal(initial[name], tensor) for name, tensor in learner_w.items())
    finally:
        trainer.scorer.close()

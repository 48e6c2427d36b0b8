"""On-policy distillation must move the student towards the teacher: two tiny random models sharing a tokenizer
(teacher seed 0, student seed 1); the sampled reverse KL to the teacher on held-out prompts has to fall clearly.
Measured on 2 shared cores (~38 s per loss): held-out 0.708 -> 0.174 (reverse_kl) and 0.708 -> 0.119 (jsd) in 15
steps."""

import pytest

from posttrain.config import validate_config
from posttrain.models.tiny import tiny_model_path
from posttrain.rl.grpo import OnlineTrainer
from posttrain.rl.run_dir import read_metrics


@pytest.mark.slow
@pytest.mark.parametrize("opd", [{"loss": "reverse_kl"}, {"loss": "jsd", "beta": 0.5}], ids=["reverse_kl", "jsd"])
def test_student_moves_towards_the_teacher(tmp_path, ray_session, opd):
    raw = {
        "name": "opd",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path(seed=1))},
        "opd": {"teacher": str(tiny_model_path(seed=0)), **opd},
        "data": {"kind": "arithmetic", "num_problems": 64, "seed": 1, "max_value": 9},
        "eval": {"data": {"kind": "arithmetic", "num_problems": 16, "seed": 2, "max_value": 9}, "every_steps": 5},
        "algorithm": {"name": "opd", "prompts_per_step": 4, "samples_per_prompt": 4},
        "rollout": {"max_new_tokens": 8, "num_threads": 1},
        "train": {"steps": 15, "lr": 1e-2, "micro_batch_size": 16, "num_threads": 1},
        "checkpoint": {"every_steps": 1000},
        "logging": {"progress": False, "samples_per_step": 0},
    }
    trainer = OnlineTrainer(validate_config(raw))
    try:
        rows = read_metrics(trainer.run())
    finally:
        for actor in [trainer.learner, trainer.teacher, *trainer.pool.workers]:
            ray_session.kill(actor)
    held_out = [row["eval/reverse_kl"] for row in rows if "eval/reverse_kl" in row]
    train = [row["opd/reverse_kl"] for row in rows if "opd/reverse_kl" in row]
    print(f"held-out reverse KL at steps 0, 5, 10, 15: {[round(v, 3) for v in held_out]}")
    print(f"training reverse KL per step: {[round(v, 3) for v in train]}")
    assert len(held_out) == 4 and held_out[-1] < 0.5 * held_out[0], held_out
    assert sum(train[-3:]) / 3 < 0.6 * train[0], train  # the per-step estimate is noisy: 16 samples of 8 tokens

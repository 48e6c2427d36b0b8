"""On-policy distillation must move the student towards the teacher: the sampled reverse KL to the teacher on
held-out prompts has to fall clearly.
  - two tiny random models sharing a tokenizer (teacher seed 0, student seed 1); measured on 2 shared cores (~16 s
    per loss): held-out 0.788 -> 0.177 (reverse_kl) and 0.788 -> 0.120 (jsd) in 15 steps;
  - recipes/opd_math.yaml: SmolLM2-135M-Instruct (the real demo model) teaches a tiny random student that shares its
    tokenizer (3-4 min on 2 cores at load 25-30; numbers in the README).
"""

from pathlib import Path

import pytest

from posttrain.config import load_config, validate_config
from posttrain.models.tiny import build_tiny_model, tiny_model_path
from posttrain.online.trainer import OnlineTrainer
from posttrain.run_folder.run_dir import read_metrics

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "opd_math.yaml"


def _run(cfg, ray_session) -> tuple[list[float], list[float]]:
    """(held-out reverse KL at each evaluation, training reverse KL per step) of one OPD run; its actors stopped."""
    trainer = OnlineTrainer(cfg)
    try:
        rows = read_metrics(trainer.run())
    finally:
        for actor in [trainer.learner, trainer.teacher, *trainer.pool.workers]:
            ray_session.kill(actor)
    held_out = [row["eval/reverse_kl"] for row in rows if "eval/reverse_kl" in row]
    train = [row["opd/reverse_kl"] for row in rows if "opd/reverse_kl" in row]
    print(f"held-out reverse KL: {[round(v, 3) for v in held_out]}")
    print(f"training reverse KL per step: {[round(v, 3) for v in train]}")
    return held_out, train


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
    held_out, train = _run(validate_config(raw), ray_session)  # evaluated at steps 0, 5, 10, 15
    assert len(held_out) == 4 and held_out[-1] < 0.5 * held_out[0], held_out
    # the per-step estimate is noisy (16 samples of 8 tokens): the last three steps against the first three
    assert sum(train[-3:]) < 0.7 * sum(train[:3]), train


@pytest.mark.slow
def test_tiny_student_moves_towards_smollm2(tmp_path, ray_session):
    student = build_tiny_model(tmp_path / "student", hidden_size=128, seed=1, tokenizer="smollm2-135m-instruct")
    overrides = [f"model.path={student}", f"output_dir={tmp_path / 'runs'}", "logging.progress=false"]
    # 3 of the recipe's 6 steps (the held-out KL falls most of the way by step 3), evaluated before and after only,
    # without the logged-only rewards (no reward worker, no greedy pass: the tiny student's accuracy is 0 throughout);
    # one thread per actor, which on a shared 2-core machine beats two fighting for a core
    overrides += ["train.steps=3", "eval.every_steps=0", "train.num_threads=1", "rollout.num_threads=1", "rewards=[]"]
    held_out, _ = _run(load_config(RECIPE, overrides), ray_session)
    # the random student samples near-uniformly over 49152 tokens (entropy ~10.2 nats). Measured (README): 5.31 ->
    # 3.27 here, 5.14 -> 3.49 with seed 1; with lr 1e-12 instead (the learner doing nothing) 5.31 -> 5.11 and
    # 5.14 -> 5.33, the eval's sampling noise. A fall of more than a nat separates the two.
    assert len(held_out) == 2 and held_out[-1] < held_out[0] - 1.0, held_out

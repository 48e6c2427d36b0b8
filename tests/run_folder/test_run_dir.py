"""Run folder bookkeeping: atomic checkpoints, resume truncation, schedules, pass@k."""

import json
import math

import pytest

from posttrain.models.training import lr_lambda
from posttrain.online.evaluation import pass_at_k
from posttrain.run_folder.run_dir import (
    RunLogger,
    checkpoint_staging,
    commit_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    read_metrics,
)


def test_only_committed_checkpoints_count_and_old_ones_are_pruned(tmp_path):
    for step in (2, 4, 6):
        staging = checkpoint_staging(tmp_path, step)
        (staging / "learner.pt").write_text("x")
        commit_checkpoint(tmp_path, staging, step, {"step": step}, keep_last=2)
    checkpoint_staging(tmp_path, 8)  # a save interrupted before its commit
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-4", "step-6"]
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "step-6" and state == {"step": 6}


def test_resume_drops_rows_of_lost_steps_and_a_torn_line(tmp_path):
    logger = RunLogger(tmp_path)
    for step in range(4):
        logger.log(step, {"loss": float(step), "kl": math.nan})
        logger.log_samples(step, [{"completion": "c"}])
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    assert read_metrics(tmp_path)[1] == {"step": 1, "loss": 1.0, "kl": None}  # NaN is written as null
    RunLogger(tmp_path, resume_after_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 1, 2]


def test_lr_schedule_warmup_then_decay():
    assert [lr_lambda(i, 2, 10, "constant") for i in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_lambda(2, 2, 10, "linear") == 1.0 and lr_lambda(6, 2, 10, "linear") == pytest.approx(0.5)
    assert lr_lambda(6, 2, 10, "cosine") == pytest.approx(0.5) and lr_lambda(10, 2, 10, "cosine") == pytest.approx(0.0)


def test_pass_at_k_unbiased_estimator():
    # n=4 samples, c=1 correct: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0


def test_resume_without_a_checkpoint_starts_the_logs_afresh(tmp_path):
    logger = RunLogger(tmp_path)
    logger.log(0, {"eval/accuracy": 0.5})
    logger.log(1, {"loss": 1.0})
    logger.close()
    RunLogger(tmp_path, resume_after_step=-1).close()
    assert read_metrics(tmp_path) == []

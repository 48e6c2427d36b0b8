"""Run folder bookkeeping: atomic checkpoints, resume truncation, schedules, pass@k."""

import json
import math

import pytest
import torch

from posttrain.config import validate_config
from posttrain.models.tiny import tiny_model_path
from posttrain.models.training import lr_lambda
from posttrain.online.evaluation import pass_at_k
from posttrain.run_folder.run_dir import (
    FAILED,
    CheckpointError,
    RunLogger,
    checkpoint_staging,
    commit_checkpoint,
    failure_marker,
    latest_checkpoint,
    list_checkpoints,
    open_run_dir,
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


def _run_with_checkpoints(tmp_path, steps=(2, 4)):
    """A run folder (as `open_run_dir` makes it) with real torch checkpoints at `steps`; (recipe, folder)."""
    cfg = validate_config(
        {
            "output_dir": str(tmp_path),
            "model": {"path": str(tiny_model_path())},
            "data": {"kind": "arithmetic"},
            "rewards": [{"fn": "math_accuracy"}],
        }
    )
    run_dir, _, _ = open_run_dir(cfg)
    for step in steps:
        staging = checkpoint_staging(run_dir, step)
        torch.save({"steps_done": step, "w": torch.arange(1000.0)}, staging / "learner.pt")
        commit_checkpoint(run_dir, staging, step, {"step": step}, keep_last=5)
    return cfg.model_copy(update={"resume": str(run_dir)}), run_dir


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "bad_file"),
    [
        (lambda ckpt: _truncate(ckpt / "learner.pt"), "learner.pt"),
        (lambda ckpt: (ckpt / "learner.pt").write_bytes(b""), "learner.pt"),
        (lambda ckpt: (ckpt / "trainer_state.json").write_text('{"step": 4'), "trainer_state.json"),
        (lambda ckpt: (ckpt / "learner.pt").unlink(), "learner.pt"),
    ],
    ids=["truncated", "empty", "broken-state", "missing"],
)
def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_is_resumed(tmp_path, capsys, damage, bad_file):
    cfg, run_dir = _run_with_checkpoints(tmp_path)
    damage(run_dir / "checkpoints" / "step-4")
    resumed_dir, start, ckpt = open_run_dir(cfg, needs=("learner.pt",))
    assert (resumed_dir, start, ckpt) == (run_dir, 2, run_dir / "checkpoints" / "step-2")
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint step-4: {run_dir / 'checkpoints' / 'step-4' / bad_file}" in err
    assert torch.load(ckpt / "learner.pt")["steps_done"] == 2  # the one chosen does load


def test_no_usable_checkpoint_is_an_error_naming_each_file(tmp_path):
    cfg, run_dir = _run_with_checkpoints(tmp_path)
    for step in (2, 4):
        _truncate(run_dir / "checkpoints" / f"step-{step}" / "learner.pt")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as err:
        open_run_dir(cfg)
    assert "step-2/learner.pt is corrupt" in str(err.value) and "step-4/learner.pt is corrupt" in str(err.value)


def test_resume_from_a_chosen_checkpoint_continues_from_its_step_and_drops_what_came_after(tmp_path):
    cfg, run_dir = _run_with_checkpoints(tmp_path, steps=(2, 4, 6))
    chosen = run_dir / "checkpoints" / "step-4"
    resumed_dir, start, ckpt = open_run_dir(cfg.model_copy(update={"resume": str(chosen)}))
    assert (resumed_dir, start, ckpt) == (run_dir, 4, chosen)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-2", "step-4"]
    _truncate(chosen / "learner.pt")  # a chosen checkpoint that is corrupt is an error, not a silent fallback
    with pytest.raises(CheckpointError, match="step-4/learner.pt is corrupt"):
        open_run_dir(cfg.model_copy(update={"resume": str(chosen)}))


def test_a_failure_leaves_a_marker_that_a_resume_removes(tmp_path):
    cfg, run_dir = _run_with_checkpoints(tmp_path)
    with pytest.raises(RuntimeError), failure_marker(run_dir, lambda: 3):
        raise RuntimeError("the learner died")
    assert (run_dir / FAILED).read_text() == "step 3: RuntimeError: the learner died\n"
    open_run_dir(cfg)
    assert not (run_dir / FAILED).exists()

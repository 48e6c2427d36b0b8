"""The `posttrain` command: eval output, and user errors reported before any work, without a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.config import dump_config, load_config
from posttrain.models.tiny import tiny_model_path

HERE = Path(__file__).parent


def _recipe(tmp_path, **extra) -> Path:
    recipe = {
        "name": "cli",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path())},
        "data": {"kind": "arithmetic", "num_problems": 6, "seed": 1, "max_value": 9},
        "eval": {"data": {"kind": "arithmetic", "num_problems": 3, "seed": 2, "max_value": 9}},
        "rewards": [{"fn": "math_accuracy"}, {"fn": "format", "weight": 0.5}],
        "rollout": {"max_new_tokens": 8},
        "train": {"steps": 1, "num_threads": 1},
        "logging": {"progress": False},
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _posttrain(*args, cwd=None):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


@pytest.mark.heavy  # a `posttrain eval` subprocess that generates
def test_eval_prints_a_table_and_writes_json_with_pass_at_k(tmp_path):
    out = tmp_path / "eval.json"
    model = str(tiny_model_path())  # the README's form: overrides after the options
    proc = _posttrain(
        "eval", str(_recipe(tmp_path)), "--model", model, "eval.n=4", "--output", str(out), "eval.temperature=1"
    )
    assert proc.returncode == 0, proc.stderr
    assert "eval/accuracy" in proc.stdout and "eval/pass@4" in proc.stdout and f"wrote {out}" in proc.stdout
    result = json.loads(out.read_text())
    assert result["n"] == 4 and result["num_prompts"] == 3 and len(result["samples"]) == 12
    metrics = result["metrics"]
    assert 0 <= metrics["eval/accuracy"] <= metrics["eval/pass@2"] <= metrics["eval/pass@4"] <= 1
    correct = sum(s["correct"] for s in result["samples"])
    assert metrics["eval/accuracy"] == correct / 12


def test_config_error_exits_2_with_the_key_and_creates_no_run_folder(tmp_path):
    proc = _posttrain("train", str(_recipe(tmp_path)), "train.lrr=0.1")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "unknown key `train.lrr` (did you mean `train.lr`?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.heavy  # a `posttrain train` subprocess
def test_missing_reward_file_is_named_before_any_work(tmp_path):
    proc = _posttrain("train", str(_recipe(tmp_path, rewards=[{"fn": "nowhere.py:score"}])))
    assert proc.returncode == 2 and "rewards[0].fn = 'nowhere.py:score'" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.heavy  # a `posttrain train` subprocess
def test_a_reward_that_raises_stops_the_run_naming_function_and_sample(tmp_path):
    rewards = [{"fn": f"{HERE / 'online' / 'data' / 'broken_reward.py'}:picky"}]
    data = {"kind": "arithmetic", "num_problems": 6, "seed": 1, "max_value": 3, "min_value": 3}
    proc = _posttrain("train", str(_recipe(tmp_path, rewards=rewards, data=data, eval={})))
    assert proc.returncode == 2, proc.stderr
    assert "picky" in proc.stderr and "ZeroDivisionError" in proc.stderr and "sample" in proc.stderr
    assert "Traceback" not in proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()  # the run folder says that it failed, at which step and why
    assert (run_dir / "FAILED").read_text().startswith("step 1: posttrain.rewards.combine.RewardError: ")
    assert "ZeroDivisionError" in (run_dir / "FAILED").read_text()


def test_config_explain_prints_a_key_and_a_section(capsys):
    from posttrain.cli import main

    assert main(["config", "--explain", "algorithm.kl_coef"]) == 0
    out = capsys.readouterr().out
    assert "weight of the KL to the reference" in out and "default: 0.0" in out
    assert "read by: grpo, rloo, reinforce_pp, reinforce_pp_baseline, rft, opd, ppo" in out
    assert main(["config", "--explain", "algorithm.kl_estimator"]) == 0
    assert "allowed: k1, k2, k3" in capsys.readouterr().out
    assert main(["config", "--explain", "ppo"]) == 0
    out = capsys.readouterr().out
    assert "read by: ppo" in out and "lam: GAE lambda" in out and "whiten_advantages:" in out
    assert main(["config", "--explain", "algorithm.name"]) == 0
    assert "rft_offline (traces):" in capsys.readouterr().out
    assert main(["config", "--explain", "ppo.lamda"]) == 2
    assert "unknown key `ppo.lamda`" in capsys.readouterr().err and "lam" in capsys.readouterr().err + "lam"


def test_arguments_that_are_neither_options_nor_overrides_are_refused():
    from posttrain.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["eval", "r.yaml", "--model", "m", "eval.n=8", "--output", "o", "x=1"])
    assert (args.overrides, args.model, args.output) == (["eval.n=8", "x=1"], "m", "o")
    proc = _posttrain("eval", "r.yaml", "--model", "m", "stray")
    assert proc.returncode == 2 and "unrecognized arguments: stray" in proc.stderr


def test_a_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path):
    run_dir = tmp_path / "runs" / "cli-1"
    ckpt = run_dir / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    (ckpt / "learner.pt").write_bytes(b"")
    (ckpt / "trainer_state.json").write_text('{"step": 2}')
    recipe = _recipe(tmp_path)
    (run_dir / "config.yaml").write_text(dump_config(load_config(recipe)))
    proc = _posttrain("train", str(recipe), f"resume={ckpt}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {ckpt / 'learner.pt'} is corrupt (0 bytes, not a complete torch archive" in proc.stderr

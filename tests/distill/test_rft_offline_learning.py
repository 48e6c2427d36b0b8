"""Offline rejection-sampling fine-tuning raises held-out accuracy (slow: SmolLM2-135M, ~2 min on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.distill.pipeline import run_distill

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "rft_offline.yaml"


@pytest.mark.slow
def test_sft_on_its_own_verified_answers_raises_held_out_accuracy(tmp_path, ray_session):
    overrides = [f"output_dir={tmp_path}", "traces.samples_per_prompt=4", "eval.data.num_problems=32"]
    run_dir = run_distill(load_config(RECIPE, [*overrides, "logging.progress=false"]))
    report = json.loads((run_dir / "report.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "traces.jsonl").read_text().splitlines()]
    assert rows and all(row["reward"] >= 1.0 for row in rows)
    per_problem = [sum(row["problem"] == p for row in rows) for p in {row["problem"] for row in rows}]
    assert max(per_problem) <= 2  # traces.max_per_problem
    before, after = report["eval_before"]["eval/accuracy"], report["eval_after"]["eval/accuracy"]
    assert after >= before + 0.2, (before, after)

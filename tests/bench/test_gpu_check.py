"""bench/gpu_check.py on CPU: the asset export and the random-weight model built from it, the pytest summary, a
failing check that does not stop the others, and the dry run's checks end to end (tiny random model)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig

from posttrain.bench import gpu_check
from posttrain.models.loading import load_model
from posttrain.models.tiny import tiny_model_path

LINE = re.compile(r"^CHECK (\w+): (PASS|FAIL|SKIP) (.*) \[\d+\.\d s\]$")


def test_export_keeps_config_and_tokenizer_and_materialize_builds_seeded_random_weights(tmp_path):
    source = tiny_model_path()
    assets = gpu_check.export_assets(source, tmp_path / "assets")
    names = {p.name for p in assets.iterdir()}
    assert "config.json" in names and "tokenizer.json" in names and not gpu_check.has_weights(assets)
    first, what = gpu_check.materialize(assets, tmp_path / "a", seed=3)
    again, _ = gpu_check.materialize(assets, tmp_path / "b", seed=3)
    other, _ = gpu_check.materialize(assets, tmp_path / "c", seed=4)
    assert what == "random weights (seed 3)"
    mine, theirs = (
        {k: v for k, v in AutoConfig.from_pretrained(p).to_dict().items() if k != "_name_or_path"}
        for p in (first, source)
    )
    assert mine == theirs
    a, b, c = (load_model(str(p)).state_dict() for p in (first, again, other))
    real = load_model(str(source)).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)  # seeded: the same weights each time
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], real["model.layers.0.mlp.up_proj.weight"])
    assert gpu_check.materialize(source, tmp_path / "d") == (source, "real weights")  # weights present: used as is


def test_materialize_without_config_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--model-dir .*: no config.json \(export it: see docs/gpu-check.md"):
        gpu_check.materialize(tmp_path, tmp_path / "out")


def test_pytest_summary_counts_and_skip_reasons():
    out = (
        "SKIPPED [2] tests/learner/test_fsdp.py:263: NCCL FSDP needs 2 CUDA GPUs\n"
        "SKIPPED [1] tests/rollout/test_engine_sleep.py:120: needs vllm (pip install vllm)\n"
        "FAILED tests/x.py::test_y - AssertionError\n"
        "1 failed, 3 passed, 3 skipped, 1 error, 40 deselected in 12.3s\n"
    )
    counts, reasons = gpu_check.summarise_pytest(out)
    assert counts == {"passed": 3, "skipped": 3, "failed": 2}
    assert reasons == ["NCCL FSDP needs 2 CUDA GPUs", "needs vllm (pip install vllm)"]


def test_a_failing_check_prints_fail_and_the_next_check_still_runs(capsys, tmp_path):
    ctx = gpu_check.Context("cpu", True, str(tiny_model_path()), tmp_path, deadline=0.0)
    results: dict[str, str] = {}
    gpu_check.run_check("broken", lambda _: 1 / 0, ctx, results)
    gpu_check.run_check("fine", lambda _: "42 things", ctx, results)
    gpu_check.run_check("cuda_only", lambda c: c.need_cuda(), ctx, results)
    lines = [LINE.match(line).groups() for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        ("broken", "FAIL", "ZeroDivisionError: division by zero"),
        ("fine", "PASS", "42 things"),
        ("cuda_only", "SKIP", "no CUDA (dry run)"),
    ]
    assert results == {"broken": "FAIL", "fine": "PASS", "cuda_only": "SKIP"}


def test_dry_run_checks_pass_or_skip_with_a_reason(capsys):
    # every check but the nested `pytest -m gpu` run (its parsing is tested above): ~30 s on 2 busy cores
    names = [name for name, _ in gpu_check.checks() if name != "pytest_gpu"]
    assert gpu_check.main(["--dry-run", "--only", *names]) == 0
    out = capsys.readouterr().out
    lines = {m.group(1): m.groups()[1:] for m in map(LINE.match, out.splitlines()) if m}
    assert set(lines) == set(names)
    assert out.startswith("MODEL: tiny random Llama") and "SUMMARY: 6 PASS, 0 FAIL, 3 SKIP" in out
    for name in ("learner_step_bf16", "learner_step_fp32", "learner_step_fp32_tf32"):
        status, detail = lines[name]
        assert status == "PASS" and "of weights changed" in detail and "loss nan" not in detail
    assert lines["hf_engine_generate"][0] == "PASS"
    # the episodes' model tokens scored teacher-forced match the sampler: ids exact, the env's tokens masked
    assert lines["episodes_hf"][0] == "PASS" and re.search(r"\d+ model \+ [1-9]\d* template/env tokens", out)
    # the engine process held other weights before the handoff and the learner's, bitwise, after it
    assert lines["ipc_weight_handoff"][0] == "PASS" and re.search(r"(\d+)/\1 before, 0 after", out)
    for name in ("vllm_greedy_equals_hf", "grpo_colocated_sleep2", "peak_gpu_memory"):
        assert lines[name] == ("SKIP", "no CUDA (dry run)") or lines[name][1].startswith("no CUDA (dry run); ")

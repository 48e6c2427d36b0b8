"""The repository root is the package `posttrain`: the wheel holds only `posttrain/` (+ metadata)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.heavy  # builds a wheel with pip
def test_wheel_has_only_the_posttrain_package(tmp_path):
    # --no-build-isolation: setuptools is already in the venv, and CI machines need not download it again
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("posttrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"posttrain", next(t for t in top if t.endswith(".dist-info"))}
    for module in (
        "learner/learner.py",
        "rewards/combine.py",
        "rollout/hf_engine.py",
        "models/lora.py",
        "verifiers/math.py",
        "recipes/quickstart.yaml",
        "cli.py",
        "config.py",
    ):
        assert f"posttrain/{module}" in names, module
    assert not any(n.startswith("posttrain/tests/") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "posttrain = posttrain.cli:main" in entry_points

    # installed from the wheel (not the editable checkout), every subpackage imports
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import posttrain, posttrain.cli, posttrain.learner.learner, posttrain.online.trainer, "
        "posttrain.rewards.combine, "
        "posttrain.rollout.worker, posttrain.models.lora, posttrain.verifiers.math, posttrain.data.sources; "
        "print(posttrain.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == str(target / "posttrain" / "__init__.py")


def test_console_script_runs():
    exe = Path(sys.executable).parent / "posttrain"
    out = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "key=value overrides" in out

"""A run folder: `runs/<name>-<timestamp>/` with config, metrics, samples, TensorBoard events, checkpoints.

Checkpoints are written into a hidden temporary folder and renamed into place as the last act, so a run
killed at any moment leaves only complete `checkpoints/step-N/` folders. On resume, metric and sample rows of
steps after the checkpoint (work that was lost) are dropped, so every step appears exactly once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.tensorboard import SummaryWriter

if TYPE_CHECKING:
    from posttrain.config import RecipeConfig

TRAINER_STATE = "trainer_state.json"


def new_run_dir(output_dir: str, name: str) -> Path:
    """Create `<output_dir>/<name>-<YYYYmmdd-HHMMSS>` (with a numeric suffix if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(output_dir) / f"{name}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    path.mkdir(parents=True)
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null means "not measured this step"
    return value


class RunLogger:
    """Appends one JSON object per step to metrics.jsonl (and TensorBoard), and samples to samples.jsonl."""

    def __init__(self, run_dir: Path, resume_after_step: int | None = None):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        if resume_after_step is not None:
            for path in (self.metrics_path, self.samples_path):
                _truncate_after(path, resume_after_step)
        purge = None if resume_after_step is None else resume_after_step + 1
        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for key, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        with open(self.samples_path, "a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")

    def close(self) -> None:
        self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill mid-write; resume drops it
            continue
    return rows


def _truncate_after(path: Path, step: int) -> None:
    """Keep only rows with `step <= step` (a torn last line from a kill is dropped too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- checkpoints


def checkpoint_staging(run_dir: Path, step: int) -> Path:
    """An empty temporary folder to write checkpoint `step` into before `commit_checkpoint`."""
    staging = run_dir / "checkpoints" / f".step-{step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def commit_checkpoint(run_dir: Path, staging: Path, step: int, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write the trainer state, rename the staging folder to `step-N` atomically, prune old checkpoints."""
    (staging / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    final = run_dir / "checkpoints" / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    done = [p for p in root.glob("step-*") if (p / TRAINER_STATE).exists() and p.name[5:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint and its trainer state, or None."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    return ckpts[-1], json.loads((ckpts[-1] / TRAINER_STATE).read_text())


def open_run_dir(cfg: RecipeConfig, checkpoints: bool = True) -> tuple[Path, int, Path | None]:
    """(run folder, steps already done, checkpoint to load): a new folder with `config.yaml`, or `cfg.resume`'s
    after checking that the recipe differs only in resumable keys. `checkpoints=False` (a run that resumes from
    its own files, not from checkpoints): (folder, 0, None)."""
    from posttrain.config import check_resumable, dump_config

    if not cfg.resume:
        run_dir = new_run_dir(cfg.output_dir, cfg.name)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        return run_dir, 0, None
    run_dir = Path(cfg.resume)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"resume: {run_dir} is not a run folder (no config.yaml)")
    check_resumable((run_dir / "config.yaml").read_text(), cfg, str(run_dir))
    (run_dir / "config.yaml").write_text(dump_config(cfg))  # e.g. a raised train.steps
    if not checkpoints:
        print(f"resuming {run_dir}", file=sys.stderr)
        return run_dir, 0, None
    found = latest_checkpoint(run_dir)
    if found is None:
        print(f"resume: {run_dir} has no complete checkpoint; starting it from step 0", file=sys.stderr)
        return run_dir, 0, None
    ckpt, state = found
    print(f"resuming {run_dir} from {ckpt.name} (step {state['step']})", file=sys.stderr)
    return run_dir, int(state["step"]), ckpt

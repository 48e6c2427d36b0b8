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
import traceback
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.tensorboard import SummaryWriter

if TYPE_CHECKING:
    from posttrain.config import RecipeConfig

TRAINER_STATE = "trainer_state.json"
FAILED = "FAILED"
"""written into the run folder when training stops on an exception: what failed, at which step"""


class CheckpointError(ValueError):
    """A checkpoint cannot be used (a file truncated, empty or unreadable); the message names the file."""


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


def read_checkpoint_state(ckpt: Path, needs: tuple[str, ...] = ()) -> dict[str, Any]:
    """The trainer state of `ckpt` after checking, cheaply and on this process, that it can be loaded: the state
    parses and has its step, and every `*.pt` file (and each of `needs`) is a complete torch zip archive (a truncated
    or empty file has no zip directory at its end). Raises `CheckpointError` naming the file."""
    state_path = ckpt / TRAINER_STATE
    try:
        state = json.loads(state_path.read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{state_path} is corrupt ({type(err).__name__}: {err})") from None
    for path in sorted({*ckpt.glob("*.pt"), *(ckpt / name for name in needs)}):
        _check_torch_archive(path)
    return state


def _check_torch_archive(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is corrupt ({size} bytes, not a complete torch archive: {err})") from None
    if not infos:
        raise CheckpointError(f"{path} is corrupt (an empty archive)")


def usable_checkpoint(run_dir: Path, needs: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that passes `read_checkpoint_state`, warning about each newer one it skips; None when
    there is no checkpoint. Raises `CheckpointError` when there are checkpoints but none is usable."""
    problems = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            state = read_checkpoint_state(ckpt, needs)
        except CheckpointError as err:
            print(f"warning: skipping checkpoint {ckpt.name}: {err}", file=sys.stderr)
            problems.append(str(err))
            continue
        return ckpt, state
    if problems:
        raise CheckpointError(f"resume: no usable checkpoint in {run_dir}: {'; '.join(problems)}")
    return None


def _split_resume(resume: str) -> tuple[Path, Path | None]:
    """`resume=<run>` or `resume=<run>/checkpoints/step-N`: (run folder, the chosen checkpoint or None)."""
    path = Path(resume)
    if path.parent.name == "checkpoints" and path.name.startswith("step-") and path.name[5:].isdigit():
        if not path.is_dir():
            raise FileNotFoundError(f"resume: checkpoint {path} does not exist")
        return path.parent.parent, path
    return path, None


def open_run_dir(
    cfg: RecipeConfig, checkpoints: bool = True, needs: tuple[str, ...] = ()
) -> tuple[Path, int, Path | None]:
    """(run folder, steps already done, checkpoint to load): a new folder with `config.yaml`, or `cfg.resume`'s
    after checking that the recipe differs only in resumable keys. `resume=<run>` takes the newest checkpoint that
    loads (`usable_checkpoint`; `needs`: files it must hold), `resume=<run>/checkpoints/step-N` that one (newer
    checkpoints are deleted: the run continues from step N). `checkpoints=False` (a run that resumes from its own
    files, not from checkpoints): (folder, 0, None)."""
    from posttrain.config import check_resumable, dump_config

    if not cfg.resume:
        run_dir = new_run_dir(cfg.output_dir, cfg.name)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        return run_dir, 0, None
    run_dir, chosen = _split_resume(cfg.resume)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"resume: {run_dir} is not a run folder (no config.yaml)")
    check_resumable((run_dir / "config.yaml").read_text(), cfg, str(run_dir))
    if chosen is not None:
        found = chosen, read_checkpoint_state(chosen, needs)
    else:
        found = usable_checkpoint(run_dir, needs) if checkpoints else None
    (run_dir / "config.yaml").write_text(dump_config(cfg))  # e.g. a raised train.steps
    (run_dir / FAILED).unlink(missing_ok=True)  # the earlier failure is being dealt with
    if not checkpoints:
        print(f"resuming {run_dir}", file=sys.stderr)
        return run_dir, 0, None
    if found is None:
        print(f"resume: {run_dir} has no complete checkpoint; starting it from step 0", file=sys.stderr)
        return run_dir, 0, None
    ckpt, state = found
    for later in list_checkpoints(run_dir) if chosen else []:  # what came after step N is discarded, like its metrics
        if int(later.name[5:]) > int(state["step"]):
            print(f"resume: deleting {later} (after the chosen {ckpt.name})", file=sys.stderr)
            shutil.rmtree(later)
    print(f"resuming {run_dir} from {ckpt.name} (step {state['step']})", file=sys.stderr)
    return run_dir, int(state["step"]), ckpt


@contextmanager
def failure_marker(run_dir: Path, step: Any):
    """Around a run's training: an exception escaping it leaves `<run>/FAILED` saying what failed at which step
    (`step()` gives the step in progress), so a run folder shows that it did not finish, and why."""
    try:
        yield
    except BaseException as err:
        lines = traceback.format_exception_only(type(err), err)
        (run_dir / FAILED).write_text(f"step {step()}: {''.join(lines).strip()}\n")
        raise

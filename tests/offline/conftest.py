"""Shared helpers for the offline tests: a tiny model and recipes written for it."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PREFERENCE_ROWS = [
    {"prompt": "Which is larger, 8 or 7?", "chosen": "8", "rejected": "7", "margin": 0.5},
    {"prompt": "Which is larger, 2 or 9?", "chosen": "9 is", "rejected": "2", "margin": 1.0},
    {"prompt": "Pick the larger: 4 or 1", "chosen": "4", "rejected": "one", "margin": 0.0},
    {"prompt": "Larger of 3, 6?", "chosen": "six", "rejected": "3 it is", "margin": 2.0},
]
SFT_ROWS = [
    {"prompt": "What is 3 + 4?", "completion": "7"},
    {"prompt": "What is 1 + 1?", "completion": "1 + 1 = 2"},
    {"prompt": "Add 5 and 2.", "completion": "seven"},
    {"prompt": "9 + 0?", "completion": "9"},
]


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from posttrain.models.tiny import tiny_model_path

    return tiny_model_path()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def offline_config(tmp_path: Path, model_path: Path, name: str, rows: list[dict], **sections):
    """A validated recipe for `name` on `rows` (written to a JSONL file in tmp_path); sections merge over defaults."""
    from posttrain.config import validate_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    raw = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(model_path)},
        "data": {"kind": "file", "path": str(data)},
        "algorithm": {"name": name},
        "train": {"steps": 1, "batch_size": len(rows), "micro_batch_size": len(rows), "num_threads": 1, "lr": 1e-3},
        "logging": {"progress": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(raw)

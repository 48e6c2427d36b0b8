"""End-of-run outputs: the curves PNG and the summary table printed to the terminal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

CURVES = [
    ("reward/mean", "reward"),
    ("kl", "KL to reference"),
    ("entropy", "entropy"),
    ("response_length/mean", "response length (tokens)"),
]
OPD_CURVES = [("opd/reverse_kl", "sampled reverse KL to the teacher"), *CURVES[1:]]
"""on-policy distillation: the distance to the teacher in the reward's place (rewards there may be only logged)"""


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(rows: list[dict[str, Any]], out_png: Path, curves: list[tuple[str, str]] = CURVES) -> Path:
    """A 2x2 PNG of four `(metric, title)` curves against step: by default reward (with eval accuracy), KL, entropy
    and response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, curves, strict=True):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, marker=".", label=key)
        if key == "reward/mean":
            ex, ey = _series(rows, "eval/accuracy")
            if ex:
                ax.plot(ex, ey, marker="o", linestyle="--", label="eval/accuracy")
            ax.legend(loc="best", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


SUMMARY_KEYS = (
    "reward/mean",
    "opd/reverse_kl",
    "jsd",
    "kl",
    "entropy",
    "response_length/mean",
    "zero_variance_groups",
    "grad_norm",
)


def summary_table(rows: list[dict[str, Any]], keys: tuple[str, ...] | list[str] = SUMMARY_KEYS) -> str:
    """A plain-text table: first and last value of the main metrics (`keys`), eval accuracy before/after, time spent."""
    train_rows = [r for r in rows if "loss" in r]
    if not train_rows:
        return "(no training steps)"
    lines = [f"{'metric':<28}{'first':>12}{'last':>12}"]
    for key in keys:
        _, ys = _series(train_rows, key)
        if ys:
            lines.append(f"{key:<28}{ys[0]:>12.4f}{ys[-1]:>12.4f}")
    for key in ("eval/accuracy", "eval/reverse_kl"):
        _, ys = _series(rows, key)
        if ys:
            lines.append(f"{key:<28}{ys[0]:>12.4f}{ys[-1]:>12.4f}")
    for key in ("time/generate", "time/reward", "time/teacher", "time/train", "time/sync", "time/eval"):
        _, ys = _series(rows, key)
        if ys:
            lines.append(f"{key + ' (total s)':<28}{'':>12}{sum(ys):>12.1f}")
    return "\n".join(lines)

"""Peak memory and step time of offline training setups on SmolLM2-135M-Instruct, side by side in one run.

Pairs compared (each setup runs in its own child process, so the peak resident memory is its own):
- ORPO vs DPO with a reference model vs DPO with precomputed reference log-probs (full weights);
- full weights vs LoRA vs QLoRA (ORPO, so no reference model muddles the comparison).
Each child builds the `OfflineTrainer` of its recipe on `recipes/data/preferences.jsonl`, runs `--steps` optimizer
steps of `--batch-size` pairs and reports its median step time (the first step, warm-up, excluded), its peak resident
memory while training (VmHWM, reset after setup so that loading's transient copies do not count) minus the memory
before the model was loaded (python + torch + transformers): weights, reference, gradients, optimizer state and
activations.
CPU only (the trainer's device); on 2 shared cores, timings are noisy: compare ratios from one run.

    python bench/offline_memory_bench.py [--steps 3] [--batch-size 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETUPS = {
    "dpo_reference_model": {"algorithm": "dpo"},
    "dpo_precomputed": {"algorithm": "dpo", "preference": {"precompute_reference": True}},
    "orpo_full": {"algorithm": "orpo"},
    "orpo_lora": {"algorithm": "orpo", "lora": True},
    "orpo_qlora": {"algorithm": "orpo", "lora": True, "quantize": "nf4"},
}
RATIOS = [
    ("orpo_full", "dpo_reference_model"),
    ("dpo_precomputed", "dpo_reference_model"),
    ("orpo_full", "dpo_precomputed"),
    ("orpo_lora", "orpo_full"),
    ("orpo_qlora", "orpo_full"),
    ("orpo_qlora", "orpo_lora"),
]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_child(name: str, steps: int, batch_size: int, threads: int) -> dict:
    """Build and train one setup in this process; returns its measurements."""
    import torch

    from posttrain.config import validate_config
    from posttrain.data.sources import batch_indices
    from posttrain.offline.trainer import OfflineTrainer

    baseline_mb = _status_mb("VmRSS")
    setup = SETUPS[name]
    raw = {
        "name": name,
        "output_dir": tempfile.mkdtemp(prefix="offline-bench-"),
        "model": {"path": "smollm2-135m-instruct"},
        "data": {"kind": "file", "path": str(ROOT / "recipes/data/preferences.jsonl")},
        "algorithm": {"name": setup["algorithm"]},
        "train": {"steps": steps, "batch_size": batch_size, "micro_batch_size": batch_size, "num_threads": threads},
        "logging": {"progress": False},
    }
    if setup.get("lora"):
        raw["model"]["lora"] = {"rank": 16, "alpha": 32}
    if setup.get("quantize"):
        raw["model"]["quantize"] = setup["quantize"]
    if "preference" in setup:
        raw["preference"] = setup["preference"]
    start = time.perf_counter()
    trainer = OfflineTrainer(validate_config(raw))
    setup_s = time.perf_counter() - start
    setup_mb = _status_mb("VmRSS") - baseline_mb
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: loading's transient copies do not count
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(batch_indices(len(trainer.rows), batch_size, step, 0))
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "setup": name,
        "baseline_mb": baseline_mb,
        "after_setup_mb": setup_mb,
        "train_peak_mb": _status_mb("VmHWM") - baseline_mb,
        "step_s_median": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "setup_s": setup_s,
        "trainable_params": trainable,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per setup (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per step (one micro-batch)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per child")
    parser.add_argument("--only", nargs="*", choices=list(SETUPS), help="run only these setups")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args.steps, args.batch_size, args.threads)))
        return
    results = {}
    for name in args.only or SETUPS:
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps)]
        cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT ") :])
        r = results[name]
        print(
            f"{name:<22} training peak {r['train_peak_mb']:6.0f} MB (after setup {r['after_setup_mb']:6.0f} MB)  "
            f"step {r['step_s_median']:6.2f} s  trainable {r['trainable_params'] / 1e6:7.2f} M",
            flush=True,
        )
    print()
    for a, b in RATIOS:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            mem = ra["train_peak_mb"] / rb["train_peak_mb"]
            speed = rb["step_s_median"] / ra["step_s_median"]
            print(f"{a} vs {b}: peak memory x{mem:.2f}, speed x{speed:.2f} (> 1: {a} is faster)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

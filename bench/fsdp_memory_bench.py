"""Per-learner training-state bytes with `placement.sharding: none` vs `fsdp`: 2 data-parallel learners (gloo, CPU)
on SmolLM2-135M-Instruct (full weights, fp32, AdamW), after one step, and the step's seconds, in one run.

    .venv/bin/python bench/fsdp_memory_bench.py [--model smollm2-135m-instruct] [--rows 8] [--steps 3]

For each sharding, a `LearnerGroup` of 2 learners takes `--steps` train steps on the same batch (the first a warm-up)
and each rank reports the bytes of the tensors it holds (`memory_bytes`: parameters, gradients, AdamW state; a
sharded tensor counts its local shard only). The groups run one after the other. Tensor bytes, not process RSS:
the transient full copy of one FSDP unit during its forward/backward (a decoder layer; the root's embeddings and
LM head) and the allocator's caches are not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import ray
from dp_learners_bench import make_batch  # bench/ is on sys.path when this script runs

from posttrain.learner.actors import LearnerGroup
from posttrain.learner.learner import LearnerSettings
from posttrain.models.loading import resolve_model_path

KEYS = ("params", "grads", "optimizer")


def measure(settings: LearnerSettings, sharding: str, batch, steps: int) -> tuple[list[dict], list[float]]:
    group = LearnerGroup(settings, world_size=2, timeout_s=600, sharding=sharding).start()
    try:
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            ray.get(group.train_step.remote(batch))
            seconds.append(time.perf_counter() - start)
        ranks = ray.get([actor.memory_bytes.remote() for actor in group.actors])
    finally:
        group.shutdown()
    return ranks, seconds[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    threads = max(1, (os.cpu_count() or 2) // 2)
    settings = LearnerSettings(
        model_path=str(resolve_model_path(args.model)), lr=1e-6, micro_batch_size=4, device="cpu", num_threads=threads
    )
    batch = make_batch(args.rows, prompt_len=16, completion_len=32)
    results = {sharding: measure(settings, sharding, batch, args.steps) for sharding in ("none", "fsdp")}
    ray.shutdown()

    print(
        f"{args.model}: 2 learners (gloo, {threads} thread(s) each), batch {args.rows} rows, fp32 full weights, AdamW"
    )
    totals = {}
    for sharding, (ranks, seconds) in results.items():
        totals[sharding] = statistics.mean(sum(rank[k] for k in KEYS) for rank in ranks)
        parts = ", ".join(f"{k} {statistics.mean(rank[k] for rank in ranks) / 2**20:.0f}" for k in KEYS)
        step = f"{statistics.median(seconds):.2f} s/step (median of {len(seconds)})" if seconds else ""
        print(f"sharding {sharding:4s}: per learner {totals[sharding] / 2**20:7.0f} MiB ({parts} MiB); {step}")
    print(f"fsdp / none per learner: {totals['fsdp'] / totals['none']:.3f}")


if __name__ == "__main__":
    main()

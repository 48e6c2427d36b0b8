"""Seconds per learner -> rollout-worker weight sync of SmolLM2-135M-Instruct over the Ray object store, against the
practical floor: copying its state dict once in memory.

In one run, with one learner actor and `--workers` rollout worker actors (hf engine) holding the model:
- floor: `{name: tensor.clone()}` of the model's full state dict in this process (median of `--repeats`);
- bucketed sync (`rollout/weight_sync.py`) at each of `--bucket-mb` sizes: the learner packs and `ray.put`s bucket
  by bucket, each worker fetches and loads bucket by bucket (median of `--repeats`, after one warm-up sync);
- the previous path for reference: the learner returns its whole state dict as one object (`get_weights`), every
  worker fetches it and loads it (`RolloutPool.load_weights`).
Full weights (fp32, 538 MB): what a full fine-tune syncs every step. CPU only; on 2 shared cores, compare ratios
from one run.

    python bench/weight_sync_bench.py [--repeats 3] [--workers 1] [--bucket-mb 32 256 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import ray
import torch

from posttrain.learner.actors import Learner
from posttrain.learner.learner import LearnerSettings
from posttrain.models.loading import load_model, resolve_model_path
from posttrain.rollout.pool import RolloutPool
from posttrain.rollout.weight_sync import WeightSync
from posttrain.rollout.worker import RolloutWorker


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[32.0, 256.0, 1024.0])
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    path = resolve_model_path("smollm2-135m-instruct")
    model = load_model(path)
    state = model.state_dict()
    megabytes = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    floor = median_seconds(lambda: {name: tensor.clone() for name, tensor in state.items()}, args.repeats)
    model = state = None  # free them before the actors load their copies

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    threads = max(1, (os.cpu_count() or 1) // 2)
    learner = Learner.options(num_cpus=0).remote(LearnerSettings(model_path=path, num_threads=threads))
    workers = [
        RolloutWorker.options(num_cpus=0).remote(engine="hf", model_path=path, num_threads=threads)
        for _ in range(args.workers)
    ]
    ray.get([learner.ready.remote()] + [w.ready.remote() for w in workers])

    results = {"model_megabytes": megabytes, "workers": args.workers, "floor_copy_s": floor, "bucketed": {}}
    for bucket_mb in args.bucket_mb:
        sync = WeightSync(learner, workers, "object_store", bucket_mb, timeout_s=600)
        buckets = sync()["sync/buckets"]  # warm-up
        seconds = median_seconds(sync, args.repeats)
        results["bucketed"][str(bucket_mb)] = {"buckets": buckets, "seconds": seconds, "x_floor": seconds / floor}
    pool = RolloutPool(workers)
    whole = median_seconds(lambda: pool.load_weights(learner.get_weights.remote(False)), args.repeats)
    results["one_object_s"] = whole
    results["one_object_x_floor"] = whole / floor
    ray.shutdown()

    print(f"SmolLM2-135M-Instruct, {megabytes:.0f} MB fp32, {args.workers} worker(s), median of {args.repeats}")
    print(f"{'path':<34}{'buckets':>8}{'seconds':>10}{'x floor':>9}")
    print(f"{'copy the state dict once (floor)':<34}{'-':>8}{floor:>10.3f}{1.0:>9.1f}")
    for bucket_mb, row in results["bucketed"].items():
        label = f"object store, {float(bucket_mb):g} MB buckets"
        print(f"{label:<34}{row['buckets']:>8.0f}{row['seconds']:>10.3f}{row['x_floor']:>9.1f}")
    print(f"{'object store, one object (before)':<34}{1:>8}{whole:>10.3f}{whole / floor:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    main()

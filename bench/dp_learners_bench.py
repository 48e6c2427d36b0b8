"""Seconds per learner step: 1 learner actor on the whole batch vs 2 data-parallel learners (gloo) on halves, in the
same run, on a tiny random model on CPU.

    .venv/bin/python bench/dp_learners_bench.py [--rows 32] [--repeat 5] [--hidden 256] [--layers 4]

Three configurations, all alive at once and timed in turns (A, B, C, A, B, C, ...) so that a shared machine's
load drifts over all of them alike: 1 learner with `--threads` torch threads, 1 learner with 1 thread, and 2
learners with `--threads // 2` threads each (the same cores in all as the first). The step is `train_step` as the
driver calls it (shard, send, lp/update, all-reduce, metrics); the first step of each is a warm-up, not counted.
On a 2-core machine expect no speedup: data parallelism pays off with one device per learner.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import ray
import torch

from posttrain.data.types import Sample
from posttrain.learner.actors import Learner, LearnerGroup
from posttrain.learner.batch import collate
from posttrain.learner.learner import LearnerSettings
from posttrain.models.tiny import tiny_model_path


def make_batch(rows: int, prompt_len: int = 32, completion_len: int = 64):
    gen = torch.Generator().manual_seed(0)
    samples = [
        Sample(
            "p",
            torch.randint(3, 90, (prompt_len,), generator=gen).tolist(),
            "c",
            torch.randint(3, 90, (completion_len,), generator=gen).tolist(),
            [0.0] * completion_len,
            "stop",
            i // 4,
        )
        for i in range(rows)
    ]
    advantages = torch.randn(rows, generator=gen).tolist()
    return collate(samples, advantages, pad_token_id=0, max_completion_tokens=completion_len)


def time_in_turns(learners: dict, batch, repeat: int) -> dict[str, list[float]]:
    for learner in learners.values():
        ray.get(learner.train_step.remote(batch))  # warm-up
    times: dict[str, list[float]] = {name: [] for name in learners}
    for _ in range(repeat):
        for name, learner in learners.items():
            start = time.perf_counter()
            ray.get(learner.train_step.remote(batch))
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    path = str(tiny_model_path(hidden_size=args.hidden, num_layers=args.layers, num_heads=4))
    batch = make_batch(args.rows)
    base = dict(model_path=path, lr=1e-4, micro_batch_size=8, device="cpu")

    singles = {}
    for name, threads in ((f"1 learner x {args.threads} threads", args.threads), ("1 learner x 1 thread", 1)):
        singles[name] = Learner.options(num_cpus=0).remote(LearnerSettings(**base, num_threads=threads))
    ray.get([learner.ready.remote() for learner in singles.values()])
    half = max(1, args.threads // 2)
    group = LearnerGroup(LearnerSettings(**base, num_threads=half), world_size=2).start()
    times = time_in_turns({**singles, f"2 learners x {half} thread(s)": group}, batch, args.repeat)
    group.shutdown()
    ray.shutdown()

    tokens = int(batch.loss_mask_BC.sum())
    print(f"tiny Llama hidden {args.hidden} x {args.layers} layers; batch {args.rows} rows, {tokens} loss tokens;")
    print(f"{os.cpu_count()} cores; {args.threads} torch threads in all; median of {args.repeat} steps after a warm-up")
    medians = {name: statistics.median(t) for name, t in times.items()}
    first = next(iter(medians.values()))
    for name, t in times.items():
        shown = ", ".join(f"{x:.3f}" for x in t)
        print(f"{name:24s}: {medians[name]:.3f} s/step  ({medians[name] / first:.2f}x the first; all: {shown})")


if __name__ == "__main__":
    main()

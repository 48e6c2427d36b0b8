"""Wall time of a GRPO step split into generate / reward / train / sync, sync mode vs async mode, in one run.

Runs `recipes/quickstart.yaml` (SmolLM2-135M-Instruct + LoRA, 8 prompts x 8 samples, <= 16 new tokens) for
`--steps` steps twice, each in its own `posttrain train` process: `rollout.async_mode=false`, then `true` (with
`algorithm.tis_cap=2`), no evaluation, one checkpoint at the end. Reports the median per step of each part from the
runs' metrics.jsonl, over steps 2..N (step 1 of an async run has nothing to overlap with). In async mode, generating
and scoring step t+1 run while step t trains: `time/overlap` is the part of that generation hidden behind training,
`time/wait_rollout` what the trainer still waited for after training.
On a CPU box the learner and the rollout worker share the same cores, so overlapping them mostly trades speed of
each for concurrency; on GPUs (separate devices) the hidden time is the gain.

`--env` runs multi-turn episodes instead (docs/environments.md): the same recipe with `env.path` set to the guess-the-
number game of the tests (numbers 0 to 8, additions of 0..4 as targets, no `rewards`), `--max-turns` model turns of
<= 16 tokens each; in async mode step t+1's episodes, all their turns, run while step t trains.

    python bench/async_step_bench.py [--steps 4] [--prompts 8] [--samples 8] [--env] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUESS = ROOT / "tests" / "envs" / "data" / "guess_number.py"
PARTS = ["time/generate", "time/reward", "time/train", "time/sync", "time/overlap", "time/wait_rollout", "time/step"]


def run(mode: str, args: argparse.Namespace, out: Path) -> list[dict]:
    steps = args.steps
    overrides = [
        f"algorithm.prompts_per_step={args.prompts}",
        f"algorithm.samples_per_prompt={args.samples}",
        f"name={mode}",
        f"output_dir={out}",
        f"train.steps={steps}",
        f"checkpoint.every_steps={steps}",
        "eval.data=null",
        "logging.progress=false",
        f"rollout.async_mode={'true' if mode == 'async' else 'false'}",
    ]
    if mode == "async":
        overrides.append("algorithm.tis_cap=2.0")
    if args.env:  # the partial reward per turn gives the groups reward variance, so every step updates the weights
        overrides += [
            f"env.path={GUESS}:ShapedGuessNumber",
            "env.args={high: 8}",
            f"env.max_turns={args.max_turns}",
            "rewards=[]",
            "data.max_value=4",
            "data.few_shot=[]",
            "data.exclude_num_problems=0",  # the eval set the recipe keeps out would be every sum of 0..4
        ]
    cli = [sys.executable, "-m", "posttrain.cli", "train", str(ROOT / "recipes" / "quickstart.yaml"), *overrides]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run(cli, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    (run_dir,) = sorted(out.glob(f"{mode}-*"))
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def medians(rows: list[dict]) -> dict[str, float]:
    later = [row for row in rows if row["step"] >= 2]
    # time/overlap and time/wait_rollout exist on async steps that started a next generation (not the last one)
    values = {part: [row[part] for row in later if part in row] for part in PARTS}
    return {part: statistics.median(v) for part, v in values.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="algorithm.prompts_per_step (the recipe's: 8)")
    parser.add_argument("--samples", type=int, default=8, help="algorithm.samples_per_prompt (the recipe's: 8)")
    parser.add_argument("--env", action="store_true", help="guess-the-number episodes instead of completions")
    parser.add_argument("--max-turns", type=int, default=3, help="env.max_turns with --env")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sync", "async"):
            rows = run(mode, args, Path(tmp))
            results[mode] = {"median": medians(rows), "staleness": [row.get("async/staleness") for row in rows]}
    shape = f"{args.prompts} prompts x {args.samples} {'episodes' if args.env else 'samples'}"
    task = f"guess-the-number episodes (<= {args.max_turns} turns)" if args.env else "quickstart recipe"
    print(f"{task}, {shape}, {args.steps} steps per mode; median s/step over steps 2..{args.steps}")
    print(f"{'part':<20}{'sync':>10}{'async':>10}")
    for part in PARTS:
        values = [results[mode]["median"].get(part) for mode in ("sync", "async")]
        print(f"{part:<20}" + "".join(f"{v:>10.2f}" if v is not None else f"{'-':>10}" for v in values))
    sync_step, async_step = results["sync"]["median"]["time/step"], results["async"]["median"]["time/step"]
    print(f"async / sync step time: {async_step / sync_step:.2f}")
    print(f"staleness per step: sync {results['sync']['staleness']}, async {results['async']['staleness']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

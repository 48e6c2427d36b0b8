"""A GRPO step, TRL's GRPOTrainer vs posttrain (hf engine, vllm engine), on exactly the same work, one after the other.

The work (the one the speed goal is stated on): SmolLM2-135M-Instruct in float32, LoRA r=16 alpha=32 on
q,k,v,o,gate,up,down, 8 prompts x 4 samples, <= 64 new tokens at T=1.0, no KL (TRL beta=0, posttrain kl_coef=0),
lr 1e-4, one update per batch, micro-batch 32, single-digit additions with a strict `\\boxed{}` reward.

Each contender runs in its own child process (its own threads and memory), in turn, in one process tree:

    .venv/bin/python bench/grpo_vs_trl.py [--steps 3] [--only trl,hf,vllm] [--trl-bf16] [--json out.json]
        [--matmul-precision medium] [--async]

Per contender it prints each step's wall time, the phase breakdown where the trainer reports one (posttrain:
generate / reward / train / sync from metrics.jsonl; TRL: generate-and-score vs the rest, by timing its
`_generate_and_score_completions`), and the steady step (median of steps 2..N: step 1 pays warm-up) with its
ratio to TRL's. TRL 1.16 autocasts to bf16 unless `bf16=False`; the default here is float32 for both (the same
work); `--trl-bf16` runs TRL with its default instead, for reference; `--bf16` runs both in bf16 autocast (posttrain's
learner with `train.autocast: bf16`; its engine samples in float32).

`--matmul-precision P` sets `torch.set_float32_matmul_precision(P)` in every contender: posttrain's
`model.matmul_precision` (learner and rollout workers), and TRL's process too (a TRL user could set it as well). A
contender may carry its own, `NAME:P` (e.g. `--only trl,trl:medium,hf:medium`), so that both ratios come out of one
run. A posttrain contender `ENGINE/bf16` (e.g. `hf/bf16:medium`) runs its rollout engine in bfloat16
(`rollout.dtype: bfloat16`; the learner stays float32). `--async` runs posttrain with `rollout.async_mode: true`
(generation of step t+1 overlaps step t's training: one step off-policy, so not the same algorithm as TRL's
on-policy step).
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
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS, SAMPLES, NEW_TOKENS, LR, SEED = 8, 4, 64, 1e-4, 0
DATA = {"kind": "arithmetic", "num_problems": 200, "seed": 1, "max_value": 9}  # instruction: the source's \boxed{}


def _recipe(
    engine: str, steps: int, out: Path, bf16: bool = False, precision: str = "highest", asynch: bool = False
) -> dict:
    engine, _, rollout_dtype = engine.partition("/")
    return {
        "name": f"bench-{engine}",
        "seed": SEED,
        "output_dir": str(out),
        "model": {
            "path": "smollm2-135m-instruct",
            "dtype": "float32",
            "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
            "matmul_precision": precision,
        },
        "data": DATA,
        "rewards": [{"fn": "math_accuracy", "weight": 1.0}],
        "algorithm": {"prompts_per_step": PROMPTS, "samples_per_prompt": SAMPLES},
        "rollout": {
            "engine": engine,
            "temperature": 1.0,
            "max_new_tokens": NEW_TOKENS,
            "async_mode": asynch,
            **({"dtype": {"bf16": "bfloat16"}[rollout_dtype]} if rollout_dtype else {}),
        },
        "train": {
            "steps": steps,
            "lr": LR,
            "micro_batch_size": PROMPTS * SAMPLES,
            "autocast": "bf16" if bf16 else "none",
        },
        "checkpoint": {"every_steps": 10_000},
        "logging": {"progress": False},
    }


def run_posttrain(
    engine: str, steps: int, bf16: bool = False, precision: str = "highest", asynch: bool = False
) -> dict:
    """`posttrain train` on the work above; per-step wall time and phases from the run's metrics.jsonl, and the first
    step's entropy and sampler-vs-learner log-prob gap (the numerical effect of bf16 / the matmul precision)."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(_recipe(engine, steps, Path(tmp), bf16, precision, asynch)))
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        cli = [sys.executable, "-m", "posttrain.cli", "train", str(recipe)]
        subprocess.run(cli, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        (run_dir,) = Path(tmp).glob(f"bench-{engine.partition('/')[0]}-*")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "time/step" in row]  # the step rows (no evaluation is configured)
    phases = ["time/generate", "time/reward", "time/train", "time/sync"]
    return {
        "step_s": [row["time/step"] for row in rows],
        "phases": {p.split("/")[1]: [row.get(p) for row in rows] for p in phases},
        "reward": [row.get("reward/mean") for row in rows],
        "first_step": {k: rows[0].get(k) for k in ("entropy", "rollout/logprob_diff", "loss", "grad_norm")},
    }


def run_trl(steps: int, bf16: bool, precision: str = "highest") -> dict:
    """TRL's GRPOTrainer on the same model, prompts, reward and settings; per-step wall time by a callback."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.config import ArithmeticSource
    from posttrain.data.sources import load_rows
    from posttrain.models.loading import resolve_model_path
    from posttrain.verifiers.math import verify

    torch.set_float32_matmul_precision(precision)
    rows = load_rows(ArithmeticSource(**DATA))
    dataset = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": str(r["answer"])} for r in rows]
    )

    def boxed_accuracy(prompts, completions, answer, **_):
        return [float(verify(gold, c[0]["content"], strict=True)) for gold, c in zip(answer, completions, strict=True)]

    path = resolve_model_path("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=PROMPTS * SAMPLES,
        gradient_accumulation_steps=1,
        num_generations=SAMPLES,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        beta=0.0,
        num_iterations=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=SEED,
        use_cpu=True,
        bf16=bf16,
        dataloader_num_workers=0,
    )
    step_s: list[float] = []
    generate_s: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_s.append(time.perf_counter() - self.start)

    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=boxed_accuracy,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[StepTimer()],
    )
    generate = getattr(trainer, "_generate_and_score_completions", None)
    if generate is not None:

        def timed(*a, **k):
            start = time.perf_counter()
            out = generate(*a, **k)
            generate_s.append(time.perf_counter() - start)
            return out

        trainer._generate_and_score_completions = timed
    trainer.train()
    rewards = [row.get("reward") for row in trainer.state.log_history if "reward" in row]
    train_s = [s - g for s, g in zip(step_s, generate_s, strict=False)]
    return {"step_s": step_s, "phases": {"generate+score": generate_s, "train": train_s}, "reward": rewards}


def _child(name: str, steps: int, trl_bf16: bool, bf16: bool, asynch: bool) -> dict:
    """Run one contender (`engine[:precision]`) in a fresh interpreter and return its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    contender, precision = name.split(":")
    cmd = [sys.executable, __file__, "--_child", contender, "--steps", str(steps), "--_out", out]
    cmd += ["--matmul-precision", precision]
    cmd += ["--trl-bf16"] if trl_bf16 else []
    cmd += ["--bf16"] if bf16 else []
    cmd += ["--async"] if asynch else []
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(Path(out).read_text())


def _steady(step_s: list[float]) -> float:
    return statistics.median(step_s[1:] if len(step_s) > 1 else step_s)


def _fmt(values) -> str:
    return " ".join("-" if v is None else f"{v:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", default="trl,hf,vllm", help="contenders, comma-separated: trl, hf, vllm, hf/bf16")
    parser.add_argument("--trl-bf16", action="store_true", help="TRL with its default bf16 autocast")
    parser.add_argument("--bf16", action="store_true", help="both in bf16 autocast (posttrain: train.autocast=bf16)")
    parser.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"])
    parser.add_argument("--async", dest="asynch", action="store_true", help="posttrain with rollout.async_mode")
    parser.add_argument("--json", default=None)
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        bf16 = args.bf16
        trl_bf16 = args.trl_bf16 or bf16
        precision = args.matmul_precision
        if args._child == "trl":
            result = run_trl(args.steps, trl_bf16, precision)
        else:
            result = run_posttrain(args._child, args.steps, bf16, precision, args.asynch)
        Path(args._out).write_text(json.dumps(result))
        return
    results = {}
    for name in args.only.split(","):
        name = name if ":" in name else f"{name}:{args.matmul_precision}"
        print(f">> {name}: {args.steps} steps", flush=True)
        results[name] = _child(name, args.steps, args.trl_bf16, args.bf16, args.asynch)
    print(
        f"\nGRPO step, SmolLM2-135M-Instruct fp32 + LoRA r16 (7 modules), {PROMPTS} prompts x {SAMPLES} samples, "
        f"<= {NEW_TOKENS} new tokens, no KL; {os.cpu_count()} cores"
        + (" (both in bf16 autocast)" if args.bf16 else " (TRL in bf16 autocast)" if args.trl_bf16 else "")
        + (" (posttrain in async mode: one step off-policy)" if args.asynch else "")
    )
    trls = {name: _steady(r["step_s"]) for name, r in results.items() if name.startswith("trl:")}
    for name, r in results.items():
        steady = _steady(r["step_s"])
        ratios = "".join(f"  {steady / base:.2f}x {trl}" for trl, base in trls.items())
        print(f"{name:<12} steps [s]: {_fmt(r['step_s'])}   steady {steady:.1f} s{ratios}")
        for phase, values in r["phases"].items():
            print(f"{'':<12}   {phase:<15} {_fmt(values)}")
        print(f"{'':<12}   reward/mean     " + " ".join("-" if v is None else f"{v:.3f}" for v in r["reward"]))
        if "first_step" in r:
            print(
                f"{'':<12}   first step      "
                + " ".join(f"{k} {v:.6g}" for k, v in r["first_step"].items() if v is not None)
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

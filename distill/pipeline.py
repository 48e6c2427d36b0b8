"""`posttrain distill` (and `posttrain train` with `algorithm.name: distill | rft_offline`): traces -> SFT -> eval.

1. traces: the teacher (`traces.teacher`; for rft_offline the model itself) samples `traces.samples_per_prompt`
   completions per problem of `data:` on the rollout workers; the recipe's rewards score them; `traces.keep`
   picks what goes into `<run>/traces.jsonl` (resumable, see `distill.traces`);
2. the student (`model:`) is evaluated on `eval.data` (if any), trained with SFT on the kept traces (full, LoRA or
   QLoRA, with `train:`/`sft:` as for `algorithm.name: sft`; its run folder is `<run>/student-<stamp>`), and
   evaluated again;
3. `<run>/report.json` records traces generated, kept fraction, tokens, the time of each stage and the
   before/after accuracy, and a summary is printed.

`resume=<run>` continues an interrupted run: trace generation from the first problem not done, the SFT stage
from its last checkpoint (or skipped when its final model exists).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import ray

from posttrain.config import FileSource, RecipeConfig
from posttrain.distill.traces import TraceSettings, TraceStats, write_traces
from posttrain.offline.trainer import run_offline
from posttrain.online import components
from posttrain.online.evaluation import evaluate_recipe
from posttrain.rewards.combine import RewardScores, trl_completion
from posttrain.rollout.types import SamplingParams
from posttrain.run_folder.run_dir import open_run_dir


def teacher_config(cfg: RecipeConfig) -> RecipeConfig:
    """The recipe as the teacher sees it: its model and system prompt, no adapter."""
    model = cfg.model.model_copy(
        update={
            "path": cfg.traces.teacher or cfg.model.path,
            "lora": None,
            "quantize": "none",  # QLoRA is for the student's SFT; the rollout workers load the teacher as is
            "system_prompt": cfg.traces.teacher_system_prompt or cfg.model.system_prompt,
        }
    )
    return cfg.model_copy(update={"model": model})


def generate_traces(cfg: RecipeConfig, dataset: Path) -> TraceStats:
    """Stage 1 (resumable): sample, score and keep traces for every problem of `cfg.data`."""
    teacher = teacher_config(cfg)
    specs = components.load_reward_specs(cfg)
    rows, _ = components.load_data(cfg)
    components.check_reward_columns(specs, rows)
    teacher_path = components.model_path_of(teacher, "traces.teacher" if cfg.traces.teacher else "model.path")
    components.init_ray(cfg)
    fmt = components.PromptFormatter(teacher, teacher_path)
    scorer = components.start_scorer(cfg, specs)
    pool = components.start_rollout_pool(teacher, teacher_path)
    t, r = cfg.traces, cfg.rollout
    params = SamplingParams(
        n=t.samples_per_prompt,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop=tuple(r.stop),
        seed=cfg.seed,
    )

    def generate(indices: list[int], chunk: list[dict[str, Any]]) -> list[list]:
        # the seed follows the chunk's first problem, so a resumed run samples what the first would have
        return [res.completions for res in pool.generate(fmt(chunk), _seeded(params, indices[0]))]

    def score(chunk: list[dict[str, Any]], completions: list[list]) -> RewardScores:
        prompts, texts, ids, columns = [], [], [], {}
        keys = sorted({k for row in chunk for k in row if k != "prompt"})
        for row, outs in zip(chunk, completions, strict=True):
            for c in outs:
                prompts.append(row["prompt"])
                texts.append(trl_completion(row["prompt"], c.text))
                ids.append(c.token_ids)
                for key in keys:
                    columns.setdefault(key, []).append(row.get(key))
        return scorer.score(
            prompts, texts, columns, ids, on_error=cfg.algorithm.on_reward_error, group_size=t.samples_per_prompt
        )

    def on_chunk(stats: TraceStats) -> None:
        print(
            f"traces: {stats.problems}/{len(rows)} problems, {stats.kept}/{stats.generated} kept "
            f"({stats.generated_tokens} tokens generated)",
            file=sys.stderr,
        )

    settings = TraceSettings(
        samples_per_prompt=t.samples_per_prompt,
        keep=t.keep,
        min_reward=t.min_reward,
        max_per_problem=t.max_per_problem,
        drop_truncated=t.drop_truncated,
        chunk_problems=t.chunk_problems,
        source=teacher.model.path,
    )
    try:
        return write_traces(rows, dataset, settings, generate, score, on_chunk)
    finally:  # free the teacher before the student trains
        for worker in pool.workers:
            ray.kill(worker)
        scorer.close()


def _seeded(params: SamplingParams, offset: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=None if params.seed is None else params.seed * 100_003 + offset)


def student_sft_config(cfg: RecipeConfig, dataset: Path, run_dir: Path) -> RecipeConfig:
    """The SFT recipe of the student on the kept traces (its run folder goes inside `run_dir`)."""
    algorithm = cfg.algorithm.model_copy(update={"name": "sft"})
    eval_cfg = cfg.eval.model_copy(update={"data": None})
    existing = sorted(run_dir.glob("student-*"))
    return cfg.model_copy(
        update={
            "algorithm": algorithm,
            "data": FileSource(path=str(dataset)),
            "eval": eval_cfg,
            "output_dir": str(run_dir),
            "name": "student",
            "resume": str(existing[-1]) if existing else None,
        }
    )


def _evaluate(cfg: RecipeConfig, model: str | None) -> dict[str, float]:
    if cfg.eval.data is None:
        return {}
    target = cfg if model is None else cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": model})})
    return evaluate_recipe(target)["metrics"]


def run_distill(cfg: RecipeConfig) -> Path:
    """Run the three stages; returns the run folder."""
    run_dir, _, _ = open_run_dir(cfg, checkpoints=False)
    dataset = run_dir / "traces.jsonl"
    report: dict[str, Any] = {"algorithm": cfg.algorithm.name, "teacher": teacher_config(cfg).model.path}
    t0 = time.perf_counter()
    stats = generate_traces(cfg, dataset)
    report["traces"] = stats.as_dict()
    report["time/traces"] = time.perf_counter() - t0
    if stats.kept == 0:
        raise RuntimeError(
            f"no trace was kept ({stats.generated} generated for {stats.problems} problems): nothing to train the "
            "student on; lower traces.min_reward, raise traces.samples_per_prompt or check the rewards"
        )
    t1 = time.perf_counter()
    report["eval_before"] = _evaluate(cfg, None)
    sft_cfg = student_sft_config(cfg, dataset, run_dir)
    existing = Path(sft_cfg.resume) if sft_cfg.resume else None
    if existing is not None and (existing / "final").is_dir():
        student_dir = existing
        print(f"student already trained: {student_dir / 'final'}", file=sys.stderr)
    else:
        t_sft = time.perf_counter()
        student_dir = run_offline(sft_cfg)
        report["time/sft"] = time.perf_counter() - t_sft
    report["student"] = str(student_dir / "final")
    report["eval_after"] = _evaluate(cfg, str(student_dir / "final"))
    report["time/eval_and_sft"] = time.perf_counter() - t1
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(summary(report))
    print(f"run folder: {run_dir}")
    return run_dir


def summary(report: dict[str, Any]) -> str:
    traces = report["traces"]
    lines = [
        f"traces: {traces['generated']} generated for {traces['problems']} problems, {traces['kept']} kept "
        f"({100 * traces['kept_fraction']:.1f}%; {100 * traces['problem_coverage']:.1f}% of problems have one), "
        f"{traces['generated_tokens']} tokens generated, {traces['kept_tokens']} kept; "
        f"{report['time/traces']:.1f} s",
    ]
    before, after = report.get("eval_before", {}), report.get("eval_after", {})
    if "eval/accuracy" in before and "eval/accuracy" in after:
        lines.append(f"student accuracy: {before['eval/accuracy']:.4f} -> {after['eval/accuracy']:.4f}")
    if "time/sft" in report:
        lines.append(f"student SFT: {report['time/sft']:.1f} s")
    return "\n".join(lines)

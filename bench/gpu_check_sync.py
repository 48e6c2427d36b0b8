"""The weight-sync and vLLM checks of `bench/gpu_check.py` (see there): a CUDA IPC handoff into a second process
without Ray, vLLM greedy against HF greedy, and a 3-step colocated GRPO run through the online trainer."""

from __future__ import annotations

import time

from posttrain.bench.gpu_check import Context, Skip, chat_prompts, greedy_gaps, missing_packages

BUCKET_MB = 64
RECV_TIMEOUT_S = 180


def _engine_process(model_path: str, device: str, conn) -> None:
    """The receiving side (a spawned process): an hf engine that takes weights from the pipe and shows its own.

    Messages: ("bucket", specs, handle) -> `gpu_sync.load_ipc_bucket`; ("tensors", state dict shared by
    torch.multiprocessing) -> `load_weights`; ("weights",) -> send the engine's state dict (shared back, no copy);
    ("stop",) -> exit. Every message is answered.
    """
    from posttrain.rollout.hf_engine import HFEngine

    engine = HFEngine(model_path, device=device)
    conn.send(("ready", None))
    while True:
        kind, *payload = conn.recv()
        if kind == "stop":
            return
        if kind == "bucket":
            from posttrain.rollout.gpu_sync import load_ipc_bucket

            conn.send(("ok", load_ipc_bucket(engine, *payload)))
        elif kind == "tensors":
            engine.load_weights(payload[0])
            conn.send(("ok", None))
        else:
            conn.send(("weights", engine.model.state_dict()))


def _ask(conn, proc, message) -> object:
    conn.send(message)
    if not conn.poll(RECV_TIMEOUT_S):
        raise TimeoutError(f"the engine process (pid {proc.pid}) did not answer {message[0]!r} in {RECV_TIMEOUT_S} s")
    kind, payload = conn.recv()
    return payload


def _mismatches(ours: dict, conn, proc) -> int:
    """How many of the engine's tensors differ from ours bitwise (its state dict arrives shared, compared in place)."""
    import torch

    theirs = _ask(conn, proc, ("weights",))
    count = sum(not torch.equal(tensor, theirs[name]) for name, tensor in ours.items())
    del theirs  # release the shared memory before the engine changes or exits
    return count


def _send(model, conn, proc, ctx: Context) -> str:
    """Stream `model`'s weights to the engine process; returns how (gpu_sync's IPC buckets when it imports and CUDA is
    there, else torch.multiprocessing sharing the whole state dict: CUDA IPC on a GPU, shared memory on CPU)."""
    try:
        from posttrain.rollout.buckets import skip_tied
        from posttrain.rollout.gpu_sync import IpcSender
    except ImportError as err:
        reason = f"posttrain.rollout.gpu_sync does not import ({err})"
    else:
        if ctx.cuda:
            sender, buckets = IpcSender(skip_tied(model.state_dict().items()), BUCKET_MB * 2**20), 0
            while (item := sender.next()) is not None:
                _ask(conn, proc, ("bucket", *item))
                buckets += 1
            return f"gpu_sync.IpcSender, {buckets} buckets of <= {BUCKET_MB} MiB"
        reason = "gpu_sync's IPC needs CUDA"
    _ask(conn, proc, ("tensors", model.state_dict()))
    return f"torch.multiprocessing state dict ({reason})"


def ipc_weight_handoff(ctx: Context) -> str:
    """A learner-side model (the checkpoint plus seeded noise) hands its weights to an hf engine in a second process
    through torch's CUDA IPC (CPU shared memory in a dry run); the engine must then hold them bitwise."""
    import torch
    import torch.multiprocessing as mp

    from posttrain.models.loading import load_model

    model = load_model(ctx.model_path, dtype="float32").to(ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():  # what a training step would do: every tensor now differs from the engine's
            param.add_(torch.randn(param.shape, generator=gen, device=ctx.device), alpha=1e-3)
    ours = model.state_dict()
    spawn = mp.get_context("spawn")
    conn, child_conn = spawn.Pipe()
    proc = spawn.Process(target=_engine_process, args=(ctx.model_path, ctx.device, child_conn), daemon=True)
    proc.start()
    try:
        if not conn.poll(RECV_TIMEOUT_S):
            raise TimeoutError(f"the engine process did not start in {RECV_TIMEOUT_S} s")
        conn.recv()
        before = _mismatches(ours, conn, proc)
        start = time.perf_counter()
        how = _send(model, conn, proc, ctx)
        seconds = time.perf_counter() - start
        after = _mismatches(ours, conn, proc)
        conn.send(("stop",))
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
    unique = {t.data_ptr(): t for t in ours.values()}.values()  # a tied embedding / LM head counted once
    megabytes = sum(t.numel() * t.element_size() for t in unique) / 2**20
    detail = (
        f"{megabytes:.1f} MiB fp32 in {seconds:.2f} s via {how}; tensors differing from the learner: "
        f"{before}/{len(ours)} before, {after} after"
    )
    if before == 0 or after != 0:
        raise RuntimeError(detail)
    return detail


def _needs_vllm_and_ray(ctx: Context) -> None:
    missing = missing_packages("vllm", "ray")
    if ctx.dry_run:
        raise Skip("no CUDA (dry run)" + (f"; not installed: {', '.join(missing)}" if missing else ""))
    ctx.need_cuda()
    if missing:
        raise Skip(f"not installed: {', '.join(missing)}")


def vllm_greedy_equals_hf(ctx: Context) -> str:
    """vLLM on CUDA decodes greedily what the HF model does: its tokens are the fp32 HF model's argmax at each step
    (teacher-forced, ties within 1e-3 allowed) and its sequences are counted against the hf engine's."""
    _needs_vllm_and_ray(ctx)
    from posttrain.models.loading import load_model
    from posttrain.rollout.hf_engine import HFEngine
    from posttrain.rollout.types import SamplingParams
    from posttrain.rollout.vllm_engine import VLLMEngine

    greedy = SamplingParams(temperature=0, max_new_tokens=32)
    vllm = VLLMEngine(ctx.model_path, device="cuda", gpu_memory_utilization=0.2, max_batch_size=8)
    prompts = chat_prompts(vllm.tokenizer, 8)
    vllm_results = vllm.generate(prompts, greedy)
    hf_results = HFEngine(ctx.model_path, dtype="float32", device="cuda").generate(prompts, greedy)
    same = sum(
        a.completions[0].token_ids == b.completions[0].token_ids for a, b in zip(vllm_results, hf_results, strict=True)
    )
    reference = load_model(ctx.model_path, dtype="float32").to("cuda").eval()
    argmax_gap, logprob_gap = greedy_gaps(reference, vllm_results, "cuda")
    detail = f"{same}/8 sequences identical; vLLM argmax gap {argmax_gap:.1e}, |log-prob diff| {logprob_gap:.1e}"
    if argmax_gap > 1e-3 or logprob_gap > 1e-3:
        raise RuntimeError(detail)
    return detail


def grpo_recipe(ctx: Context) -> dict:
    """3 GRPO steps, vLLM colocated with the learner on one GPU, sleep level 2, CUDA IPC weight sync."""
    return {
        "name": "gpu-check",
        "output_dir": str(ctx.work_dir / "runs"),
        "model": {"path": ctx.model_path, "dtype": "bfloat16"},
        "data": {"kind": "arithmetic", "num_problems": 32, "seed": 1, "max_value": 9},
        "rewards": [{"fn": "math_accuracy"}, {"fn": "format", "weight": 0.1}],
        "algorithm": {"prompts_per_step": 8, "samples_per_prompt": 4},
        "rollout": {
            "engine": "vllm",
            "sleep_level": 2,
            "sync_transport": "cuda_ipc",
            "gpu_memory_utilization": 0.3,
            "max_new_tokens": 64,
        },
        "train": {"steps": 3, "lr": 1e-5, "micro_batch_size": 32},
        "placement": {"learner_gpus": 0.5, "rollout_gpus": 0.5, "colocate": True},
        "scoring": {"workers": 0},
        "logging": {"progress": False},
    }


def grpo_colocated(ctx: Context) -> str:
    """The recipe path (`online.trainer.OnlineTrainer`): 3 steps, then the engine must hold the learner's weights
    bitwise; prints the mean step-time breakdown."""
    if missing_packages("pydantic"):
        raise Skip("not installed: pydantic (the recipe schema)")
    from posttrain.config import validate_config

    cfg = validate_config(grpo_recipe(ctx))  # the dry run stops here: the recipe is valid
    _needs_vllm_and_ray(ctx)
    import ray
    import torch

    from posttrain.online.trainer import OnlineTrainer

    trainer = OnlineTrainer(cfg)
    try:
        metrics = [trainer.train_step(step)[0] for step in (1, 2, 3)]
        learner_w = ray.get(trainer.learner.get_weights.remote(False))
        worker_w = ray.get(trainer.pool.workers[0].get_weights.remote())
    finally:
        trainer.scorer.close()
        trainer.placement.remove()
    differ = sum(not torch.equal(worker_w[name], tensor) for name, tensor in learner_w.items())
    phases = ("generate", "reward", "train", "sleep", "wake", "sync")
    breakdown = ", ".join(f"{p} {sum(m.get(f'time/{p}', 0.0) for m in metrics) / 3:.2f}" for p in phases)
    losses = [m["loss"] for m in metrics]
    detail = (
        f"mean s/step: {breakdown}; losses {', '.join(f'{x:.4f}' for x in losses)}; engine tensors differing from "
        f"the learner after step 3: {differ}/{len(learner_w)}"
    )
    if differ or not all(x == x for x in losses):
        raise RuntimeError(detail)
    return detail

"""Data-parallel learners over real gloo through Ray (tiny random model, CPU): 2 learners on a split batch take the
same step as 1 learner on the whole batch, for every loss reduction, an odd batch size, several updates per batch
and LoRA; a peer that never joins fails with a clear error. NCCL (2+ GPUs only): the same equality, gpu-marked."""

import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="needs ray (the learner and rollout workers are Ray actors)")

import ray
import torch

from posttrain.config import validate_config
from posttrain.data.types import Sample
from posttrain.learner.actors import DataParallelLearner, LearnerGroup
from posttrain.learner.batch import collate, select_rows
from posttrain.learner.data_parallel import merge_stats, shard_plan
from posttrain.learner.learner import LearnerImpl, LearnerSettings
from posttrain.models.lora import LoraSettings, merged_state_dict
from posttrain.models.tiny import tiny_model_path
from posttrain.models.training import Stats
from posttrain.online.trainer import OnlineTrainer
from posttrain.run_folder.run_dir import read_metrics

REWARD_FILE = Path(__file__).parents[1] / "online" / "data" / "length_reward.py"

# fp32 tolerance of the parameters after the step(s). 1 vs 2 learners differ only by summation order (per-rank sums
# then the all-reduce, vs one process accumulating micro-batches), but AdamW's first steps divide each gradient
# element by its own magnitude, so elements with |g| near eps (1e-8) turn float32 rounding into parameter noise of up
# to ~lr/100. Measured here: one learner against itself with micro_batch_size 1 vs 2 differs by up to 1.9e-4 at
# lr 1e-2 (the floor); 2 learners vs 1 by up to 1.1e-4, with <= 0.21% of the elements beyond 1e-6 (most cases
# < 2e-6 everywhere). A missing or wrong all-reduce moves nearly every element by ~lr instead.
PARAM_ATOL_PER_LR = 1 / 40  # every element within lr / 40
CLOSE, MOST = 1e-6, 0.995  # and >= 99.5% of all elements within 1e-6
# grad_norm (before clipping) is the strictest check of the normalisers: a local token count, or averaging instead
# of summing the ranks' gradients, changes it by a large factor.
METRIC_RTOL = 1e-5


def _batch(num_rows: int = 7):
    """Rows of different prompt and completion lengths, advantages of both signs, one skipped sample (all-zero mask)."""
    gen = torch.Generator().manual_seed(0)
    samples, advantages = [], []
    for i in range(num_rows):
        prompt = torch.randint(3, 90, (2 + i % 4,), generator=gen).tolist()
        completion = torch.randint(3, 90, (1 + (3 * i) % 7,), generator=gen).tolist()
        samples.append(Sample("p", prompt, "c", completion, [-1.0] * len(completion), "stop", i // 2))
        advantages.append(float("nan") if i == 3 else float(torch.randn((), generator=gen)))
    return collate(samples, advantages, pad_token_id=0, max_completion_tokens=8)


def _settings(**kw) -> LearnerSettings:
    base = dict(model_path=str(tiny_model_path()), lr=1e-2, micro_batch_size=2, num_threads=1, seed=0, device="cpu")
    return LearnerSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def group(ray_session):
    """Two gloo ranks, started once; each test rebuilds their model with `reset` (starting actors is the slow part)."""
    group = LearnerGroup(_settings(), world_size=2, timeout_s=60).start()
    yield group
    group.shutdown()


def _compare(group: LearnerGroup, settings: LearnerSettings, batch, steps: int = 1) -> None:
    single = LearnerImpl(settings)
    initial = merged_state_dict(single.model)
    group.reset(settings)
    for _ in range(steps):
        expected = single.train_step(batch)
        got = ray.get(group.train_step.remote(batch), timeout=120)
    rank0 = ray.get(group.get_weights.remote(False), timeout=60)
    # sharded ranks (tests/learner/test_fsdp.py) read the weights only together: rank 0's answer is theirs
    rank1 = rank0 if group.sharding == "fsdp" else ray.get(group.actors[1].get_weights.remote(False), timeout=60)
    assert got["updates"] == expected["updates"] == settings.epochs_per_batch * settings.mini_batches
    for name in ("loss", "grad_norm", "entropy", "rollout/logprob_diff", "ratio/min", "ratio/max", "kl"):
        if name in expected and expected[name] == expected[name]:  # kl is NaN without a reference
            assert got[name] == pytest.approx(expected[name], rel=METRIC_RTOL, abs=1e-7), name
    reference = merged_state_dict(single.model)
    assert rank0.keys() == reference.keys() == rank1.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(rank0[name], tensor, rtol=0, atol=settings.lr * PARAM_ATOL_PER_LR, msg=name)
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged on {name}"
    diffs = torch.cat([(rank0[n] - reference[n]).abs().flatten() for n in reference])
    assert float((diffs <= CLOSE).float().mean()) >= MOST, f"max {float(diffs.max()):.2e}"
    assert any(not torch.equal(initial[n], reference[n]) for n in reference), "no parameter moved: vacuous test"


def test_shard_plan_cuts_each_global_mini_batch_across_ranks():
    # 7 rows, 2 mini-batches [0,4) [4,7) (as one learner cuts them), 2 ranks: rank 0 {0,1} {4,5}, rank 1 {2,3} {6}
    assert shard_plan(7, 2, 2) == [([0, 1, 4, 5], [0, 2, 4]), ([2, 3, 6], [0, 2, 3])]
    # fewer rows than ranks: a rank with nothing still gets (empty) bounds for every mini-batch
    assert shard_plan(1, 1, 2) == [([], [0, 0]), ([0], [0, 1])]
    # each row exactly once over the ranks
    for rows, mini, world in [(9, 3, 2), (5, 4, 3), (16, 2, 4)]:
        plan = shard_plan(rows, mini, world)
        assert sorted(r for rank_rows, _ in plan for r in rank_rows) == list(range(rows))
        assert all(len(bounds) == min(mini, rows) + 1 and bounds[-1] == len(r) for r, bounds in plan)


def test_merge_stats_pools_weighted_means_and_keeps_replicated_sums():
    a, b = Stats(), Stats()
    a.add("loss", 0.25), b.add("loss", 0.5)  # shares of one step's loss: they add
    a.add("grad_norm", 2.0), b.add("grad_norm", 2.0)  # the same after the all-reduce: not doubled
    a.mean("entropy", 1.0, 3.0), b.mean("entropy", 2.0, 1.0)  # token-weighted: (3*1 + 1*2) / 4
    a.extremes("ratio", 0.9, 1.1), b.extremes("ratio", 0.8, 1.05)
    metrics = merge_stats([a, b]).result(1)
    assert metrics == {"loss": 0.75, "grad_norm": 2.0, "entropy": 1.25, "ratio/min": 0.8, "ratio/max": 1.1}


def test_select_rows_keeps_widths_and_allows_no_rows():
    batch = _batch()
    part = select_rows(batch, [4, 0])
    assert torch.equal(part.input_ids_BT, batch.input_ids_BT[[4, 0]])
    assert torch.equal(part.loss_mask_BC, batch.loss_mask_BC[[4, 0]])
    empty = select_rows(batch, [])
    assert len(empty) == 0 and empty.loss_mask_BC.shape == (0, batch.loss_mask_BC.shape[1])


@pytest.mark.parametrize("reduction", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_two_learners_equal_one_on_an_odd_batch(group, reduction):
    _compare(group, _settings(loss_reduction=reduction), _batch(7))


def test_two_learners_equal_one_with_epochs_and_mini_batches(group):
    # 2 epochs x 2 mini-batches of 7 rows: 4 optimizer steps, lp_old taken once, ratios move from the 2nd update
    _compare(group, _settings(epochs_per_batch=2, mini_batches=2, loss_reduction="seq-mean-token-mean"), _batch(7))


def test_two_learners_equal_one_with_lora_and_a_kl_in_the_loss(group):
    lora = LoraSettings(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    _compare(group, _settings(lora=lora, kl_coef=0.1, mini_batches=2, lr=5e-2), _batch(5), steps=2)


def test_a_rank_without_rows_still_takes_the_step(group):
    # 3 rows, 2 mini-batches [0,2) [2,3), 2 ranks: rank 1's share of the second mini-batch is empty
    _compare(group, _settings(mini_batches=2), _batch(3))


def test_a_peer_that_never_joins_fails_with_a_clear_error(ray_session):
    lonely = DataParallelLearner.options(num_cpus=0).remote(_settings(), None, 0, 2)
    try:
        host, port = ray.get(lonely.address.remote(), timeout=60)
        start = time.perf_counter()
        expected = r"group of 2 learners .* did not form within 2s \(placement.timeout_s\)"
        with pytest.raises(TimeoutError, match=expected):
            ray.get(lonely.join.remote(host, port, 2.0), timeout=60)
        assert time.perf_counter() - start < 30
    finally:
        ray.kill(lonely)


def test_group_logprobs_equal_the_single_learners(group):
    lora = LoraSettings(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    settings = _settings(lora=lora)
    single = LearnerImpl(settings)
    group.reset(settings)
    batch = _batch(5)
    (policy, ref), (expected_policy, expected_ref) = ray.get(group.logprobs.remote(batch)), single.logprobs(batch)
    torch.testing.assert_close(policy, expected_policy, rtol=0, atol=1e-6)
    torch.testing.assert_close(ref, expected_ref, rtol=0, atol=1e-6)
    adapter = ray.get(group.get_lora_adapter.remote(), timeout=60)  # rank-0 calls pass through the group
    assert adapter is not None


def test_rank_0_saves_and_every_rank_loads_a_checkpoint(group, tmp_path):
    group.reset(_settings())
    ray.get(group.save_checkpoint.remote(str(tmp_path)), timeout=60)
    saved = ray.get(group.get_weights.remote(False), timeout=60)
    ray.get(group.train_step.remote(_batch(5)), timeout=120)
    assert ray.get(group.load_checkpoint.remote(str(tmp_path)), timeout=60) == 0  # steps done at the save
    for actor in group.actors:
        weights = ray.get(actor.get_weights.remote(False), timeout=60)
        assert all(torch.equal(weights[n], saved[n]) for n in saved)


def test_grpo_runs_two_steps_with_two_placed_learners(tmp_path, ray_session):
    recipe = {
        "name": "dp",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path()), "lora": {"rank": 4, "alpha": 8}},
        "data": {"kind": "arithmetic", "num_problems": 8, "seed": 1, "max_value": 9},
        "rewards": [{"fn": f"{REWARD_FILE}:length_reward"}],
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 4, "kl_coef": 0.05, "mini_batches": 2},
        "rollout": {"max_new_tokens": 24, "num_threads": 1},
        "train": {"steps": 2, "lr": 1e-2, "micro_batch_size": 2},
        "checkpoint": {"every_steps": 1},
        "logging": {"progress": False},
        "placement": {"learners": 2, "learner_cpus": 0.5, "rollout_cpus": 0.5, "timeout_s": 60},
    }
    trainer = OnlineTrainer(validate_config(recipe))
    try:
        assert isinstance(trainer.learner, LearnerGroup) and len(trainer.placement.plan.bundles) == 3
        run_dir = trainer.run()
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == [1, 2]
        for row in rows:
            assert row["updates"] == 2.0 and row["kl"] >= 0
        assert any(row["grad_norm"] > 0 for row in rows)  # lengths (the reward) differed somewhere: it learned
        assert (run_dir / "final" / "config.json").is_file()
        assert (run_dir / "checkpoints" / "step-2" / "learner.pt").is_file()  # written by rank 0
        rank0 = ray.get(trainer.learner.get_weights.remote(False), timeout=60)
        rank1 = ray.get(trainer.learner.actors[1].get_weights.remote(False), timeout=60)
        assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
        engine = ray.get(trainer.pool.workers[0].get_weights.remote(), timeout=60)  # synced from rank 0
        assert all(torch.equal(engine[n], rank0[n]) for n in rank0)
    finally:
        trainer.learner.shutdown()
        trainer.placement.remove()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL data parallel needs 2 CUDA GPUs")
def test_two_nccl_learners_equal_one(ray_session):
    settings = _settings(device="cuda", mini_batches=2)
    single = LearnerImpl(settings)
    group = LearnerGroup(settings, 2, actor_options=[{"num_cpus": 0, "num_gpus": 1}] * 2, timeout_s=120).start()
    try:
        expected = single.train_step(_batch(7))
        got = ray.get(group.train_step.remote(_batch(7)), timeout=300)
        weights = ray.get(group.get_weights.remote(False), timeout=120)
    finally:
        group.shutdown()
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    for name, tensor in merged_state_dict(single.model).items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_learner_on_cuda_takes_the_cpu_learners_step():
    batch = _batch(7)
    on_cpu, on_gpu = LearnerImpl(_settings(mini_batches=2)), LearnerImpl(_settings(mini_batches=2, device="cuda"))
    assert next(on_gpu.model.parameters()).is_cuda
    expected, got = on_cpu.train_step(batch), on_gpu.train_step(batch)
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    gpu_weights = on_gpu.get_weights(False)
    for name, tensor in merged_state_dict(on_cpu.model).items():
        torch.testing.assert_close(gpu_weights[name], tensor, rtol=0, atol=1e-5, msg=name)

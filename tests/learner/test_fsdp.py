"""Sharded learners (`placement.sharding: fsdp`, learner/fsdp.py) over real gloo through Ray (tiny random model, CPU):
each rank holds half of the weights and optimizer state; 2 sharded learners on a split batch take the step 1 learner
takes on the whole batch (full weights, LoRA, a KL to a separate or adapter-off reference, several updates, ranks
with fewer micro-batches or no rows); log-probs; checkpoints in one learner's format that resume exactly; a GRPO run
whose engines get the learner's full weights. NCCL/GPU FSDP is not tested here (no GPU)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="needs ray (the learner and rollout workers are Ray actors)")

import ray
import torch

from posttrain.config import validate_config
from posttrain.learner.actors import LearnerGroup
from posttrain.learner.fsdp import to_index_keyed, to_name_keyed
from posttrain.learner.learner import LearnerImpl, LearnerSettings
from posttrain.models.lora import LoraSettings, merged_state_dict
from posttrain.models.tiny import tiny_model_path
from posttrain.online.trainer import OnlineTrainer
from posttrain.run_folder.run_dir import read_metrics

REWARD_FILE = Path(__file__).parents[1] / "online" / "data" / "length_reward.py"
LORA = LoraSettings(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])


def _load_sibling(name: str):
    """A sibling test module's helpers (tests import in importlib mode: not importable by name)."""
    spec = importlib.util.spec_from_file_location(f"_fsdp_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# plain data parallelism's batch (rows of different lengths, advantages of both signs, row 3 skipped), settings and
# fp32 tolerance (every element within lr / 40, >= 99.5% within 1e-6; see there why)
_dp = _load_sibling("test_data_parallel")
_batch, _settings = _dp._batch, _dp._settings
PARAM_ATOL_PER_LR = _dp.PARAM_ATOL_PER_LR


@pytest.fixture(scope="module")
def group(ray_session):
    """Two sharded gloo ranks, started once; each test rebuilds (and reshards) their model with `reset`."""
    group = LearnerGroup(_settings(), world_size=2, timeout_s=60, sharding="fsdp").start()
    yield group
    group.shutdown()


def _compare(group: LearnerGroup, settings: LearnerSettings, batch, steps: int = 1) -> None:
    """1 learner vs the group, as for plain data parallelism; the metrics compared include grad_norm, the global
    norm that clipping uses (a per-shard norm would be ~1/sqrt(2) of it)."""
    _dp._compare(group, settings, batch, steps)


def test_each_rank_holds_half_of_the_weights_gradients_and_optimizer_state(group):
    settings = _settings(max_grad_norm=1e9)
    single = LearnerImpl(settings)
    group.reset(settings)
    batch = _batch(6)
    single.train_step(batch)
    ray.get(group.train_step.remote(batch), timeout=120)
    full = {
        "numel": sum(p.numel() for p in single.model.parameters()),
        "params": sum(p.numel() * 4 for p in single.model.parameters()),
        "optimizer": 2 * sum(p.numel() * 4 for p in single.model.parameters()),  # AdamW: exp_avg + exp_avg_sq
    }
    ranks = ray.get([actor.memory_bytes.remote() for actor in group.actors], timeout=60)
    for key, total in full.items():
        assert sum(rank[key] for rank in ranks) == total, key  # every element on exactly one rank
        for rank in ranks:
            assert 0.4 * total <= rank[key] <= 0.6 * total, (key, rank[key], total)
    assert all(rank["grads"] == rank["params"] for rank in ranks)  # gradients are sharded like the weights


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(loss_reduction="seq-mean-token-mean"), id="full-weights"),
        pytest.param(dict(epochs_per_batch=2, mini_batches=2, kl_coef=0.1), id="epochs-minibatches-kl-separate-ref"),
        pytest.param(dict(lora=LORA, kl_coef=0.1, mini_batches=2, lr=5e-2), id="lora-kl-adapter-off-ref"),
    ],
)
def test_two_sharded_learners_equal_one(group, kw):
    # 5 rows, micro-batches of 2: the ranks' shares have different numbers of passes (dummy passes fill in)
    _compare(group, _settings(**kw), _batch(5), steps=2 if "lora" in kw else 1)


def test_a_rank_without_rows_still_takes_the_step(group):
    # 3 rows, 2 mini-batches [0,2) [2,3): rank 0's share of the second mini-batch is empty
    _compare(group, _settings(mini_batches=2), _batch(3))
    # 1 row: rank 0 has nothing at all, and only dummy passes (lp_old's, then 2 updates' forward and backward)
    _compare(group, _settings(epochs_per_batch=2), _batch(1))


def test_jsd_distillation_with_sharded_learners_equals_one(ray_session):
    """opd_jsd: the student's full logits with gradient (its own forward path), the teacher asked per micro-batch."""
    from posttrain.learner.teacher import TeacherImpl, TeacherSettings

    teacher = TeacherImpl(TeacherSettings(str(tiny_model_path(seed=0)), temperature=0.8, batch_size=4))
    settings = _settings(model_path=str(tiny_model_path(seed=1)), loss="opd_jsd", temperature=0.8)
    single = LearnerImpl(settings, teacher)
    sharded = LearnerGroup(settings, world_size=2, teacher=teacher, timeout_s=60, sharding="fsdp").start()
    try:
        batch = _batch(5)
        expected, got = single.train_step(batch), ray.get(sharded.train_step.remote(batch), timeout=120)
        weights = ray.get(sharded.get_weights.remote(False), timeout=60)
    finally:
        sharded.shutdown()
    for name in ("jsd", "opd/reverse_kl", "grad_norm"):
        assert got[name] == pytest.approx(expected[name], rel=1e-5), name
    for name, tensor in merged_state_dict(single.model).items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=settings.lr * PARAM_ATOL_PER_LR, msg=name)


def test_group_logprobs_and_adapter_equal_the_single_learners(group):
    # policy and adapter-off reference log-probs of 5 rows (shares of 2 and 3 rows: 1 and 2 passes, one padded)
    _dp.test_group_logprobs_equal_the_single_learners(group)
    adapter = ray.get(group.get_lora_adapter.remote(), timeout=60)  # the group is still at that test's LoRA init
    expected_adapter = LearnerImpl(_settings(lora=LORA)).get_lora_adapter()
    assert adapter.tensors.keys() == expected_adapter.tensors.keys()
    for name, tensor in expected_adapter.tensors.items():
        assert torch.equal(adapter.tensors[name], tensor), name  # full (gathered) tensors, not shards


def test_optimizer_state_keys_convert_both_ways():
    names = ["a.weight", "b.weight"]
    by_name = {"state": {"b.weight": {"step": 1}}, "param_groups": [{"lr": 0.1, "params": ["a.weight", "b.weight"]}]}
    by_index = to_index_keyed(by_name, names)
    assert by_index == {"state": {1: {"step": 1}}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    assert to_name_keyed(by_index, names) == by_name


def test_checkpoints_are_one_learners_and_resume_exactly(group, tmp_path):
    settings = _settings(lora=LORA, mini_batches=2, lr=5e-2)
    single = LearnerImpl(settings)
    group.reset(settings)
    batch = _batch(5)
    single.train_step(batch)
    ray.get(group.train_step.remote(batch), timeout=120)
    ray.get(group.save_checkpoint.remote(str(tmp_path / "fsdp")), timeout=60)
    single.save_checkpoint(str(tmp_path / "single"))
    sharded, plain = (torch.load(tmp_path / d / "learner.pt", weights_only=False) for d in ("fsdp", "single"))
    # the same format as one learner's: full tensors by name, AdamW state by index
    assert sharded["steps_done"] == plain["steps_done"] == 2
    for name, tensor in plain["trainable"].items():
        torch.testing.assert_close(sharded["trainable"][name], tensor, rtol=0, atol=settings.lr * PARAM_ATOL_PER_LR)
    assert sharded["optimizer"]["state"].keys() == plain["optimizer"]["state"].keys()
    for index, state in plain["optimizer"]["state"].items():
        assert sharded["optimizer"]["state"][index]["exp_avg"].shape == state["exp_avg"].shape
        torch.testing.assert_close(sharded["optimizer"]["state"][index]["exp_avg"], state["exp_avg"], atol=1e-3, rtol=0)

    # resume: a second step from the checkpoint is bitwise the step taken without the detour
    after_two = ray.get(group.train_step.remote(batch), timeout=120)
    weights_two = ray.get(group.get_weights.remote(False), timeout=60)
    ray.get(group.train_step.remote(batch), timeout=120)  # move on, then go back
    assert ray.get(group.load_checkpoint.remote(str(tmp_path / "fsdp")), timeout=60) == 2
    again = ray.get(group.train_step.remote(batch), timeout=120)
    assert again["loss"] == after_two["loss"] and again["grad_norm"] == after_two["grad_norm"]
    weights_again = ray.get(group.get_weights.remote(False), timeout=60)
    assert all(torch.equal(weights_again[n], weights_two[n]) for n in weights_two)

    # a checkpoint of one unsharded learner loads into the sharded group (and the weights come back unchanged)
    assert ray.get(group.load_checkpoint.remote(str(tmp_path / "single")), timeout=60) == 2
    loaded = ray.get(group.get_weights.remote(False), timeout=60)
    assert all(torch.equal(loaded[n], t) for n, t in merged_state_dict(single.model).items())


def _recipe(tmp_path, steps: int) -> dict:
    return {
        "name": "fsdp",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path())},
        "data": {"kind": "arithmetic", "num_problems": 8, "seed": 1, "max_value": 9},
        "rewards": [{"fn": f"{REWARD_FILE}:length_reward"}],
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 4, "kl_coef": 0.05, "mini_batches": 2},
        "rollout": {"max_new_tokens": 24, "num_threads": 1},
        "train": {"steps": steps, "lr": 1e-2, "micro_batch_size": 2},
        "checkpoint": {"every_steps": 1},
        "logging": {"progress": False},
        "placement": {"learners": 2, "sharding": "fsdp", "timeout_s": 60},
    }


def _stop(trainer) -> None:
    trainer.learner.shutdown()
    trainer.placement.remove()
    for worker in trainer.pool.workers:
        ray.kill(worker)


def test_grpo_with_sharded_learners_runs_checkpoints_resumes_and_syncs_full_weights(tmp_path, ray_session):
    trainer = OnlineTrainer(validate_config(_recipe(tmp_path, steps=2)))
    try:
        assert trainer.learner.sharding == "fsdp" and trainer.learner.weight_sender is trainer.learner
        run_dir = trainer.run()
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == [1, 2] and all(r["updates"] == 2.0 for r in rows)
        assert any(row["grad_norm"] > 0 for row in rows)
        learner = ray.get(trainer.learner.get_weights.remote(False), timeout=60)
        engine = ray.get(trainer.pool.workers[0].get_weights.remote(), timeout=60)  # synced after step 2
        assert learner.keys() <= engine.keys()
        assert all(torch.equal(engine[n], learner[n]) for n in learner)
    finally:
        _stop(trainer)
    saved = torch.load(run_dir / "checkpoints" / "step-2" / "learner.pt", weights_only=False)
    assert all(torch.equal(saved["trainable"][n], learner[n]) for n in saved["trainable"])  # full weights
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    assert all(torch.equal(final[n], learner[n]) for n in learner)

    resumed = OnlineTrainer(validate_config({**_recipe(tmp_path, steps=3), "resume": str(run_dir)}))
    try:
        restored = ray.get(resumed.learner.get_weights.remote(False), timeout=60)
        assert all(torch.equal(restored[n], learner[n]) for n in learner)
        resumed.run()
    finally:
        _stop(resumed)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


@pytest.mark.parametrize(
    "placement, extra, message",
    [
        ({"learners": 1, "sharding": "fsdp"}, {}, r"placement.sharding: .*placement.learners=1"),
        (
            {"learners": 2, "sharding": "fsdp"},
            {"rollout": {"sync_transport": "nccl"}},
            r"placement.sharding: .*rollout.sync_transport=nccl",
        ),
        ({"learners": 2, "sharding": "zero3"}, {}, r"placement.sharding"),
        (
            {"learners": 2, "sharding": "fsdp"},
            {"model": {"lora": {"rank": 4, "alpha": 8}, "quantize": "nf4"}},
            r"placement.sharding: .*model.quantize=nf4",
        ),
    ],
)
def test_bad_sharding_settings_fail_naming_the_key(tmp_path, placement, extra, message):
    raw = {**_recipe(tmp_path, steps=1), "placement": placement}
    for section, values in extra.items():
        raw[section] = {**raw[section], **values}
    with pytest.raises(ValueError, match=message):
        validate_config(raw)


@pytest.mark.parametrize("lora", [None, LORA], ids=["plain", "lora"])
def test_plain_state_is_the_state_dict_read_from_the_live_tensors(lora):
    from posttrain.learner.fsdp import plain_state
    from posttrain.models.loading import load_model
    from posttrain.models.lora import apply_lora

    model = load_model(str(tiny_model_path()))
    model = apply_lora(model, lora) if lora else model
    state, expected = plain_state(model), model.state_dict()
    assert list(state) == list(expected) if lora is None else set(state) == set(expected)
    live = dict(model.named_parameters())
    assert all(state[n].data_ptr() == live[n].data_ptr() for n in live)  # views, not copies
    assert all(torch.equal(state[n], expected[n]) for n in expected)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL FSDP needs 2 CUDA GPUs")
def test_two_sharded_nccl_learners_equal_one(ray_session):
    settings = _settings(device="cuda", mini_batches=2)
    options = [{"num_cpus": 0, "num_gpus": 1}] * 2
    group = LearnerGroup(settings, 2, actor_options=options, timeout_s=120, sharding="fsdp").start()
    try:
        _compare(group, settings, _batch(7))
    finally:
        group.shutdown()

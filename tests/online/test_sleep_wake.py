"""`rollout.sleep_level`: the config's refusals, and where the online step puts the engines to sleep and wakes them
(a real trainer on CPU with the real `hf` engine in its Ray worker; the engine refuses to generate while asleep)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("ray", reason="needs ray (the learner and rollout workers are Ray actors)")

from posttrain.config import ConfigError, check_resumable, dump_config, load_config, validate_config
from posttrain.models.loading import load_model
from posttrain.models.tiny import tiny_model_path
from posttrain.online import components
from posttrain.online.trainer import OnlineTrainer
from posttrain.rollout.pool import RolloutPool
from posttrain.rollout.types import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
LENGTH_REWARD = Path(__file__).parent / "data" / "length_reward.py"
BASE = {"model": {"path": "m"}, "data": {"kind": "arithmetic"}, "rewards": [{"fn": "math_accuracy"}]}
ONE_GPU = {"learner_gpus": 0.5, "rollout_gpus": 0.5, "colocate": True}


def _error(rollout: dict, placement: dict | None = None, **rest) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config({**BASE, "rollout": rollout, **({"placement": placement} if placement else {}), **rest})
    return str(info.value)


def test_off_by_default_and_valid_on_a_shared_gpu():
    assert validate_config(BASE).rollout.sleep_level == 0
    cfg = validate_config({**BASE, "rollout": {"engine": "vllm", "sleep_level": 2}, "placement": ONE_GPU})
    assert components.rollout_engine_options(cfg)["sleep_mode"] is True
    assert components.learner_settings(cfg, "m").empty_cuda_cache is True
    off = validate_config({**BASE, "rollout": {"engine": "vllm"}, "placement": ONE_GPU})
    assert "sleep_mode" not in components.rollout_engine_options(off)
    assert components.learner_settings(off, "m").empty_cuda_cache is False
    # the GPU recipe takes it as an override, and a resumed run may turn it on or off
    recipe = ROOT / "recipes" / "grpo_gsm8k.yaml"
    gpu = load_config(recipe, ["rollout.engine=vllm", "rollout.sleep_level=1"])
    assert gpu.rollout.sleep_level == 1
    check_resumable(dump_config(load_config(recipe, ["rollout.engine=vllm"])), gpu, "run")


def test_refused_without_rollout_gpus_naming_the_keys():
    message = _error({"sleep_level": 1})
    assert "rollout.sleep_level: sleeping frees the engines' GPU memory" in message
    assert "placement.rollout_gpus=0" in message
    # the learner alone on a GPU does not help: the engines' own memory is what sleeps
    assert "placement.rollout_gpus=0" in _error({"sleep_level": 2}, {"learner_gpus": 1})


def test_refused_in_async_mode_naming_both_keys():
    message = _error({"sleep_level": 1, "async_mode": True}, ONE_GPU)
    assert "rollout.sleep_level" in message and "rollout.async_mode" in message


def test_level_2_refused_with_adapter_syncs():
    rollout = {"engine": "vllm", "lora_sync": "adapter", "sleep_level": 2}
    message = _error(rollout, ONE_GPU, model={"path": "m", "lora": {"rank": 4}})
    assert "use rollout.sleep_level=1" in message
    rollout["sleep_level"] = 1
    validate_config({**BASE, "model": {"path": "m", "lora": {"rank": 4}}, "rollout": rollout, "placement": ONE_GPU})


# ------------------------------------------------------------------------------------------- the step's order


class RecordingPool(RolloutPool):
    """The trainer's real pool, noting each call and whether worker 0's engine was asleep when it came."""

    def __init__(self, pool: RolloutPool, events: list):
        super().__init__(pool.workers, pool.timeout_s)
        self.events = events

    def asleep(self) -> bool:
        import ray

        return ray.get(self.workers[0].is_sleeping.remote())

    def generate(self, prompts, params):
        self.events.append(("generate", self.asleep()))
        return super().generate(prompts, params)

    def sleep(self, level, timeout_s=600.0):
        self.events.append((f"sleep {level}", self.asleep()))
        return super().sleep(level, timeout_s)

    def wake_up(self, tags=None, timeout_s=600.0):
        seconds = super().wake_up(tags, timeout_s)
        self.events.append((f"woke {tags}", self.asleep()))
        return seconds


class Recording:
    """Notes a call of `fn` (the learner's train_step, the weight sync) with the engine's state, then makes it."""

    def __init__(self, name: str, fn, pool: RecordingPool):
        self.name, self.fn, self.pool = name, fn, pool

    def remote(self, *args, **kwargs):
        self.pool.events.append((self.name, self.pool.asleep()))
        return self.fn.remote(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        self.pool.events.append((self.name, self.pool.asleep()))
        return self.fn(*args, **kwargs)


class Learner:
    def __init__(self, actor, pool: RecordingPool):
        self.actor, self.train_step = actor, Recording("train", actor.train_step, pool)

    def __getattr__(self, name):
        return getattr(self.actor, name)


def test_each_step_sleeps_after_generating_and_wakes_weights_then_kv_cache_around_the_sync(tmp_path, ray_session):
    ray = ray_session
    recipe = {
        "name": "sleep",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path())},
        "data": {"kind": "arithmetic", "num_problems": 8, "seed": 1, "max_value": 9},
        "rewards": [{"fn": f"{LENGTH_REWARD}:length_reward"}],  # varies on a random model: a real update
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 2, "advantage_std": "none"},
        "rollout": {"max_new_tokens": 8, "num_threads": 1},
        "train": {"steps": 2, "lr": 5e-2, "micro_batch_size": 4, "num_threads": 1},
        "scoring": {"workers": 0},
        "logging": {"progress": False},
    }
    trainer = OnlineTrainer(validate_config(recipe))
    try:
        # The config refuses sleep without rollout GPUs (on CPU it frees nothing); set after validation, the loop
        # makes its real calls and the CPU engine really refuses to generate while asleep.
        trainer.cfg.rollout.sleep_level = 2
        events: list = []
        trainer.pool = pool = RecordingPool(trainer.pool, events)
        sync = trainer.weight_sync
        trainer.__dict__["weight_sync"] = Recording("sync", sync, pool)
        trainer.learner = Learner(trainer.learner, pool)
        metrics = [trainer.train_step(step)[0] for step in (1, 2)]
        one_step = [
            ("generate", False),
            ("sleep 2", False),
            ("train", True),
            ("woke ['weights']", False),  # the hf engine has no KV cache: awake once its weights are
            ("sync", False),
            ("woke ['kv_cache']", False),
        ]
        assert events == one_step * 2
        assert all(m["time/sleep"] > 0 and m["time/wake"] > 0 and m["updates"] == 1 for m in metrics)
        # the sync into the woken engine arrived: it holds the learner's weights bitwise
        learner_w = ray.get(trainer.learner.get_weights.remote(False))
        worker_w = ray.get(pool.workers[0].get_weights.remote())
        assert all(torch.equal(worker_w[name], tensor) for name, tensor in learner_w.items())
    finally:
        trainer.scorer.close()
        for actor in [trainer.learner.actor, *trainer.pool.workers]:
            ray.kill(actor)


# ------------------------------------------------------------------------------------------------------- GPU


def _free_bytes(worker) -> int:
    """Free memory of the GPU as the worker's process sees it (vLLM's allocations are outside torch's allocator)."""
    import ray

    return ray.get(worker.__ray_call__.remote(lambda _: (torch.cuda.synchronize(), torch.cuda.mem_get_info()[0])[1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's sleep mode needs a CUDA GPU")
def test_colocated_vllm_sleeps_during_training_and_generates_with_the_synced_weights(tmp_path, ray_session):
    ray = ray_session
    recipe = {
        "name": "sleep-gpu",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path(num_heads=2))},
        "data": {"kind": "arithmetic", "num_problems": 8, "seed": 1, "max_value": 9},
        "rewards": [{"fn": f"{LENGTH_REWARD}:length_reward"}],
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 2, "advantage_std": "none"},
        "rollout": {"engine": "vllm", "sleep_level": 2, "gpu_memory_utilization": 0.3, "max_new_tokens": 8},
        "train": {"steps": 2, "lr": 5e-2, "micro_batch_size": 4},
        "placement": ONE_GPU,
        "scoring": {"workers": 0},
        "logging": {"progress": False},
    }
    trainer = OnlineTrainer(validate_config(recipe))
    worker = trainer.pool.workers[0]
    try:
        metrics = [trainer.train_step(step)[0] for step in (1, 2)]
        assert all(m["time/sleep"] > 0 and m["time/wake"] > 0 and m["updates"] == 1 for m in metrics)
        awake = _free_bytes(worker)
        trainer.pool.sleep(2)
        freed = _free_bytes(worker) - awake
        trainer.pool.wake_up()
        total = ray.get(worker.__ray_call__.remote(lambda _: torch.cuda.get_device_properties(0).total_memory))
        assert freed > 0.2 * total, (freed, total)  # most of vLLM's 30% is KV cache
        # after the step's sleep, wake and sync the engine decodes greedily with the learner's new weights
        learner_w = ray.get(trainer.learner.get_weights.remote(False))
        worker_w = ray.get(worker.get_weights.remote())
        assert all(torch.equal(worker_w[name], tensor) for name, tensor in learner_w.items())
        model = load_model(recipe["model"]["path"]).to("cuda").eval()
        model.load_state_dict({k: v.to("cuda") for k, v in learner_w.items()}, strict=True)
        prompts = trainer.format(trainer.train_rows[:3])
        for result in trainer.pool.generate(prompts, SamplingParams(n=1, temperature=0, max_new_tokens=8)):
            completion, start = result.completions[0], len(result.prompt_token_ids)
            ids = torch.tensor([result.prompt_token_ids + completion.token_ids], device="cuda")
            with torch.no_grad():
                lp_LV = torch.log_softmax(model(ids).logits[0, start - 1 : -1].float(), dim=-1).cpu()
            chosen = lp_LV.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
            assert float((lp_LV.max(-1).values - chosen).max()) < 1e-3  # each token the learner's argmax
            assert float((torch.tensor(completion.logprobs) - chosen).abs().max()) < 1e-3
    finally:
        trainer.scorer.close()
        trainer.placement.remove()

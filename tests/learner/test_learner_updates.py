"""The learner in-process on a tiny random model: several updates per rollout batch (lp_old taken once, before the
first), GSPO, the SFT loss of online RFT, the KL estimators, and the settings a recipe turns into."""

import math

import pytest
import torch

from posttrain.config import validate_config
from posttrain.data.types import Sample
from posttrain.learner.batch import collate
from posttrain.learner.learner import LearnerImpl, LearnerSettings
from posttrain.models.logprobs import token_logprobs
from posttrain.models.lora import LoraSettings
from posttrain.models.tiny import tiny_model_path
from posttrain.online.components import learner_settings


def _batch(advantages=(1.0, -1.0, 0.5, -0.5, 2.0, 0.0)):
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(len(advantages)):
        prompt = torch.randint(3, 90, (3 + i % 3,), generator=gen).tolist()
        completion = torch.randint(3, 90, (2 + (2 * i) % 5,), generator=gen).tolist()
        samples.append(Sample("p", prompt, "c", completion, [0.0] * len(completion), "stop", i // 2))
    return collate(samples, list(advantages), pad_token_id=0, max_completion_tokens=8)


def _learner(**kw) -> LearnerImpl:
    settings = dict(model_path=str(tiny_model_path()), lr=5e-2, micro_batch_size=4, num_threads=1, seed=0)
    return LearnerImpl(LearnerSettings(**{**settings, **kw}))


def test_one_update_per_batch_has_ratio_one_and_no_extra_pass():
    metrics = _learner().train_step(_batch())
    assert metrics["updates"] == 1.0
    assert metrics["ratio/min"] == metrics["ratio/max"] == 1.0 and metrics["clip_fraction"] == 0.0
    assert math.isnan(metrics["kl"])  # full weights, no KL: no reference


def test_several_updates_use_lp_old_from_before_the_first_update():
    learner = _learner(epochs_per_batch=2, mini_batches=2)
    metrics = learner.train_step(_batch())
    assert metrics["updates"] == 4.0 and learner.steps_done == 4
    # with lp_old recomputed per update the ratio would stay exactly 1; from the second update on it moves
    assert metrics["ratio/max"] > 1.001 or metrics["ratio/min"] < 0.999
    assert 0.0 <= metrics["clip_fraction"] <= 1.0 and metrics["grad_norm"] > 0


def test_lp_old_brought_by_the_batch_is_used_as_is():
    learner = _learner(epochs_per_batch=1, mini_batches=1)
    batch = _batch()
    lp_BC, ref_BC = learner.logprobs(batch)
    assert ref_BC is None
    batch.old_logprobs_BC = lp_BC - 0.1  # as if the sampling policy were e^0.1 less likely on every token
    metrics = learner.train_step(batch)
    assert metrics["ratio/min"] == pytest.approx(math.exp(0.1), abs=1e-4)
    assert metrics["ratio/max"] == pytest.approx(math.exp(0.1), abs=1e-4)


def test_logprobs_are_padding_invariant_and_match_a_plain_forward():
    learner = _learner()
    batch = _batch()
    lp_BC, _ = learner.logprobs(batch)
    for i in range(len(batch)):
        row = batch.slice(i, i + 1)  # the row alone, all padding trimmed
        alone_1C, _ = token_logprobs(
            learner.model, row.input_ids_BT, row.attention_mask_BT, 1.0, False, row.prompt_width
        )
        c = row.loss_mask_BC.shape[1]
        torch.testing.assert_close(lp_BC[i, :c], alone_1C[0], atol=1e-5, rtol=0)
        assert torch.equal(lp_BC[i, c:], torch.zeros(lp_BC.shape[1] - c))


def test_sft_loss_is_the_token_mean_nll_of_the_batch():
    learner = _learner(loss="sft")
    batch = _batch()
    lp_BC, _ = learner.logprobs(batch)
    mask = batch.loss_mask_BC
    expected = float(-(lp_BC * mask).sum() / mask.sum())
    metrics = learner.train_step(batch)
    assert metrics["loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["nll"] == pytest.approx(expected, abs=1e-5) and "ratio/min" not in metrics
    after = float(-(learner.logprobs(batch)[0] * mask).sum() / mask.sum())
    assert after < expected  # one step of SFT made the completions likelier


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_in_the_loss_start_at_zero_with_a_frozen_reference(estimator):
    learner = _learner(kl_coef=0.1, kl_estimator=estimator, epochs_per_batch=2)
    assert learner.ref_model is not None
    metrics = learner.train_step(_batch())
    assert metrics["updates"] == 2.0
    assert metrics["kl"] != 0.0 and math.isfinite(metrics["kl"])  # the second update sees a moved policy
    assert learner.logprobs(_batch())[1] is not None


@pytest.mark.parametrize(
    ("kl", "adapter_off_passes"),
    [(dict(kl_coef=0.0), 0), (dict(kl_coef=0.1), 2), (dict(kl_coef=0.0, reference=True), 2)],
    ids=["no-kl", "kl-in-loss", "kl-in-reward"],
)
def test_lora_reference_pass_runs_only_when_a_kl_uses_it(kl, adapter_off_passes):
    """With LoRA the reference is the adapter switched off; that forward (one per micro-batch: 6 rows / 4 = 2) is
    made only when a KL needs it, and `kl` is logged only then."""
    learner = _learner(lora=LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]), **kl)
    calls, disable = [], learner.model.disable_adapter
    learner.model.disable_adapter = lambda: calls.append(1) or disable()
    metrics = learner.train_step(_batch())
    assert len(calls) == adapter_off_passes
    assert math.isfinite(metrics["kl"]) == (adapter_off_passes > 0)
    assert (learner.logprobs(_batch())[1] is None) == (adapter_off_passes == 0)


def test_gspo_sequence_ratio_runs_several_updates():
    learner = _learner(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, mini_batches=3, dual_clip=3.0)
    metrics = learner.train_step(_batch())
    assert metrics["updates"] == 3.0
    assert metrics["clip_fraction"] > 0  # sequence ratios leave a 4e-4 range once the policy moves
    assert "dual_clip_fraction" in metrics


def test_learner_settings_from_a_recipe():
    recipe = {
        "model": {"path": "m"},
        "data": {"kind": "arithmetic"},
        "rewards": [{"fn": "math_accuracy"}],
        "algorithm": {
            "name": "reinforce_pp",
            "kl_coef": 0.01,
            "kl_in": "reward",
            "kl_estimator": "k1",
            "epochs_per_batch": 2,
            "mini_batches": 2,
            "dual_clip": 3.0,
            "ratio_level": "sequence",
        },
        "train": {"steps": 10, "warmup_steps": 2},
    }
    s = learner_settings(validate_config(recipe), "m")
    assert (s.loss, s.kl_coef, s.reference, s.kl_estimator) == ("policy", 0.0, True, "k1")  # KL not in the loss
    assert (s.total_steps, s.warmup_steps) == (40, 8)  # the schedule counts optimizer steps: 4 per rollout batch
    assert (s.dual_clip, s.ratio_level, s.epochs_per_batch, s.mini_batches) == (3.0, "sequence", 2, 2)
    recipe["algorithm"] = {"name": "rft", "kl_coef": 0.05}
    s = learner_settings(validate_config(recipe), "m")
    assert (s.loss, s.kl_coef, s.reference) == ("sft", 0.05, True)


def test_bf16_autocast_is_opt_in_and_close_to_float32():
    recipe = {"model": {"path": "m"}, "data": {"kind": "arithmetic"}, "rewards": [{"fn": "math_accuracy"}]}
    assert learner_settings(validate_config(recipe), "m").autocast == "none"
    recipe["train"] = {"autocast": "bf16"}
    assert learner_settings(validate_config(recipe), "m").autocast == "bf16"
    with pytest.raises(ValueError, match="autocast"):
        validate_config({**recipe, "train": {"autocast": "fp8"}})
    fp32, bf16 = _learner().train_step(_batch()), _learner(autocast="bf16").train_step(_batch())
    # with one update the loss is -mean(A) whatever the log-probs; the entropy shows the bf16 body's rounding
    assert fp32["entropy"] != bf16["entropy"] and bf16["entropy"] == pytest.approx(fp32["entropy"], abs=0.02)
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=0.05)

"""PPO's critic in-process on a tiny random model: value head positions and shapes, the clipped value loss it reports
against a direct computation, training lowering the loss, LoRA, checkpoints, and the settings a recipe turns into."""

import pytest
import torch

from posttrain.config import validate_config
from posttrain.data.types import Sample
from posttrain.learner.batch import collate
from posttrain.learner.critic import CriticImpl, CriticSettings
from posttrain.models.logprobs import position_ids_from_mask
from posttrain.models.tiny import tiny_model_path
from posttrain.online.ppo import critic_settings


def _batch(num: int = 5):
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(num):
        prompt = torch.randint(3, 90, (3 + i % 3,), generator=gen).tolist()
        completion = torch.randint(3, 90, (2 + (2 * i) % 5,), generator=gen).tolist()
        samples.append(Sample("p", prompt, "c", completion, [0.0] * len(completion), "stop", i))
    return collate(samples, [0.0] * num, pad_token_id=0, max_completion_tokens=8)


def _critic(**kw) -> CriticImpl:
    settings = dict(model_path=str(tiny_model_path()), lr=1e-2, micro_batch_size=2, num_threads=1, seed=0)
    return CriticImpl(CriticSettings(**{**settings, **kw}))


def test_values_are_read_from_the_state_before_each_completion_token():
    critic, batch = _critic(), _batch()
    values = critic.values(batch)
    assert values.shape == batch.loss_mask_BC.shape and values.dtype == torch.float32
    assert torch.equal(values[batch.loss_mask_BC == 0], torch.zeros(int((batch.loss_mask_BC == 0).sum())))
    # direct: the whole batch through the backbone at once, head on the hidden state one column before each token
    P = batch.prompt_width
    with torch.no_grad():
        hidden = critic.model.backbone(
            input_ids=batch.input_ids_BT,
            attention_mask=batch.attention_mask_BT,
            position_ids=position_ids_from_mask(batch.attention_mask_BT),
        ).last_hidden_state
        direct = critic.model.value_head(hidden[:, P - 1 : -1]).squeeze(-1) * batch.loss_mask_BC
    torch.testing.assert_close(values, direct, atol=1e-5, rtol=0)
    # a token's value does not depend on the token itself, only on what came before it
    changed = _batch()
    row, last = 4, int(batch.completion_lengths_B[4]) - 1
    changed.input_ids_BT[row, P + last] = 3 + (int(changed.input_ids_BT[row, P + last]) - 2) % 80
    moved = critic.values(changed)
    torch.testing.assert_close(moved, values, atol=1e-6, rtol=0)
    changed.input_ids_BT[row, P] += 1  # the first completion token moves the values of every later one
    assert not torch.allclose(critic.values(changed)[row, 1 : last + 1], values[row, 1 : last + 1])


def _with_targets(batch, values, returns):
    batch.old_values_BC, batch.returns_BC = values, returns
    return batch


def test_reported_value_loss_matches_a_direct_clipped_computation():
    critic, batch = _critic(value_clip=0.1), _batch()
    mask = batch.loss_mask_BC
    values = critic.values(batch)
    gen = torch.Generator().manual_seed(1)
    old = (values + 0.3 * torch.randn(values.shape, generator=gen)) * mask  # some tokens move beyond old +- 0.1
    returns = torch.rand(values.shape, generator=gen) * mask
    metrics = critic.train_step(_with_targets(batch, old, returns))
    clipped = old + (values - old).clamp(-0.1, 0.1)
    per_token = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    expected = float((per_token * mask).sum() / mask.sum())
    assert metrics["critic/value_loss"] == pytest.approx(expected, abs=1e-6)
    clipfrac = float((((clipped - returns) ** 2 > (values - returns) ** 2).float() * mask).sum() / mask.sum())
    assert metrics["critic/value_clipfrac"] == pytest.approx(clipfrac, abs=1e-6) and 0 < clipfrac < 1
    assert metrics["critic/updates"] == 1 and metrics["critic/grad_norm"] > 0


def test_a_few_steps_lower_the_value_loss_on_a_fixed_batch():
    critic, batch = _critic(epochs_per_batch=2, mini_batches=2), _batch()
    returns = torch.where(batch.loss_mask_BC.bool(), 1.0, 0.0)  # every token's return is 1
    losses = []
    for _ in range(6):
        metrics = critic.train_step(_with_targets(batch, critic.values(batch), returns))
        assert metrics["critic/updates"] == 4
        losses.append(metrics["critic/value_loss"])
    assert losses[-1] < 0.2 * losses[0], losses


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_lora_critic_trains_adapters_and_head_and_resumes_from_its_checkpoint(tmp_path, quantize):
    from posttrain.models.lora import LoraSettings

    critic, batch = _critic(lora=LoraSettings(rank=4, alpha=8), quantize=quantize), _batch()
    if quantize != "none":  # QLoRA: the backbone's linear layers are 4-bit, the value head float32
        assert type(critic.model.backbone.layers[0].mlp.up_proj.weight).__name__ == "Params4bit"
        assert critic.model.value_head.weight.dtype == torch.float32
    trainable = [n for n, p in critic.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    assert any(n.startswith("value_head") for n in trainable)
    returns = torch.where(batch.loss_mask_BC.bool(), 1.0, 0.0)
    critic.train_step(_with_targets(batch, critic.values(batch), returns))
    critic.save_checkpoint(str(tmp_path))
    saved = critic.values(batch)
    after_save = critic.train_step(_with_targets(batch, saved, returns))
    assert not torch.allclose(critic.values(batch), saved)

    fresh = _critic(lora=LoraSettings(rank=4, alpha=8), quantize=quantize)
    assert fresh.load_checkpoint(str(tmp_path)) == 1
    torch.testing.assert_close(fresh.values(batch), saved, atol=0, rtol=0)
    again = fresh.train_step(_with_targets(batch, saved, returns))  # optimizer state restored: the same step
    assert again["critic/value_loss"] == pytest.approx(after_save["critic/value_loss"], abs=1e-6)
    with pytest.raises(FileNotFoundError, match="has no critic"):
        fresh.load_checkpoint(str(tmp_path / "nowhere"))


def test_train_step_refuses_a_batch_without_returns():
    with pytest.raises(ValueError, match="returns_BC and old_values_BC"):
        _critic().train_step(_batch())


def test_recipe_to_critic_settings():
    raw = {
        "model": {"path": "m", "lora": {"rank": 4, "alpha": 8}},
        "data": {"kind": "arithmetic"},
        "rewards": [{"fn": "math_accuracy"}],
        "algorithm": {"name": "ppo", "samples_per_prompt": 1, "epochs_per_batch": 2, "mini_batches": 3},
        "ppo": {"critic_lr": 3e-4, "value_clip": None},
        "train": {"steps": 10, "lr": 1e-5, "warmup_steps": 2},
    }
    s = critic_settings(validate_config(raw), "m")
    assert (s.lr, s.value_clip, s.lora.rank, s.epochs_per_batch, s.mini_batches) == (3e-4, None, 4, 2, 3)
    assert (s.total_steps, s.warmup_steps) == (60, 12)  # optimizer steps: rollout batches x 6 updates
    raw["ppo"] = {}
    assert critic_settings(validate_config(raw), "m").lr == 1e-5  # default: the policy's LR
    raw["model"]["quantize"] = "nf4"
    assert critic_settings(validate_config(raw), "m").quantize == "nf4"  # QLoRA: the critic's backbone too

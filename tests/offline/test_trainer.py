"""The offline trainer on the tiny model: accumulation invariance, the reference modes, resume, and the CLI recipes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import ConfigError, load_config, validate_config
from posttrain.offline.trainer import REFERENCE_FILE, OfflineTrainer

from .conftest import PREFERENCE_ROWS, SFT_ROWS, offline_config

ROOT = Path(__file__).resolve().parents[2]

CHAT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a + b}"},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "yes" if a % 2 else "I am sure"},
        ]
    }
    for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]
]


def _grads(trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "name, rows, sections",
    [
        ("sft", SFT_ROWS, {}),
        ("sft", CHAT_ROWS, {}),
        ("dpo", PREFERENCE_ROWS, {"preference": {"loss_type": "ipo"}}),
        ("orpo", PREFERENCE_ROWS, {}),
        ("reward_model", PREFERENCE_ROWS, {"reward_model": {"margin_column": "margin", "center_coef": 0.1}}),
    ],
)
def test_one_by_four_and_four_by_one_accumulation_give_the_same_loss_and_gradient(
    tmp_path, tiny_path, name, rows, sections
):
    results = []
    for micro in (4, 1):
        train = {"micro_batch_size": micro, "max_grad_norm": 1e9}
        cfg = offline_config(tmp_path / str(micro), tiny_path, name, rows, train=train, **sections)
        trainer = OfflineTrainer(cfg)
        metrics = trainer.train_step([0, 1, 2, 3])
        results.append((metrics, _grads(trainer)))
    (m4, g4), (m1, g1) = results
    assert m4["loss"] == pytest.approx(m1["loss"], abs=1e-5)
    assert g4.keys() == g1.keys() and len(g4) > 0
    for key in g4:
        torch.testing.assert_close(g4[key], g1[key], atol=1e-5, rtol=1e-4)
    # the logged metrics are weighted averages over the step, so they agree too
    for key in m4:
        if not key.startswith(("time/", "grad_norm")):
            assert m4[key] == pytest.approx(m1[key], abs=1e-5), key


def test_precomputed_reference_gives_the_losses_of_a_live_reference_and_holds_no_reference_model(tmp_path, tiny_path):
    losses = {}
    for precompute in (False, True):
        pref = {"precompute_reference": precompute, "beta": 0.5}
        cfg = offline_config(tmp_path / str(precompute), tiny_path, "dpo", PREFERENCE_ROWS, preference=pref)
        trainer = OfflineTrainer(cfg)
        assert (trainer.ref_model is None) == precompute
        assert (trainer.run_dir / REFERENCE_FILE).exists() == precompute
        losses[precompute] = [trainer.train_step([0, 1, 2, 3])["loss"] for _ in range(3)]
    assert losses[False][0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert losses[False][2] < losses[False][0] - 1e-3  # it trains, so the later steps test the reference
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_lora_dpo_uses_the_base_model_as_reference(tmp_path, tiny_path):
    cfg = offline_config(tmp_path, tiny_path, "dpo", PREFERENCE_ROWS, model={"lora": {"rank": 4}}, train={"lr": 1e-2})
    trainer = OfflineTrainer(cfg)
    assert trainer.ref_model is None
    first, second = (trainer.train_step([0, 1, 2, 3]) for _ in range(2))
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapter B = 0: the policy is the base
    assert first["rewards/margin"] == 0.0 and second["rewards/margin"] > 0
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_resume_continues_exactly_where_the_checkpoint_left(tmp_path, tiny_path):
    def config(out, steps, resume=None):
        cfg = offline_config(
            out,
            tiny_path,
            "dpo",
            PREFERENCE_ROWS,
            preference={"precompute_reference": True},
            train={"steps": steps, "batch_size": 2, "micro_batch_size": 1},
            checkpoint={"every_steps": 2},
        )
        return cfg.model_copy(update={"resume": resume}) if resume else cfg

    straight = OfflineTrainer(config(tmp_path / "a", 4)).run()
    first = OfflineTrainer(config(tmp_path / "b", 2)).run()
    resumed = OfflineTrainer(config(tmp_path / "b", 4, resume=str(first))).run()
    assert resumed == first

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(resumed)) == 4
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)


def _posttrain(*args):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


EXPECTED_METRICS = {
    "sft": {"loss", "nll", "grad_norm", "lr", "epoch"},
    "dpo": {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen"},
    "orpo": {"loss", "nll", "log_odds_ratio", "accuracy", "log_odds_chosen", "log_odds_rejected"},
    "reward_model": {"loss", "accuracy", "margin", "chosen", "rejected", "grad_norm"},
}


@pytest.mark.heavy  # `posttrain train` subprocesses
@pytest.mark.parametrize("method", ["sft", "dpo", "orpo", "reward_model"])
def test_shipped_recipe_runs_from_the_cli_and_leaves_a_loadable_final_model(tmp_path, tiny_path, method):
    proc = _posttrain(
        "train",
        f"recipes/{method}.yaml",
        f"model.path={tiny_path}",
        f"output_dir={tmp_path}",
        "train.epochs=null",
        "train.steps=3",
        "train.num_threads=1",
        "logging.progress=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = tmp_path.glob(f"{method}-*")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert EXPECTED_METRICS[method] <= rows[0].keys()
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert rows[-1]["loss"] != rows[0]["loss"]  # the weights moved
    assert (run / "curves.png").is_file() and (run / "checkpoints" / "step-3").is_dir()
    import transformers

    auto = transformers.AutoModelForSequenceClassification if method == "reward_model" else None
    auto = auto or transformers.AutoModelForCausalLM
    model = auto.from_pretrained(run / "final")
    if method == "reward_model":
        assert model.config.num_labels == 1
        score = model(input_ids=torch.tensor([[1, 5, 6, 2]])).logits
        assert score.shape == (1, 1)


def test_offline_recipes_need_no_rewards_but_online_ones_do(tmp_path):
    base = {"model": {"path": "m"}, "data": {"kind": "file", "path": "x.jsonl"}}
    assert validate_config({**base, "algorithm": {"name": "dpo"}}).rewards == []
    with pytest.raises(ConfigError, match="rewards: algorithm.name=grpo needs at least one reward"):
        validate_config(base)
    with pytest.raises(ConfigError, match="data.kind: sft trains on a dataset; allowed: file, hub"):
        validate_config({**base, "data": {"kind": "arithmetic"}, "algorithm": {"name": "sft"}})


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "preference.label_smoothing=0.1",
            "preference.label_smoothing: only used by algorithm.name=dpo with loss_type",
        ),
        ("preference.loss_type=kto", "`preference.loss_type`: Input should be 'sigmoid', 'ipo', 'hinge' or 'robust'"),
        ("algorithm.name=orpo", "preference.beta: only dpo reads this key (got orpo); remove it"),
        ("eval.data={kind: file, path: x.jsonl}", "eval.data: held-out evaluation is not available for dpo yet"),
        ("sft.packing=true", "sft: only algorithm.name=sft uses this section (got dpo; it sets sft.packing)"),
        ("train.epochs=0", "`train.epochs`: Input should be greater than 0"),
        ("preference.betta=1", "unknown key `preference.betta` (did you mean `preference.beta`?)"),
    ],
)
def test_offline_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "recipes/dpo.yaml", [override])
    assert message in str(err.value)


def test_precompute_reference_is_refused_without_a_reference_model():
    with pytest.raises(ConfigError, match="preference.precompute_reference: only dpo reads this key"):
        load_config(ROOT / "recipes/orpo.yaml", ["preference.precompute_reference=true"])


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_qlora_trains_adapters_on_a_4bit_base_and_saves_a_full_precision_merge(tmp_path, tiny_path, method):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    lora = {"rank": 4, "target_modules": ["q_proj", "v_proj"]}
    rows = PREFERENCE_ROWS if method == "dpo" else SFT_ROWS
    cfg = offline_config(
        tmp_path, tiny_path, method, rows, model={"lora": lora, "quantize": "nf4"}, train={"steps": 3, "lr": 1e-2}
    )
    trainer = OfflineTrainer(cfg)
    base = trainer.model.get_base_model()
    assert isinstance(base.model.layers[0].mlp.up_proj, Linear4bit)  # every linear layer is 4-bit, not just targets
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    run = trainer.run()
    rows_logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if method == "dpo":
        assert rows_logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # reference = the 4-bit base
    assert rows_logged[-1]["loss"] < rows_logged[0]["loss"]
    original = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    final = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    # layers without an adapter keep their exact full-precision weights; adapted ones moved
    assert torch.equal(final["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(
        final["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"]
    )


def test_qlora_is_refused_without_lora_or_with_adapter_syncs(tmp_path):
    with pytest.raises(ConfigError, match="model.quantize: 4-bit base weights"):
        load_config(ROOT / "recipes/sft.yaml", ["model.quantize=nf4", "model.lora=null"])
    with pytest.raises(ConfigError, match="model.quantize: 4-bit base weights"):
        load_config(ROOT / "recipes/quickstart.yaml", ["model.quantize=nf4", "model.lora=null"])
    assert load_config(ROOT / "recipes/quickstart.yaml", ["model.quantize=nf4"]).model.quantize == "nf4"  # online
    # vLLM adapter syncs would put the adapter on the engine's full-precision base, not the learner's 4-bit one
    with pytest.raises(ConfigError, match="rollout.lora_sync: `adapter` would apply the adapter"):
        load_config(
            ROOT / "recipes/quickstart.yaml", ["model.quantize=nf4", "rollout.engine=vllm", "rollout.lora_sync=adapter"]
        )


def test_a_trained_reward_model_scores_the_same_through_the_reward_model_reward(tmp_path, tiny_path):
    from posttrain.offline import objectives as obj
    from posttrain.rewards.reward_model import RewardModelScorer

    cfg = offline_config(tmp_path, tiny_path, "reward_model", PREFERENCE_ROWS, train={"steps": 2})
    trainer = OfflineTrainer(cfg)
    run = trainer.run()
    trainer.model.eval()
    with torch.no_grad():
        ours = obj.reward_scores(trainer.model, obj.pair_batch(trainer.rows, trainer.pad_id)).tolist()
    scorer = RewardModelScorer(str(run / "final"), device="cpu")
    prompts = [r["prompt"] for r in PREFERENCE_ROWS] * 2
    completions = [r["chosen"] for r in PREFERENCE_ROWS] + [r["rejected"] for r in PREFERENCE_ROWS]
    # the reward scores the text training saw (chat template, end-of-turn included), so the scores agree
    assert scorer.score(prompts, completions) == pytest.approx(ours, abs=1e-5)
    assert len(set(round(s, 4) for s in ours)) > 1  # not a constant head


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_lora_reward_model_trains_adapters_and_its_head_and_saves_a_plain_classifier(tmp_path, tiny_path, quantize):
    if quantize != "none":
        pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForSequenceClassification

    from posttrain.offline import objectives as obj

    model = {"lora": {"rank": 4}, "quantize": quantize}
    cfg = offline_config(tmp_path, tiny_path, "reward_model", PREFERENCE_ROWS, model=model, train={"steps": 3})
    trainer = OfflineTrainer(cfg)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)
    run = trainer.run()
    saved = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    trainer.model.eval()
    batch = obj.pair_batch(trainer.rows, trainer.pad_id)
    with torch.no_grad():
        ours, theirs = obj.reward_scores(trainer.model, batch), obj.reward_scores(saved, batch)
    if quantize == "none":  # the merged folder computes what the adapter model computes
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    else:  # merged into the full-precision base: close to the 4-bit model, not equal
        assert (theirs - ours).abs().max() < 0.5 * ours.abs().max()


@pytest.mark.parametrize("rows, completion_only", [(SFT_ROWS, True), (CHAT_ROWS, True), (CHAT_ROWS, False)])
def test_packed_and_padded_sft_give_the_same_loss_and_gradient(tmp_path, tiny_path, rows, completion_only):
    results = {}
    for packing in (False, True):
        cfg = offline_config(
            tmp_path / str(packing),
            tiny_path,
            "sft",
            rows,
            sft={"packing": packing, "completion_only": completion_only},
            train={"max_length": 512, "max_grad_norm": 1e9},
        )
        trainer = OfflineTrainer(cfg)
        assert len(trainer.rows) == (1 if packing else 4)  # all four sequences fit in one packed row
        results[packing] = (trainer.train_step(list(range(len(trainer.rows)))), _grads(trainer))
    (m_pad, g_pad), (m_pack, g_pack) = results[False], results[True]
    # equal only if attention stays inside each packed sequence and the positions restart
    assert m_pack["loss"] == pytest.approx(m_pad["loss"], abs=1e-5)
    for key in g_pad:
        torch.testing.assert_close(g_pack[key], g_pad[key], atol=1e-5, rtol=1e-4)


def test_epochs_set_the_number_of_steps_and_the_logged_epoch(tmp_path, tiny_path):
    train = {"epochs": 1.5, "batch_size": 2, "micro_batch_size": 2}
    cfg = offline_config(tmp_path, tiny_path, "orpo", PREFERENCE_ROWS, train=train)
    trainer = OfflineTrainer(cfg)
    assert trainer.total_steps == 3  # ceil(1.5 * 4 rows / 2 per step)
    run = trainer.run()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0.5, 1.0, 1.5]


def test_warmup_longer_than_the_epochs_is_refused_naming_the_keys(tmp_path, tiny_path):
    train = {"epochs": 1, "batch_size": 2, "warmup_steps": 5}
    cfg = offline_config(tmp_path, tiny_path, "sft", SFT_ROWS, train=train)  # epochs: steps are not known yet
    with pytest.raises(ConfigError, match=r"train.warmup_steps \(5\) must be <= the run's 2 steps \(train.epochs=1"):
        OfflineTrainer(cfg)

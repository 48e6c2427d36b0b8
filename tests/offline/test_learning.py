"""Learning tests: each offline method, on its shipped recipe's toy data and the tiny model, improves its objective.

The data are the recipes' own files (recipes/data/): which of two digits is larger (preferences) and single-digit
additions (SFT). A random tiny model knows neither; 40-60 steps of full-weight training must move the metric far
from where it starts. A few seconds each on 2 cores.
"""

import json
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from posttrain.offline import objectives as obj
from posttrain.offline.data import ChatTokenizer
from posttrain.offline.trainer import OfflineTrainer

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _train(tmp_path, tiny_path, method: str, steps: int, lr: float, *extra: str) -> tuple[OfflineTrainer, list[dict]]:
    overrides = [
        f"model.path={tiny_path}",
        "model.lora=null",
        f"output_dir={tmp_path}",
        "train.epochs=null",
        f"train.steps={steps}",
        f"train.lr={lr}",
        "train.num_threads=2",
        "checkpoint.every_steps=1000",
        "logging.progress=false",
        *extra,
    ]
    cfg = load_config(ROOT / f"recipes/{method}.yaml", overrides)
    trainer = OfflineTrainer(cfg)
    run = trainer.run()
    return trainer, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _last(rows: list[dict], key: str, n: int = 4) -> float:
    return sum(r[key] for r in rows[-n:]) / n


def test_sft_drives_the_completion_nll_down_on_train_and_held_out_additions(tmp_path, tiny_path):
    held_out = [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}"} for a, b in [(7, 7), (0, 8)]]
    trainer, rows = _train(tmp_path, tiny_path, "sft", 40, 3e-3)
    assert rows[0]["nll"] > 5.0  # ~ln(vocabulary) for a random model
    assert _last(rows, "nll") < 1.0
    # the "a + b = " format generalises to additions it never saw
    tok = ChatTokenizer(trainer.tokenizer, None, True, 256)
    seqs = [tok.prompt_completion(r["prompt"], r["completion"], "held-out") for r in held_out]
    with torch.no_grad():
        _, metrics, _ = obj.sft_micro_loss(trainer.model, seqs, trainer.pad_id, step_tokens=1.0)
    assert metrics["nll"] < 2.0


def test_dpo_reaches_high_preference_accuracy_and_pushes_rejected_down(tmp_path, tiny_path):
    _, rows = _train(tmp_path, tiny_path, "dpo", 40, 1e-3)
    assert rows[0]["rewards/accuracy"] == 0.0 and rows[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert _last(rows, "rewards/accuracy") >= 0.9
    assert _last(rows, "loss") < 0.35
    assert _last(rows, "rewards/chosen") > 0 > _last(rows, "rewards/rejected")


def test_dpo_with_precomputed_reference_learns_too(tmp_path, tiny_path):
    trainer, rows = _train(tmp_path, tiny_path, "dpo", 40, 1e-3, "preference.precompute_reference=true")
    assert trainer.ref_model is None
    assert _last(rows, "rewards/accuracy") >= 0.9 and _last(rows, "loss") < 0.35


def test_orpo_learns_the_chosen_answers_and_separates_the_odds(tmp_path, tiny_path):
    _, rows = _train(tmp_path, tiny_path, "orpo", 40, 3e-3)
    assert rows[0]["nll"] - _last(rows, "nll") > 4.0
    assert _last(rows, "accuracy") >= 0.9
    assert _last(rows, "log_odds_ratio") > 2.0


def test_reward_model_ranks_chosen_above_rejected(tmp_path, tiny_path):
    trainer, rows = _train(tmp_path, tiny_path, "reward_model", 40, 1e-3)
    assert rows[0]["accuracy"] < 0.7 and _last(rows, "accuracy") >= 0.9
    assert _last(rows, "loss") < rows[0]["loss"] / 3  # margins in the data: the loss cannot reach 0 fast
    # the saved folder scores like the trained model (what the reward_model reward loads)
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(trainer.run_dir / "final").eval()
    batch = obj.pair_batch(trainer.rows[:4], trainer.pad_id)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(obj.reward_scores(saved, batch), obj.reward_scores(trainer.model, batch))

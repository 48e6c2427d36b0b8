"""The `reward_model` reward: a sequence-classification model scoring prompt + completion, batched, in Ray."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig

from posttrain.models.loading import load_tokenizer
from posttrain.models.tiny import build_tiny_tokenizer
from posttrain.rewards.loading import build_reward_specs
from posttrain.rewards.reward_model import reward_model, reward_model_text
from posttrain.rewards.workers import RewardPool

PROMPTS = ["What is 2 + 2?", [{"role": "user", "content": "Say hi"}], "Name a color.", "x"]
COMPLETIONS = ["4", "hi there, how are you today?", [{"role": "assistant", "content": "blue"}], ""]


def _tiny_reward_model(path, num_labels=1):
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory):
    return str(_tiny_reward_model(tmp_path_factory.mktemp("rm")))


def _one_by_one(path):
    """The expected scores: each text alone, unpadded, straight through the model."""
    tokenizer = load_tokenizer(path, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    texts = [c if isinstance(c, str) else c[0]["content"] for c in COMPLETIONS]
    scores = []
    for prompt, text in zip(PROMPTS, texts, strict=True):
        ids = tokenizer(reward_model_text(tokenizer, prompt, text), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            scores.append(model(**ids).logits[0, 0].item())
    return scores


def test_text_is_the_conversation_through_the_chat_template(rm_path):
    tokenizer = load_tokenizer(rm_path)
    assert (
        reward_model_text(tokenizer, "Q?", "A.")
        == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
    )


def test_scores_in_process_equal_unbatched_forward_passes(rm_path):
    got = reward_model(PROMPTS, COMPLETIONS, model=rm_path, batch_size=3)
    assert got == pytest.approx(_one_by_one(rm_path), abs=1e-5)
    assert len(set(round(v, 4) for v in got)) == len(got)  # a real model, not a constant


def test_scores_through_a_ray_actor_shared_by_reward_workers(ray_session, rm_path):
    entries = [{"fn": "reward_model", "args": {"model": rm_path, "batch_size": 2}}]
    specs = build_reward_specs(entries, ["rm"])
    pool = RewardPool(entries, specs, workers=2)
    try:
        scores = pool.score(PROMPTS, COMPLETIONS, {})
        assert scores.per_function["rm"] == pytest.approx(_one_by_one(rm_path), abs=1e-5)
        named = ray_session.util.list_named_actors(all_namespaces=True)
        actors = [a for a in named if a["name"].startswith("posttrain-reward-model-")]
        assert len(actors) == 1  # both workers used the same loaded model
    finally:
        pool.close()


def test_a_model_with_several_outputs_is_refused(tmp_path):
    path = str(_tiny_reward_model(tmp_path / "two", num_labels=2))
    # ValueError in this process; RuntimeError naming the same cause when Ray runs the model in an actor
    with pytest.raises((ValueError, RuntimeError), match="has 2 outputs"):
        reward_model(["p"], ["c"], model=path)


def test_a_missing_model_folder_is_named(tmp_path):
    with pytest.raises((FileNotFoundError, RuntimeError), match="nowhere"):
        reward_model(["p"], ["c"], model=str(tmp_path / "nowhere"))


def test_the_model_argument_is_required_when_loading_the_recipe():
    with pytest.raises(ValueError, match=r"rewards\[0\].*needs \['model'\]"):
        build_reward_specs([{"fn": "reward_model"}], ["rm"])


def test_without_a_chat_template_the_text_is_prompt_completion_eos(rm_path):
    tokenizer = load_tokenizer(rm_path)
    tokenizer.chat_template = None
    assert reward_model_text(tokenizer, "Q?", "A.") == "Q?A.<|im_end|>"

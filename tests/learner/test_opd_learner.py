"""On-policy distillation in-process: the teacher's numbers, the tokenizer check, and the learner's two OPD losses on
tiny random models (teacher seed 0, student seed 1, one tokenizer) checked against direct computations."""

import pytest
import torch

from posttrain.algorithms.losses import generalized_jsd
from posttrain.algorithms.masked import masked_mean
from posttrain.config import validate_config
from posttrain.data.types import Sample
from posttrain.learner.batch import collate
from posttrain.learner.learner import LearnerImpl, LearnerSettings
from posttrain.learner.teacher import TeacherImpl, TeacherSettings, check_same_tokenizer
from posttrain.models.loading import load_model, load_tokenizer
from posttrain.models.logprobs import completion_logits, logprobs_from_logits, token_logprobs
from posttrain.models.tiny import build_tiny_model, tiny_model_path
from posttrain.online.components import learner_settings

TEMPERATURE = 0.8


def _batch(rows: int = 6):
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(rows):
        prompt = torch.randint(3, 90, (3 + i % 3,), generator=gen).tolist()
        completion = torch.randint(3, 90, (2 + (2 * i) % 5,), generator=gen).tolist()
        samples.append(Sample("p", prompt, "c", completion, [0.0] * len(completion), "stop", i // 2))
    return collate(samples, [0.0] * rows, pad_token_id=0, max_completion_tokens=8)


@pytest.fixture(scope="module")
def teacher() -> TeacherImpl:
    return TeacherImpl(TeacherSettings(str(tiny_model_path(seed=0)), temperature=TEMPERATURE, batch_size=4))


def _student(loss: str, teacher=None, **kw) -> LearnerImpl:
    settings = LearnerSettings(
        model_path=str(tiny_model_path(seed=1)),
        lr=1e-2,
        micro_batch_size=4,
        num_threads=1,
        temperature=TEMPERATURE,
        loss=loss,
        **kw,
    )
    return LearnerImpl(settings, teacher)


def test_completion_logits_give_token_logprobs():
    model = load_model(str(tiny_model_path(seed=1)))
    batch = _batch()
    P = batch.prompt_width
    expected, expected_entropy = token_logprobs(
        model, batch.input_ids_BT, batch.attention_mask_BT, TEMPERATURE, True, P
    )
    logits = completion_logits(model, batch.input_ids_BT, batch.attention_mask_BT, P)
    assert logits.shape == (*batch.loss_mask_BC.shape, model.config.vocab_size)
    lp, entropy = logprobs_from_logits(logits, batch.input_ids_BT[:, P:], batch.attention_mask_BT[:, P:], TEMPERATURE)
    torch.testing.assert_close(lp, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-6, rtol=0)


def test_teacher_logprobs_are_its_own_and_batched_like_one_pass(teacher):
    batch = _batch()
    model = load_model(str(tiny_model_path(seed=0)))
    P = batch.prompt_width
    direct, _ = token_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT, TEMPERATURE, False, P)
    torch.testing.assert_close(teacher.logprobs(batch), direct, atol=1e-5, rtol=0)  # two passes of 4 and 2 rows
    assert teacher.logits(batch).shape == (*batch.loss_mask_BC.shape, len(load_tokenizer(str(tiny_model_path()))))


def test_same_tokenizer_passes_and_a_different_one_is_refused_naming_both(tmp_path):
    student, teacher = str(tiny_model_path(seed=1)), str(tiny_model_path(seed=0))
    check_same_tokenizer(student, teacher)  # two random models, one tokenizer
    other = build_tiny_model(tmp_path / "other", seed=2)
    tokenizer = load_tokenizer(str(other))
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match="do not share a tokenizer") as info:
        check_same_tokenizer(student, str(other))
    assert student in str(info.value) and str(other) in str(info.value) and "<extra_token>" in str(info.value)
    eos = build_tiny_model(tmp_path / "eos", seed=2)  # same vocabulary, another eos token
    tokenizer = load_tokenizer(str(eos))
    tokenizer.eos_token = "<|pad|>"
    tokenizer.save_pretrained(eos)
    with pytest.raises(ValueError, match=r"eos_token_id 2 vs 0"):
        check_same_tokenizer(student, str(eos))


def test_reverse_kl_loss_is_the_sampled_reverse_kl_with_one_update(teacher):
    learner = _student("opd_reverse_kl")
    batch = _batch()
    batch.teacher_logprobs_BC = teacher.logprobs(batch)
    student_BC, _ = learner.logprobs(batch)
    expected = float(masked_mean(student_BC - batch.teacher_logprobs_BC, batch.loss_mask_BC))
    metrics = learner.train_step(batch)
    assert metrics["opd/reverse_kl"] == pytest.approx(expected, abs=1e-5)
    # ratio 1, A = lp_T - lp: the token-mean surrogate -mean(A) is the same number
    assert metrics["pg_loss"] == pytest.approx(expected, abs=1e-5) and metrics["ratio/max"] == 1.0
    after = float(masked_mean(learner.logprobs(batch)[0] - batch.teacher_logprobs_BC, batch.loss_mask_BC))
    assert after < expected - 0.05  # the step moved the student's log-probs towards the teacher's


def test_reward_coef_adds_the_sequence_advantages(teacher):
    batch = _batch()
    batch.teacher_logprobs_BC = teacher.logprobs(batch)
    batch.advantages_B = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0])
    plain = _student("opd_reverse_kl").train_step(batch)
    mixed = _student("opd_reverse_kl", reward_coef=0.5).train_step(batch)
    mask = batch.loss_mask_BC
    # -mean over tokens of 0.5 * A_seq (weighted by each sequence's tokens)
    shift = -float((0.5 * batch.advantages_B[:, None] * mask).sum() / mask.sum())
    assert mixed["pg_loss"] == pytest.approx(plain["pg_loss"] + shift, abs=1e-5)
    assert mixed["opd/reverse_kl"] == pytest.approx(plain["opd/reverse_kl"], abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_loss_equals_the_direct_jsd_of_both_models(teacher, beta):
    learner = _student("opd_jsd", teacher, opd_beta=beta)
    batch = _batch()
    P = batch.prompt_width
    with torch.no_grad():
        student_logits = completion_logits(learner.model, batch.input_ids_BT, batch.attention_mask_BT, P)
    teacher_logits = teacher.logits(batch).float()
    expected, _ = generalized_jsd(student_logits, teacher_logits, batch.loss_mask_BC, beta, TEMPERATURE)
    student_BC, _ = learner.logprobs(batch)
    reverse_kl = float(masked_mean(student_BC - teacher.logprobs(batch), batch.loss_mask_BC))
    metrics = learner.train_step(batch)  # two micro-batches of 4 and 2 rows, token-mean over the step
    assert metrics["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert metrics["jsd"] == pytest.approx(float(expected), abs=1e-5) and "ratio/max" not in metrics
    assert metrics["opd/reverse_kl"] == pytest.approx(reverse_kl, abs=1e-5)
    again = learner.train_step(batch)
    assert again["jsd"] < metrics["jsd"]  # the step moved the student's distributions towards the teacher's


def test_jsd_needs_a_teacher_and_settings_come_from_the_recipe():
    with pytest.raises(ValueError, match="opd_jsd needs the teacher"):
        _student("opd_jsd")
    recipe = {
        "model": {"path": "m"},
        "data": {"kind": "arithmetic"},
        "algorithm": {"name": "opd"},
        "opd": {"teacher": "t", "loss": "jsd", "beta": 0.2, "reward_coef": 0.0},
    }
    s = learner_settings(validate_config(recipe), "m")
    assert (s.loss, s.opd_beta, s.reward_coef) == ("opd_jsd", 0.2, 0.0)
    recipe["opd"] = {"teacher": "t", "reward_coef": 0.3}
    recipe["rewards"] = [{"fn": "math_accuracy"}]
    s = learner_settings(validate_config(recipe), "m")
    assert (s.loss, s.reward_coef) == ("opd_reverse_kl", 0.3)

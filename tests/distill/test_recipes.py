"""The shipped distillation / rejection-sampling recipes validate and say what they claim."""

from pathlib import Path

from posttrain.config import load_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_gpu_distill_recipe_is_a_real_teacher_student_pair_on_gsm8k():
    cfg = load_config(RECIPES / "distill_math_gpu.yaml")
    assert cfg.algorithm.name == "distill"
    assert cfg.traces.teacher == "Qwen/Qwen2.5-Math-7B-Instruct" and cfg.model.path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.data.kind == "hub" and cfg.data.name == "openai/gsm8k" and cfg.eval.data.split == "test"
    assert cfg.traces.min_reward == 1.0 and [r.fn for r in cfg.rewards] == ["math_accuracy"]
    assert cfg.model.dtype == "bfloat16" and cfg.rollout.max_new_tokens >= 512


def test_cpu_distill_recipe_distils_the_demo_model_into_a_pruned_student():
    cfg = load_config(RECIPES / "distill_math.yaml")
    assert cfg.algorithm.name == "distill" and cfg.traces.teacher == "smollm2-135m-instruct"
    assert cfg.model.path == "runs/smollm2-8l" and cfg.eval.data is not None


def test_offline_rft_recipe_samples_the_model_itself():
    cfg = load_config(RECIPES / "rft_offline.yaml")
    assert cfg.algorithm.name == "rft_offline" and cfg.traces.teacher is None
    assert cfg.traces.keep == "all" and cfg.traces.min_reward == 1.0 and cfg.model.lora is not None


def test_a_distill_student_may_train_as_qlora_while_the_teacher_loads_plain():
    from posttrain.distill.pipeline import teacher_config

    cfg = load_config(RECIPES / "distill_math.yaml", ["model.lora={rank: 8}", "model.quantize=nf4"])
    assert cfg.model.quantize == "nf4"
    teacher = teacher_config(cfg)
    assert teacher.model.quantize == "none" and teacher.model.lora is None
    assert teacher.model.path == "smollm2-135m-instruct"

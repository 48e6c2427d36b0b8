"""`algorithm.name: opd` and its `opd:` section: defaults, the refusals (naming the key), and the two recipes."""

from pathlib import Path

import pytest
import yaml

from posttrain.config import ConfigError, check_resumable, dump_config, load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
BASE = {"model": {"path": "m"}, "data": {"kind": "arithmetic"}, "algorithm": {"name": "opd"}}


def _cfg(**sections):
    return validate_config({**BASE, **sections})


def _error(**sections) -> str:
    with pytest.raises(ConfigError) as info:
        _cfg(**sections)
    return str(info.value)


def test_defaults_and_rewards_are_optional_without_reward_coef():
    cfg = _cfg(opd={"teacher": "t"})
    o = cfg.opd
    assert (o.teacher, o.loss, o.beta, o.reward_coef, o.teacher_dtype, o.teacher_batch_size) == (
        "t",
        "reverse_kl",
        0.5,
        0.0,
        None,
        8,
    )
    assert cfg.rewards == []
    one_sample = _cfg(opd={"teacher": "t"}, algorithm={"name": "opd", "samples_per_prompt": 1})
    assert one_sample.algorithm.samples_per_prompt == 1  # no group advantage without rewards
    jsd = _cfg(opd={"teacher": "t", "loss": "jsd", "beta": 0.0})
    assert (jsd.opd.loss, jsd.opd.beta) == ("jsd", 0.0)


@pytest.mark.parametrize(
    "sections, fragment",
    [
        ({}, "opd.teacher: algorithm.name=opd needs the teacher"),
        ({"opd": {"teacher": "t", "reward_coef": 0.5}}, "rewards: algorithm.name=opd needs at least one reward"),
        (
            {
                "opd": {"teacher": "t", "reward_coef": 0.5},
                "rewards": [{"fn": "math_accuracy"}],
                "algorithm": {"name": "opd", "samples_per_prompt": 1},
            },
            "algorithm.samples_per_prompt: opd.reward_coef > 0 uses group-relative advantages",
        ),
        ({"opd": {"teacher": "t", "beta": 0.3}}, "opd.beta: only opd.loss=jsd uses it"),
        ({"opd": {"teacher": "t", "loss": "jsd", "beta": 1.5}}, "`opd.beta`"),
        ({"opd": {"teacher": "t", "loss": "forward_kl"}}, "`opd.loss`"),
        ({"opd": {"teacher": "t", "reward_coef": -1}}, "`opd.reward_coef`"),
        ({"opd": {"teacher": "t", "techer_dtype": "bfloat16"}}, "did you mean `opd.teacher_dtype`"),
        (
            {"opd": {"teacher": "t"}, "algorithm": {"name": "opd", "dynamic_sampling": True}},
            "algorithm.dynamic_sampling: opd",
        ),
        (
            {"opd": {"teacher": "t"}, "algorithm": {"name": "opd", "kl_coef": 0.1, "kl_in": "reward"}},
            "algorithm.kl_in: opd",
        ),
        (
            {"opd": {"teacher": "t"}, "algorithm": {"name": "grpo"}, "rewards": [{"fn": "math_accuracy"}]},
            "opd: only algorithm.name=opd uses this section",
        ),
    ],
)
def test_impossible_combinations_name_the_key(sections, fragment):
    assert fragment in _error(**sections)


def test_cpu_recipe_distils_the_demo_model_into_a_tiny_student():
    cfg = load_config(ROOT / "recipes" / "opd_math.yaml")
    assert (cfg.algorithm.name, cfg.opd.teacher) == ("opd", "smollm2-135m-instruct")
    assert cfg.model.path == "runs/smollm2-tiny" and cfg.model.system_prompt  # short prompts: cheap teacher passes
    assert (cfg.opd.loss, cfg.opd.beta) == ("jsd", 0.0) and cfg.eval.data is not None and cfg.data.max_value == 9
    assert cfg.eval.data.seed != cfg.data.seed and cfg.data.exclude_seed == cfg.eval.data.seed


def test_gpu_recipe_is_a_qwen_pair_on_gsm8k():
    cfg = load_config(ROOT / "recipes" / "opd_math_gpu.yaml")
    assert cfg.algorithm.name == "opd" and cfg.opd.teacher.startswith("Qwen/Qwen2.5-") and "7B" in cfg.opd.teacher
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.model.dtype == cfg.opd.teacher_dtype == "bfloat16"
    assert (cfg.data.kind, cfg.data.name, cfg.eval.data.split) == ("hub", "openai/gsm8k", "test")
    assert cfg.opd.reward_coef > 0 and cfg.rewards[0].fn == "math_accuracy"


def test_a_run_made_before_the_opd_section_existed_still_resumes():
    cfg = validate_config(
        {"model": {"path": "m"}, "data": {"kind": "arithmetic"}, "rewards": [{"fn": "math_accuracy"}]}
    )
    saved = cfg.model_dump(mode="json")  # what config.yaml held before it recorded only what the algorithm reads
    del saved["opd"]  # config.yaml of a run made before `opd:` was added to the schema
    check_resumable(yaml.safe_dump(saved), cfg, "old-run")  # no error: the section holds its defaults
    changed = validate_config({**BASE, "opd": {"teacher": "t"}})
    saved = yaml.safe_load(dump_config(changed))
    del saved["opd"]
    with pytest.raises(ConfigError, match="opd.teacher"):
        check_resumable(yaml.safe_dump(saved), changed, "old-run")  # a non-default opd section is a change

"""Config errors name the key and what is allowed; shipped recipes validate."""

from pathlib import Path

import pytest

from posttrain.config import ConfigError, load_config, parse_overrides, validate_config

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"path": "m"}, "data": {"kind": "arithmetic"}, "rewards": [{"fn": "math_accuracy"}]}


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return str(info.value)


def test_minimal_recipe_gets_documented_defaults():
    cfg = validate_config(BASE)
    assert cfg.algorithm.samples_per_prompt == 4 and cfg.algorithm.loss_reduction == "token-mean"
    assert cfg.reward_names() == ["math_accuracy"]


def test_unknown_key_is_named_with_a_suggestion_and_the_allowed_keys():
    msg = _error({**BASE, "train": {"lrr": 1e-4}})
    assert "unknown key `train.lrr`" in msg and "did you mean `train.lr`" in msg and "micro_batch_size" in msg


def test_unknown_key_inside_a_list_item_and_a_data_source():
    assert "`rewards.0.wieght` (did you mean `rewards.0.weight`?)" in _error(
        {**BASE, "rewards": [{"fn": "f", "wieght": 1}]}
    )
    msg = _error({**BASE, "data": {"kind": "file", "path": "x", "prompt_col": "q"}})
    assert "unknown key `data.prompt_col`" in msg and "prompt_column" in msg


def test_wrong_type_names_key_and_value():
    assert "`train.lr`" in _error({**BASE, "train": {"lr": "fast"}}) and "'fast'" in _error(
        {**BASE, "train": {"lr": "fast"}}
    )
    assert "`rollout.temperature`" in _error({**BASE, "rollout": {"temperature": -1}})


def test_missing_and_unknown_source_kind():
    assert "missing required key `model`" in _error({k: v for k, v in BASE.items() if k != "model"})
    assert "unknown source 'csv'; allowed: arithmetic, file, hub" in _error({**BASE, "data": {"kind": "csv"}})


@pytest.mark.parametrize(
    "patch, fragment",
    [
        ({"algorithm": {"samples_per_prompt": 1}}, "algorithm.samples_per_prompt: group-relative advantages need >= 2"),
        ({"algorithm": {"eps_low": 0.3, "eps_high": 0.2}}, "algorithm.eps_high (0.2) must be >= algorithm.eps_low"),
        ({"train": {"steps": 2, "warmup_steps": 5}}, "train.warmup_steps (5) must be <= train.steps (2)"),
        ({"rewards": [{"fn": "a.py:f"}, {"fn": "b.py:f"}]}, "two rewards share a log name"),
        ({"eval": {"accuracy_reward": "nope"}}, "eval.accuracy_reward: `nope` is not a reward"),
        (
            {"algorithm": {"kl_coef": 0.1, "kl_estimator": "k1"}},
            "algorithm.kl_estimator: k1 in the loss has an expected gradient of zero (the KL term would do nothing); "
            "use k2 or k3",
        ),
        ({"eval": {"n": 8}}, "eval.n: 8 greedy samples per problem (eval.temperature 0) are identical"),
    ],
)
def test_impossible_combinations(patch, fragment):
    assert fragment in _error({**BASE, **patch})


def test_overrides_parse_yaml_values_into_nested_keys(tmp_path):
    assert parse_overrides(["train.lr=1e-4", "model.lora=null", "rollout.stop=[a, b]"]) == {
        "train": {"lr": 1e-4},
        "model": {"lora": None},
        "rollout": {"stop": ["a", "b"]},
    }
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["train.lr"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: m}\ndata: {kind: arithmetic}\nrewards: [{fn: math_accuracy}]\n")
    assert load_config(recipe, ["train.steps=7"]).train.steps == 7
    with pytest.raises(ConfigError, match=r"r.yaml: invalid recipe:\n  - unknown key `train.stepz`"):
        load_config(recipe, ["train.stepz=7"])


def test_k1_and_several_eval_samples_are_allowed_where_they_mean_something():
    reward_kl = validate_config({**BASE, "algorithm": {"kl_coef": 0.1, "kl_in": "reward", "kl_estimator": "k1"}})
    assert reward_kl.algorithm.kl_estimator == "k1"
    assert validate_config({**BASE, "eval": {"n": 8, "temperature": 1.0}}).eval.n == 8


def test_an_override_of_a_data_kind_replaces_the_section_and_one_of_the_same_kind_merges(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {path: m}\ndata: {kind: arithmetic, num_problems: 50, max_value: 9}\nrewards: [{fn: math_accuracy}]\n"
        "eval: {data: {kind: arithmetic, num_problems: 5}}\n"
    )
    cfg = load_config(recipe, ["data.kind=file", "data.path=x.jsonl", "eval.data.kind=hub", "eval.data.name=d"])
    assert cfg.data.model_dump() == {"kind": "file", "path": "x.jsonl", "prompt_column": "prompt", "limit": None}
    assert (cfg.eval.data.kind, cfg.eval.data.name, cfg.eval.data.split) == ("hub", "d", "train")
    same = load_config(recipe, ["data.kind=arithmetic", "data.seed=3"]).data
    assert (same.num_problems, same.max_value, same.seed) == (50, 9, 3)


def test_missing_or_broken_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_model_path_that_is_not_a_folder_is_refused_naming_key_value_and_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = Path.cwd()  # tmp_path with any symlinks resolved, as the error shows it
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "weights.bin").write_text("")

    def model(path: str, **sections) -> str:
        return _error({**BASE, "model": {"path": path}, **sections})

    assert model("./no_such_model") == (
        f"invalid recipe:\n  - model.path = './no_such_model': the folder '{here}/no_such_model' does not "
        f"exist (a relative path is resolved against the working directory, {here})"
    )
    assert f"'../m': the folder '{here.parent}/m' does not exist" in model("../m")
    assert f"'runs/x/final': the folder '{here}/runs/x/final' does not exist" in model("runs/x/final")
    assert "'/no/such/dir': the folder '/no/such/dir' does not exist\n" in model("/no/such/dir") + "\n"
    assert f"'weights.bin/': the folder '{here}/weights.bin' is a file, not a model folder" in model("weights.bin/")
    assert "opd.teacher = './t': the folder" in _error({**BASE, "opd": {"teacher": "./t"}})
    assert "traces.teacher = 'a/b/c': the folder" in _error({**BASE, "traces": {"teacher": "a/b/c"}})
    # hub ids (`org/name`, `name`), the demo alias and existing folders pass; a hub id is checked when loading
    for path in ("Qwen/Qwen2.5-0.5B", "gpt2", "smollm2-135m-instruct", "./runs/x", "runs/x", str(tmp_path), "~"):
        assert validate_config({**BASE, "model": {"path": path}}).model.path == path


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "grpo_gsm8k.yaml"])
def test_shipped_recipes_validate(recipe):
    cfg = load_config(ROOT / "recipes" / recipe)
    assert cfg.eval.data is not None and cfg.rewards


def test_quickstart_is_grpo_lora_on_the_demo_model_with_64_plus_eval_problems():
    cfg = load_config(ROOT / "recipes" / "quickstart.yaml")
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.model.lora is not None
    assert cfg.eval.data.num_problems >= 64 and cfg.eval.temperature == 0.0
    assert {r.fn for r in cfg.rewards} >= {"math_accuracy", "format"}


def test_resume_refuses_a_changed_experiment_but_allows_more_steps():
    from posttrain.config import check_resumable, dump_config

    saved = dump_config(validate_config(BASE))
    check_resumable(saved, validate_config({**BASE, "train": {"steps": 99}, "resume": "runs/x"}), "runs/x")
    with pytest.raises(ConfigError) as info:
        check_resumable(saved, validate_config({**BASE, "algorithm": {"prompts_per_step": 16}}), "runs/x")
    assert "algorithm.prompts_per_step" in str(info.value) and "8 -> 16" in str(info.value)


# ------------------------------------------------------------------------------- one schema for every algorithm


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"preference": {"beta": 0.2}}, "preference: only algorithm.name=dpo uses this section (got grpo; it sets"),
        ({"train": {"batch_size": 4}}, "train.batch_size: only sft, dpo, orpo, reward_model, distill, rft_offline"),
        ({"traces": {"keep": "all"}}, "traces: only algorithm.name=distill or rft_offline uses this section"),
        ({"placement": {"learners": 2}, "algorithm": {"name": "sft"}, "data": {"kind": "file", "path": "x"}},
         "placement: only algorithm.name=grpo or rloo"),
        ({"algorithm": {"name": "dpo", "samples_per_prompt": 2}, "data": {"kind": "file", "path": "x"}},
         "algorithm.samples_per_prompt: only grpo, rloo, reinforce_pp, reinforce_pp_baseline, rft, opd, ppo read this"),
    ],
)  # fmt: skip
def test_a_key_the_algorithm_does_not_read_is_an_error_naming_it(raw, fragment):
    message = _error({**BASE, **raw})
    assert fragment in message and message.endswith("remove it")


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_recipe_round_trips_through_its_run_folder_config(recipe, tmp_path):
    from posttrain.config import dump_config

    cfg = load_config(ROOT / "recipes" / recipe)
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg  # `posttrain train runs/<name>/config.yaml` validates
    import yaml

    sections = yaml.safe_load(dump_config(cfg))
    assert ("preference" in sections) == (cfg.algorithm.name in ("dpo", "orpo"))
    assert ("ppo" in sections, "placement" in sections) == (
        cfg.algorithm.name == "ppo",
        cfg.algorithm.spec.family == "online",
    )


def test_resume_accepts_a_config_yaml_that_recorded_every_section():
    import yaml

    from posttrain.config import check_resumable

    for raw in (BASE, {**BASE, "algorithm": {"name": "ppo"}, "ppo": {"lam": 0.9}}):
        cfg = validate_config(raw)
        old = yaml.safe_dump(cfg.model_dump(mode="json"))  # what config.yaml held before the dump kept only reads
        check_resumable(old, cfg, "runs/old")
    changed = yaml.safe_load(old)
    changed["ppo"]["lam"] = 0.5
    with pytest.raises(ConfigError, match=r"ppo.lam: 0.5 -> 0.9"):
        check_resumable(yaml.safe_dump(changed), cfg, "runs/old")
    changed = yaml.safe_load(old)
    changed["preference"]["beta"] = 0.5  # a key ppo does not read: not a change of the experiment
    check_resumable(yaml.safe_dump(changed), cfg, "runs/old")


def test_field_docstrings_are_the_schema_descriptions():
    from posttrain.config import AlgorithmConfig, PPOConfig

    assert AlgorithmConfig.model_fields["kl_coef"].description.startswith("weight of the KL to the reference")
    assert PPOConfig.model_fields["lam"].description.startswith("GAE lambda")

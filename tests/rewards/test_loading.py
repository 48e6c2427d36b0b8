"""Loading reward functions from `file.py:name`, `module:name` and built-in names."""

import sys
from pathlib import Path

import pytest

from posttrain.rewards import builtin
from posttrain.rewards.loading import RewardLoadError, build_reward_specs, check_columns, load_reward_function

DATA = Path(__file__).parent / "data"
TRL_FILE = DATA / "trl_style_rewards.py"


def test_builtin_names():
    assert load_reward_function("math_accuracy") is builtin.math_accuracy
    assert load_reward_function("format") is builtin.format_reward


def test_module_spec():
    assert load_reward_function("posttrain.rewards.builtin:format_reward") is builtin.format_reward
    assert load_reward_function("posttrain.rewards.builtin:BUILTIN_REWARDS.get")("format") is builtin.format_reward


def test_relative_path_resolves_against_base_dir():
    fn = load_reward_function("data/trl_style_rewards.py:reward_len", base_dir=Path(__file__).parent)
    assert fn(completions=["x" * 18, "x" * 25]) == [-2, -5]


def test_relative_path_defaults_to_cwd(monkeypatch):
    monkeypatch.chdir(DATA)
    fn = load_reward_function("trl_style_rewards.py:accuracy_reward")
    assert fn(completions=["so \\boxed{4}", "\\boxed{5}", "4"], ground_truth=["4", "4", "4"]) == [1.0, 0.0, 0.0]


def test_trl_conversational_function_works_unchanged():
    fn = load_reward_function(f"{TRL_FILE}:format_reward_func")
    completions = [
        [{"role": "assistant", "content": "<think>add</think><answer>4</answer>"}],
        [{"role": "assistant", "content": "4"}],
    ]
    assert fn(prompts=[[{"role": "user", "content": "2+2?"}]] * 2, completions=completions) == [1.0, 0.0]


def test_same_file_loads_as_one_module_and_same_stem_files_stay_apart(tmp_path):
    for folder, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "rewards.py").write_text(f"def score(completions, **kwargs):\n    return [{value}]\n")
    score_a = load_reward_function("a/rewards.py:score", base_dir=tmp_path)
    score_b = load_reward_function("b/rewards.py:score", base_dir=tmp_path)
    assert (score_a(completions=["x"]), score_b(completions=["x"])) == ([1.0], [2.0])
    assert score_a.__module__ != score_b.__module__
    assert load_reward_function(str(tmp_path / "a" / "rewards.py") + ":score") is score_a


def test_sibling_helper_module_imports_and_sys_path_is_restored(tmp_path):
    (tmp_path / "my_helpers_xyz.py").write_text("BONUS = 0.5\n")
    (tmp_path / "user.py").write_text(
        "from my_helpers_xyz import BONUS\n\ndef score(completions, **kwargs):\n    return [BONUS] * len(completions)\n"
    )
    path_before = list(sys.path)
    assert load_reward_function("user.py:score", base_dir=tmp_path)(completions=["a", "b"]) == [0.5, 0.5]
    assert sys.path == path_before


@pytest.mark.parametrize(
    "spec,expected_words",
    [
        ("no_such_file.py:score", ["no_such_file.py:score", "does not exist"]),
        ("trl_style_rewards.py:no_such_fn", ["trl_style_rewards.py:no_such_fn", "no_such_fn", "reward_len"]),
        ("trl_style_rewards.py:NOT_A_FUNCTION", ["NOT_A_FUNCTION", "int", "not a function"]),
        ("no_such_package.mod:fn", ["no_such_package.mod:fn", "no_such_package"]),
        ("posttrain.rewards.builtin:nope", ["posttrain.rewards.builtin:nope", "nope"]),
        ("accuracy", ["accuracy", "not a built-in", "math_accuracy"]),
        ("trl_style_rewards.py:", ["expected"]),
    ],
)
def test_bad_specs_name_the_spec_and_the_problem(spec, expected_words):
    with pytest.raises(RewardLoadError) as raised:
        load_reward_function(spec, base_dir=DATA)
    for word in expected_words:
        assert word in str(raised.value)


def test_file_that_fails_to_import(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('missing API key')\n")
    with pytest.raises(RewardLoadError, match=r"broken\.py:score.*missing API key"):
        load_reward_function("broken.py:score", base_dir=tmp_path)
    (tmp_path / "broken.py").write_text("def score(completions, **kwargs):\n    return [1.0]\n")
    assert load_reward_function("broken.py:score", base_dir=tmp_path)(completions=["x"]) == [1.0]  # not cached


def test_a_dataset_column_a_builtin_reward_needs_is_checked_before_any_scoring():
    entries = [{"fn": "format"}, {"fn": "math_accuracy", "args": {"timeout": 2.0}}]  # args: a partial, still checked
    specs = build_reward_specs(entries, ["format", "math_accuracy"])
    with pytest.raises(RewardLoadError) as err:
        check_columns(specs, [{"prompt": "1+1?", "question": "q"}], "data")
    assert str(err.value).startswith(
        "rewards[1].fn = 'math_accuracy' needs the dataset column `answer` or `solution`, but the rows of data have "
        "['question']"
    )
    check_columns(specs, [{"prompt": "1+1?", "solution": "2"}], "data")  # either column will do
    code = build_reward_specs([{"fn": "code_tests"}], ["code_tests"])
    with pytest.raises(RewardLoadError, match="`tests` or `io_cases`"):
        check_columns(code, [{"prompt": "p", "answer": "1"}], "eval.data")

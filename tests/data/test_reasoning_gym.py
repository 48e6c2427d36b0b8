"""reasoning-gym tasks as a prompt source: seeded, deterministic rows whose `reasoning_gym` column is plain JSON, and
clear errors for a wrong task, a wrong setting or a missing package."""

import json

import pytest

from posttrain.config import ConfigError, ReasoningGymSource, validate_config
from posttrain.data import reasoning_gym as rg_source
from posttrain.data.reasoning_gym import ReasoningGymError
from posttrain.data.sources import load_rows

pytest.importorskip("reasoning_gym", reason="pip install reasoning-gym==0.1.25 (the `test` and `envs` extras)")

INSTRUCTION = ReasoningGymSource(task="x").instruction


@pytest.mark.parametrize("task", ["basic_arithmetic", "chain_sum", "countdown"])
def test_rows_are_the_tasks_entries_seeded_and_json_safe(task):
    import reasoning_gym

    rows = load_rows(ReasoningGymSource(task=task, size=5, seed=7))
    assert rows == load_rows(ReasoningGymSource(task=task, size=5, seed=7))  # deterministic
    assert rows != load_rows(ReasoningGymSource(task=task, size=5, seed=8))
    reference = reasoning_gym.create_dataset(task, size=5, seed=7)
    assert len(rows) == 5
    for index, row in enumerate(rows):
        entry = reference[index]
        assert row["prompt"] == entry["question"] + INSTRUCTION and row["answer"] == str(entry["answer"])
        assert row["reasoning_gym"] == {"task": task, "seed": 7, "size": 5, "config": {}, "index": index}
        assert row["metadata"]["source_index"] == index and row["metadata"]["source_dataset"] == task
    assert json.loads(json.dumps(rows)) == rows  # survives a JSONL file, a run folder and Ray unchanged


def test_task_settings_pass_through_config():
    rows = load_rows(ReasoningGymSource(task="chain_sum", size=20, config={"min_terms": 2, "max_terms": 2}))
    assert {row["metadata"]["num_terms"] for row in rows} == {2}
    assert rows[0]["reasoning_gym"]["config"] == {"min_terms": 2, "max_terms": 2}


def test_a_wrong_task_or_setting_names_the_key():
    with pytest.raises(
        ReasoningGymError, match=r"data.task = 'chain_sums': not a reasoning-gym task; tasks: .*chain_sum"
    ):
        load_rows(ReasoningGymSource(task="chain_sums", size=2))
    with pytest.raises(ReasoningGymError, match=r"data.config = \{'max_term': 3\}: .*'chain_sum' refused.*max_term"):
        load_rows(ReasoningGymSource(task="chain_sum", size=2, config={"max_term": 3}))
    with pytest.raises(ReasoningGymError, match=r"data.config = .*max_terms must be >= min_terms"):
        load_rows(ReasoningGymSource(task="chain_sum", size=2, config={"min_terms": 5, "max_terms": 2}))
    with pytest.raises(ReasoningGymError, match=r"set \['seed'\] as data.seed / data.size"):
        load_rows(ReasoningGymSource(task="chain_sum", size=2, config={"seed": 3}))


def test_the_recipe_schema_knows_the_source():
    base = {"model": {"path": "smollm2-135m-instruct"}, "rewards": [{"fn": "reasoning_gym"}]}
    cfg = validate_config({**base, "data": {"kind": "reasoning_gym", "task": "chain_sum", "size": 10}})
    assert isinstance(cfg.data, ReasoningGymSource) and cfg.data.size == 10
    with pytest.raises(ConfigError, match=r"data.sizes.*did you mean `data.size`"):
        validate_config({**base, "data": {"kind": "reasoning_gym", "task": "chain_sum", "sizes": 10}})
    with pytest.raises(ConfigError, match=r"missing required key `data.task`"):
        validate_config({**base, "data": {"kind": "reasoning_gym"}})


def test_without_the_package_the_error_says_how_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_reasoning_gym(name, *args, **kwargs):
        if name.startswith("reasoning_gym"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_reasoning_gym)
    rg_source._dataset.cache_clear()
    with pytest.raises(ReasoningGymError, match=r"need the reasoning-gym package: pip install reasoning-gym==0.1.25"):
        load_rows(ReasoningGymSource(task="chain_sum", size=2))

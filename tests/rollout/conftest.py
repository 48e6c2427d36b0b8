"""Shared fixtures for rollout tests: tiny models and one engine per session, and one Ray session."""

from __future__ import annotations

import os

import pytest
import torch

from posttrain.models.loading import format_prompt, load_model
from posttrain.models.tiny import tiny_model_path
from posttrain.rollout.hf_engine import HFEngine


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread while rollout tests run: on 2 cores shared with other jobs, 2 threads ran 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model_path():
    return tiny_model_path()


@pytest.fixture(scope="session")
def other_model_path():
    """Same architecture, different random weights."""
    return tiny_model_path(seed=1)


@pytest.fixture(scope="session")
def engine(model_path):
    """A shared engine; tests that change its weights must use their own."""
    return HFEngine(model_path)


@pytest.fixture(scope="session")
def reference_model(model_path):
    """The same weights loaded independently of the engine, for teacher-forced checks."""
    return load_model(str(model_path)).eval()


@pytest.fixture(scope="session")
def prompts(engine):
    """Chat-templated prompts of different lengths (so batches are left-padded)."""
    questions = ["hi", "What is 12 + 30?", "Write a haiku about gradient descent, please."]
    return [format_prompt(engine.tokenizer, q) for q in questions]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session for all rollout tests (started on first use; ~4 s)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started_here:
        ray.shutdown()

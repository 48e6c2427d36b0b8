"""Shared fixtures for the models tests: a cached tiny random Llama (built offline in well under a second)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_path():
    """Folder of the default tiny model (hidden 64, 2 layers, 4 heads, seed 0)."""
    from posttrain.models.tiny import tiny_model_path

    return tiny_model_path()

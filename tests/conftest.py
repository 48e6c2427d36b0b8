import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting one costs ~4 s)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray

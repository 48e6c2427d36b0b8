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


def pytest_configure(config):
    config.addinivalue_line("markers", "bwrap: runs untrusted code, so needs bubblewrap; skipped where it cannot run")


def pytest_runtest_setup(item):
    """A `bwrap` test skips, saying why and how to install bubblewrap, where the code sandbox cannot run (running
    untrusted code without it is refused unless a caller opts in)."""
    if item.get_closest_marker("bwrap") is not None:
        from posttrain.verifiers import sandbox

        problem = sandbox.bwrap_problem()
        if problem is not None:
            pytest.skip(f"{problem}; {sandbox.INSTALL_HINT}")

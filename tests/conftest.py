import os
import sys

import pytest

# Two tiers: `make test` runs everything; `make test-fast` runs `-m "not heavy"` (pure math, config, verifiers, data,
# units on tiny models). `heavy` is added here to every slow or gpu test and every test that uses the ray_session
# fixture (directly or through another fixture). Mark by hand, with @pytest.mark.heavy, a test that runs `posttrain`
# in a subprocess that loads a model, uses the SmolLM2 demo model, starts vLLM or builds a package. A test left
# unmarked that starts Ray or imports vLLM fails at teardown with a message saying so.
HEAVY_FIXTURES = {"ray_session"}
HEAVY_MARKS = {"slow", "gpu"}
_STARTED = pytest.StashKey[tuple[bool, bool]]()


def _is_heavy(item: pytest.Item) -> bool:
    return any(mark.name == "heavy" for mark in item.iter_markers())


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        marks = {mark.name for mark in item.iter_markers()}
        if HEAVY_MARKS & marks or HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.heavy)


def _ray_and_vllm_state() -> tuple[bool, bool]:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized()), "vllm" in sys.modules


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Note whether Ray/vLLM were already up (see the teardown check). A `bwrap` test skips, saying why and how to
    install bubblewrap, where the code sandbox cannot run (running untrusted code without it is refused unless a
    caller opts in)."""
    item.stash[_STARTED] = _ray_and_vllm_state()
    if item.get_closest_marker("bwrap") is not None:
        from posttrain.verifiers import sandbox

        problem = sandbox.bwrap_problem()
        if problem is not None:
            pytest.skip(f"{problem}; {sandbox.INSTALL_HINT}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    before = item.stash.get(_STARTED, (True, True))
    after = _ray_and_vllm_state()
    names = ("started Ray", "imported vLLM")
    started = [name for name, was, now in zip(names, before, after, strict=True) if now and not was]
    if started and not _is_heavy(item):
        pytest.fail(
            f"{item.nodeid} {' and '.join(started)} but is not marked heavy: use the ray_session fixture or add "
            "@pytest.mark.heavy, so that `make test-fast` stays fast (see tests/conftest.py)",
            pytrace=False,
        )
    return result


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

"""The code sandbox's isolation (posttrain.verifiers.sandbox), through both judges: what a program can see of the
host, that every process it starts dies with its run, and that running without bubblewrap needs an explicit
opt-in."""

import os
import secrets
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import pytest

from posttrain.rewards.code import code_tests
from posttrain.verifiers import sandbox
from posttrain.verifiers.code import run_assert_tests, run_io_tests

REPO = Path(__file__).resolve().parents[2]
SQUARE_TEST = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
SQUARE_CASES = [("2\n", "4\n"), ("3\n", "9\n")]


def _run(mode: str, program: str, timeout: float = 5.0, **kw):
    if mode == "assert":
        return run_assert_tests(program, SQUARE_TEST, "solve", timeout, **kw)
    return run_io_tests(program, SQUARE_CASES[:1], timeout, **kw)


# ---- what the program sees ----------------------------------------------------------------------------------

# Reads every bait path, then walks everything it can see outside /usr, /proc and /dev (the bait may be visible
# under another name) and prints each file and symlink path, one per line, after a "FILES" line; it does not
# descend into the interpreter's standard library (STDLIB) except into its site-packages.
VIEW_PROGRAM = """
import os
for path in BAIT:
    try:
        print("READ", path, open(path).read())
    except OSError as e:
        print("blocked", path, type(e).__name__)
print("FILES")
for top in sorted(os.listdir("/")):
    if top in ("usr", "proc", "dev") or os.path.islink("/" + top):
        print("/" + top)
        continue
    for root, dirs, files in os.walk("/" + top):
        if root == STDLIB:
            dirs[:] = [d for d in dirs if d == "site-packages"]
            files = []
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            print(os.path.join(root, name))

def solve(n):
    return -1
"""


@pytest.fixture
def bait():
    """A secret file in each place of the host a program must not see: our /tmp, the repository, the home."""
    token = secrets.token_hex(8)
    paths = []
    for place in dict.fromkeys([Path(tempfile.gettempdir()), Path("/tmp"), REPO, Path.home()]):
        path = place / f".pt-bait-{token}"
        try:
            path.write_text(f"BAIT-{token}")
        except OSError:
            continue
        paths.append(path)
    assert paths
    yield token, [str(p) for p in paths]
    for path in paths:
        path.unlink()


def _allowed(path: str) -> bool:
    """What a sandboxed program may see beside /usr, /proc and /dev: its job folder, its fresh /tmp, the
    /etc/alternatives symlinks, /bin and /lib* as links into /usr, the interpreter binary and libpython."""
    if path.startswith(("/job/", "/tmp/", "/etc/alternatives/")) or path in ("/usr", "/proc", "/dev"):
        return True
    if os.path.dirname(path) == "/" and os.path.islink(path) and os.readlink(path).lstrip("/").startswith("usr/"):
        return True
    return path == os.path.realpath(sys.executable) or os.path.basename(path).startswith("libpython")


@pytest.mark.bwrap
@pytest.mark.parametrize("mode", ["assert", "io"])
def test_program_sees_only_its_job_and_the_interpreter(mode, bait):
    token, paths = bait
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    program = VIEW_PROGRAM.replace("BAIT", repr(paths)).replace("STDLIB", repr(stdlib))
    result = _run(mode, program)
    assert f"BAIT-{token}" not in result.stdout + result.stderr  # the content (the paths carry the token)
    assert result.stdout.count("blocked") == len(paths), result.stdout
    files = result.stdout.split("FILES\n", 1)[1].splitlines()
    stray = [f for f in files if not _allowed(f)]  # e.g. the rest of the Python installation, its site-packages
    assert not stray, stray
    assert "/job/launcher.py" in files and "/usr" in files  # (the listing was not cut short by the output cap)


# ---- every process dies with its run ------------------------------------------------------------------------

# Starts marked processes that try every way to outlive the run: a double-forked daemon in its own session, a
# new-session child that ignores SIGTERM/SIGHUP, a child holding our stdout; waits until they exist, then ENDING.
SPAWNER = """
import os, subprocess, sys, time
MARK = "__MARK__"
SLEEPER = "import signal, time\\nfor s in (1, 2, 15):\\n    signal.signal(s, signal.SIG_IGN)\\ntime.sleep(60)\\n"
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", SLEEPER, MARK])
    os._exit(0)
quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
subprocess.Popen([sys.executable, "-c", SLEEPER, MARK], start_new_session=True, **quiet)
if "__ENDING__" == "hang":
    subprocess.Popen([sys.executable, "-c", SLEEPER, MARK])
def marked():
    n = 0
    for p in os.listdir("/proc"):
        try:
            n += p.isdigit() and MARK.encode() in open(f"/proc/{p}/cmdline", "rb").read()
        except OSError:
            pass
    return n
for _ in range(200):
    if marked() >= 2:
        break
    time.sleep(0.01)
print("spawned", marked(), file=sys.stderr)
if "__ENDING__" == "hang":
    while True:
        pass

def solve(n):
    return n * n + 1
"""

BOMB = """
import os, sys
BOMB = "import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass\\n"
os.execv(sys.executable, [sys.executable, "-c", BOMB, "__MARK__"])
"""


def _marked(mark: str) -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                n += mark.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                pass
    return n


@pytest.mark.bwrap
@pytest.mark.parametrize("mode", ["assert", "io"])
@pytest.mark.parametrize("ending", ["exit", "hang"])
def test_no_process_outlives_its_run(mode, ending):
    mark = f"ptmark{secrets.token_hex(6)}"
    result = _run(mode, SPAWNER.replace("__MARK__", mark).replace("__ENDING__", ending), timeout=3.0)
    assert _marked(mark) == 0  # at once: the run returns only after all of them are gone
    assert "spawned" in result.stderr  # (they did start; "spawned 2" or 3, unless a fork hit the rlimit)
    assert not result.passed
    assert set(result.statuses) == ({"timeout"} if ending == "hang" else {"wrong"})


@pytest.mark.bwrap
def test_fork_bomb_is_capped_and_dies_with_its_run():
    mark = f"ptmark{secrets.token_hex(6)}"
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _marked(mark))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_io_tests(BOMB.replace("__MARK__", mark), [("", "")], 2.0)
    finally:
        done.set()
        watcher.join()
    assert _marked(mark) == 0
    assert result.statuses == ["timeout"]
    assert 1 < peak[0] <= sandbox.NPROC_LIMIT  # RLIMIT_NPROC of the sandbox's uid


# ---- without bubblewrap: refused unless opted in ------------------------------------------------------------

GOOD_FUNC = "def solve(n):\n    return n * n\n"
GOOD_IO = "n = int(input())\nprint(n * n)\n"


@pytest.fixture
def no_bwrap(monkeypatch, tmp_path):
    """A host without bubblewrap, as the sandbox finds it: its bwrap lookup points at a missing file."""
    monkeypatch.setattr(sandbox, "BWRAP", str(tmp_path / "missing" / "bwrap"))
    monkeypatch.setattr(sandbox, "_warned", False)
    assert sandbox.bwrap_path() is None


def test_without_bwrap_running_code_is_refused_naming_the_opt_in(no_bwrap):
    for run in (
        lambda: run_io_tests(GOOD_IO, SQUARE_CASES, timeout=5),
        lambda: run_assert_tests(GOOD_FUNC, SQUARE_TEST, "solve", timeout=5),
        lambda: code_tests(["p"], ["```python\n" + GOOD_FUNC + "```"], tests=[SQUARE_TEST], entry_point=["solve"]),
    ):
        with pytest.raises(sandbox.SandboxUnavailable, match="allow_unsandboxed: true") as error:
            run()
        assert "bubblewrap is not installed" in str(error.value) and "apt-get install bubblewrap" in str(error.value)


def test_without_bwrap_the_opt_in_runs_with_one_warning(no_bwrap):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_io_tests(GOOD_IO, SQUARE_CASES, timeout=5, allow_unsandboxed=True).passed
        assert run_assert_tests(GOOD_FUNC, SQUARE_TEST, "solve", timeout=5, allow_unsandboxed=True).passed
        assert not run_assert_tests("import sys\nsys.exit(0)\n", SQUARE_TEST, "solve", 5, allow_unsandboxed=True).passed
        completion = "```python\n" + GOOD_FUNC + "```"
        scores = code_tests(["p"], [completion], tests=[SQUARE_TEST], entry_point=["solve"], allow_unsandboxed=True)
        assert scores == [1.0]
    assert sum("WITHOUT namespaces" in str(w.message) for w in caught) == 1

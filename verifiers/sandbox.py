"""Run untrusted Python in a fresh, isolated, resource-limited process (the low layer of `verifiers.code`).

Layers, strongest available first (see docs/rewards-and-verifiers.md#code-execution):
- bubblewrap: new pid/net/ipc/uts (and, when not root, user) namespaces, so no network and no view of host
  processes; a new root holding only a read-only /usr (and /bin, /lib* beside it), the interpreter binary, its
  standard library (its site-packages masked) and its shared libpython; the job folder read-only as /job; a
  private size-capped tmpfs as /tmp and cwd; a fresh /proc and a minimal /dev. No host /tmp, /root, /home,
  project, or /etc beyond /etc/alternatives. An empty environment; `--new-session` (no TIOCSTI on our terminal).
- every process of a run dies with it, whatever it does (double forks, setsid, daemons, ignored signals): they
  all live in the run's pid namespace; when the run ends or times out we SIGKILL the namespace's init (bwrap's
  `--info-fd` gives its pid) and wait for bwrap, which exits only once the kernel has killed and reaped every
  process in the namespace. `--die-with-parent` covers our own death.
- an unprivileged uid: when we are root, bwrap runs without a user namespace and the launcher drops to the host
  user `nobody` (65534) before any untrusted code runs, so RLIMIT_NPROC really binds (it does not for a uid
  mapped to host root) and the code holds no capabilities; when we are not root, bwrap maps us to 65534.
- rlimits set by the launcher: address space, CPU seconds, file size, process count, open files, no core dumps.
- from outside: a wall-clock deadline, and output read with a byte cap (the rest is drained and dropped).
Without a working bwrap, running code is refused (`SandboxUnavailable`) unless the caller opts in with
`allow_unsandboxed=True` (the `code_tests` reward's `allow_unsandboxed: true`); then only the rlimits, a new
session killed as a group, the clean environment and a temp cwd remain, and a warning says so once.
"""

from __future__ import annotations

import functools
import json
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field

MEMORY_LIMIT = 1 << 30
FILE_SIZE_LIMIT = 10 << 20
TMPFS_SIZE = 32 << 20
NPROC_LIMIT = 64
OUTPUT_CAP = 4096
NOBODY = 65534

# The launcher runs first in the sandboxed process: drop privileges, set rlimits, close stray fds, then run the
# target script with the given argv. argv: launcher.py CPU_SECONDS KEEP_FDS(comma list) DROP_UID(0/1) TARGET [ARGS...]
LAUNCHER = f"""
import os, resource, sys
cpu, keep, drop, target = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4]
keep = {{int(x) for x in keep.split(",") if x}}
if drop and os.getuid() == 0:
    os.setgroups([])
    os.setgid({NOBODY})
    os.setuid({NOBODY})
for res, val in ((resource.RLIMIT_AS, {MEMORY_LIMIT}), (resource.RLIMIT_CPU, cpu),
                 (resource.RLIMIT_FSIZE, {FILE_SIZE_LIMIT}), (resource.RLIMIT_NPROC, {NPROC_LIMIT}),
                 (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256)):
    try:
        resource.setrlimit(res, (val, val))
    except (ValueError, OSError):
        pass
for fd in range(3, 1024):
    if fd not in keep:
        try:
            os.close(fd)
        except OSError:
            pass
sys.argv = sys.argv[4:]
del cpu, keep, drop, res, val
with open(target) as f:
    code = compile(f.read(), target, "exec")
g = {{"__name__": "__main__", "__builtins__": __builtins__}}
del f, target
exec(code, g)
"""

_warned = False


@dataclass
class RawRun:
    """What came out of one sandboxed process."""

    returncode: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    stdout_truncated: bool = False
    extra: dict[int, bytes] = field(default_factory=dict)  # data read from extra result pipes, by host fd


BWRAP = "bwrap"
"""The bubblewrap binary: a name looked up on PATH, or a path (tests point it at a missing file)."""
ALLOW_KEY = "allow_unsandboxed"
INSTALL_HINT = "install bubblewrap: `make install` as root, or `apt-get install bubblewrap`"
_probed: dict[str, str | None] = {}  # bwrap path -> None when it works here, else why not


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create its namespaces here, and the caller did not opt in to running
    untrusted code without it."""


def bwrap_path() -> str | None:
    """The bwrap binary, if installed and able to create the sandbox here (probed once per process and path)."""
    return None if bwrap_problem() else shutil.which(BWRAP)


def bwrap_problem() -> str | None:
    """Why the sandbox cannot be used here (None when it can)."""
    path = shutil.which(BWRAP)
    if path is None:
        return f"bubblewrap is not installed ({BWRAP!r} not found)"
    if path not in _probed:
        with tempfile.TemporaryDirectory() as d:
            os.chmod(d, 0o755)
            cmd = [path, *_bwrap_argv(d, None), _python(), "-I", "-S", "-c", "pass"]
            try:
                done = subprocess.run(cmd, capture_output=True, timeout=30)
                err = done.stderr.decode(errors="replace").strip()[-300:]
                _probed[path] = None if done.returncode == 0 else f"{path} cannot create the sandbox here: {err}"
            except (OSError, subprocess.SubprocessError) as e:
                # not cached: a transient failure (EAGAIN, a slow machine) must not disable the sandbox for good
                return f"{path} could not be started: {e}"
    return _probed[path]


def _python() -> str:
    """The real interpreter binary (a venv's python is a symlink to it)."""
    return os.path.realpath(sys.executable)


def _parents(path: str) -> list[str]:
    out = []
    p = os.path.dirname(path)
    while p not in ("/", ""):
        out.append(p)
        p = os.path.dirname(p)
    return out[::-1]


@functools.lru_cache(maxsize=1)
def _system_argv() -> tuple[str, ...]:
    """The read-only system view: /usr (and /bin, /lib* beside it) and just enough of the interpreter to run
    `python -I -S`: its binary, its standard library (site-packages masked: with -S nothing there is importable,
    and a program needs only the stdlib) and its libpython. Not the venv, not the rest of the installation."""
    argv: list[str] = []
    for d in ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/etc/alternatives"):
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    wanted = [_python(), stdlib]
    soname = sysconfig.get_config_var("INSTSONAME")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and soname:
        # where the build put libpython, and prefix/lib (relocatable builds find it through $ORIGIN/../lib)
        for d in (sysconfig.get_config_var("LIBDIR") or "", os.path.dirname(os.path.dirname(_python())) + "/lib"):
            lib = os.path.join(d, soname)
            if os.path.isfile(lib):
                wanted.append(os.path.realpath(lib))
    made: set[str] = set()
    for path in dict.fromkeys(wanted):
        if path.startswith("/usr/"):
            continue
        for p in _parents(path):
            if p not in made:
                made.add(p)
                argv += ["--perms", "0755", "--dir", p]
        argv += ["--ro-bind", path, path]
    site = os.path.join(stdlib, "site-packages")
    if os.path.isdir(site):
        argv += ["--tmpfs", site, "--remount-ro", site]
    return tuple(argv)


def _bwrap_argv(job_dir: str, info_fd: int | None) -> list[str]:
    argv = ["--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin"]
    argv += ["--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONIOENCODING", "utf-8"]
    if os.geteuid() == 0:
        # No user namespace: the launcher drops to the real host uid 65534, where RLIMIT_NPROC binds.
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    else:
        argv += ["--unshare-all", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    argv += _system_argv()
    argv += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", job_dir, "/job"]
    argv += ["--perms", "1777", "--size", str(TMPFS_SIZE), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    return argv


def _check_sandbox(allow_unsandboxed: bool) -> str | None:
    """The bwrap binary to use; None for the weak fallback, only when the caller opted in (warned once)."""
    global _warned
    problem = bwrap_problem()
    if problem is None:
        return shutil.which(BWRAP)
    if not allow_unsandboxed:
        raise SandboxUnavailable(
            f"refusing to run untrusted code: {problem}. To fix it, {INSTALL_HINT}; or accept running it WITHOUT "
            f"isolation (it can read host files, reach the network and leave processes behind) with the code_tests "
            f"reward argument `{ALLOW_KEY}: true` (rewards: [{{fn: code_tests, args: {{{ALLOW_KEY}: true}}}}])"
        )
    if not _warned:
        _warned = True
        warnings.warn(
            f"{problem}: untrusted code runs WITHOUT namespaces ({ALLOW_KEY} is set): it can reach the network, "
            "read host files, see host processes and leave daemons behind; only rlimits, a new session, a clean "
            "environment and a temp cwd remain. Install bubblewrap before training on code rewards.",
            RuntimeWarning,
            stacklevel=4,
        )
    return None


def _read_capped(streams: dict[int, str], deadline: float, cap: dict[int, int], proc) -> tuple[dict, dict, bool]:
    """Read every fd until EOF or the deadline, keeping at most cap[fd] bytes of each."""
    data = {fd: bytearray() for fd in streams}
    truncated = {fd: False for fd in streams}
    sel = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    timed_out = False
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            fd = key.fd
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                sel.unregister(fd)
                continue
            room = cap[fd] - len(data[fd])
            if room > 0:
                data[fd] += chunk[:room]
            if len(chunk) > room:
                truncated[fd] = True
    sel.close()
    return data, truncated, timed_out


def run_python(
    files: dict[str, str],
    target: str,
    args: list[str] | None = None,
    stdin: bytes = b"",
    timeout: float = 5.0,
    stdout_cap: int = OUTPUT_CAP,
    result_pipe: bool = False,
    secret: bytes | None = None,
    allow_unsandboxed: bool = False,
) -> RawRun:
    """Run `files[target]` (with the other files beside it, read-only, in /job) in a fresh sandboxed interpreter.

    With `result_pipe`, the target gets argv `RESULT_FD SECRET_FD` extra: a pipe it may write a result record to
    (returned in `RawRun.extra[0]`), and a pipe holding `secret`, readable once. Raises `SandboxUnavailable`
    without a working bwrap unless `allow_unsandboxed`.
    """
    bwrap = _check_sandbox(allow_unsandboxed)
    job_dir = tempfile.mkdtemp(prefix="pt-sandbox-")
    pipes_close: list[int] = []
    proc = init_fd = info_r = None
    cwd = None
    try:
        _write_job(job_dir, files)
        root = "/job" if bwrap else job_dir
        extra_args = list(args or [])
        pass_fds: list[int] = []
        res_r = None
        if result_pipe:
            res_r, res_w = os.pipe()
            sec_r, sec_w = os.pipe()
            os.write(sec_w, secret or b"")
            os.close(sec_w)
            pipes_close += [res_r, res_w, sec_r]
            pass_fds = [res_w, sec_r]
            extra_args = [str(res_w), str(sec_r)] + extra_args
        keep = ",".join(str(fd) for fd in pass_fds)
        cpu, drop = str(int(timeout) + 1), "1" if bwrap else "0"
        cmd = [_python(), "-I", "-S", "-B", f"{root}/launcher.py", cpu, keep, drop, f"{root}/{target}", *extra_args]
        if bwrap:
            info_r, info_w = os.pipe()  # bwrap writes the host pid of the namespace's init here
            pipes_close += [info_r, info_w]
            cmd = [bwrap, *_bwrap_argv(job_dir, info_w), *cmd]
            pass_fds = [*pass_fds, info_w]
            env = {"PATH": "/usr/bin:/bin"}
        else:
            cwd = tempfile.mkdtemp(prefix="pt-sandbox-cwd-")
            env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            start_new_session=True,
            close_fds=True,
            cwd=cwd,
            env=env,
        )
        for fd in pass_fds:
            os.close(fd)
            pipes_close.remove(fd)
        threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True).start()
        if bwrap:
            init_fd = _namespace_init(info_r, proc.pid)
        streams = {proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
        caps = {proc.stdout.fileno(): stdout_cap, proc.stderr.fileno(): OUTPUT_CAP}
        if res_r is not None:
            streams[res_r] = "res"
            caps[res_r] = 1 << 20
        data, truncated, timed_out = _read_capped(streams, start + timeout, caps, proc)
        if not timed_out:
            try:
                proc.wait(timeout=max(0.1, start + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        _stop(proc, init_fd)
        init_fd = None
        out = RawRun(
            returncode=proc.returncode,
            stdout=bytes(data[proc.stdout.fileno()]),
            stderr=bytes(data[proc.stderr.fileno()]),
            timed_out=timed_out,
            stdout_truncated=truncated[proc.stdout.fileno()],
        )
        if res_r is not None:
            out.extra[0] = bytes(data[res_r])
        return out
    finally:
        if proc is not None:
            _stop(proc, init_fd)
            for s in (proc.stdout, proc.stderr):
                s.close()
        for fd in pipes_close:
            try:
                os.close(fd)
            except OSError:
                pass
        for d in (job_dir, cwd):
            if d:
                shutil.rmtree(d, ignore_errors=True)


def _write_job(job_dir: str, files: dict[str, str]) -> None:
    """The job folder: the run's files and the launcher, world-readable (the code runs as nobody), read-only."""
    os.chmod(job_dir, 0o755)
    for name, text in {**files, "launcher.py": LAUNCHER}.items():
        path = os.path.join(job_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, 0o644)


def _feed(pipe, data: bytes) -> None:
    """Write stdin from a thread: a program that never reads it must not block us past the deadline."""
    try:
        pipe.write(data)
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def _stop(proc: subprocess.Popen, init_fd: int | None) -> None:
    """End the run and everything it started; return only once all of it is gone.

    Under bwrap, `init_fd` is a pidfd on the run's pid-namespace init: SIGKILL it and wait until it has exited.
    The kernel kills every process of the namespace when its init dies (double forks, setsid, ignored signals
    included) and lets the init finish exiting only once they are all reaped. (bwrap itself exits as soon as
    the program does, and a SIGKILLed bwrap leaves its namespace to die later through --die-with-parent: either
    way processes outlived their run.) Then, and in the fallback, SIGKILL the process group we started."""
    if init_fd is not None:
        try:
            signal.pidfd_send_signal(init_fd, signal.SIGKILL)
        except ProcessLookupError:  # already gone (or a zombie: its namespace is empty)
            pass
        select.select([init_fd], [], [], 10.0)  # a pidfd is readable once its process has exited
        os.close(init_fd)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _namespace_init(info_r: int, bwrap_pid: int) -> int | None:
    """A pidfd on the sandbox's pid 1, whose host pid bwrap writes to --info-fd right after creating it; None if
    it cannot be had (no pidfd support, or bwrap already gone, so the pid might no longer be its child)."""
    text = b""
    deadline = time.monotonic() + 10.0
    while (
        not text.rstrip().endswith(b"}") and select.select([info_r], [], [], max(0.0, deadline - time.monotonic()))[0]
    ):
        chunk = os.read(info_r, 4096)
        if not chunk:
            break
        text += chunk
    try:
        pid = int(json.loads(text)["child-pid"])
        pidfd = os.pidfd_open(pid)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    try:  # the pidfd now pins one process; it is the right one if its parent is still our bwrap
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        if int(stat[stat.rindex(b")") + 2 :].split()[1]) == bwrap_pid:
            return pidfd
    except (OSError, ValueError, IndexError):
        pass
    os.close(pidfd)
    return None

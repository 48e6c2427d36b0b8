"""Run untrusted Python in a fresh, isolated, resource-limited process (the low layer of `verifiers.code`).

Layers, strongest available first (see docs/rewards-and-verifiers.md#code-execution):
- bubblewrap: new pid/net/ipc/uts (and, when not root, user) namespaces, so no network, no view of host
  processes, and every process of the run dies with the sandbox; a read-only view of /usr, /lib*, /bin and the
  Python installation only (no home, no project, no host /tmp); a private size-capped tmpfs as /tmp and cwd;
  an empty environment; `--new-session` (no TIOCSTI on our terminal); `--die-with-parent`.
- an unprivileged uid: when we are root, bwrap runs without a user namespace and the launcher drops to the host
  user `nobody` (65534) before any untrusted code runs, so RLIMIT_NPROC really binds (it does not for a uid
  mapped to host root) and the code holds no capabilities; when we are not root, bwrap maps us to 65534.
- rlimits set by the launcher: address space, CPU seconds, file size, process count, open files, no core dumps.
- from outside: a wall-clock deadline after which the whole process group is SIGKILLed, and output read with a
  byte cap (the rest is drained and dropped).
Without bwrap (or with POSTTRAIN_SANDBOX_NO_BWRAP=1, for testing) only the rlimits, the new session, the clean
environment and the temp cwd remain (a warning says so).
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
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


_bwrap_ok: dict[str, bool] = {}


def bwrap_path() -> str | None:
    """The bwrap binary, if installed and able to create the sandbox here (probed once per process)."""
    path = shutil.which("bwrap")
    if path is None or os.environ.get("POSTTRAIN_SANDBOX_NO_BWRAP") == "1":
        return None
    if path not in _bwrap_ok:
        exe, prefix = _python()
        with tempfile.TemporaryDirectory() as d:
            os.chmod(d, 0o755)
            cmd = _bwrap_argv(path, d, prefix) + [exe, "-I", "-S", "-c", "pass"]
            try:
                ok = subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
        _bwrap_ok[path] = ok
    return path if _bwrap_ok[path] else None


def _python() -> tuple[str, str]:
    """The real interpreter binary and the real installation prefix to bind (a venv's python is a symlink)."""
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not exe.startswith(prefix + os.sep):
        prefix = os.path.dirname(os.path.dirname(exe))
    return exe, prefix


def _parents(path: str) -> list[str]:
    out = []
    p = os.path.dirname(path)
    while p not in ("/", ""):
        out.append(p)
        p = os.path.dirname(p)
    return out[::-1]


def _bwrap_argv(bwrap: str, job_dir: str, prefix: str) -> list[str]:
    argv = [bwrap, "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin"]
    argv += ["--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONIOENCODING", "utf-8"]
    if os.geteuid() == 0:
        # No user namespace: the launcher drops to the real host uid 65534, where RLIMIT_NPROC binds.
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    else:
        argv += ["--unshare-all", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    for d in ("/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32", "/etc/alternatives"):
        if os.path.exists(d) and not (d != "/usr" and os.path.realpath(d).startswith("/usr/")):
            argv += ["--ro-bind", d, d]
        elif os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
    for p in _parents(prefix):
        if not p.startswith("/usr"):
            argv += ["--perms", "0755", "--dir", p]
    if not prefix.startswith("/usr/"):
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", job_dir, "/job"]
    argv += ["--perms", "1777", "--size", str(TMPFS_SIZE), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    return argv


def _warn_no_bwrap() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "bubblewrap (bwrap) is not installed or cannot create namespaces here: untrusted code runs WITHOUT "
            "namespaces (it can reach the network, "
            "read host files and see host processes); only rlimits, a new session, a clean environment and a temp "
            "cwd remain. Install bubblewrap before running code rewards.",
            RuntimeWarning,
            stacklevel=3,
        )


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
) -> RawRun:
    """Run `files[target]` (with the other files beside it, read-only, in /job) in a fresh sandboxed interpreter.

    With `result_pipe`, the target gets argv `RESULT_FD SECRET_FD` extra: a pipe it may write a result record to
    (returned in `RawRun.extra[0]`), and a pipe holding `secret`, readable once.
    """
    exe, prefix = _python()
    job_dir = tempfile.mkdtemp(prefix="pt-sandbox-")
    pipes_close: list[int] = []
    proc = None
    try:
        os.chmod(job_dir, 0o755)
        for name, text in files.items():
            path = os.path.join(job_dir, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(path, 0o644)
        with open(os.path.join(job_dir, "launcher.py"), "w") as f:
            f.write(LAUNCHER)
        os.chmod(os.path.join(job_dir, "launcher.py"), 0o644)
        bwrap = bwrap_path()
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
        cpu = str(int(timeout) + 1)
        drop = "1" if bwrap else "0"
        cmd = [exe, "-I", "-S", "-B", f"{root}/launcher.py", cpu, keep, drop, f"{root}/{target}", *extra_args]
        if bwrap:
            cmd = _bwrap_argv(bwrap, job_dir, prefix) + cmd
            cwd = None
            env = {"PATH": "/usr/bin:/bin"}
        else:
            _warn_no_bwrap()
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
        _kill(proc)
        proc.wait()
        out = RawRun(
            returncode=proc.returncode,
            stdout=bytes(data[proc.stdout.fileno()]),
            stderr=bytes(data[proc.stderr.fileno()]),
            timed_out=timed_out,
            stdout_truncated=truncated[proc.stdout.fileno()],
        )
        if res_r is not None:
            out.extra[0] = bytes(data[res_r])
        if cwd:
            shutil.rmtree(cwd, ignore_errors=True)
        return out
    finally:
        if proc is not None:
            _kill(proc)
            for s in (proc.stdout, proc.stderr):
                s.close()
        for fd in pipes_close:
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(job_dir, ignore_errors=True)


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


def _kill(proc) -> None:
    """SIGKILL the run's whole process group (bwrap's pid namespace takes every process inside with it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

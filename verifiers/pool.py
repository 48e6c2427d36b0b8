"""A pool of killable worker processes for checks that must not hang or corrupt the caller.

Each worker is a fresh Python interpreter (`subprocess`, not `multiprocessing`: it starts from any thread, from
daemonic processes and inside Ray actors) in its own session, that imports one function once and then answers
calls to it over a pipe. A call that runs past its timeout gets the worker's whole process group SIGKILLed and
a fresh worker started in its place; a worker is also replaced after `max_tasks_per_worker` calls, so nothing a
check leaves behind (caches, memory) outlives a bounded number of checks. Workers exit on their own when the
parent dies (their pipe closes), and cap their address space (`memory_limit_mb`).

Start-up (~0.5-1 s to import sympy) is paid once per worker, off the clock: a call's timeout counts only the
time its check runs, and the time it waits for a busy pool is bounded by the same timeout.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

Status = Literal["ok", "error", "timeout", "crashed"]


@dataclass(frozen=True)
class CallResult:
    status: Status
    value: Any = None
    """the function's return value when status is "ok"; the error text when "error"/"crashed" """


class PoolError(RuntimeError):
    """The pool itself failed (a worker could not start); never raised for a bad input."""


_WORKER_MAIN = """
import sys
from posttrain.verifiers.pool import serve
serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
"""


def _resolve(target: str) -> Any:
    import importlib

    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def serve(target: str, setup: str, read_fd: int, write_fd: int, memory_limit_mb: int) -> None:
    """Worker main loop: import `module:function`, run `setup` (or "-"), say ready, then answer `(args, kwargs)`
    requests until EOF."""
    if memory_limit_mb > 0:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    requests, replies = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    function = _resolve(target)
    if setup != "-":
        _resolve(setup)()
    replies.send(("ready", os.getpid()))
    while True:
        try:
            args, kwargs = requests.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            reply = ("ok", function(*args, **kwargs))
        except MemoryError:
            reply = ("error", "MemoryError")
        except Exception as error:
            reply = ("error", f"{type(error).__name__}: {error}"[:500])
        replies.send(reply)


class _Worker:
    def __init__(self, target: str, setup: str | None, memory_limit_mb: int):
        child_read, parent_write = os.pipe()
        parent_read, child_write = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # whatever made posttrain importable here
        env["OMP_NUM_THREADS"] = "1"
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_MAIN, target, setup or "-"]
                + [str(child_read), str(child_write), str(memory_limit_mb)],
                pass_fds=(child_read, child_write),
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group, killed as a whole
            )
        finally:
            os.close(child_read)
            os.close(child_write)
        self.requests = Connection(parent_write, readable=False)
        self.replies = Connection(parent_read, writable=False)
        self.ready = False
        self.tasks = 0

    def wait_ready(self, timeout: float) -> None:
        if self.ready:
            return
        if not self.replies.poll(timeout):
            self.kill()
            raise PoolError(f"a verifier worker did not start within {timeout:.0f} s")
        try:
            self.replies.recv()
        except (EOFError, OSError):
            self.kill()
            raise PoolError(f"a verifier worker died while starting (exit code {self.process.poll()})") from None
        self.ready = True

    def call(self, args: tuple, kwargs: dict, timeout: float) -> CallResult:
        self.tasks += 1
        try:
            self.requests.send((args, kwargs))
            if not self.replies.poll(max(timeout, 0.0)):
                return CallResult("timeout")
            status, value = self.replies.recv()
        except (EOFError, OSError, BrokenPipeError):
            return CallResult("crashed", f"worker exited with code {self.process.poll()}")
        return CallResult(status, value)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.process.wait(5)
        for connection in (self.requests, self.replies):
            connection.close()


class WorkerPool:
    """`workers` processes serving `target` ("package.module:function"); thread-safe. `setup` (same form) is
    called once in each worker before it takes calls (imports, warm-up).

    `call(*args, timeout=, **kwargs)` -> `CallResult`; `map(calls, timeout=)` runs many calls on all workers at
    once, each with its own timeout. A timed-out or crashed worker is killed and replaced.
    """

    def __init__(
        self,
        target: str,
        workers: int | None = None,
        setup: str | None = None,
        max_tasks_per_worker: int = 500,
        memory_limit_mb: int = 2048,
        startup_timeout: float = 60.0,
    ):
        if ":" not in target:
            raise ValueError(f"target must be 'module:function', got {target!r}")
        self.target, self.setup = target, setup
        self.size = workers or max(1, min(8, os.cpu_count() or 1))
        self.max_tasks_per_worker = max_tasks_per_worker
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout = startup_timeout
        self.stats = {"calls": 0, "timeouts": 0, "crashes": 0, "recycled": 0}
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._all: set[_Worker] = set()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="verifier-pool")
        for _ in range(self.size):
            self._idle.put(self._start())

    def _start(self) -> _Worker:
        worker = _Worker(self.target, self.setup, self.memory_limit_mb)
        with self._lock:
            self._all.add(worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
        if not self._closed:
            self._idle.put(self._start())

    def call(self, *args: Any, timeout: float, **kwargs: Any) -> CallResult:
        """Run `target(*args, **kwargs)` in a worker, at most `timeout` s; waits for a free worker at most as long."""
        return self._run(args, kwargs, timeout, wait=timeout)

    def map(self, calls: Sequence[tuple[tuple, dict]], timeout: float) -> list[CallResult]:
        """`[(args, kwargs), ...]` -> their results in order, run on all workers at once, `timeout` s per call.

        The calls of one batch queue for workers without a limit (the batch is ours, and the executor has one
        thread per worker), so the batch takes at most about len(calls) / workers * timeout.
        """
        if self._closed:
            raise PoolError("the verifier pool is closed")
        return list(self._executor.map(lambda item: self._run(item[0], item[1], timeout, wait=None), calls))

    def _run(self, args: tuple, kwargs: dict, timeout: float, wait: float | None) -> CallResult:
        if self._closed:
            raise PoolError("the verifier pool is closed")
        try:
            worker = self._idle.get(timeout=None if wait is None else max(wait, 0.0))
        except queue.Empty:
            with self._lock:
                self.stats["timeouts"] += 1
            return CallResult("timeout")
        try:
            worker.wait_ready(self.startup_timeout)  # start-up is the pool's cost, not the check's
        except PoolError:
            with self._lock:
                self._all.discard(worker)
            self._idle.put(self._start())
            raise
        result = worker.call(args, kwargs, timeout)
        with self._lock:
            self.stats["calls"] += 1
            self.stats["timeouts"] += result.status == "timeout"
            self.stats["crashes"] += result.status == "crashed"
        if result.status in ("timeout", "crashed") or worker.tasks >= self.max_tasks_per_worker:
            with self._lock:
                self.stats["recycled"] += 1
            self._retire(worker)
        else:
            self._idle.put(worker)
        return result

    def close(self) -> None:
        """Kill every worker; further calls raise `PoolError`."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            workers, self._all = list(self._all), set()
        for worker in workers:
            worker.kill()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

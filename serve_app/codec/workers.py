"""Decode and encode in worker processes that can be stopped.

A thread cannot be interrupted inside libjpeg or libtiff, so a decode that runs away (or whose
caller has gone) would keep its core until it ends. Each call here runs in one of a few
long-lived worker processes (forked from a forkserver that has the codec imported, so a
replacement starts in milliseconds) under

- a CPU-time budget: ``RLIMIT_CPU`` set to the worker's usage so far plus the budget, so the
  kernel stops the worker whatever library it is in (all its threads count);
- a memory budget: ``RLIMIT_DATA`` for the worker's heap and anonymous mappings;
- the caller's deadline and cancellation: the waiting coroutine kills the worker when the
  deadline passes or when it is cancelled (Serve cancels a request whose client went away).

A stopped worker is replaced lazily. Arrays cross in shared memory (``/dev/shm``) rather than
the pipe, so a 576 MB result costs one copy, not three. docs/SECURITY.md ("Decoding") has the
measurements behind this choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from serve_app.errors import CodecBudgetExceeded, InvalidImage, Overloaded, PhotoEnhanceError

LOGGER = logging.getLogger(__name__)

_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
_SHARE_MIN_BYTES = 1 << 20  # smaller arrays simply travel in the pipe
# Workers import this package from where this process found it (a Ray working_dir included).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]),
    "OMP_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class SharedArray:
    """An array left in a shared-memory file by one process for another (read once)."""

    path: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def put(cls, array: np.ndarray) -> SharedArray | np.ndarray:
        if _SHM_DIR is None or array.nbytes < _SHARE_MIN_BYTES:
            return array
        path = os.path.join(_SHM_DIR, f"photoenhance-{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, array.nbytes)
            with open(fd, "r+b", closefd=False) as f:
                f.write(np.ascontiguousarray(array).data)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(path, tuple(array.shape), array.dtype.str)

    def take(self) -> np.ndarray:
        """Map the array (no copy) and remove the file; the mapping lives as long as the array."""
        import mmap

        fd = os.open(self.path, os.O_RDWR)
        try:
            os.unlink(self.path)
            size = int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize
            mapped = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return np.frombuffer(mapped, dtype=self.dtype).reshape(self.shape)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def share(value: Any) -> Any:
    """Replace large arrays (top level, in tuples, or dataclass fields named ``image``)."""
    if isinstance(value, np.ndarray):
        return SharedArray.put(value)
    if isinstance(value, tuple):
        return tuple(share(v) for v in value)
    if hasattr(value, "__dataclass_fields__") and isinstance(getattr(value, "image", None), np.ndarray):
        import dataclasses

        return dataclasses.replace(value, image=SharedArray.put(value.image))
    return value


def unshare(value: Any) -> Any:
    if isinstance(value, SharedArray):
        return value.take()
    if isinstance(value, tuple):
        return tuple(unshare(v) for v in value)
    if isinstance(getattr(value, "image", None), SharedArray):
        import dataclasses

        return dataclasses.replace(value, image=value.image.take())
    return value


def discard(value: Any) -> None:
    for item in value if isinstance(value, tuple) else (value, getattr(value, "image", None)):
        if isinstance(item, SharedArray):
            item.discard()


# --------------------------------------------------------------------------- the worker side


def _worker_main(conn: Connection, memory_bytes: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    hard_cpu = resource.getrlimit(resource.RLIMIT_CPU)[1]
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        fn, args, cpu_s = task
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(usage.ru_utime + usage.ru_stime + cpu_s)
        # Past the soft limit the kernel sends SIGXCPU, whose default action terminates. (The
        # hard limit stays: once lowered it could not be raised for the next task.)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard_cpu))
        try:
            reply: tuple[str, Any] = ("ok", share(fn(*unshare(args))))
        except PhotoEnhanceError as exc:
            reply = ("error", exc)
        except MemoryError:
            reply = ("memory", None)
        except BaseException as exc:  # reported, never fatal to the worker
            reply = ("crash", f"{type(exc).__name__}: {exc}"[:300])
        try:
            conn.send(reply)
        except (EOFError, OSError, BrokenPipeError):
            if reply[0] == "ok":
                discard(reply[1])
            return


# --------------------------------------------------------------------------- the caller side


class _Worker:
    """One worker: a fresh interpreter (never a fork of a Ray worker) on a socket pair."""

    def __init__(self, memory_bytes: int) -> None:
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serve_app.codec.workers", str(theirs.fileno()), str(memory_bytes)],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True, env=_ENV,
        )
        theirs.close()
        self.conn = Connection(ours.detach())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            LOGGER.warning("codec worker %d did not exit", self.process.pid)
        self.conn.close()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()


class CodecWorkers:
    """A small pool of stoppable codec processes. Thread- and event-loop-safe."""

    def __init__(self, size: int = 2, memory_mb: int = 4096) -> None:
        self.size = max(1, size)
        self.memory_bytes = memory_mb * 1024 * 1024
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._starting = 0  # replacements being started in the background
        self._slots = threading.BoundedSemaphore(self.size)
        self.stopped = {"cpu": 0, "deadline": 0, "cancelled": 0, "memory": 0}
        self.busy = {"decode": 0, "encode": 0}  # calls running in a worker now, by kind
        # Threads that wait on workers (they hold no CPU): never the loop's shared executor.
        self._waiters = ThreadPoolExecutor(self.size * 8, thread_name_prefix="codec-wait")

    def _take(self) -> _Worker:
        with self._lock:
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive:
                        return worker
                    worker.kill()
                # A replacement on its way is sooner than a new start of our own.
                if not self._starting or not self._ready.wait(timeout=30):
                    break
        return _Worker(self.memory_bytes)

    def _give(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)
            self._ready.notify()

    def _replace(self) -> None:
        """Start a worker in the background, so the next call does not pay the start-up."""
        def start() -> None:
            try:
                self._give(_Worker(self.memory_bytes))
            except OSError:
                LOGGER.warning("could not start a codec worker", exc_info=True)
            finally:
                with self._lock:
                    self._starting -= 1
                    self._ready.notify_all()

        with self._lock:
            self._starting += 1

        threading.Thread(target=start, name="codec-worker-start", daemon=True).start()

    def start(self) -> None:
        """Start the workers now (a replica calls this at start-up)."""
        for _ in range(self.size - len(self._idle)):
            self._give(_Worker(self.memory_bytes))

    def call(self, fn: Callable[..., Any], *args: Any, cpu_s: float, timeout_s: float | None = None,
             what: str = "decode") -> Any:
        """Run ``fn(*args)`` in a worker (blocking; callers in an event loop use ``run``)."""
        cancel = threading.Event()
        return self._call(fn, args, cpu_s, timeout_s, what, cancel)

    async def run(self, fn: Callable[..., Any], *args: Any, cpu_s: float,
                  deadline: float | None = None, what: str = "decode") -> Any:
        """``fn(*args)`` in a worker; ``deadline`` is a ``time.monotonic()`` instant.

        Cancelling the awaiting task stops the worker at once.
        """
        timeout_s = None if deadline is None else deadline - time.monotonic()
        if timeout_s is not None:
            cpu_s = min(cpu_s, max(timeout_s, 0.0))
        cancel = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(
            self._waiters, self._call, fn, args, cpu_s, timeout_s, what, cancel
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            future.add_done_callback(lambda f: f.exception())  # retrieved: no log noise
            raise

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...], cpu_s: float,
              timeout_s: float | None, what: str, cancel: threading.Event) -> Any:
        end = None if timeout_s is None else time.monotonic() + timeout_s
        if not self._slots.acquire(timeout=None if timeout_s is None else max(timeout_s, 0.0)):
            raise self._exceeded(what, "deadline")
        try:
            worker = self._take()
            sent = share(args)
            try:
                worker.conn.send((fn, sent, cpu_s))
            except (OSError, EOFError):
                discard(sent)
                worker.kill()
                worker = self._take()
                sent = share(args)
                worker.conn.send((fn, sent, cpu_s))
            self._count(self.busy, what, 1)
            try:
                reason = self._wait(worker, end, cancel)
            finally:
                self._count(self.busy, what, -1)
            if reason is not None:
                worker.kill()
                self._replace()
                discard(sent)
                self._count(self.stopped, reason, 1)
                raise self._exceeded(what, reason)
            try:
                status, value = worker.conn.recv()
            except (EOFError, OSError):
                try:
                    code = worker.process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    code = None
                worker.kill()
                self._replace()
                discard(sent)
                if code in (-signal.SIGXCPU, -signal.SIGKILL):
                    self._count(self.stopped, "cpu", 1)
                    raise self._exceeded(what, "cpu") from None
                status, value = "crash", f"worker exited with {code}"
            else:
                self._give(worker)
        finally:
            self._slots.release()
        if status == "ok":
            return unshare(value)
        if status == "error":
            raise value
        if status == "memory":
            self._count(self.stopped, "memory", 1)
            raise self._exceeded(what, "memory")
        LOGGER.error("codec worker failed in %s: %s", what, value)
        raise InvalidImage(f"the image could not be {what}d", code=f"{what}_failed")

    def _count(self, table: dict[str, int], key: str, step: int) -> None:
        with self._lock:
            table[key] = table.get(key, 0) + step

    @staticmethod
    def _wait(worker: _Worker, end: float | None, cancel: threading.Event) -> str | None:
        """None when a reply (or the worker's end) is ready, else why we stop waiting."""
        while True:
            step = 0.05 if end is None else min(0.05, max(end - time.monotonic(), 0.0))
            if worker.conn.poll(step):
                return None
            if cancel.is_set():
                return "cancelled"
            if end is not None and time.monotonic() >= end:
                return "deadline"
            if not worker.alive:
                return None

    @staticmethod
    def _exceeded(what: str, reason: str) -> PhotoEnhanceError:
        if reason == "cancelled":
            return CodecBudgetExceeded(f"{what} cancelled", code=f"{what}_cancelled")
        if reason == "deadline":
            return Overloaded(
                f"{what} did not finish before the request's deadline", code="timeout",
                retry_after_s=5,
            )
        if reason == "memory":
            return CodecBudgetExceeded(
                f"{what} needs more memory than the server allows for one image",
                code=f"{what}_out_of_memory",
            )
        return CodecBudgetExceeded(
            f"{what} needs more CPU time than the server allows for one image",
            code=f"{what}_too_costly",
        )

    def close(self) -> None:
        with self._lock:
            workers, self._idle = self._idle, []
        for worker in workers:
            worker.kill()
        self._waiters.shutdown(wait=False)


if __name__ == "__main__":
    # Through the imported module, so that what it pickles names ``serve_app.codec.workers``.
    from serve_app.codec import workers

    workers._worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]))

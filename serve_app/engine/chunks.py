"""Chunked forwards: chunk sizes from a memory budget, out-of-memory turned into splits, on
the CPU chunks side by side in ``Lanes``, and a batch whose callers have all gone stopped at
its next chunk (``stopping``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from serve_app.errors import Abandoned, is_out_of_memory

LOGGER = logging.getLogger(__name__)


class ItemTooLarge(MemoryError):
    """One item alone does not fit the device; ``index`` is its position in the input.

    A ``MemoryError``, so that ``serve_app.errors.engine_error`` answers it with a 413."""

    def __init__(self, index: int) -> None:
        super().__init__(f"item {index} does not fit the device alone")
        self.index = index


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and is_out_of_memory(exc)


def chunk_size(budget_mb: int, bytes_per_item: float, cap: int = 64) -> int:
    """How many items one forward may take within ``budget_mb`` of activations."""
    return max(1, min(cap, int(budget_mb * 2**20 // max(bytes_per_item, 1.0))))


T = TypeVar("T")
R = TypeVar("R")

_local = threading.local()


@contextmanager
def stopping(stop: threading.Event | None) -> Iterator[None]:
    """While inside, every chunk this thread runs (or hands to lanes) first checks ``stop``:
    once it is set, ``Abandoned`` is raised in place of the forward. A deadline or a client
    that left then frees the device within one chunk, not after the whole image."""
    before = _current_stop()
    _local.stop = stop
    try:
        yield
    finally:
        _local.stop = before


def _current_stop() -> threading.Event | None:
    return getattr(_local, "stop", None)


def check_stop() -> None:
    stop = _current_stop()
    if stop is not None and stop.is_set():
        raise Abandoned("every caller of this batch has gone")


class Lanes:
    """``n`` threads that run forwards side by side on the CPU, each with one torch thread.

    On the CPU small convolutions use torch's intra-op threads poorly: on 2 cores, two tiny
    GFPGAN forwards at once with one thread each ran 1.9x the crops per second of one at a
    time with two threads (ParseNet 1.3x, Real-ESRGAN x2plus 1.1x; loadtests/lanes_bench.py). A
    batch has many items, so its chunks go through the lanes, while one item alone still
    gets every torch thread in its caller's thread. Each lane holds one chunk's activations
    at a time, so the CPU's memory budget is per lane.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._pool = ThreadPoolExecutor(n, thread_name_prefix="engine-lane")
        # torch keeps the thread count per thread, but a new thread copies the count last
        # set anywhere: each lane sets its own 1 once it has started, then the count of
        # everyone else is put back, before any other thread can start.
        previous = torch.get_num_threads()
        started = threading.Barrier(n + 1)

        def one_thread() -> None:
            torch.get_num_threads()  # torch's per-thread set-up first, or it undoes the next
            torch.set_num_threads(1)
            started.wait(timeout=60)

        for _ in range(n):
            self._pool.submit(one_thread)
        started.wait(timeout=60)
        torch.set_num_threads(previous)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` of each item, side by side, in no-grad inference mode (which is per thread).
        Every call has ended when this returns or raises (the first error, in item order)."""
        stop = _current_stop()  # the lanes run under their caller's stop
        futures = [self._pool.submit(_inferring, stop, fn, x) for x in items]
        wait(futures)
        return [f.result() for f in futures]

    def forward(
        self, fn: Callable[[torch.Tensor], Any], items: Sequence[torch.Tensor], chunk: int,
    ) -> Iterator[tuple[int, Any]]:
        """``forward_chunks`` with every chunk started at once; results in order. On out of
        memory the rest runs one chunk at a time in the caller, halving as there."""
        starts = range(0, len(items), chunk)
        stop = _current_stop()
        futures: list[Future] = [
            self._pool.submit(_inferring, stop, fn, torch.stack(list(items[s : s + chunk])))
            for s in starts
        ]
        try:
            for s, future in zip(starts, futures, strict=True):
                try:
                    out = future.result()
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    _cancel(futures)
                    LOGGER.warning("out of memory with %d lanes; the rest one chunk at a time",
                                   self.n)
                    try:
                        for i, y in forward_chunks(fn, items[s:], max(1, chunk // 2)):
                            yield s + i, y
                    except ItemTooLarge as too_large:
                        raise ItemTooLarge(s + too_large.index) from too_large
                    return
                yield s, out
        finally:
            _cancel(futures)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def by_group(fn: Callable[[T, Lanes | None], Any], groups: Sequence[T],
             lanes: Lanes | None) -> None:
    """``fn(group, lanes)`` for every group (a shape, a model: one forward's items): with
    lanes and several groups, the groups side by side, each in one lane; else in turn, each
    group's chunks side by side."""
    if lanes is not None and len(groups) > 1:
        lanes.map(lambda group: fn(group, None), groups)
    else:
        for group in groups:
            fn(group, lanes)


def _inferring(stop: threading.Event | None, fn: Callable[[T], R], x: T) -> R:
    """``fn(x)`` in a lane: in no-grad inference mode (per thread), under its caller's stop."""
    with stopping(stop), torch.inference_mode():
        check_stop()
        return fn(x)


def _cancel(futures: list[Future]) -> None:
    """Cancel what has not started and wait for what has: a chunk still running when its
    caller has moved on would hold its memory, and its lane, past the stage."""
    for f in futures:
        f.cancel()
    wait(futures)


def forward_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor],
    items: Sequence[torch.Tensor],
    chunk: int,
    lanes: Lanes | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, outputs)`` for consecutive chunks of equally shaped ``items``; with
    ``lanes`` and more than one chunk, the chunks run side by side there.

    On out-of-memory the chunk is halved and retried; a chunk of one that still does not
    fit raises ``ItemTooLarge`` naming the item, after the chunks before it were yielded.
    """
    if lanes is not None and len(items) > chunk:
        yield from lanes.forward(fn, items, chunk)
        return
    i, n = 0, len(items)
    while i < n:
        k = min(chunk, n - i)
        check_stop()
        try:
            out = fn(torch.stack(list(items[i : i + k])))
        except Exception as exc:
            if not is_oom(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if k == 1:
                raise ItemTooLarge(i) from exc
            chunk = max(1, k // 2)
            LOGGER.warning("out of memory with a chunk of %d; retrying with %d", k, chunk)
            continue
        yield i, out
        i += k


# Activation estimates (bytes per item, fp32): rough, by design; OOM handling covers misses.
def gfpgan_bytes(net: torch.nn.Module, elem: int) -> float:
    c_unet = net.conv_body_first.out_channels
    c_dec = net.stylegan_decoder.to_rgbs[-1].modulated_conv.in_channels
    return 512 * 512 * (6 * c_unet + 8 * c_dec + 16) * elem


def parse_bytes(net: torch.nn.Module, elem: int) -> float:
    c = net.encoder[0].conv2d.out_channels if hasattr(net.encoder[0], "conv2d") else 64
    return 512 * 512 * (8 * c + 64) * elem


def sr_bytes(net: torch.nn.Module, h: int, w: int, scale: int, elem: int) -> float:
    feat = getattr(net, "conv_first", None)
    c = feat.out_channels if feat is not None else 64
    grow = 32 if c >= 64 else max(4, c // 2)
    return h * w * (6 * c + 8 * grow) * elem + h * w * scale * scale * (3 * c + 6) * elem


def detect_bytes(h: int, w: int, elem: int) -> float:
    return h * w * 160 * elem

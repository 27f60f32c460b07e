"""The model deployment: one ``Engine`` per replica, fed by pixel-budget micro-batches.

Bytes in, bytes out. ``enhance`` takes the encoded image and returns the encoded result:
decoding and encoding run on the replica's codec threads (``deployments.transcode``), beside
the engine, so pixels never cross the network and the CPU work scales with the replicas.

Batching. ``@serve.batch`` with a ``batch_size_fn`` compares only that function's value with
``max_batch_size`` (the count is no longer checked), so both limits are folded into one
cost: an image costs ``max(N * pixels / B, 1)`` where ``N`` is ``batching.max_batch_size``
and ``B`` is ``batching.max_batch_pixels``, and a batch may cost ``N``. So a batch holds at
most ``N`` images and at most ``B`` pixels, and ``N`` small images close it at once. An image
of more than ``B`` pixels alone would be refused by Serve (``RuntimeError``), so it takes
its own path straight to the engine. One lock keeps the two paths from running the engine
at the same time, so the device never holds two batches' activations.

Metrics. Each replica records its work with ``ray.serve.metrics`` (``ReplicaMetrics``); Ray
exports them on every node's metrics port as ``ray_photoenhance_*`` (counters with ``_total``)
with ``deployment``, ``replica`` and ``application`` labels. They are recorded once per batch,
after the engine lock is released.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from serve_app import codec
from serve_app.api.schemas import EnhancedImage
from serve_app.config import AppConfig
from serve_app.deployments.backlog import BacklogProbe
from serve_app.deployments.transcode import Transcoder, accelerator_for
from serve_app.engine import EnhanceResult
from serve_app.errors import EngineFailure, PhotoEnhanceError, engine_error
from serve_app.options import EnhanceOptions

LOGGER = logging.getLogger(__name__)


@dataclass
class _Work:
    image: np.ndarray
    options: EnhanceOptions
    cost: float
    enqueued: float
    gone: bool = False  # its caller went away (its deadline passed, its client left)
    batch: _Callers | None = None  # once its batch has reached the engine

    def leave(self) -> None:
        self.gone = True
        if self.batch is not None:
            self.batch.update()


class _Callers:
    """A batch's callers. Once every one has gone its device stages stop at their next chunk
    (the engine's ``stop``): a timed-out image must not hold the device for seconds more."""

    def __init__(self, works: list[_Work]) -> None:
        self.works = works
        self.stop = threading.Event()
        for w in works:
            w.batch = self
        self.update()

    def update(self) -> None:
        if all(w.gone for w in self.works):
            self.stop.set()


def _batch_cost(items: list[_Work]) -> float:
    return sum(item.cost for item in items)


# Engine stages recorded once per batch (every image of a batch shares its stage's time).
ENGINE_STAGES = ("detect", "restore", "parse", "upsample", "paste")
STAGE_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
BATCH_SIZE_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
BATCH_PIXEL_BUCKETS = [2.0**k for k in range(12, 29)]  # 4 Ki .. 256 Mi pixels, doubling


class ReplicaMetrics:
    """The model replica's figures, through Ray (``ray_`` prefix on Ray's metrics port).

    Made in ``Enhancer.__init__`` (inside the replica, so Serve adds its labels). ``record``
    takes one finished batch; ``gpu_memory_bytes`` is set only on a CUDA device.
    """

    def __init__(self, device: Any = None) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.batch_size = Histogram(
            "photoenhance_batch_size",
            description="Images per engine batch.",
            boundaries=BATCH_SIZE_BUCKETS,
        )
        self.batch_pixels = Histogram(
            "photoenhance_batch_pixels",
            description="Input pixels per engine batch.",
            boundaries=BATCH_PIXEL_BUCKETS,
        )
        self.stage_seconds = Histogram(
            "photoenhance_stage_seconds",
            description="Seconds per stage in the model replica: queue per image, the engine "
            "stages and their total (engine) per batch.",
            boundaries=STAGE_BUCKETS,
            tag_keys=("stage",),
        )
        self.images = Counter(
            "photoenhance_images",
            description="Images through the engine, by outcome ('ok' or an error code).",
            tag_keys=("outcome",),
        )
        self.faces = Counter("photoenhance_faces", description="Faces restored.")
        self.gpu_memory = Gauge(
            "photoenhance_gpu_memory_bytes",
            description="GPU memory held by this replica's PyTorch allocator (reserved).",
        )
        self._cuda = device if getattr(device, "type", None) == "cuda" else None
        self._tags = {name: {"stage": name} for name in ("queue", "engine", *ENGINE_STAGES)}
        self._ok = {"outcome": "ok"}

    def record(self, works: list[_Work], results: list[Any]) -> None:
        self.batch_size.observe(len(works))
        self.batch_pixels.observe(sum(int(w.image.shape[0]) * int(w.image.shape[1]) for w in works))
        ok = faces = 0
        stages: dict[str, float] = {}
        for result in results:
            if isinstance(result, EnhanceResult):
                ok += 1
                faces += int(result.faces)
                timings = result.timings
                if "queue" in timings:
                    self.stage_seconds.observe(timings["queue"], tags=self._tags["queue"])
                for name in ENGINE_STAGES:
                    if name in timings:
                        stages[name] = max(stages.get(name, 0.0), timings[name])
                if "total" in timings:
                    stages["engine"] = max(stages.get("engine", 0.0), timings["total"])
            else:
                code = getattr(result, "code", None) or "internal_error"
                self.images.inc(1, tags={"outcome": str(code)})
        for name, seconds in stages.items():
            self.stage_seconds.observe(seconds, tags=self._tags[name])
        if ok:
            self.images.inc(ok, tags=self._ok)
        if faces:
            self.faces.inc(faces)
        if self._cuda is not None:
            import torch

            self.gpu_memory.set(torch.cuda.memory_reserved(self._cuda))


@serve.deployment(name="Enhancer")
class Enhancer:
    """Holds the engine and its codec threads; ``enhance`` (encoded bytes in and out) is
    what the ingress calls."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        from serve_app.engine import Engine  # torch loads inside the replica only

        started = time.perf_counter()
        self.engine = Engine.from_config(self.config)
        if self.config.engine.warmup:
            self.engine.warmup()
        batching = self.config.batching
        self._count = batching.max_batch_size
        self._budget = batching.max_batch_pixels
        self._run_batch.set_max_batch_size(self._count)
        self._run_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._engine_lock = asyncio.Lock()
        # Batches between the start of their device stages and the end of their paste. Two
        # when pastes overlap the device (one pasting, the next on the device; a third
        # waits, so staged images cannot pile up); one when not (each batch whole, in turn).
        overlap = self.config.engine.overlap_paste
        if overlap is None:
            overlap = getattr(self.engine.device, "type", "cpu") != "cpu"
        self._pasting = asyncio.Semaphore(2 if overlap else 1)
        self._overlap = overlap
        self._pastes: set[asyncio.Task] = set()  # held here: a task whose clients left runs on
        self._in_flight = 0
        self._backlog = BacklogProbe.for_app(self.config)
        self._metrics = _replica_metrics(getattr(self.engine, "device", None))
        device = getattr(self.engine, "device", None)
        self._codec = Transcoder(self.config, accelerator_for(self.config, device))
        self._codec.start()
        self._load_s = time.perf_counter() - started
        self._started_at = time.time()
        if getattr(device, "type", None) == "cpu" and self.config.engine.cpu_memory_mb:
            # Last: the codec workers already forked, each with its own limit.
            cap_private_memory(self.config.engine.cpu_memory_mb)
        if self.engine.synthetic:
            LOGGER.warning(
                "SYNTHETIC WEIGHTS in %s: outputs are not real restorations",
                self.config.weights.dir,
            )

    # ------------------------------------------------------------------ public methods

    async def enhance(self, data: bytes, options: EnhanceOptions) -> EnhancedImage:
        """Enhance one encoded image: decode, batch through the engine, encode; errors belong
        to this caller only. Only encoded bytes travel to and from this replica."""
        self._in_flight += 1
        try:
            t0 = time.perf_counter()
            # Decode and encode are stopped past this (and when this call is cancelled).
            deadline = time.monotonic() + self.config.ingress.request_timeout_s
            decoded = await self._codec.decode(bytes(data), options.upscale, deadline=deadline)
            t1 = time.perf_counter()
            result = await self._enhance_pixels(decoded.image, options)
            t2 = time.perf_counter()
            out, fmt = await self._codec.encode(
                result.image, options.format, decoded.format, options.quality,
                metadata=decoded.metadata, keep=options.metadata, color=options.color,
                chroma=options.chroma, deadline=deadline,
            )
            t3 = time.perf_counter()
        finally:
            self._in_flight -= 1
        # The engine's stages and its own total (as "engine"), with the queue before it.
        inner = dict(result.timings)
        engine_total = inner.pop("total", None)
        if engine_total is not None:
            inner["engine"] = engine_total
        timings = {"decode": t1 - t0, **inner, "encode": t3 - t2, "model": t3 - t0}
        return EnhancedImage(
            data=out,
            media_type=codec.MEDIA_TYPES[fmt],
            format=fmt,
            width=int(result.image.shape[1]),
            height=int(result.image.shape[0]),
            faces=int(result.faces),
            face_boxes=tuple(result.face_boxes),
            timings=timings,
            synthetic=self.engine.uses_synthetic(options),
        )

    async def _enhance_pixels(self, image: np.ndarray, options: EnhanceOptions) -> EnhanceResult:
        now = time.perf_counter()
        pixels = int(image.shape[0]) * int(image.shape[1])
        work = _Work(image, options, max(self._count * pixels / self._budget, 1.0), now)
        try:
            if pixels > self._budget:
                [(paste, i)] = await self._run_engine([work])
            else:
                paste, i = await self._run_batch(work)
            # Shielded: this request's end (say, its client left) must not cancel the others'.
            result = (await asyncio.shield(paste))[i]
        except asyncio.CancelledError:
            work.leave()
            raise
        if isinstance(result, BaseException):
            raise result
        return result

    def info(self, fresh: bool = False) -> dict[str, Any]:
        """Engine facts (device, profile, ``synthetic``), plus ``ready`` and batch settings;
        ``fresh``: the added models read from the registry now, not from the last look."""
        if fresh:
            self.engine.added.refresh()
        return {
            **self.engine.info(),
            "ready": True,
            "load_seconds": round(self._load_s, 3),
            "started_at": self._started_at,
            "max_batch_size": self._count,
            "max_batch_pixels": self._budget,
            "batch_wait_timeout_s": self.config.batching.batch_wait_timeout_s,
            **self._codec.info(),
        }

    def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        if self.engine.fault:
            raise RuntimeError(f"engine is broken: {self.engine.fault}")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Figures for the queue-depth policy: this replica's work and the job backlog."""
        stats = {"in_flight": float(self._in_flight)}
        stats.update(await self._backlog.stats())
        return stats

    # ------------------------------------------------------------------ batching

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, batch_size_fn=_batch_cost)
    async def _run_batch(self, works: list[_Work]) -> list[tuple[asyncio.Task, int]]:
        return await self._run_engine(works)

    async def _run_engine(self, works: list[_Work]) -> list[tuple[asyncio.Task, int]]:
        """Start the batch (device stages, then paste) as a task of its own, which no caller's
        leaving cancels; return once its device stages have ended, with, per image, that task
        and its place in the batch. The batch handler is then free for the next batch, whose
        device stages overlap this one's paste: the device does not wait on CPU work. (Pastes
        not overlapped: it returns once the whole batch has ended.)"""
        await self._pasting.acquire()  # bounds the batches held between device and paste
        forwarded = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._batch(works, forwarded))
        self._pastes.add(task)
        task.add_done_callback(self._pastes.discard)
        await asyncio.shield(forwarded)
        return [(task, i) for i in range(len(works))]

    async def _batch(self, works: list[_Work],
                     forwarded: asyncio.Future) -> list[EnhanceResult | PhotoEnhanceError]:
        started = time.perf_counter()
        try:
            if self._overlap:
                started, staged = await self._forward(works)
                forwarded.set_result(None)
                raw = await asyncio.to_thread(self.engine.finish_batch, staged)
            else:  # nothing runs beside the paste: the whole batch in one thread hop
                started, raw = await self._forward(works, finish=True)
            results = [_safe(r) for r in raw]
            if len(results) != len(works):
                raise EngineFailure(f"engine returned {len(results)} results for {len(works)}")
        except Exception as exc:
            results = [engine_error(exc) for _ in works]
        finally:
            self._pasting.release()
            if not forwarded.done():
                forwarded.set_result(None)
        for work, result in zip(works, results, strict=True):
            if isinstance(result, EnhanceResult):
                result.timings = {"queue": started - work.enqueued, **result.timings}
        if self._metrics is not None:
            try:
                self._metrics.record(works, results)
            except Exception:  # a metric must never fail a batch
                LOGGER.debug("replica metrics not recorded", exc_info=True)
        return results

    async def _forward(self, works: list[_Work], finish: bool = False) -> tuple[float, Any]:
        """(when the engine took the batch, its device stages as ``Engine.forward_batch``
        returns them; with ``finish``, its results, pasted in the same thread). The engine
        lock is held until the engine's thread has ended, whoever still waits: two batches
        never share the device's memory."""
        images = [w.image for w in works]
        options = [w.options for w in works]
        stop = _Callers(works).stop

        def run() -> Any:
            staged = self.engine.forward_batch(images, options, stop)
            return self.engine.finish_batch(staged) if finish else staged

        started = time.perf_counter()
        try:
            async with self._engine_lock:  # one batch in the device stages at a time
                started = time.perf_counter()
                return started, await asyncio.to_thread(run)
        except Exception as exc:  # a bug outside the stages (they keep errors per image)
            staged = self.engine.staged_failure(images, options, engine_error(exc))
            return started, self.engine.finish_batch(staged) if finish else staged


def cap_private_memory(headroom_mb: int) -> int:
    """Let this process's data segment grow by ``headroom_mb`` from now, and no further:
    past it an allocation fails (torch: "can't allocate memory", a 413 for that image alone)
    where the kernel's OOM killer would end the replica. Only the soft limit: children may
    still set their own. Returns the limit in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        data_kb = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
    limit = data_kb * 1024 + headroom_mb * 2**20
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    LOGGER.info("model replica: private memory capped at %d MiB (%d MiB headroom)",
                limit >> 20, headroom_mb)
    return limit


def _replica_metrics(device: Any) -> ReplicaMetrics | None:
    try:
        return ReplicaMetrics(device)
    except Exception:  # metrics must never keep a replica from starting
        LOGGER.warning("replica metrics unavailable", exc_info=True)
        return None


def _safe(result: Any) -> EnhanceResult | PhotoEnhanceError:
    if isinstance(result, EnhanceResult | PhotoEnhanceError):
        return result
    if isinstance(result, BaseException):
        return engine_error(result)
    return EngineFailure(f"engine returned {type(result).__name__}")


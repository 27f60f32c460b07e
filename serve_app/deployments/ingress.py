"""The ingress deployment (CPU): HTTP and Python handles in, the model deployment behind.

It checks each image's header against the limits (``codec.probe``: bombs are refused here)
and forwards the encoded bytes to ``Enhancer``, which decodes, enhances and encodes where
the pixels are and returns the encoded result: only compressed images travel between the
deployments. Python handles take the same path. From a Ray job or driver::

    from ray import serve
    handle = serve.get_app_handle("photoenhance")
    result = handle.enhance.remote(open("in.jpg", "rb").read(), {"upscale": 2}).result()
    open("out." + result.format, "wb").write(result.data)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app import codec
from serve_app.api import metrics
from serve_app.api.routes import build_asgi_app
from serve_app.api.schemas import EnhancedImage
from serve_app.config import AppConfig
from serve_app.deployments.admission import AdmissionGate
from serve_app.errors import (
    NotReady,
    Overloaded,
    UnsupportedMediaType,
    engine_error,
)
from serve_app.jobs import start_manager
from serve_app.options import EnhanceOptions, resolve_options
from serve_app.presets import PresetCatalog

LOGGER = logging.getLogger(__name__)

INFO_TIMEOUT_S = 5.0
INFO_TTL_S = 2.0
MODEL_DEPLOYMENT = "Enhancer"
STATE_TTL_S = 1.0  # how long one look at Serve's controller answers /readyz
STATE_TIMEOUT_S = 5.0
# Serve's replica states on the way to RUNNING (ray.serve._private.common.ReplicaState).
_COMING = ("STARTING", "UPDATING", "RECOVERING")
# Deployment statuses that mean something is wrong, not a policy (DeploymentStatus).
_FAILING = ("UNHEALTHY", "DEPLOY_FAILED")


def classify(status: str, replica_states: Mapping[str, int], scale_to_zero: bool) -> str:
    """The model deployment's state from what Serve's controller reports: ``running`` (a
    replica serves), ``starting`` (one is on its way, none serves yet), ``scaled_to_zero``
    (none, by policy: a request starts one), or ``unavailable`` (none, and not by policy;
    or Serve reports the deployment unhealthy or failed)."""
    states = {str(getattr(k, "value", k)): int(v) for k, v in replica_states.items()}
    if states.get("RUNNING", 0) > 0:
        return "running"
    if str(getattr(status, "value", status)) in _FAILING:
        return "unavailable"
    if any(states.get(k, 0) > 0 for k in _COMING):
        return "starting"
    return "scaled_to_zero" if scale_to_zero else "unavailable"


def _model_status(app_name: str) -> Any:
    """Serve's ``DeploymentStatusOverview`` of the model deployment (blocking: a controller
    call), or None when Serve does not know the application."""
    app = serve.status().applications.get(app_name)
    return None if app is None else app.deployments.get(MODEL_DEPLOYMENT)


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP routes (see ``serve_app.api.routes``) and the ``enhance`` handle method."""

    async def __init__(self, config: dict[str, Any], model: DeploymentHandle) -> None:
        self.config = AppConfig.model_validate(config)
        self._model = model
        self.presets = PresetCatalog(self.config.jobs.data_dir)
        self._door = AdmissionGate(
            self.config.ingress_inflight(),
            self.config.ingress.max_queued_requests,
            self.config.ingress.queue_timeout_s,
        )
        metrics.DOOR_ACTIVE.set_function(lambda: self._door.active)
        metrics.DOOR_WAITING.set_function(lambda: self._door.waiting)
        metrics.DOOR_DRAIN_RATE.set_function(self._door.drain_rate)
        self._info: dict[str, Any] | None = None
        self._info_at = 0.0
        self._scale_to_zero = self.config.model.autoscaling.min_replicas == 0
        self._app_name = serve.get_replica_context().app_name
        self._state: dict[str, Any] | None = None
        self._state_at = 0.0
        self._state_lock = asyncio.Lock()
        # The first model call from a new replica costs seconds (router set-up, first result
        # transfer); pay it in the background, not in the first user's request. Not where
        # the model may sleep at zero replicas: the warm-up would wake it.
        self._warmup = None if self._scale_to_zero else (
            asyncio.get_running_loop().create_task(self._warm_up()))
        # The job actor starts with the server, so unfinished jobs resume at once.
        start_manager(self.config)

    def __serve_build_asgi_app__(self) -> Any:
        return build_asgi_app(self)

    # ------------------------------------------------------------------ handle API

    async def enhance(
        self, data: bytes, options: Mapping[str, Any] | EnhanceOptions | None = None
    ) -> EnhancedImage:
        """Enhance one encoded image (JPEG, PNG, WebP, BMP or TIFF bytes).

        ``options`` are the HTTP option names (``upscale``, ``face``, ``format``, ``preset``,
        ...) as a mapping of strings or typed values, or an ``EnhanceOptions``. Raises a
        ``PhotoEnhanceError`` (wrapped in Ray's ``RayTaskError`` for remote callers, and still
        an instance of it) with the same code and status as the HTTP API.
        """
        async with self._door.slot():
            return await self._enhance(data, options)

    async def model_info(self, fresh: bool = False) -> dict[str, Any]:
        """The model deployment's ``info()`` (cached briefly; ``fresh``: asked now, with the
        added models read from their registry now); ``NotReady`` if it cannot say."""
        now = time.monotonic()
        if not fresh and self._info is not None and now - self._info_at < INFO_TTL_S:
            return self._info
        try:
            info = await self._call_model(self._model.info.remote(fresh), INFO_TIMEOUT_S)
        except Overloaded as exc:  # no answer, queue full, a replica restarting: not ready
            if isinstance(exc, NotReady):
                raise
            raise NotReady(
                f"the model deployment cannot answer now ({exc.code})", retry_after_s=5
            ) from None
        self._info, self._info_at = info, now
        metrics.WEIGHTS_SYNTHETIC.set(1 if info.get("synthetic") else 0)
        return info

    async def model_state(self) -> dict[str, Any] | None:
        """The model deployment as Serve's controller reports it, asking no replica (a call
        would wake a model at zero and keep it from scaling down): ``state`` (see
        ``classify``), ``replicas`` (running), ``scale_to_zero`` (the policy allows zero).
        Cached for ``STATE_TTL_S``; None when the controller cannot say."""
        async with self._state_lock:
            now = time.monotonic()
            if self._state is not None and now - self._state_at < STATE_TTL_S:
                return self._state
            try:
                status = await asyncio.wait_for(
                    asyncio.to_thread(_model_status, self._app_name), STATE_TIMEOUT_S)
            except Exception as exc:
                LOGGER.warning("readiness: Serve's controller did not answer (%s)", exc)
                return None
            if status is None:
                return None
            replicas = {str(getattr(k, "value", k)): int(v)
                        for k, v in status.replica_states.items()}
            self._state = {
                "state": classify(status.status, replicas, self._scale_to_zero),
                "replicas": replicas.get("RUNNING", 0),
                "scale_to_zero": self._scale_to_zero,
            }
            self._state_at = now
            return self._state

    def last_model_info(self) -> dict[str, Any] | None:
        """The model deployment's last ``info()`` answer, without asking it again."""
        return self._info

    # ------------------------------------------------------------------ internals

    async def _warm_up(self) -> None:
        tiny = codec.encode(np.full((8, 8, 3), 128, np.uint8), "png")
        opts = EnhanceOptions(upscale=1, face=False, bg_model="none")
        for _ in range(120):
            try:
                await self.model_info()
                await self._call_model(self._model.enhance.remote(tiny, opts), INFO_TIMEOUT_S * 6)
                return
            except Exception as exc:
                LOGGER.debug("warm-up: model not reachable yet (%s)", exc)
                await asyncio.sleep(1.0)

    async def _enhance(
        self, data: bytes, options: Mapping[str, Any] | EnhanceOptions | None
    ) -> EnhancedImage:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise UnsupportedMediaType(f"expected image bytes, got {type(data).__name__}")
        opts = (
            options
            if isinstance(options, EnhanceOptions)
            else resolve_options(options or {}, presets=self.presets.table(None))
        )
        data = bytes(data)
        t0 = time.perf_counter()
        # Headers and limits only (bombs are refused here, before a byte moves on); the model
        # replica decodes and encodes, so only encoded images cross the network.
        # Always on a thread: a small body may still cost tens of ms (19000 chunks within the
        # limits: 66 ms in Pillow); the hop costs about 0.14 ms (docs/SECURITY.md, "Metadata").
        await asyncio.to_thread(codec.probe, data, self.config.limits, opts.upscale)
        t1 = time.perf_counter()
        result: EnhancedImage = await self._call_model(
            self._model.enhance.remote(data, opts), self.config.ingress.request_timeout_s
        )
        t2 = time.perf_counter()
        # The rest of the model call: transfer both ways, routing and scheduling.
        transfer = max((t2 - t1) - result.timings.get("model", 0.0), 0.0)
        timings = {"probe": t1 - t0, **result.timings, "transfer": transfer, "total": t2 - t0}
        timings.pop("model", None)
        metrics.observe_stages(timings)
        return dataclasses.replace(result, timings=timings)

    async def _call_model(self, response: DeploymentResponse, timeout_s: float) -> Any:
        """Await a model call, mapping Ray's failures onto the API's errors."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        async def wait() -> Any:
            return await response

        try:
            return await asyncio.wait_for(wait(), timeout_s)
        except TimeoutError:
            response.cancel()
            raise Overloaded(
                f"the model did not answer within {timeout_s:g}s", code="timeout", retry_after_s=5
            ) from None
        except BackPressureError:
            raise Overloaded("the model queue is full; retry later", retry_after_s=2) from None
        except DeploymentUnavailableError:
            raise NotReady("the model deployment is unavailable", retry_after_s=5) from None
        except RayActorError:
            raise Overloaded(
                "a model replica went away; retry", code="replica_unavailable", retry_after_s=1
            ) from None
        except Exception as exc:
            raise engine_error(exc, "model call failed") from None

"""The HTTP API, version 1: a Starlette application over an enhancement service.

The service (the ingress deployment) provides ``enhance`` and ``model_info``; this module
only reads requests, calls it and writes responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from serve_app import __version__
from serve_app.api import metrics
from serve_app.api.errors import EXCEPTION_HANDLERS, error_response
from serve_app.api.guard import Guard, owner_filter, principal_of
from serve_app.api.http import DrainBody, ObservedApp, read_image_request, read_json_body
from serve_app.api.jobs import build_job_routes
from serve_app.api.schemas import SYNTHETIC_WARNING, EnhancedImage
from serve_app.codec import INPUT_FORMATS
from serve_app.config import AppConfig
from serve_app.errors import NotFound, NotReady, PhotoEnhanceError, as_photo_error
from serve_app.options import (
    BG_MODELS,
    FACE_MODELS,
    OUTPUT_FORMATS,
    EnhanceOptions,
    resolve_options,
)
from serve_app.presets import PresetCatalog

LOGGER = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# Engine facts anyone may read; the rest (folders, tuning) only admins (keys on) and the log.
PUBLIC_ENGINE_FIELDS = (
    "ready", "synthetic", "profile", "device", "loaded_models", "started_at",
    "max_batch_size", "max_batch_pixels", "batch_wait_timeout_s", "tile",
)

# What may follow /jobs/ in a page address; the page itself asks the API for the job.
PAGE_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
# The page loads only its own files; results and previews are same-origin or blob: URLs.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
    "object-src 'none'; base-uri 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}


class Service(Protocol):
    config: AppConfig
    presets: PresetCatalog

    async def enhance(
        self, data: bytes, options: Mapping[str, Any] | EnhanceOptions | None = None
    ) -> EnhancedImage: ...

    async def model_info(self, fresh: bool = False) -> dict[str, Any]:
        """The model deployment's ``info()`` (``fresh``: not from a cache, the added models
        read now); raises ``NotReady`` when it cannot answer."""
        ...

    async def model_state(self) -> dict[str, Any] | None:
        """The model deployment's ``state``, running ``replicas`` and ``scale_to_zero`` as
        Serve reports them, asking no replica; None when Serve cannot say."""
        ...

    def last_model_info(self) -> dict[str, Any] | None:
        """The last ``model_info`` answer, without asking again."""
        ...


def build_asgi_app(service: Service) -> DrainBody:
    config = service.config
    api = _Api(service)
    routes: list[BaseRoute] = [
        Route("/", api.index, methods=["GET"]),
        Route("/jobs/{job_id}", api.job_page, methods=["GET"]),
        Route("/favicon.ico", api.favicon, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/v1/enhance", api.enhance, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/presets", api.list_presets, methods=["GET"]),
        Route("/v1/presets/{name}", api.get_preset, methods=["GET"]),
        Route("/v1/presets/{name}", api.put_preset, methods=["PUT"]),
        Route("/v1/presets/{name}", api.delete_preset, methods=["DELETE"]),
    ]
    routes += build_job_routes(config, service.presets.for_owner, owner_filter,
                               service.model_info)
    middleware = []
    if config.http.cors_origins:  # outside the guard: preflights carry no key
        middleware.append(Middleware(
            CORSMiddleware,
            allow_origins=list(config.http.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "WWW-Authenticate", "Location", "Server-Timing"],
        ))
    middleware.append(Middleware(Guard, config=config))
    app = Starlette(
        routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS  # type: ignore[arg-type]
    )
    http = config.http
    return DrainBody(ObservedApp(app), http.drain_max_bytes, http.drain_timeout_s)


def public_engine_info(info: dict[str, Any] | None, admin: bool) -> dict[str, Any] | None:
    if info is None or admin:
        return info
    return {k: info[k] for k in PUBLIC_ENGINE_FIELDS if k in info}


def _model_names(info: dict[str, Any] | None) -> dict[str, Any]:
    """Built-in names, then the added models the model replicas report (docs/MODELS.md)."""
    added = list((info or {}).get("added_models") or [])
    return {
        "face": [*FACE_MODELS, *(m["name"] for m in added if m.get("kind") == "face")],
        "background": [*BG_MODELS, *(m["name"] for m in added if m.get("kind") == "bg")],
        "added": added,
    }


class _Api:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.config = service.config

    async def index(self, request: Request) -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return JSONResponse({"service": "photoenhance", "version": __version__, "api": "/v1"})
        # The page's addresses are relative to <base>: the application's mount point.
        root = html.escape(request.scope.get("root_path", "").rstrip("/") + "/", quote=True)
        text = page.read_text().replace('<base href="/">', f'<base href="{root}">', 1)
        return HTMLResponse(text, headers=PAGE_HEADERS)

    async def job_page(self, request: Request) -> Response:
        """``/jobs/ID``: the page, which reads the job id from its own address."""
        job_id = request.path_params["job_id"]
        if not PAGE_JOB_ID.match(job_id):
            raise NotFound(f"no job {job_id!r}", code="job_not_found")
        return await self.index(request)

    async def favicon(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Ready = can take a request: a model replica answers, or the model is at zero
        replicas by policy (or waking from it) and a request starts one. The model's own
        state is in ``models``. Where the model may scale to zero, no replica is asked:
        a probe's call would wake it, or keep it from ever reaching zero."""
        state = await self.service.model_state()
        if state is not None and state["scale_to_zero"]:
            if state["state"] == "unavailable":
                return self._not_ready(
                    NotReady("the model deployment is unavailable", retry_after_s=5), state)
            info = self.service.last_model_info()  # what the last answer said, if any
            if info is None and state["state"] == "running":
                # Asked once per ingress replica (weights synthetic or not): too rare to
                # hold the model up; a replica that cannot answer is Serve's to replace.
                with contextlib.suppress(Exception):
                    info = await self.service.model_info()
        else:
            if state is not None and state["state"] != "running":
                return self._not_ready(NotReady(
                    f"the model deployment is not ready ({state['state']})", retry_after_s=5
                ), state)
            try:
                info = await self.service.model_info()
            except Exception as exc:
                err = as_photo_error(exc) or NotReady("the model deployment is not ready")
                return self._not_ready(err, state and {**state, "state": "unavailable"})
            if state is None:  # Serve could not say; the replica's answer does
                state = {"state": "running", "replicas": None,
                         "scale_to_zero": self.config.model.autoscaling.min_replicas == 0}
        synthetic = None if info is None else bool(info.get("synthetic"))
        # Open to anyone, so never the admin view.
        model = public_engine_info(info, admin=False)
        body: dict[str, Any] = {
            "status": "ready", "ready": True, "synthetic": synthetic, "model": model,
            "models": {"enhancer": state},
        }
        headers = {}
        if synthetic:
            body["warning"] = SYNTHETIC_WARNING
            headers["X-Weights-Synthetic"] = "true"
        return JSONResponse(body, headers=headers)

    @staticmethod
    def _not_ready(err: PhotoEnhanceError, state: dict[str, Any] | None) -> Response:
        """The error answer, with the model's state beside it for operators."""
        beside: dict[str, Any] = {"ready": False}
        if state is not None:
            beside["models"] = {"enhancer": state}
        return error_response(err, **beside)

    async def metrics(self, request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)

    async def enhance(self, request: Request) -> Response:
        incoming = await read_image_request(request, self.config.limits)
        presets = self.service.presets.table(principal_of(request))
        options = resolve_options(incoming.options, presets=presets)
        result = await self.service.enhance(incoming.data, options)
        return Response(result.data, media_type=result.media_type, headers=result.headers())

    async def models(self, request: Request) -> Response:
        """What the server offers. A model asleep by policy (scale to zero, or waking from it)
        is not asked, as ``readyz`` does not ask it: a page or a monitor reading this would
        otherwise start a GPU replica for nothing. The engine facts are then those the model
        last gave, or none yet."""
        state = await self.service.model_state()
        asleep = (state is not None and state["scale_to_zero"]
                  and state["state"] in ("scaled_to_zero", "starting"))
        info: dict[str, Any] | None
        if asleep:
            info = self.service.last_model_info()
        else:
            try:
                info = await self.service.model_info()
            except Exception:
                info = None
        synthetic = bool(info and info.get("synthetic"))
        principal = principal_of(request)
        body: dict[str, Any] = {
            "ready": info is not None or asleep,  # asleep: a request starts a replica
            "synthetic": synthetic,
            "engine": public_engine_info(info, admin=principal is not None and principal.is_admin),
            "models": _model_names(info),
            "options": {
                **EnhanceOptions().model_dump(mode="json"),
                "metadata": self.config.encoding.metadata,  # the server's default
            },
            "formats": {"input": list(INPUT_FORMATS), "output": list(OUTPUT_FORMATS)},
            # What each option is (type, choices, bounds, default): the web page builds its
            # controls from this, so a new option needs no page edit.
            "option_schema": EnhanceOptions.model_json_schema(),
            "upload": {"max_files": self.config.jobs.max_upload_files},
            "presets": self.service.presets.listing(principal),
            "limits": self.config.limits.model_dump(mode="json"),
            "batching": self.config.batching.model_dump(mode="json"),
        }
        if synthetic:
            body["warning"] = SYNTHETIC_WARNING
        return JSONResponse(body)

    async def list_presets(self, request: Request) -> Response:
        return JSONResponse({"presets": self.service.presets.listing(principal_of(request))})

    async def get_preset(self, request: Request) -> Response:
        name = request.path_params["name"]
        for preset in self.service.presets.listing(principal_of(request)):
            if preset["name"] == name:
                return JSONResponse(preset)
        raise NotFound(f"no preset named {name!r}", code="preset_not_found")

    async def put_preset(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await read_json_body(request)
        if isinstance(body, dict) and set(body) == {"options"}:
            body = body["options"]
        principal = principal_of(request)
        store = self.service.presets.store_for(principal)
        stored, created = await asyncio.to_thread(store.put, name, body)
        scope = "global" if store is self.service.presets.shared else "own"
        return JSONResponse(
            {"name": name, "builtin": False, "scope": scope, "options": stored},
            status_code=201 if created else 200,
        )

    async def delete_preset(self, request: Request) -> Response:
        store = self.service.presets.store_for(principal_of(request))
        await asyncio.to_thread(store.delete, request.path_params["name"])
        return Response(status_code=204)

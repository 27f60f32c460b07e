"""The ``/v1/jobs`` routes: HTTP in, calls on the jobs boundary (``serve_app.jobs``), HTTP out.

This module knows requests and responses only; what a job is, where its files live and how
its inputs are checked is the jobs package's. Errors are ``PhotoEnhanceError``s; the app's
handlers give them their JSON shape. ``owner_of`` says as which owner a request reads
(``None``: all jobs: keys off or an admin key); a new job belongs to the submitting key
(``serve_app.api.guard.owner_name``). Event streams are bounded by ``JobStreams``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from serve_app.api.guard import owner_name
from serve_app.api.http import check_multipart_boundary, limit_body, read_json_body
from serve_app.api.streams import JobStreams
from serve_app.config import AppConfig
from serve_app.engine import catalog
from serve_app.errors import (
    InvalidOption,
    InvalidRequest,
    PayloadTooLarge,
    TooManyRequests,
    UnsupportedMediaType,
)
from serve_app.jobs import JobIntake, JobReader, Presets
from serve_app.options import EnhanceOptions


def _inline(name: str) -> str:
    """Content-Disposition for an output: its last component, as RFC 6266's ``filename*``
    where it is not ASCII (a header is Latin-1; a name like ``写真.jpg`` is not)."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf.isascii():
        return f'inline; filename="{leaf}"'
    return f"inline; filename*=utf-8''{quote(leaf)}"


Owner = Callable[[Request | WebSocket], str | None]
# JSON values a job body may hold besides its inputs: options and the other fields.
JSON_ROOM = 1024
ModelInfo = Callable[..., Awaitable[dict[str, Any]]]  # Service.model_info(fresh=...)


def _no_owner(_: Request | WebSocket) -> str | None:
    return None


def build_job_routes(config: AppConfig, presets: Presets | None = None,
                     owner_of: Owner = _no_owner,
                     model_info: ModelInfo | None = None) -> list[BaseRoute]:
    return job_routes(JobsApi(config, presets, owner_of, model_info))


def job_routes(api: JobsApi) -> list[BaseRoute]:
    return [
        Route("/v1/jobs", api.submit, methods=["POST"]),
        Route("/v1/jobs", api.list_jobs, methods=["GET"]),
        Route("/v1/jobs/{job_id}", api.get_job, methods=["GET"]),
        Route("/v1/jobs/{job_id}", api.delete_job, methods=["DELETE"]),
        Route("/v1/jobs/{job_id}/items", api.items, methods=["GET"]),
        Route("/v1/jobs/{job_id}/items/{index:item_index}/result", api.item_result,
              methods=["GET"]),
        Route("/v1/jobs/{job_id}/items/{index:item_index}/source", api.item_source,
              methods=["GET"]),
        Route("/v1/jobs/{job_id}/events", api.events, methods=["GET"]),
        WebSocketRoute("/v1/jobs/{job_id}/ws", api.websocket),
        Route("/v1/jobs/{job_id}/results.zip", api.results_zip, methods=["GET"]),
        Route("/v1/jobs/{job_id}/manifest.jsonl", api.manifest, methods=["GET"]),
        Route("/v1/jobs/{job_id}/retry", api.retry, methods=["POST"]),
        Route("/v1/jobs/{job_id}/{action:str}", api.control, methods=["POST"]),
    ]


class JobsApi:
    def __init__(self, config: AppConfig, presets: Presets | None = None,
                 owner_of: Owner = _no_owner, model_info: ModelInfo | None = None) -> None:
        self.config = config
        self.model_info = model_info
        if presets is None:
            from serve_app.presets import PresetStore

            store = PresetStore(config.jobs.data_dir / "presets.json")
            presets = lambda owner: store.custom()  # noqa: E731
        self.intake = JobIntake(config, presets, check=self._check_models)
        self.reader = JobReader(config)
        self.owner_of = owner_of
        self.streams = JobStreams(config.http)

    # ------------------------------------------------------------------ submit

    async def submit(self, request: Request) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        owner = owner_name(request)  # the job belongs to the submitting key, admins' too
        if owner is not None:
            await self._check_quota(owner)
        if media_type == "multipart/form-data":
            check_multipart_boundary(request.headers["content-type"])
            declared = request.headers.get("content-length", "")
            limited = limit_body(request, self.intake.upload_limit())
            snapshot = await self.intake.submit_upload(
                request.headers["content-type"],
                limited.stream(),
                owner=owner,
                declared_bytes=int(declared) if declared.isdigit() else None,
                namespace=self.owner_of(request),
            )
        elif media_type in ("application/json", ""):  # no type: read_json_body answers 415
            body = await self._read_job_body(request)
            snapshot = await self.intake.submit(body, owner=owner,
                                                namespace=self.owner_of(request))
        else:
            raise UnsupportedMediaType(
                "send multipart/form-data with 'files', or application/json with 'inputs' "
                "or 'input_prefix'",
                code="unsupported_media_type",
            )
        job_id = snapshot["job_id"]
        body = {**snapshot, "urls": _urls(job_id)}
        return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})

    async def _read_job_body(self, request: Request) -> Any:
        """A JSON job body within ``jobs.max_json_bytes`` and ``max_json_inputs`` (413):
        counted before it is parsed, so a hostile body costs the ingress little memory."""
        jobs = self.config.jobs
        advice = ("; for a larger job name an 'input_prefix' (a folder or bucket prefix, "
                  "listed as the job runs) or split it into several jobs")
        body = await read_json_body(
            request, jobs.max_json_bytes, max_values=jobs.max_json_inputs + JSON_ROOM,
            advice=advice, too_many="too_many_inputs",
        )
        inputs = body.get("inputs") if isinstance(body, dict) else None
        if isinstance(inputs, list) and len(inputs) > jobs.max_json_inputs:
            raise PayloadTooLarge(
                f"{len(inputs)} inputs; the limit is {jobs.max_json_inputs}{advice}",
                code="too_many_inputs", max_values=jobs.max_json_inputs,
            )
        return body

    async def _check_models(self, options: EnhanceOptions) -> None:
        """A job naming an added model the model replicas do not know, or one of the wrong
        kind, is refused (422) before it exists, not failed item by item. A name missing
        from the cached listing is asked again fresh (a model added a moment ago); when the
        replicas cannot answer now, the job goes in and each item is checked where it runs."""
        if self.model_info is None or not catalog.added_fields(options):
            return
        for fresh in (False, True):
            try:
                info = await self.model_info(fresh=fresh)
            except Exception:  # noqa: BLE001 - cannot say now: the items are checked as they run
                return
            kinds = {m.get("name"): m.get("kind") for m in info.get("added_models") or []}
            try:
                catalog.check_options(options, kinds.get)
                return
            except InvalidOption:
                if fresh:
                    raise

    async def _check_quota(self, owner: str) -> None:
        """Per-key limits on unfinished jobs and items (``auth.max_*_in_flight``): 429.
        A cheap early refusal, before an upload streams in; the job actor checks again,
        counting the new job's items, as it creates the job (atomic across ingress
        replicas: ``JobManager.create_job``)."""
        auth = self.config.auth
        live = [j for j in await self.reader.list(owner=owner) if j["finished_at"] is None]
        if len(live) >= auth.max_jobs_in_flight:
            raise TooManyRequests(
                f"this key has {len(live)} unfinished jobs (the limit is "
                f"{auth.max_jobs_in_flight}); wait for one to end", code="too_many_jobs",
                retry_after_s=30,
            )
        items = sum(max((j["total"] or 0) - j["done"], 0) for j in live)
        if items >= auth.max_items_in_flight:
            raise TooManyRequests(
                f"this key has {items} unfinished items (the limit is "
                f"{auth.max_items_in_flight})", code="too_many_items", retry_after_s=30,
            )

    # ------------------------------------------------------------------ reading

    async def list_jobs(self, request: Request) -> Response:
        state = request.query_params.get("state") or None
        jobs = await self.reader.list(state=state, owner=self.owner_of(request))
        return JSONResponse({"jobs": jobs})

    async def get_job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        return JSONResponse(await self.reader.get(job_id, owner=self.owner_of(request)))

    async def items(self, request: Request) -> Response:
        q = request.query_params
        page = await self.reader.items(
            request.path_params["job_id"],
            offset=_query_int(q.get("offset"), 0, "offset"),
            limit=_query_int(q.get("limit"), 100, "limit"),
            status=q.get("status") or None,
            owner=self.owner_of(request),
        )
        return JSONResponse(page)

    async def item_result(self, request: Request) -> Response:
        result = await self.reader.item_result(
            request.path_params["job_id"], int(request.path_params["index"]),
            owner=self.owner_of(request),
        )
        record = result.record
        return StreamingResponse(
            result.chunks,
            media_type=result.media_type,
            headers={
                "Content-Length": str(record.bytes),
                "Content-Disposition": _inline(record.name),
                "X-Content-SHA256": record.sha256 or "",
            },
        )

    async def item_source(self, request: Request) -> Response:
        source = await self.reader.item_source(
            request.path_params["job_id"], int(request.path_params["index"]),
            owner=self.owner_of(request),
        )
        return StreamingResponse(
            source.chunks,
            media_type=source.media_type,
            headers={"Content-Length": str(source.size),
                     "Content-Disposition": f'inline; filename="{source.name}"'},
        )

    async def manifest(self, request: Request) -> Response:
        manifest = await self.reader.manifest(
            request.path_params["job_id"], owner=self.owner_of(request)
        )
        return StreamingResponse(
            manifest.chunks,
            media_type="application/x-ndjson",
            headers={"Content-Length": str(manifest.size)},
        )

    async def results_zip(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        chunks = await self.reader.results(job_id, owner=self.owner_of(request))
        return StreamingResponse(
            chunks,
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'},
        )

    # ------------------------------------------------------------------ control

    async def control(self, request: Request) -> Response:
        snapshot = await self.intake.control(
            request.path_params["job_id"], request.path_params["action"],
            owner=self.owner_of(request),
        )
        return JSONResponse(snapshot)

    async def retry(self, request: Request) -> Response:
        """A new job over this job's failed items (body: optional ``{"options": {...}}``)."""
        owner = owner_name(request)
        if owner is not None:
            await self._check_quota(owner)
        empty = request.headers.get("content-length") == "0" and "content-type" not in request.headers
        body = {} if empty else await read_json_body(request, JSON_ROOM * 64)
        if not isinstance(body, dict) or set(body) - {"options"}:
            raise InvalidRequest("send {} or {\"options\": {...}}", code="invalid_request")
        snapshot = await self.intake.retry(
            request.path_params["job_id"], body.get("options"), owner=self.owner_of(request),
            namespace=self.owner_of(request),
        )
        job_id = snapshot["job_id"]
        return JSONResponse({**snapshot, "urls": _urls(job_id)}, status_code=202,
                            headers={"Location": f"/v1/jobs/{job_id}"})

    async def delete_job(self, request: Request) -> Response:
        await self.intake.delete(request.path_params["job_id"], owner=self.owner_of(request))
        return Response(status_code=204)

    # ------------------------------------------------------------------ progress

    async def events(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        owner = self.owner_of(request)
        return await self.streams.events(job_id, lambda: self.reader.progress(job_id, owner=owner),
                                         key=owner_name(request))

    async def websocket(self, websocket: WebSocket) -> None:
        job_id = websocket.path_params["job_id"]
        owner = self.owner_of(websocket)
        await self.streams.websocket(
            websocket, job_id, lambda: self.reader.progress(job_id, owner=owner),
            key=owner_name(websocket),
        )


# ---------------------------------------------------------------------- helpers


def _urls(job_id: str) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {
        "self": base,
        "events": f"{base}/events",
        "ws": f"{base}/ws",
        "items": f"{base}/items",
        "results": f"{base}/results.zip",
        "manifest": f"{base}/manifest.jsonl",
    }


def _query_int(value: str | None, default: int, name: str) -> int:
    if value in (None, ""):
        return default
    try:
        return max(int(value), 0)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer", code="invalid_query") from None

"""The ``/v1/jobs`` routes. Requests are checked here; the job actor owns the jobs.

Submission does everything that can fail cheaply before a job exists: options, inputs
(scheme, allowed local folders, private addresses), output location, free space (507);
uploads are spooled into the new job's folder as they stream. Result files (``results.zip``,
one item's output, the manifest) are streamed from storage by this process, not through the
actor. Errors are ``PhotoEnhanceError``s; the app's handlers give them their JSON shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from serve_app.api.http import limit_body, parse_option_sources, read_json
from serve_app.api.presets import PresetStore
from serve_app.config import AppConfig
from serve_app.errors import (
    InvalidRequest,
    NotFound,
    NotReady,
    PhotoEnhanceError,
)
from serve_app.jobs import manager as mgr
from serve_app.jobs import sources
from serve_app.jobs.manifest import MANIFEST
from serve_app.jobs.naming import is_job_id, new_job_id
from serve_app.jobs.scheduler import unwrap
from serve_app.jobs.spec import ITEM_STATES, TERMINAL, JobSpec
from serve_app.jobs.spool import UploadSpooler
from serve_app.jobs.storage import Storage, is_local, local_path, within
from serve_app.options import EnhanceOptions, resolve_options

LOGGER = logging.getLogger(__name__)

EVENT_INTERVAL_S = 0.5
ACTOR_RETRY_S = 30.0
JOB_FIELDS = frozenset({"priority", "output", "max_inflight"})
JSON_FIELDS = JOB_FIELDS | {"inputs", "input_prefix", "options"}
MAX_PAGE = 1000
SIZE_SAMPLE = 32
MULTIPART_OVERHEAD = 64 * 1024
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def build_job_routes(config: AppConfig, enhance: Callable[..., Awaitable[Any]] | None = None) -> list[BaseRoute]:
    """Routes of the jobs API. ``enhance`` is unused: the job actor calls the ingress
    through a Serve handle, so job items pass the same checks as ``POST /v1/enhance``."""
    api = JobsApi(config)
    api.start_manager()
    return job_routes(api)


def job_routes(api: JobsApi) -> list[BaseRoute]:
    return [
        Route("/v1/jobs", api.submit, methods=["POST"]),
        Route("/v1/jobs", api.list_jobs, methods=["GET"]),
        Route("/v1/jobs/{job_id}", api.get_job, methods=["GET"]),
        Route("/v1/jobs/{job_id}/items", api.items, methods=["GET"]),
        Route("/v1/jobs/{job_id}/items/{index:int}/result", api.item_result, methods=["GET"]),
        Route("/v1/jobs/{job_id}/events", api.events, methods=["GET"]),
        WebSocketRoute("/v1/jobs/{job_id}/ws", api.websocket),
        Route("/v1/jobs/{job_id}/results.zip", api.results_zip, methods=["GET"]),
        Route("/v1/jobs/{job_id}/manifest.jsonl", api.manifest, methods=["GET"]),
        Route("/v1/jobs/{job_id}/{action:str}", api.control, methods=["POST"]),
    ]


class JobsApi:
    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.jobs = config.jobs
        self.jobs_dir = mgr.jobs_dir(config)
        self.presets = PresetStore(Path(config.jobs.data_dir) / "presets.json")

    # ------------------------------------------------------------------ the actor

    def start_manager(self) -> None:
        """Create the job actor as the server starts, so unfinished jobs resume at once."""
        import ray

        if ray.is_initialized():
            try:
                handle = mgr.get_manager(self.config)
                handle.configure.remote(self.config.model_dump(mode="json"))
            except Exception:
                LOGGER.exception("cannot start the job actor; it starts on first use")

    async def call(self, method: str, *args: Any) -> Any:
        """Call the job actor, waiting out a restart; its errors come back as raised."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        deadline = time.monotonic() + ACTOR_RETRY_S
        while True:
            handle = mgr.get_manager(self.config)
            try:
                return await getattr(handle, method).remote(*args)
            except (RayActorError, ActorUnavailableError) as exc:
                err = unwrap(exc)
                if err is not None:
                    raise err from None
                # Restarting, or gone for good: look it up (or create it) again by name.
                mgr.forget_manager(self.config)
                if time.monotonic() > deadline:
                    raise NotReady("the job manager is restarting; retry", retry_after_s=2) from None
                await asyncio.sleep(0.25)
            except Exception as exc:
                err = unwrap(exc)
                if err is not None:
                    raise err from None
                raise

    async def snapshot(self, job_id: str) -> dict[str, Any]:
        if not is_job_id(job_id):
            raise NotFound(f"no job {job_id!r}", code="job_not_found")
        return await self.call("get_job", job_id)

    # ------------------------------------------------------------------ submit

    async def submit(self, request: Request) -> Response:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        job_id = new_job_id()
        folder = self.jobs_dir / job_id
        try:
            if media_type == "multipart/form-data":
                spec = await self._from_upload(request, job_id, folder)
            elif media_type in ("application/json", ""):
                spec = await self._from_json(request, job_id, folder)
            else:
                raise InvalidRequest(
                    "send multipart/form-data with 'files', or JSON with 'inputs' or "
                    "'input_prefix'",
                    code="unsupported_body",
                )
            snapshot = await self.call("create_job", spec.model_dump(mode="json"))
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            raise
        body = {**snapshot, "urls": _urls(job_id)}
        return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})

    async def _from_upload(self, request: Request, job_id: str, folder: Path) -> JobSpec:
        max_files = self.jobs.max_upload_files
        max_bytes = self.config.limits.max_bytes
        limit = max_files * (max_bytes + MULTIPART_OVERHEAD)
        declared = request.headers.get("content-length", "")
        if declared.isdigit():
            Storage(str(self.jobs_dir)).check_space(int(declared), self.jobs.min_free_bytes)
        limited = limit_body(request, limit)
        spooler = UploadSpooler(folder / "inputs", max_files=max_files, max_file_bytes=max_bytes)
        spooled = await spooler.spool(request.headers["content-type"], limited.stream())
        if not spooled.files:
            raise InvalidRequest("the upload holds no files (send them in 'files')", code="no_inputs")
        job_fields = {k: v for k, v in spooled.fields.items() if k in JOB_FIELDS}
        options = self._options(
            parse_option_sources({k: v for k, v in spooled.fields.items() if k not in JOB_FIELDS})
        )
        items = [(str(path), filename) for path, filename in spooled.files]
        await asyncio.to_thread(sources.write_inputs, folder / sources.INPUTS, items)
        estimate = spooled.bytes * options.upscale**2
        return self._spec(job_id, folder, "upload", job_fields, options, len(items), estimate)

    async def _from_json(self, request: Request, job_id: str, folder: Path) -> JobSpec:
        body = await read_json(request, self.jobs.max_json_bytes)
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object", code="invalid_json")
        unknown = set(body) - JSON_FIELDS
        if unknown:
            raise InvalidRequest(f"unknown fields {sorted(unknown)}", code="invalid_request")
        options = self._options(parse_option_sources({"options": body.get("options") or {}}))
        has_inputs, has_prefix = "inputs" in body, "input_prefix" in body
        if has_inputs == has_prefix:
            raise InvalidRequest("send exactly one of 'inputs' and 'input_prefix'", code="no_inputs")
        folder.mkdir(parents=True, exist_ok=True)
        if has_inputs:
            uris = body["inputs"]
            if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
                raise InvalidRequest("'inputs' must be a non-empty list of URIs", code="no_inputs")
            await asyncio.to_thread(self._check_inputs, uris)
            items = [(u, u) for u in uris]
            await asyncio.to_thread(sources.write_inputs, folder / sources.INPUTS, items)
            estimate = await asyncio.to_thread(_estimate, uris, len(uris))
            return self._spec(job_id, folder, "inputs", body, options, len(uris),
                              estimate * options.upscale**2)
        prefix = body["input_prefix"]
        if not isinstance(prefix, str) or not prefix:
            raise InvalidRequest("'input_prefix' must be a URI", code="no_inputs")
        if sources.scheme_of(prefix) in ("http", "https"):
            raise InvalidRequest("an http(s) URL cannot be listed; send 'inputs'", code="invalid_uri")
        await asyncio.to_thread(self._check_inputs, [prefix])
        sample = await asyncio.to_thread(_sample_prefix, prefix)
        estimate = await asyncio.to_thread(_estimate, sample, len(sample))
        return self._spec(job_id, folder, "prefix", body, options, None,
                          estimate * options.upscale**2, prefix)

    def _check_inputs(self, uris: list[str]) -> None:
        roots = mgr.local_roots(self.config)
        hosts_seen: set[str] = set()
        for uri in uris:
            if sources.scheme_of(uri) in ("http", "https"):
                host = uri.split("://", 1)[1].split("/", 1)[0]
                if host in hosts_seen:
                    continue
                hosts_seen.add(host)
            try:
                sources.check_input(
                    uri, allow_private=self.jobs.allow_private_urls, local_roots=roots
                )
            except sources.SourceUnavailable as exc:  # DNS failure now: the fetch retries later
                LOGGER.info("input %s not checked now: %s", uri, exc.message)

    def _options(self, raw: dict[str, Any]) -> EnhanceOptions:
        return resolve_options(raw, presets=self.presets.custom())

    def _spec(
        self,
        job_id: str,
        folder: Path,
        kind: str,
        fields: dict[str, Any],
        options: EnhanceOptions,
        total: int | None,
        estimate: int,
        prefix: str | None = None,
    ) -> JobSpec:
        output = self._output(fields.get("output"), folder)
        storage = Storage(output)
        storage.check_space(estimate, self.jobs.min_free_bytes)
        return JobSpec(
            job_id=job_id,
            created_at=time.time(),
            kind=kind,  # type: ignore[arg-type]
            input_prefix=prefix,
            output=output,
            options=options.model_dump(mode="json"),
            priority=_int_field(fields, "priority", 0, -1000, 1000),
            max_inflight=_int_field(fields, "max_inflight", None, 1, 1 << 20),
            total=total,
            estimated_bytes=estimate,
        )

    def _output(self, value: Any, folder: Path) -> str:
        if value in (None, ""):
            return str(folder / "outputs")
        if not isinstance(value, str):
            raise InvalidRequest("'output' must be a storage URI", code="invalid_output")
        if is_local(value):
            path = local_path(value)
            roots = [Path(self.jobs.data_dir) / "outputs", *self.jobs.local_roots]
            if not path.is_absolute() or not within(path, roots):
                raise InvalidRequest(
                    f"output {value!r} is outside the folders this server writes to",
                    code="forbidden_path",
                )
            return str(path)
        Storage(value)  # the protocol's library must be installed
        return value

    # ------------------------------------------------------------------ reading

    async def list_jobs(self, request: Request) -> Response:
        state = request.query_params.get("state") or None
        return JSONResponse({"jobs": await self.call("list_jobs", state)})

    async def get_job(self, request: Request) -> Response:
        return JSONResponse(await self.snapshot(request.path_params["job_id"]))

    async def items(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        q = request.query_params
        offset = _query_int(q.get("offset"), 0, "offset")
        limit = min(_query_int(q.get("limit"), 100, "limit"), MAX_PAGE)
        status = q.get("status") or None
        if status is not None and status not in ITEM_STATES:
            raise InvalidRequest(f"status must be one of {list(ITEM_STATES)}", code="invalid_query")
        await self.snapshot(job_id)
        return JSONResponse(await self.call("items", job_id, offset, max(limit, 0), status))

    async def item_result(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        index = int(request.path_params["index"])
        snapshot = await self.snapshot(job_id)
        record = await self.call("record", job_id, index)
        if record is None:
            raise NotFound(f"item {index} of job {job_id} has no result (yet)", code="result_not_ready")
        if record.get("status") != "succeeded":
            raise NotFound(f"item {index} failed: {record['error']['code']}", code="item_failed")
        storage = Storage(snapshot["output"])
        return StreamingResponse(
            storage.iter_bytes(record["name"]),
            media_type=MEDIA.get(record.get("format") or "", "application/octet-stream"),
            headers={
                "Content-Length": str(record["bytes"]),
                "Content-Disposition": f'inline; filename="{record["name"]}"',
                "X-Content-SHA256": record["sha256"],
            },
        )

    async def manifest(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        await self.snapshot(job_id)
        path = self.jobs_dir / job_id / MANIFEST
        size = path.stat().st_size if path.exists() else 0
        return StreamingResponse(
            _read_upto(path, size),
            media_type="application/x-ndjson",
            headers={"Content-Length": str(size)},
        )

    async def results_zip(self, request: Request) -> Response:
        from stream_zip import NO_COMPRESSION_64, stream_zip

        job_id = request.path_params["job_id"]
        snapshot = await self.snapshot(job_id)
        storage = Storage(snapshot["output"])
        path = self.jobs_dir / job_id / MANIFEST
        size = path.stat().st_size if path.exists() else 0

        def members() -> Iterator[Any]:
            for record in _records(path, size):
                if record.get("status") != "succeeded":
                    continue
                when = datetime.fromtimestamp(record.get("finished_at") or time.time())
                method = NO_COMPRESSION_64(record["bytes"], record["crc32"])
                yield record["name"], when, 0o644, method, storage.iter_bytes(record["name"])

        return StreamingResponse(
            stream_zip(members()),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'},
        )

    # ------------------------------------------------------------------ control

    async def control(self, request: Request) -> Response:
        job_id, action = request.path_params["job_id"], request.path_params["action"]
        if action not in ("cancel", "pause", "resume"):
            raise NotFound(f"no action {action!r}; use cancel, pause or resume", code="not_found")
        await self.snapshot(job_id)
        return JSONResponse(await self.call("control", job_id, action))

    # ------------------------------------------------------------------ progress

    async def progress(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The current state, then one snapshot per state change or at most every 500 ms
        while anything moves; ends after the job's final state."""
        snapshot = await self.snapshot(job_id)
        yield snapshot
        last = _event_key(snapshot)
        while snapshot["state"] not in TERMINAL:
            started = time.monotonic()
            snapshot = await self.call("watch", job_id, EVENT_INTERVAL_S)
            key = _event_key(snapshot)
            if key != last:
                yield snapshot
                last = key
            elif time.monotonic() - started < EVENT_INTERVAL_S / 2:
                await asyncio.sleep(EVENT_INTERVAL_S / 2)

    async def events(self, request: Request) -> Response:
        from sse_starlette import EventSourceResponse

        job_id = request.path_params["job_id"]
        stream = self.progress(job_id)
        first = await anext(stream)  # a 404 before the stream starts

        async def messages() -> AsyncIterator[dict[str, Any]]:
            yield {"data": json.dumps(first), "id": str(first["version"])}
            async for snapshot in stream:
                yield {"data": json.dumps(snapshot), "id": str(snapshot["version"])}

        return EventSourceResponse(messages(), ping=15)

    async def websocket(self, websocket: WebSocket) -> None:
        job_id = websocket.path_params["job_id"]
        await websocket.accept()
        try:
            async for snapshot in self.progress(job_id):
                await websocket.send_json(snapshot)
        except PhotoEnhanceError as exc:
            await websocket.send_json({"error": exc.to_dict()})
            await websocket.close(code=4000 + exc.status)
            return
        except WebSocketDisconnect:
            return
        await websocket.close(code=1000)


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


def _event_key(snapshot: dict[str, Any]) -> tuple[Any, ...]:
    return (
        snapshot["state"],
        snapshot["reason"],
        snapshot["total"],
        snapshot["listing"],
        tuple(snapshot["counts"].values()),
    )


def _int_field(fields: dict[str, Any], name: str, default: Any, low: int, high: int) -> Any:
    value = fields.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name!r} must be an integer", code="invalid_request") from None
    if isinstance(value, float | bool) or not low <= number <= high:
        raise InvalidRequest(f"{name!r} must be an integer in [{low}, {high}]", code="invalid_request")
    return number


def _query_int(value: str | None, default: int, name: str) -> int:
    if value in (None, ""):
        return default
    try:
        return max(int(value), 0)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer", code="invalid_query") from None


def _estimate(uris: list[str], count: int) -> int:
    """Bytes of ``count`` inputs, from the local ones among the first ``SIZE_SAMPLE``."""
    sizes = []
    for uri in uris[:SIZE_SAMPLE]:
        if is_local(uri):
            try:
                sizes.append(local_path(uri).stat().st_size)
            except OSError:
                continue
    return int(sum(sizes) / len(sizes) * count) if sizes else 0


def _sample_prefix(prefix: str) -> list[str]:
    out = []
    for uri in sources.iter_prefix(prefix):
        out.append(uri)
        if len(out) >= SIZE_SAMPLE:
            break
    return out


def _read_upto(path: Path, size: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    if size == 0:
        return
    with open(path, "rb") as f:
        left = size
        while left > 0 and (block := f.read(min(chunk, left))):
            left -= len(block)
            yield block


def _records(path: Path, size: int) -> Iterator[dict[str, Any]]:
    if size == 0:
        return
    with open(path, "rb") as f:
        while f.tell() < size:
            line = f.readline()
            if not line.endswith(b"\n"):
                break
            yield json.loads(line)


"""The jobs intake: plain values in (a request mapping, an upload stream, the owner), a job out.

Everything that can fail cheaply happens here, before a job exists: the request's fields
(``JobRequest``, validated once), the options (resolved once; the spec carries them typed to
the job actor and every item), inputs (scheme, allowed folders, private addresses), the output
location and free space (507). Uploads are spooled into the new job's folder as they stream.
A submission that fails leaves no folder behind. Control commands (pause, resume, cancel)
come in here too. The HTTP layer only translates requests into these calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_app.config import MULTIPART_OVERHEAD, AppConfig
from serve_app.errors import Conflict, InvalidOption, InvalidRequest, NotFound
from serve_app.jobs import manager as mgr
from serve_app.jobs import sources, webhooks
from serve_app.jobs.gate import Gate, HostUnresolved, parse_url, protocol_of
from serve_app.jobs.naming import new_job_id, spool_name
from serve_app.jobs.reader import JobReader
from serve_app.jobs.spec import JOB_JSON, JobSpec, read_json
from serve_app.jobs.spool import UploadSpooler
from serve_app.jobs.storage import Storage, is_local, local_path
from serve_app.options import EnhanceOptions, resolve_options

LOGGER = logging.getLogger(__name__)

SIZE_SAMPLE = 32
# Room for each part's multipart envelope around the file itself.
ACTIONS = ("cancel", "pause", "resume")

# Saved presets a submission may name, by the submitting owner (None: keys off).
Presets = Callable[[str | None], Mapping[str, Mapping[str, Any]]]


class JobRequest(BaseModel):
    """What a client may ask of a job (JSON body, or an upload's non-option form fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: list[str] | None = Field(None, min_length=1, description="Input URIs.")
    input_prefix: str | None = Field(None, min_length=1, description="A folder or bucket prefix.")
    output: str | None = Field(None, description="Output storage URI; default: the job's folder.")
    options: dict[str, Any] = Field(default_factory=dict, description="Enhancement options.")
    priority: int = Field(0, ge=-1000, le=1000)
    max_inflight: int | None = Field(None, ge=1, le=1 << 20)
    callback_url: str | None = Field(None, description="Where to POST a signed summary at the end.")

    @field_validator("output", "callback_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("priority", "max_inflight", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        # Refused before pydantic: booleans, fractions, inf/nan (1e999 in JSON is inf).
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError("must be an integer")
        return None if value == "" else value

    @field_validator("priority", mode="before")
    @classmethod
    def _default_priority(cls, value: Any) -> Any:
        return 0 if value is None else value


JOB_FIELDS = frozenset({"priority", "output", "max_inflight", "callback_url"})
_FIELD_CODES = {"inputs": "no_inputs", "input_prefix": "no_inputs", "output": "invalid_output",
                "callback_url": "invalid_uri"}


def parse_request(body: Any) -> JobRequest:
    """A ``JobRequest`` from a JSON value; every mistake is a 4xx naming the field."""
    if isinstance(body, JobRequest):
        return body
    if not isinstance(body, Mapping):
        raise InvalidRequest("the body must be a JSON object", code="invalid_json")
    unknown = set(body) - set(JobRequest.model_fields)
    if unknown:
        raise InvalidRequest(f"unknown fields {sorted(map(str, unknown))}", code="invalid_request")
    options = body.get("options")
    if options is not None and not isinstance(options, Mapping | str):
        raise InvalidOption("options must be a JSON object", field="options")
    try:
        return JobRequest.model_validate({**body, "options": raw_options(options)})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "body"
        raise InvalidRequest(
            f"{field!r}: {err['msg']}", code=_FIELD_CODES.get(field, "invalid_request")
        ) from None


def raw_options(value: Any) -> dict[str, Any]:
    """Option values from a mapping or a JSON object text (a form field); not resolved."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except (ValueError, RecursionError):
            raise InvalidOption("options is not valid JSON", field="options") from None
    if not isinstance(value, Mapping):
        raise InvalidOption("options must be a JSON object", field="options")
    return dict(value)


class JobIntake:
    """Submits jobs and passes control commands to the job actor."""

    def __init__(self, config: AppConfig, presets: Presets | None = None,
                 check: Callable[[EnhanceOptions], Awaitable[None]] | None = None) -> None:
        self.config = config
        self.jobs_dir = mgr.jobs_dir(config)
        self.presets: Presets = presets or (lambda owner: {})
        # Whether the server can run a job's options (say, the added models it names): it
        # raises to refuse the job before it exists.
        self.check = check
        self.gate = Gate(config)
        self.reader = JobReader(config)
        mgr.configure_fsspec(config)

    # ------------------------------------------------------------------ submitting

    async def submit(self, request: Mapping[str, Any] | JobRequest, *,
                     owner: str | None = None, namespace: str | None = None) -> dict[str, Any]:
        """A job reading URIs (``inputs``) or a prefix (``input_prefix``); its snapshot.
        ``namespace``: a user key's name, whose outputs stay in its own folder of each
        shared root (``Gate.output``); None for admin keys and handles."""
        req = parse_request(request)
        options = self._options(req.options, owner)
        if (req.inputs is None) == (req.input_prefix is None):
            raise InvalidRequest("send exactly one of 'inputs' and 'input_prefix'", code="no_inputs")
        if self.check is not None:
            await self.check(options)
        job_id = new_job_id()
        folder = self.jobs_dir / job_id
        return await self._create(folder, self._uri_spec(job_id, folder, req, options, owner,
                                                         namespace))

    async def submit_upload(
        self,
        content_type: str,
        stream: AsyncIterator[bytes],
        *,
        owner: str | None = None,
        declared_bytes: int | None = None,
        namespace: str | None = None,
    ) -> dict[str, Any]:
        """A job over the files of a ``multipart/form-data`` stream (field ``files``); other
        fields are job fields (``priority``, ``output``, ``max_inflight``) or options."""
        if declared_bytes is not None:
            Storage(str(self.jobs_dir)).check_space(declared_bytes, self.config.jobs.min_free_bytes)
        job_id = new_job_id()
        folder = self.jobs_dir / job_id

        async def spec() -> JobSpec:
            spooler = UploadSpooler(folder / "inputs", max_files=self.config.jobs.max_upload_files,
                                    max_file_bytes=self.config.limits.max_bytes,
                                    check_space=self._spool_space)
            spooled = await spooler.spool(content_type, stream)
            if not spooled.files:
                raise InvalidRequest("the upload holds no files (send them in 'files')",
                                     code="no_inputs")
            fields = {k: v for k, v in spooled.fields.items() if k in JOB_FIELDS}
            option_fields = {k: v for k, v in spooled.fields.items() if k not in JOB_FIELDS}
            opts = raw_options(option_fields.pop("options", None))
            req = parse_request({**fields, "options": {**option_fields, **opts}})
            options = self._options(req.options, owner)
            if self.check is not None:
                await self.check(options)
            items = [(str(path), filename) for path, filename in spooled.files]
            await asyncio.to_thread(sources.write_inputs, folder / sources.INPUTS, items)
            estimate = spooled.bytes * options.upscale**2
            return self._spec(job_id, folder, "upload", req, options, len(items), estimate,
                              owner=owner, namespace=namespace)

        return await self._create(folder, spec())

    async def retry(self, job_id: str, options: Mapping[str, Any] | None, *,
                    owner: str | None = None, namespace: str | None = None) -> dict[str, Any]:
        """A new job over ``job_id``'s failed items, owned as the old one; its snapshot.
        ``owner``: as whom the caller reads (None: all). ``options`` None: the old job's
        options; else resolved afresh (a preset, the rest defaults), as a submission's.
        An upload's retry reads the kept originals (linked, not copied); another job's, its
        URIs again (checked by the gate again)."""
        await self.reader.get(job_id, owner=owner)  # another owner's job: 404
        failed: list[int] = []
        while True:
            page = await self.reader.items(job_id, offset=len(failed), limit=1000,
                                           status="failed", owner=owner)
            failed += [row["index"] for row in page["items"]]
            if not page["items"] or len(failed) >= page["total"]:
                break
        if not failed:
            raise Conflict(f"job {job_id} has no failed items", code="no_failed_items")
        old = JobSpec.model_validate(
            await asyncio.to_thread(read_json, self.jobs_dir / job_id / JOB_JSON))
        owner = old.owner  # the new job is the old one's owner's, whoever asks (an admin)
        opts = old.options if options is None else self._options(raw_options(options), owner)
        if self.check is not None:
            await self.check(opts)
        pairs = await asyncio.to_thread(_input_pairs, self.jobs_dir / job_id / sources.INPUTS,
                                        set(failed))
        new_id = new_job_id()
        folder = self.jobs_dir / new_id
        req = JobRequest(priority=old.priority, max_inflight=old.max_inflight)

        async def spec() -> JobSpec:
            if old.kind != "upload":
                uris = [source for source, _ in pairs]
                return await self._uri_spec(new_id, folder, req.model_copy(update={"inputs": uris}),
                                            opts, owner, namespace)
            items = await asyncio.to_thread(_link_uploads, pairs, folder / "inputs")
            await asyncio.to_thread(sources.write_inputs, folder / sources.INPUTS, items)
            size = sum(Path(p).stat().st_size for p, _ in items)
            return self._spec(new_id, folder, "upload", req, opts, len(items),
                              size * opts.upscale**2, owner=owner, namespace=namespace)

        return await self._create(folder, spec())

    def _spool_space(self, _: int) -> None:
        # The floor holds for uploads too, checked as they stream (chunked bodies declare
        # no length up front).
        Storage(str(self.jobs_dir)).check_space(0, self.config.jobs.min_free_bytes)

    def upload_limit(self) -> int:
        """The most bytes an upload body may have."""
        return self.config.jobs.max_upload_files * (self.config.limits.max_bytes + MULTIPART_OVERHEAD)

    async def _create(self, folder: Path, spec: Any) -> dict[str, Any]:
        try:
            job_spec: JobSpec = await spec
            return await mgr.call_manager(self.config, "create_job", job_spec)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            raise

    async def _uri_spec(self, job_id: str, folder: Path, req: JobRequest,
                        options: EnhanceOptions, owner: str | None,
                        namespace: str | None = None) -> JobSpec:
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        if req.inputs is not None:
            uris = req.inputs
            await asyncio.to_thread(self._check_inputs, uris)
            # Items keep the URIs as the client wrote them; the gate checks them again at
            # every fetch.
            await asyncio.to_thread(sources.write_inputs, folder / sources.INPUTS,
                                    [(u, u) for u in uris])
            estimate = await asyncio.to_thread(_estimate, uris, len(uris))
            return self._spec(job_id, folder, "inputs", req, options, len(uris),
                              estimate * options.upscale**2, owner=owner, namespace=namespace)
        if protocol_of(req.input_prefix or "") in ("http", "https"):
            raise InvalidRequest("an http(s) URL cannot be listed; send 'inputs'", code="invalid_uri")
        prefix = (await asyncio.to_thread(self.gate.input, req.input_prefix)).uri
        sample = await asyncio.to_thread(_sample_prefix, prefix)
        estimate = await asyncio.to_thread(_estimate, sample, len(sample))
        return self._spec(job_id, folder, "prefix", req, options, None,
                          estimate * options.upscale**2, prefix, owner=owner,
                          namespace=namespace)

    def _check_inputs(self, uris: list[str]) -> None:
        hosts_seen: set[tuple[str, int]] = set()
        for uri in uris:
            if isinstance(uri, str) and protocol_of(uri) in ("http", "https"):
                host = parse_url(self.gate.url(uri, resolve=False))
                if host in hosts_seen:  # one DNS lookup a host
                    continue
                hosts_seen.add(host)
            try:
                self.gate.input(uri)
            except HostUnresolved as exc:  # DNS failure now: the fetch retries later
                LOGGER.info("input %s not checked now: %s", uri, exc.message)

    def _options(self, raw: Mapping[str, Any], owner: str | None) -> EnhanceOptions:
        return resolve_options(raw, presets=self.presets(owner))

    def _spec(
        self,
        job_id: str,
        folder: Path,
        kind: str,
        req: JobRequest,
        options: EnhanceOptions,
        total: int | None,
        estimate: int,
        prefix: str | None = None,
        *,
        owner: str | None,
        namespace: str | None = None,
    ) -> JobSpec:
        output = self._output(req.output, folder, namespace)
        if req.callback_url is not None:
            webhooks.secret_for(self.config.jobs, owner)  # 400 when callbacks are not enabled
            try:
                self.gate.url(req.callback_url)
            except HostUnresolved as exc:  # checked again before every attempt
                LOGGER.info("callback not checked now: %s", exc.message)
        if is_local(output):  # object stores report no free space; nothing to connect to
            Storage(output).check_space(estimate, self.config.jobs.min_free_bytes)
        return JobSpec(
            job_id=job_id,
            created_at=time.time(),
            kind=kind,  # type: ignore[arg-type]
            input_prefix=prefix,
            output=output,
            requested_output=req.output,
            options=options,
            priority=req.priority,
            max_inflight=req.max_inflight,
            total=total,
            estimated_bytes=estimate,
            owner=owner,
            callback_url=req.callback_url,
        )

    def _output(self, value: str | None, folder: Path, namespace: str | None = None) -> str:
        location = self.gate.output(value, folder / "outputs", namespace)
        if not location.local:
            import fsspec

            try:  # the protocol's library must be installed (imported, never connected)
                fsspec.get_filesystem_class(location.protocol)
            except (ImportError, ValueError):
                raise InvalidRequest(f"{location.protocol}:// storage is not installed here",
                                     code="invalid_output") from None
        return location.uri

    # ------------------------------------------------------------------ control

    async def control(self, job_id: str, action: str, *, owner: str | None = None) -> dict[str, Any]:
        """``pause``, ``resume`` or ``cancel``; the job's new snapshot."""
        if action not in ACTIONS:
            raise NotFound(f"no action {action!r}; use cancel, pause or resume", code="not_found")
        await self.reader.get(job_id, owner=owner)
        return await mgr.call_manager(self.config, "control", job_id, action)

    async def delete(self, job_id: str, *, owner: str | None = None) -> None:
        """Cancel the job if it runs and remove it with its folder (outputs written
        elsewhere stay)."""
        await self.reader.get(job_id, owner=owner)
        await mgr.call_manager(self.config, "delete", job_id)


def _input_pairs(path: Path, indices: set[int]) -> list[tuple[str, str]]:
    """Items ``indices``' (source, name) from a job's item list, read only (a listing job
    may be appending to it)."""
    out = []
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if i in indices and line.endswith(b"\n"):
                source, name = json.loads(line)
                out.append((source, name))
    return out


def _link_uploads(pairs: list[tuple[str, str]], folder: Path) -> list[tuple[str, str]]:
    """Another job's spooled uploads in ``folder``, hard-linked where the file system allows
    (the originals are never written again), copied where not; (path, client's name) each."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index, (source, name) in enumerate(pairs):
        target = folder / spool_name(index, name)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        out.append((str(target), name))
    return out


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
    """Up to ``SIZE_SAMPLE`` local inputs under ``prefix``; a bucket is not listed here (only
    local sizes are known without a request, and submission connects nowhere)."""
    if not is_local(prefix):
        return []
    out = []
    for uri in sources.iter_prefix(prefix):
        out.append(uri)
        if len(out) >= SIZE_SAMPLE:
            break
    return out

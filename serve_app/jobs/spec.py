"""What a job is (its spec, stored as ``job.json``), the states jobs and items go through, and
why a job was paused or ended."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.options import EnhanceOptions

ACTIVE: frozenset[str] = frozenset({"queued", "running"})
TERMINAL: frozenset[str] = frozenset({"completed", "partial", "failed", "cancelled"})

# Item states, one byte per item in the job's status array.
PENDING, RUNNING, SUCCEEDED, FAILED = 0, 1, 2, 3
ITEM_STATES: tuple[str, ...] = ("pending", "running", "succeeded", "failed")

# Why the server paused or ended a job: a code and a generic text (details go to the log).
REASONS: dict[str, str] = {
    "low_disk": "the output storage is under its free-space floor; resume once space is freed",
    "storage_error": "writing outputs failed; resume to retry",
    "internal_error": "an internal error stopped the job; resume to retry",
    "listing_failed": "listing the input prefix failed",
    "no_inputs": "no inputs were found",
    "paused_expired": "the job stayed paused longer than this server keeps paused jobs",
}

# Which control actions each state accepts.
TRANSITIONS: dict[str, dict[str, str]] = {
    "pause": {"queued": "paused", "running": "paused"},
    "resume": {"paused": "running"},
    "cancel": {"queued": "cancelled", "running": "cancelled", "paused": "cancelled"},
}

JOB_JSON = "job.json"
STATE_JSON = "state.json"


class JobSpec(BaseModel):
    """Everything needed to run (or re-run) a job; written once, never changed."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    job_id: str
    created_at: float
    kind: Literal["upload", "inputs", "prefix"]
    input_prefix: str | None = None
    output: str = Field(description="Output storage URI.")
    requested_output: str | None = Field(
        None, description="The output as the client wrote it (None: the job's own folder); "
        "what answers echo, never the resolved server path.")
    options: EnhanceOptions = Field(
        default_factory=EnhanceOptions, description="Resolved once, at submission."
    )
    priority: int = 0
    max_inflight: int | None = Field(None, ge=1, description="At most the server's per-job limit.")
    total: int | None = Field(None, description="Item count, unless listed lazily from a prefix.")
    estimated_bytes: int = 0
    owner: str | None = Field(None, description="The API key's name; None: keys are off.")
    callback_url: str | None = Field(None, description="POSTed a signed summary at the end.")


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def reason_code(reason: str | None) -> str | None:
    # state.json of older versions holds free text: its code is the part before ':'.
    return None if reason is None else reason.split(":", 1)[0].strip()


def reason_text(reason: str | None) -> str | None:
    code = reason_code(reason)
    if code is None:
        return None
    return f"{code}: {REASONS.get(code, 'see the server log')}"

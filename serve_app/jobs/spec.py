"""What a job is (its spec, stored as ``job.json``) and the states jobs and items go through."""

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

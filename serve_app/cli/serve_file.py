"""The parts of a Ray Serve config file (``configs/*.yaml``) that ``photoenhance serve`` and
``photoenhance keys`` read: HTTP host and port, the route prefix, and the one application's
``args`` validated as an ``AppConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from serve_app.config import AppConfig


class ServeFile(BaseModel):
    """The parts of a Ray Serve config file that ``photoenhance serve`` reads."""

    model_config = ConfigDict(extra="allow")

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    app: AppConfig
    route_prefix: str = "/"
    raw: dict[str, Any]


def load_serve_file(path: str | Path) -> ServeFile:
    """Read a ``configs/*.yaml`` Serve config and validate its application's args."""
    raw = yaml.safe_load(Path(path).read_text())
    apps = raw.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{path}: expected exactly one application, found {len(apps)}")
    http = raw.get("http_options") or {}
    return ServeFile(
        http_host=http.get("host", "127.0.0.1"),
        http_port=int(http.get("port", 8000)),
        app=AppConfig.model_validate(apps[0].get("args") or {}),
        route_prefix=apps[0].get("route_prefix", "/"),
        raw=raw,
    )

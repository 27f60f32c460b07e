"""Which weights folder the engine loads from, decided from ``WeightsConfig``; never downloads.

Official files when all required ones are present and pass their sums; otherwise (unless
``source`` is ``official``) synthetic stand-ins, written on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from serve_app.config import WeightsConfig
from serve_app.engine import synthetic
from serve_app.engine.weights import REGISTRY, LoadedWeightsInfo, Profile, read_marker, sum_ok
from serve_app.errors import WeightsError

LOGGER = logging.getLogger(__name__)


def _official(dir: Path) -> LoadedWeightsInfo | None:
    if read_marker(dir) is not None:
        return None
    files = {}
    for s in REGISTRY.values():
        path = dir / s.filename
        if not path.exists():
            if s.required:
                return None
            continue
        if not sum_ok(s, path):
            return None
        files[s.name] = path
    return LoadedWeightsInfo(dir=dir, synthetic=False, profile="full", files=files)


def _synthetic(dir: Path, profile: Profile) -> LoadedWeightsInfo:
    sdir = dir / f"synthetic-{profile}"
    marker = read_marker(sdir)
    if marker is None or marker.get("profile") != profile or not all(
        (sdir / s.filename).exists() for s in REGISTRY.values()
    ):
        return synthetic.synth(sdir, profile)
    files = {s.name: sdir / s.filename for s in REGISTRY.values()}
    return LoadedWeightsInfo(dir=sdir, synthetic=True, profile=profile, files=files)


def resolve(cfg: WeightsConfig) -> LoadedWeightsInfo:
    """Pick the weights folder the engine loads from; never downloads."""
    dir = Path(cfg.dir).expanduser()
    # A folder written by `weights synth` is synthetic whatever its name.
    marker = read_marker(dir)
    if marker is not None and cfg.source != "official":
        profile = marker.get("profile", "tiny")
        files = {s.name: dir / s.filename for s in REGISTRY.values()}
        return LoadedWeightsInfo(dir=dir, synthetic=True, profile=profile, files=files)
    if cfg.source == "synthetic":
        return _synthetic(dir, cfg.profile)
    info = _official(dir)
    if info is not None:
        return info
    if cfg.source == "official":
        missing = [s.filename for s in REGISTRY.values() if s.required and not (dir / s.filename).exists()]
        raise WeightsError(
            f"official weights are missing or fail their checksum in {dir} "
            f"(missing: {missing or 'none'}); run `photoenhance weights fetch --dir {dir}`",
            dir=str(dir),
        )
    LOGGER.warning(
        "!!! OFFICIAL WEIGHTS NOT FOUND in %s: running on SYNTHETIC random '%s' weights. "
        "Outputs are meaningless. Run `photoenhance weights fetch --dir %s` for real ones. !!!",
        dir, cfg.profile, dir,
    )
    return _synthetic(dir, cfg.profile)

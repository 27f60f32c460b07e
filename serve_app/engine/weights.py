"""The weights registry: official files, their sums and architectures. No torch.

``fetch`` downloads official files (never called implicitly); ``read_marker`` tells a
synthetic folder. Synthetic stand-ins are written by ``synthetic.synth``, and
``weights_folder.resolve`` decides which folder the engine loads from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from serve_app.errors import WeightsError

LOGGER = logging.getLogger(__name__)

Profile = Literal["tiny", "full"]
Kind = Literal["face", "bg", "detect", "parse"]
MARKER = "SYNTHETIC.json"

_GFPGAN_KW = {
    "out_size": 512,
    "num_style_feat": 512,
    "channel_multiplier": 2,
    "decoder_load_path": None,
    "fix_decoder": False,
    "num_mlp": 8,
    "input_is_latent": True,
    "different_w": True,
    "narrow": 1,
    "sft_half": True,
}
# out_size stays 512: the alignment template and the paste-back assume 512x512 crops.
_GFPGAN_TINY = {**_GFPGAN_KW, "num_style_feat": 32, "channel_multiplier": 1, "narrow": 0.125}


@dataclass(frozen=True)
class WeightSpec:
    """One official file and how to build the network that loads it."""

    name: str
    url_prefix: str
    sha256: str
    multi_source: bool  # several independent manifests agree on the sum
    kind: Kind
    arch: str
    full: dict[str, Any]
    tiny: dict[str, Any]
    key: str | None  # state-dict wrapper key ("params_ema", "params"), None: bare
    scale: int = 1
    required: bool = True  # the engine can load it (the wdn twin is fetch-only)

    @property
    def filename(self) -> str:
        return f"{self.name}.pth"

    @property
    def url(self) -> str:
        return self.url_prefix + self.filename

    def kwargs(self, profile: Profile) -> dict[str, Any]:
        return dict(self.full if profile == "full" else self.tiny)


_GH = "https://github.com/"
REGISTRY: dict[str, WeightSpec] = {
    s.name: s
    for s in (
        WeightSpec("GFPGANv1.3", _GH + "TencentARC/GFPGAN/releases/download/v1.3.0/",
                   "c953a88f2727c85c3d9ae72e2bd4846bbaf59fe6972ad94130e23e7017524a70", False,
                   "face", "GFPGANv1Clean", _GFPGAN_KW, _GFPGAN_TINY, "params_ema"),
        WeightSpec("GFPGANv1.4", _GH + "TencentARC/GFPGAN/releases/download/v1.3.0/",
                   "e2cd4703ab14f4d01fd1383a8a8b266f9a5833dacee8e6a79d3bf21a1b6be5ad", False,
                   "face", "GFPGANv1Clean", _GFPGAN_KW, _GFPGAN_TINY, "params_ema"),
        WeightSpec("RealESRGAN_x2plus", _GH + "xinntao/Real-ESRGAN/releases/download/v0.2.1/",
                   "49fafd45f8fd7aa8d31ab2a22d14d91b536c34494a5cfe31eb5d89c2fa266abb", False,
                   "bg", "RRDBNet",
                   {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_block": 23,
                    "num_grow_ch": 32, "scale": 2},
                   {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 1,
                    "num_grow_ch": 4, "scale": 2},
                   "params_ema", scale=2),
        WeightSpec("RealESRGAN_x4plus", _GH + "xinntao/Real-ESRGAN/releases/download/v0.1.0/",
                   "4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1", True,
                   "bg", "RRDBNet",
                   {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_block": 23,
                    "num_grow_ch": 32, "scale": 4},
                   {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 1,
                    "num_grow_ch": 4, "scale": 4},
                   "params_ema", scale=4),
        WeightSpec("realesr-general-x4v3", _GH + "xinntao/Real-ESRGAN/releases/download/v0.2.5.0/",
                   "8dc7edb9ac80ccdc30c3a5dca6616509367f05fbc184ad95b731f05bece96292", False,
                   "bg", "SRVGGNetCompact",
                   {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_conv": 32,
                    "upscale": 4, "act_type": "prelu"},
                   {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_conv": 2,
                    "upscale": 4, "act_type": "prelu"},
                   "params", scale=4),
        WeightSpec("realesr-general-wdn-x4v3", _GH + "xinntao/Real-ESRGAN/releases/download/v0.2.5.0/",
                   "1641f8c4464b9f097c9fdda5589273713f67cf59f3d909e0bd688f0cee269dca", False,
                   "bg", "SRVGGNetCompact",
                   {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_conv": 32,
                    "upscale": 4, "act_type": "prelu"},
                   {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_conv": 2,
                    "upscale": 4, "act_type": "prelu"},
                   "params", scale=4, required=False),
        # Full: the exact classes facexlib's loaders build. Tiny: the same classes with the
        # mobile0.25 backbone and a narrow ParseNet, because ResNet-50 detection and the full
        # ParseNet (~100 GFLOPs per face) alone take seconds per image on one CPU core.
        WeightSpec("detection_Resnet50_Final", _GH + "xinntao/facexlib/releases/download/v0.1.0/",
                   "6d1de9c2944f2ccddca5f5e010ea5ae64a39845a86311af6fdf30841b0a5a16d", True,
                   "detect", "RetinaFace", {"network_name": "resnet50"},
                   {"network_name": "mobile0.25"}, None),
        WeightSpec("parsing_parsenet", _GH + "xinntao/facexlib/releases/download/v0.2.2/",
                   "3d558d8d0e42c20224f13cf5a29c79eba2d59913419f945545d8cf7b72920de2", True,
                   "parse", "ParseNet", {"in_size": 512, "out_size": 512, "parsing_ch": 19},
                   {"in_size": 512, "out_size": 512, "parsing_ch": 19, "base_ch": 8,
                    "ch_range": [8, 16], "res_depth": 1}, None),
    )
}


def spec(name: str) -> WeightSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsError(f"unknown weights {name!r}; known: {sorted(REGISTRY)}") from None


@dataclass(frozen=True)
class LoadedWeightsInfo:
    """Where the engine loads from, and whether those files are synthetic."""

    dir: Path
    synthetic: bool
    profile: Profile
    files: dict[str, Path] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        try:
            return self.files[name]
        except KeyError:
            raise WeightsError(f"weights {name!r} are not in {self.dir}") from None

    def kwargs(self, name: str) -> dict[str, Any]:
        return spec(name).kwargs(self.profile)


# --------------------------------------------------------------------------- sums
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_sum(s: WeightSpec, actual: str) -> bool:
    """True when the sum matches; a one-source mismatch warns, a multi-source one raises."""
    if actual == s.sha256:
        return True
    if s.multi_source:
        raise WeightsError(
            f"{s.filename}: SHA-256 {actual} differs from the known {s.sha256}; refused"
        )
    LOGGER.warning(
        "%s: SHA-256 %s differs from %s, a sum found in only one public manifest; "
        "keeping the file, but check its origin", s.filename, actual, s.sha256,
    )
    return False


def _cached_sum(path: Path) -> str:
    # Hashing ~1 GB at every start is slow; remember the sum by size and mtime.
    st = path.stat()
    side = path.with_name(path.name + ".sha256")
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    if side.exists():
        parts = side.read_text().split()
        if len(parts) == 2 and parts[0] == stamp:
            return parts[1]
    digest = sha256_file(path)
    with contextlib.suppress(OSError):  # a read-only folder: just hash again next time
        side.write_text(f"{stamp} {digest}\n")
    return digest


# --------------------------------------------------------------------------- fetch
def fetch(
    dir: Path, names: Iterable[str] | None = None, *, progress: bool = False, timeout_s: float = 60.0
) -> list[Path]:
    """Download official files into ``dir`` (stream to a temp file, check, rename)."""
    import httpx

    dir = Path(dir).expanduser()
    dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names or list(REGISTRY):
        s = spec(name)
        dest = dir / s.filename
        if dest.exists() and sum_ok(s, dest):
            LOGGER.info("%s: present and checked", s.filename)
            out.append(dest)
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{s.filename}.", dir=dir)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as fh, httpx.stream(
                "GET", s.url, follow_redirects=True, timeout=timeout_s
            ) as resp:
                resp.raise_for_status()
                total = int(resp.headers.get("content-length") or 0) or None
                bar = _bar(s.filename, total) if progress else None
                for block in resp.iter_bytes(1 << 20):
                    fh.write(block)
                    digest.update(block)
                    if bar is not None:
                        bar.update(len(block))
                if bar is not None:
                    bar.close()
            check_sum(s, digest.hexdigest())
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        out.append(dest)
    return out


def _bar(desc: str, total: int | None):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


def sum_ok(s: WeightSpec, path: Path) -> bool:
    try:
        check_sum(s, _cached_sum(path))
    except WeightsError as exc:
        LOGGER.error("%s", exc)
        return False
    return True  # a one-source mismatch has been reported and is accepted


# --------------------------------------------------------------------------- marker
def read_marker(dir: Path) -> dict[str, Any] | None:
    marker = Path(dir) / MARKER
    if not marker.exists():
        return None
    return json.loads(marker.read_text())

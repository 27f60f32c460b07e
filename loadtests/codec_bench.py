"""Codec benchmark (not a test): what metadata, colour and bounded decoding cost.

    PYTHONPATH=. .venv/bin/python loadtests/codec_bench.py [--runs 5] [--libs DIR]

1. Per 12-megapixel JPEG: decode + encode (JPEG q95) alone, then with camera metadata kept
   (EXIF with GPS and a thumbnail, XMP, IPTC), then with a Display P3 profile converted to
   sRGB and back. CPU seconds (median of ``--runs``).
2. The metadata byte work (parse EXIF, reset orientation, set the pixel size and DPI, drop
   GPS and the thumbnail, serialise, put it into the encoded JPEG) with Pillow, piexif and
   pyvips; the last two are not dependencies: install them into a folder named by ``--libs``
   (``pip install --target DIR piexif pyvips pyvips-binary``) to include them.
3. Bounded decoding: a decode in a worker process against one in the caller's thread (512 px
   and 12 MP), how long stopping a worker takes, and the bombs of docs/SECURITY.md before
   (the decoder alone) and after (``codec.probe`` refuses them).
4. ``--only sixteen``: a 12 MP 16-bit image from Display P3 and Adobe RGB to sRGB
   (``color=srgb``): CPU seconds by the tables ``codec.color`` uses, against the exact
   per-pixel interpolation it used before, and the largest difference in 16-bit levels.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import platform
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from serve_app import codec  # noqa: E402
from serve_app.codec.metadata import EXIF_PREFIX  # noqa: E402
from serve_app.codec.workers import CodecWorkers  # noqa: E402
from serve_app.config import LimitsConfig  # noqa: E402
from serve_app.errors import PhotoEnhanceError  # noqa: E402


def cpu(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def photo(h: int, w: int) -> np.ndarray:
    """Photo-like content (smooth, with texture), RGB."""
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 255, (h // 40, w // 40, 3), np.uint8), (w, h),
                      interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 6, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def camera_jpeg(rgb: np.ndarray, icc: bytes | None, with_metadata: bool) -> bytes:
    import test_codec_metadata as t  # the test suite's camera file, reused

    buf = io.BytesIO()
    if not with_metadata:
        Image.fromarray(rgb).save(buf, "JPEG", quality=95, icc_profile=icc)
        return buf.getvalue()
    # Orientation 1: turning the pixels is not metadata work (and was done before as well).
    exif_raw = t.with_thumbnail(t.camera_exif(orientation=1).tobytes()[len(EXIF_PREFIX):])
    xmp = t.XMP.replace(b'tiff:Orientation="6"', b'tiff:Orientation="1"')
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, exif=EXIF_PREFIX + exif_raw, xmp=xmp,
                              icc_profile=icc, dpi=(300, 300))
    data = buf.getvalue()
    resource = b"8BIM\x04\x04\x00\x00" + struct.pack(">I", len(t.IPTC)) + t.IPTC
    resource += b"\x00" * (len(t.IPTC) % 2)
    return data[:2] + t.jpeg_segment(0xED, b"Photoshop 3.0\x00" + resource) + data[2:]


def roundtrip(data: bytes, keep: str = "keep") -> bytes:
    decoded = codec.decode(data)
    return codec.encode(decoded.image, "jpeg", 95, metadata=decoded.metadata, keep=keep)


def bare_roundtrip(data: bytes) -> bytes:
    return codec.encode(codec.decode(data).image, "jpeg", 95)


def section_cost(runs: int) -> dict[str, Any]:
    import _icc

    rgb = photo(3000, 4000)
    plain = camera_jpeg(rgb, None, False)
    tagged = camera_jpeg(rgb, None, True)
    p3 = camera_jpeg(rgb, _icc.make_profile("p3"), True)
    base = cpu(lambda: bare_roundtrip(plain), runs)
    meta = cpu(lambda: roundtrip(tagged), runs)
    colour = cpu(lambda: roundtrip(p3), runs)
    srgb_out = cpu(lambda: codec.encode(codec.decode(p3).image, "jpeg", 95,
                                        metadata=codec.decode(p3).metadata, color="srgb"), runs)
    decoded = codec.decode(p3)
    convert_in = cpu(lambda: codec.decode(p3), runs) - cpu(lambda: codec.decode(tagged), runs)
    return {
        "image": "4000x3000 JPEG q95",
        "decode_encode_s": round(base, 4),
        "with_metadata_s": round(meta, 4),
        "metadata_cost_pct": round(100 * (meta - base) / base, 1),
        "with_p3_profile_s": round(colour, 4),
        "colour_cost_pct": round(100 * (colour - base) / base, 1),
        "p3_to_srgb_output_s": round(srgb_out - cpu(lambda: codec.decode(p3), 1), 4),
        "one_conversion_s": round(convert_in, 4),
        "pixels_in_srgb": decoded.metadata.pixels_in_srgb,
    }


def section_libraries(runs: int) -> dict[str, Any]:
    """EXIF edit + insertion into an encoded 12 MP JPEG, per library."""
    import test_codec_metadata as t

    from serve_app.codec import metadata as m

    rgb = photo(3000, 4000)
    source = camera_jpeg(rgb, None, True)
    exif_raw = Image.open(io.BytesIO(source)).info["exif"]
    encoded = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    out: dict[str, Any] = {}

    def pillow() -> bytes:
        meta = m.ImageMetadata(exif=exif_raw[6:], xmp=t.XMP, dpi=(300, 300), size=(4000, 3000))
        return m.attach(encoded, "jpeg", m.prepare(meta, "keep-no-gps", 8000, 6000, None))

    out["pillow_ms"] = round(1000 * cpu(pillow, runs * 20) , 3)
    try:
        import piexif

        def with_piexif() -> bytes:
            d = piexif.load(exif_raw)
            d["0th"][piexif.ImageIFD.Orientation] = 1
            d["0th"][piexif.ImageIFD.XResolution] = (600, 1)
            d["0th"][piexif.ImageIFD.YResolution] = (600, 1)
            d["Exif"][piexif.ExifIFD.PixelXDimension] = 8000
            d["Exif"][piexif.ExifIFD.PixelYDimension] = 6000
            d["GPS"], d["1st"], d["thumbnail"] = {}, {}, None
            buf = io.BytesIO()
            piexif.insert(piexif.dump(d), encoded, buf)
            return buf.getvalue()

        out["piexif_ms"] = round(1000 * cpu(with_piexif, runs * 20), 3)
    except ImportError:
        out["piexif_ms"] = "not installed"
    try:
        import pyvips

        def vips_plain() -> bytes:
            return pyvips.Image.new_from_buffer(source, "").jpegsave_buffer(Q=95, keep="none")

        def vips_meta() -> bytes:
            im = pyvips.Image.new_from_buffer(source, "").copy()
            im.set_type(pyvips.GValue.gint_type, "orientation", 1)
            im.remove("gps-ifd") if "gps-ifd" in im.get_fields() else None
            return im.jpegsave_buffer(Q=95, keep="exif,xmp,iptc,icc")

        plain = cpu(vips_plain, runs)
        out["pyvips_ms"] = round(1000 * (cpu(vips_meta, runs) - plain), 3)
        out["pyvips_decode_encode_s"] = round(plain, 4)
        out["pyvips_version"] = pyvips.__version__
    except (ImportError, OSError):
        out["pyvips_ms"] = "not installed"
    out["cv2_decode_encode_s"] = round(cpu(lambda: cv2.imencode(
        ".jpg", cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_COLOR),
        [cv2.IMWRITE_JPEG_QUALITY, 95]), runs), 4)
    return out


def section_bounded(runs: int) -> dict[str, Any]:
    from test_codec_bombs import progressive_bomb, tiff_with_strips

    out: dict[str, Any] = {}
    pool = CodecWorkers(size=1, memory_mb=4096)
    pool.start()
    try:
        import psutil

        for name, (h, w) in {"512px": (512, 512), "12MP": (3000, 4000)}.items():
            data = cv2.imencode(".jpg", photo(h, w), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
            n = runs * (20 if name == "512px" else 2)
            here = cpu(lambda d=data: codec.decode(d), n)
            worker = psutil.Process(pool._idle[0].process.pid)
            before, t0 = sum(worker.cpu_times()[:2]), time.process_time()
            for _ in range(n):
                pool.call(codec.decode, data, cpu_s=30)
            caller = (time.process_time() - t0) / n
            inside = (sum(worker.cpu_times()[:2]) - before) / n
            out[f"decode_{name}_in_thread_cpu_ms"] = round(1000 * here, 2)
            out[f"decode_{name}_in_worker_cpu_ms"] = round(1000 * inside, 2)
            out[f"decode_{name}_caller_cpu_ms"] = round(1000 * caller, 2)
        bomb = progressive_bomb(4096, 2000)

        async def stop() -> float:
            task = asyncio.ensure_future(pool.run(codec.decode, bomb, cpu_s=600))
            await asyncio.sleep(1.0)
            task.cancel()
            t0 = time.perf_counter()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            while pool.stopped["cancelled"] == 0:
                await asyncio.sleep(0.001)
            return time.perf_counter() - t0

        out["stop_worker_ms"] = round(1000 * asyncio.run(stop()), 1)
        t0 = time.perf_counter()
        pool.call(codec.decode, progressive_bomb(64, 1), cpu_s=10)
        out["next_call_after_stop_ms_incl_replacement_start"] = round(1000 * (time.perf_counter() - t0), 1)
    finally:
        pool.close()

    limits = LimitsConfig()
    scans = 1000
    data = progressive_bomb(4096, scans)
    per_scan = cpu(lambda: Image.open(io.BytesIO(data)).load(), 1) / scans
    scan_bytes = (len(progressive_bomb(4096, scans + 100)) - len(data)) / 100
    ten_mib_scans = (10 * 2**20) / scan_bytes
    out["progressive_bomb"] = {
        "bytes_per_scan": scan_bytes,
        "cpu_ms_per_scan_4096px": round(1000 * per_scan, 3),
        "before_cpu_s_for_10MiB": round(per_scan * ten_mib_scans, 1),
        "after_refused_in_ms": round(1000 * cpu(lambda: _refused(progressive_bomb_10mib(), limits), 3), 3),
    }
    strips = 170_000
    tiff = tiff_with_strips(4096, 4096 // 4, strips)
    t0 = time.process_time()
    try:
        codec.decode(tiff)
    except Exception as exc:
        out["tiff_decode_error"] = type(exc).__name__
    per_strip = (time.process_time() - t0) / strips
    out["tiff_strips_bomb"] = {
        "bytes": len(tiff),
        "strips": strips,
        "before_cpu_s": round(per_strip * strips, 2),
        "before_cpu_s_per_million_strips": round(per_strip * 1e6, 1),
        "after_refused_in_ms": round(1000 * cpu(lambda: _refused(tiff, limits), 3), 3),
    }
    return out


_BOMB_CACHE: dict[str, bytes] = {}


def progressive_bomb_10mib() -> bytes:
    from test_codec_bombs import progressive_bomb

    if "b" not in _BOMB_CACHE:
        one = progressive_bomb(4096, 1)
        _BOMB_CACHE["b"] = progressive_bomb(4096, (10 * 2**20 - len(one)) // 33)
    return _BOMB_CACHE["b"]


def _refused(data: bytes, limits: LimitsConfig) -> None:
    try:
        codec.probe(data, limits)
    except PhotoEnhanceError:
        return
    raise AssertionError("not refused")


def section_sixteen(runs: int) -> dict[str, Any]:
    import _icc

    from serve_app.codec import color as colorm

    rng = np.random.default_rng(0)
    image = rng.integers(0, 65536, (3000, 4000, 3), dtype=np.uint16)  # BGR, every level
    srgb = colorm.matrix_shaper(colorm.srgb_profile())
    assert srgb is not None
    out: dict[str, Any] = {"image": "4000x3000 16-bit, uniform random levels"}
    for space in ("p3", "adobe"):
        shaper = colorm.matrix_shaper(_icc.make_profile(space))
        assert shaper is not None

        def exact(s: colorm.MatrixShaper = shaper) -> np.ndarray:
            m = (np.linalg.inv(srgb.matrix) @ s.matrix).astype(np.float32)
            lin = np.clip(s.to_linear(image[..., ::-1].astype(np.float32) / 65535.0) @ m.T, 0, 1)
            return (srgb.from_linear(lin)[..., ::-1] * 65535.0 + 0.5).astype(np.uint16)

        tabled = shaper.convert(image, to_srgb=True)  # builds the tables once
        diff = np.abs(tabled.astype(np.int64) - exact().astype(np.int64))
        out[space] = {
            "tables_s": round(cpu(lambda s=shaper: s.convert(image, to_srgb=True), runs), 3),
            "exact_s": round(cpu(exact, max(1, runs // 2)), 3),
            "max_diff_levels": int(diff.max()),
            "mean_diff_levels": round(float(diff.mean()), 4),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--libs", type=Path, default=None, help="folder with piexif/pyvips")
    parser.add_argument("--only", choices=["cost", "libraries", "bounded", "sixteen"],
                        default=None)
    args = parser.parse_args()
    if args.libs:
        sys.path.append(str(args.libs))
    cv2.setNumThreads(1)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, "
                   f"{__import__('os').cpu_count()} CPUs, Python {platform.python_version()}",
    }
    sections = {"cost": section_cost, "libraries": section_libraries, "bounded": section_bounded,
                "sixteen": section_sixteen}
    for name, fn in sections.items():
        if args.only in (None, name):
            report[name] = fn(args.runs)
            print(json.dumps({name: report[name]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

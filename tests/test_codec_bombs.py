"""Decoding bombs, made here: refused by structure before decoding, or stopped by the budget.

Each bomb is small on the wire and costly to decode (scans, strips, chunks, frames, pages).
The unit tests check the structural walkers and the stoppable workers; the HTTP tests send
the same bombs to the dev application and expect the documented status and code, with the
server still answering a good request beside them.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import struct
import time
import zlib
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from serve_app import codec
from serve_app.codec.structure import jpeg_counts, tiff_counts
from serve_app.codec.workers import CodecWorkers
from serve_app.config import LimitsConfig
from serve_app.errors import CodecBudgetExceeded, ImageTooComplex, PhotoEnhanceError

LIMITS = LimitsConfig()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------- bomb makers


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment; a scan's end includes its entropy data."""
    out, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append((marker, pos, pos + 2))
            break
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            end = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, end).start()
        out.append((marker, pos, end))
        pos = end
    return out


def progressive_bomb(side: int, scans: int) -> bytes:
    """A flat progressive JPEG whose smallest scan (a few bytes) is repeated ``scans`` times:
    libjpeg makes a full pass over every coefficient for each copy."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    segments = _jpeg_segments(data)
    _, start, end = min((s for s in segments if s[0] == 0xDA), key=lambda s: s[2] - s[1])
    return data[:segments[-1][1]] + data[start:end] * scans + b"\xff\xd9"


def jpeg_with_markers(count: int) -> bytes:
    """A small JPEG with ``count`` empty comment segments before its frame."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[:2] + b"\xff\xfe\x00\x02" * count + data[2:]


def tiff_with_strips(width: int, height: int, strips: int) -> bytes:
    """An uncompressed gray TIFF cut into ``strips`` strips (1 row each, the rest repeated)."""
    order = "<"
    pixels = bytes(width * height)
    entries = []
    header = 8
    n_tags = 9
    ifd_size = 2 + n_tags * 12 + 4
    offsets_at = header + ifd_size
    counts_at = offsets_at + 4 * strips
    data_at = counts_at + 4 * strips
    offsets = [data_at + (i % height) * width for i in range(strips)]
    counts = [width] * strips
    entries = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
        (262, 3, 1, 1), (273, 4, strips, offsets_at), (277, 3, 1, 1),
        (278, 4, 1, max(1, height // strips) if strips <= height else 1),
        (279, 4, strips, counts_at),
    ]
    ifd = struct.pack(order + "H", n_tags)
    for tag, typ, count, value in entries:
        ifd += struct.pack(order + "HHII", tag, typ, count, value)
    ifd += struct.pack(order + "I", 0)
    return (
        b"II*\x00" + struct.pack(order + "I", header) + ifd
        + struct.pack(order + f"{strips}I", *offsets) + struct.pack(order + f"{strips}I", *counts)
        + pixels
    )


def tiff_pages(count: int) -> bytes:
    frames = [Image.new("L", (8, 8), i % 256) for i in range(count)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunks(count: int) -> bytes:
    """A 16x16 PNG with ``count`` empty private ancillary chunks before its IDAT."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "PNG")
    data = buf.getvalue()
    at = 8 + 25  # after the signature and IHDR
    return data[:at] + png_chunk(b"xbOm", b"") * count + data[at:]


def png_icc_bomb(size: int) -> bytes:
    """A 16x16 PNG whose ``iCCP`` profile inflates to ``size`` bytes from about size/1000."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "PNG")
    data = buf.getvalue()
    chunk = png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(bytes(size), 9))
    return data[:33] + chunk + data[33:]


def animated(fmt: str, frames: int) -> bytes:
    # Neighbouring frames differ everywhere, so that no encoder merges them.
    images = [Image.new("RGB", (8, 8), (i * 97 % 256, i * 57 % 256, 255 * (i % 2))) for i in range(frames)]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    images[0].save(buf, fmt, save_all=True, append_images=images[1:], duration=10, **extra)
    return buf.getvalue()


# ----------------------------------------------------------------------------- structure


def test_the_progressive_bomb_is_costly_without_the_checks():
    """The reason for the scan limit, measured: CPU per repeated scan of a 2048 px bomb."""
    few, many = progressive_bomb(2048, 10), progressive_bomb(2048, 210)
    costs = []
    for data in (few, many):
        t0 = time.process_time()
        Image.open(io.BytesIO(data)).load()
        costs.append(time.process_time() - t0)
    assert len(many) - len(few) < 200 * 40  # a few bytes per scan on the wire
    assert costs[1] > costs[0]  # ...and each one a full pass


def test_jpeg_scans_are_counted_and_limited():
    normal = io.BytesIO()
    Image.new("RGB", (64, 64)).save(normal, "JPEG", progressive=True)
    assert jpeg_counts(normal.getvalue(), LIMITS)[1] == 10  # libjpeg's default script
    data = progressive_bomb(256, LIMITS.max_jpeg_scans + 1)
    with pytest.raises(ImageTooComplex) as err:
        codec.probe(data, LIMITS)
    assert (err.value.status, err.value.code) == (413, "too_many_scans")


def test_jpeg_markers_are_limited():
    assert codec.probe(jpeg_with_markers(100), LIMITS).width == 16
    with pytest.raises(ImageTooComplex) as err:
        codec.probe(jpeg_with_markers(LIMITS.max_jpeg_markers), LIMITS)
    assert err.value.code == "too_many_markers"


def test_marker_bytes_inside_entropy_data_are_not_markers():
    """Stuffed 0xFF00 and restart markers in scans are skipped; a real photo counts right."""
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), np.uint8)).save(
        buf, "JPEG", quality=100, restart_marker_blocks=2
    )
    markers, scans = jpeg_counts(buf.getvalue(), LIMITS)
    assert scans == 1 and markers < 20


def test_tiff_strips_are_limited():
    ok = tiff_with_strips(64, 64, 64)
    assert tiff_counts(ok, LIMITS) == (1, 64)
    assert codec.decode(ok, codec.probe(ok, LIMITS)).image.shape == (64, 64)
    small = LimitsConfig(max_tiff_strips=1000)
    with pytest.raises(ImageTooComplex) as err:
        codec.probe(tiff_with_strips(64, 64, 1001), small)
    assert (err.value.status, err.value.code) == (413, "too_many_strips")


def test_tiff_pages_are_limited():
    assert codec.probe(tiff_pages(3), LIMITS).width == 8
    with pytest.raises(ImageTooComplex) as err:
        codec.probe(tiff_pages(9), LimitsConfig(max_frames=8))
    assert err.value.code == "too_many_frames"


def test_tiff_ifd_loop_ends():
    data = bytearray(tiff_pages(1))
    first = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, first)[0]
    struct.pack_into("<I", data, first + 2 + entries * 12, first)  # next IFD: itself
    assert tiff_counts(bytes(data), LIMITS)[0] == 1


def test_png_chunks_are_limited():
    assert codec.probe(png_with_chunks(100), LIMITS).width == 16
    with pytest.raises(ImageTooComplex) as err:
        codec.probe(png_with_chunks(LIMITS.max_chunks), LIMITS)
    assert (err.value.status, err.value.code) == (413, "too_many_chunks")


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_frames_are_limited(fmt):
    limits = LimitsConfig(max_frames=5)
    decoded = codec.decode(data := animated(fmt, 5), codec.probe(data, limits))
    assert decoded.image.shape[:2] == (8, 8)  # the first frame
    with pytest.raises(ImageTooComplex) as err:
        codec.probe(animated(fmt, 6), limits)
    assert err.value.code == "too_many_frames"


# ----------------------------------------------------------------------------- the workers


@pytest.fixture(scope="module")
def workers():
    pool = CodecWorkers(size=1, memory_mb=1024)
    pool.start()
    yield pool
    pool.close()


def test_a_worker_decodes_like_the_caller(workers, images):
    data = images.cv2_bytes(images.array(600, 700), ".png")  # large enough for shared memory
    here = codec.decode(data)
    there = workers.call(codec.decode, data, cpu_s=10)
    assert np.array_equal(here.image, there.image) and there.format == "png"


def test_the_cpu_budget_stops_a_bomb(workers):
    """With the scan limit lifted, the CPU budget (1 s here) is what stops the bomb."""
    data = progressive_bomb(2048, 20_000)
    t0 = time.monotonic()
    with pytest.raises(CodecBudgetExceeded) as err:
        workers.call(codec.decode, data, cpu_s=1)
    assert (err.value.status, err.value.code) == (413, "decode_too_costly")
    assert time.monotonic() - t0 < 60
    assert workers.stopped["cpu"] >= 1
    # The pool goes on with a new worker.
    assert workers.call(codec.decode, progressive_bomb(64, 1), cpu_s=5).image.shape == (64, 64)


def test_cancelling_the_caller_kills_the_worker(workers):
    data = progressive_bomb(2048, 20_000)

    async def scenario() -> float:
        task = asyncio.ensure_future(workers.run(codec.decode, data, cpu_s=600))
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    before = workers.stopped["cancelled"]
    cancel_s = asyncio.run(scenario())
    deadline = time.monotonic() + 30
    while workers.stopped["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers.stopped["cancelled"] == before + 1
    assert cancel_s < 5


def test_the_deadline_stops_a_decode(workers):
    data = progressive_bomb(2048, 20_000)
    with pytest.raises(Exception) as err:
        workers.call(codec.decode, data, cpu_s=600, timeout_s=0.5)
    assert (err.value.status, err.value.code) == (503, "timeout")


def test_a_crashing_worker_is_a_422_and_is_replaced(workers):
    with pytest.raises(PhotoEnhanceError) as err:
        workers.call(os.abort, cpu_s=5)
    assert (err.value.status, err.value.code) == (422, "decode_failed")
    assert workers.call(codec.decode, progressive_bomb(64, 1), cpu_s=5).image.shape == (64, 64)


def test_the_memory_budget_is_a_413():
    pool = CodecWorkers(size=1, memory_mb=256)
    try:
        with pytest.raises(CodecBudgetExceeded) as err:
            pool.call(np.ones, (1024, 1024, 512), np.uint8, cpu_s=10, what="decode")
        assert (err.value.status, err.value.code) == (413, "decode_out_of_memory")
    finally:
        pool.close()


def test_no_shared_memory_is_left_behind(workers, images):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    before = {n for n in os.listdir("/dev/shm") if n.startswith("photoenhance-")}
    data = images.cv2_bytes(images.array(700, 700), ".png")
    for _ in range(3):
        workers.call(codec.decode, data, cpu_s=10)
    with pytest.raises(CodecBudgetExceeded):  # a worker killed while its arrays are out
        workers.call(codec.decode, progressive_bomb(2048, 20_000), cpu_s=1)
    after = {n for n in os.listdir("/dev/shm") if n.startswith("photoenhance-")}
    assert after <= before


# ----------------------------------------------------------------------------- over HTTP


HTTP_BOMBS = {
    "progressive_scans": (lambda: progressive_bomb(1024, 3000), 413, "too_many_scans"),
    "jpeg_markers": (lambda: jpeg_with_markers(5000), 413, "too_many_markers"),
    "png_chunks": (lambda: png_with_chunks(30_000), 413, "too_many_chunks"),
    "apng_frames": (lambda: animated("PNG", 300), 413, "too_many_frames"),
    "webp_frames": (lambda: animated("WEBP", 300), 413, "too_many_frames"),
    "tiff_pages": (lambda: tiff_pages(300), 413, "too_many_frames"),
    "tiff_strips": (lambda: tiff_with_strips(16, 16, 40_000), 413, "too_many_strips"),
    # 64 KiB on the wire, 64 MiB inflated: measured one byte past the 4 MiB cap, no further.
    "png_icc_inflation": (lambda: png_icc_bomb(64 << 20), 413, "metadata_too_large"),
}


@pytest.mark.parametrize("name", sorted(HTTP_BOMBS))
def test_bombs_over_http(http, images, name):
    make, status, code = HTTP_BOMBS[name]
    r = http.post("/v1/enhance?upscale=1&face=false&bg_model=none", content=make(),
                  headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    good = http.post("/v1/enhance?upscale=1&face=false&bg_model=none",
                     content=images.cv2_bytes(images.array(32, 32), ".png"),
                     headers={"Content-Type": "image/png"})
    assert good.status_code == 200


def _codec_counts() -> tuple[dict[str, int], dict[str, int]]:
    """The model replica's codec counts (stopped by reason, busy by stage), asked through a
    handle: the test process is the Ray driver of the dev application."""
    from ray import serve

    from serve_app.config import APP_NAME

    info = serve.get_deployment_handle("Enhancer", app_name=APP_NAME).info.remote().result()
    return info["codec_stopped"], info["codec_busy"]


def test_a_client_that_goes_away_cancels_its_encode(serve_url, images):
    """A slow encode (a 16-megapixel AVIF, several CPU seconds) is stopped when its client
    closes the connection, long before its budget would stop it."""
    before = _codec_counts()[0].get("cancelled", 0)
    body = images.cv2_bytes(images.array(1000, 1000), ".png")
    url = urlsplit(serve_url)
    request = (
        f"POST /v1/enhance?upscale=4&face=false&bg_model=none&format=avif HTTP/1.1\r\n"
        f"Host: {url.netloc}\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(request)
    deadline = time.monotonic() + 180
    while _codec_counts()[1].get("encode", 0) < 1:
        assert time.monotonic() < deadline, "the encode never started"
        time.sleep(0.05)
    sock.close()
    while _codec_counts()[0].get("cancelled", 0) <= before:
        assert time.monotonic() < deadline, "the encode was not cancelled"
        time.sleep(0.1)
    assert _codec_counts()[1].get("encode", 0) == 0

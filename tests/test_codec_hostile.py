"""Metadata made to hurt, made here: parsed in linear time, capped before parsing, never kept.

The cases of issue 17 that the codec owns: an XMP of unclosed elements (quadratic before,
and a replica killer at 1 MiB), a PNG whose 200 ``zTXt`` chunks Pillow inflated to 64 MiB on
the ingress event loop, ICC profiles that stayed in memory for good (the cache kept their
bytes), and decoder messages that named Python objects. Unit tests check the parts; the HTTP
tests send each file to the dev application beside good requests, and check the answer and
that the model replica was not restarted.
"""

from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import _icc
import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from serve_app import codec
from serve_app.codec import color as colorm
from serve_app.codec.metadata import (
    MAX_EXIF_BYTES,
    MAX_ICC_BYTES,
    MAX_XMP_BYTES,
)
from serve_app.codec.pngtext import png_for_pillow
from serve_app.codec.xmp import edit_xmp
from serve_app.config import LimitsConfig
from serve_app.errors import InvalidImage, PayloadTooLarge

LIMITS = LimitsConfig()
PLAIN = "/v1/enhance?upscale=1&face=false&bg_model=none"
THUMBNAIL = b"<xmp:Thumbnails>"


# ----------------------------------------------------------------------------- makers


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with(chunks: list[bytes], side: int = 32) -> bytes:
    """A small photo-like PNG with ``chunks`` right after its IHDR."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 80, 60)).save(buf, "PNG")
    data = buf.getvalue()
    return data[:33] + b"".join(chunks) + data[33:]


def xmp_chunk(xmp: bytes, compressed: bool = False) -> bytes:
    text = zlib.compress(xmp) if compressed else xmp
    return png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00" + bytes([int(compressed), 0]) + b"\x00\x00" + text)


def unclosed_thumbnails(size: int) -> bytes:
    """The issue's XMP: ``<xmp:Thumbnails>`` over and over, never closed."""
    return THUMBNAIL * (size // len(THUMBNAIL))


def ztxt_bomb(count: int = 200) -> bytes:
    """About 1 KiB on the wire per chunk, 1 MiB once inflated: 206 KiB in all."""
    inflated = zlib.compress(b"\x00" * (1 << 20), 9)
    return png_with([png_chunk(b"zTXt", b"Comment%d\x00\x00" % i + inflated) for i in range(count)])


def webp_with_icc(icc: bytes) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 80, 60)).save(buf, "WEBP", lossless=True, icc_profile=icc)
    return buf.getvalue()


def padded_profile(size: int, seed: int) -> bytes:
    """A valid Display P3 profile made ``size`` bytes long (distinct per ``seed``)."""
    base = _icc.make_profile("p3")
    body = base[4:] + bytes(size - len(base) - 4) + seed.to_bytes(4, "big")
    return size.to_bytes(4, "big") + body[: size - 4]


def broken_heif() -> bytes:
    """A HEIC whose coded data is zeroed: libheif's own words come back from it."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 80, 60)).save(buf, "HEIF")
    data = buf.getvalue()
    start = data.find(b"mdat") + 4
    return data[:start] + bytes(len(data) - start)


def truncated_tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 80, 60)).save(buf, "TIFF", compression="tiff_lzw")
    return buf.getvalue()[:60]


# ----------------------------------------------------------------------------- XMP


VALUES = {"tiff:Orientation": "1", "exif:PixelXDimension": "128"}


def test_xmp_is_edited_as_before():
    xmp = (
        '<x:xmpmeta><rdf:RDF><rdf:Description tiff:Orientation="6" exif:GPSAltitude=\'3\''
        ' dc:title="a > b" exif:PixelXDimension=\'64\'><xmp:Thumbnails><rdf:Alt><rdf:li>'
        "<xmp:Thumbnails/></rdf:li></rdf:Alt></xmp:Thumbnails><tiff:Orientation>8"
        "</tiff:Orientation><exif:GPSLatitude>1</exif:GPSLatitude><xmpGImg:image>AAAA"
        "</xmpGImg:image></rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    assert edit_xmp(xmp, VALUES, no_gps=True) == (
        '<x:xmpmeta><rdf:RDF><rdf:Description tiff:Orientation="1" dc:title="a > b"'
        " exif:PixelXDimension='128'><tiff:Orientation>1</tiff:Orientation>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    kept = edit_xmp(xmp, VALUES, no_gps=False)
    assert "exif:GPSAltitude='3'" in kept and "<exif:GPSLatitude>1</exif:GPSLatitude>" in kept
    assert "Thumbnails" not in kept and "xmpGImg" not in kept


def test_an_unclosed_element_to_remove_drops_the_packet():
    assert edit_xmp("<a>" + THUMBNAIL.decode() + "<b/></a>", VALUES, no_gps=False) is None
    assert edit_xmp("<a><exif:GPSLatitude>1</a>", VALUES, no_gps=True) is None
    assert edit_xmp("<a><exif:GPSLatitude>1</a>", VALUES, no_gps=False) == "<a><exif:GPSLatitude>1</a>"


HOSTILE_XMP = {  # each 4 MiB: four times the cap
    "unclosed thumbnails": unclosed_thumbnails(4 << 20),
    "unclosed GPS elements": b"<exif:GPSLatitude>" * ((4 << 20) // 18),
    "tags never ended": b"<rdf:Description a=\"" * ((4 << 20) // 20),
    "one tag of attributes": b"<rdf:Description" + b" exif:GPSAltitude='1'" * ((4 << 20) // 21) + b">",
    "values set over and over": b"<tiff:Orientation>6</tiff:Orientation>" * ((4 << 20) // 38),
    "lone quotes and brackets": b"<\"'>" * (1 << 20),
}


@pytest.mark.timeout(60)  # the quadratic editor took about 1 s for 64 KiB, hours for 4 MiB
@pytest.mark.parametrize("name", sorted(HOSTILE_XMP))
def test_xmp_editing_is_linear(name):
    text = HOSTILE_XMP[name].decode()
    tags = text.count("<")
    calls = 0

    class Counted(dict):  # counts the property look-ups: one per tag and attribute at most
        def __contains__(self, key):
            nonlocal calls
            calls += 1
            return dict.__contains__(self, key)

    out = edit_xmp(text, Counted(VALUES), no_gps=True)
    assert calls <= tags + text.count("=")
    if name.startswith("unclosed"):
        assert out is None
    elif name == "one tag of attributes":
        assert out == "<rdf:Description>"
    elif name == "values set over and over":
        assert out == text.replace(">6<", ">1<")


# ----------------------------------------------------------------------------- PNG text


def test_text_chunks_are_removed_before_pillow_inflates_them():
    data = ztxt_bomb()
    assert 200_000 < len(data) < 220_000
    view, dropped = png_for_pillow(data)
    assert dropped == ()
    assert len(view) == len(png_with([]))  # every zTXt gone, nothing else
    with Image.open(io.BytesIO(view)) as im:
        assert im.text == {}
    decoded = codec.decode(data, codec.probe(data, LIMITS))
    assert decoded.image.shape == (32, 32, 3)


def test_pillow_alone_is_bounded_too():
    """The backstop for a PNG that reaches Pillow another way: 2 MiB of text, not 64 MiB."""
    assert PngImagePlugin.MAX_TEXT_MEMORY == 2 * MAX_XMP_BYTES
    with pytest.raises(ValueError, match="MAX_TEXT_MEMORY"), Image.open(io.BytesIO(ztxt_bomb())) as im:
        im.load()


@pytest.mark.parametrize("compressed", [False, True])
def test_an_xmp_over_its_cap_is_dropped_and_the_photo_kept(compressed):
    xmp = b'<x:xmpmeta><rdf:RDF><rdf:Description dc:format="image/png"/></rdf:RDF></x:xmpmeta>'
    padding = b" " * (MAX_XMP_BYTES + 1 - len(xmp))
    exif = Image.Exif()
    exif[0x0110] = "Camera"
    data = png_with([xmp_chunk(xmp + padding, compressed), png_chunk(b"eXIf", exif.tobytes()[6:])])
    decoded = codec.decode(data, codec.probe(data, LIMITS))
    assert decoded.metadata.xmp is None
    assert decoded.metadata.dropped == ("xmp",)
    assert decoded.metadata.exif is not None  # the rest is kept
    fitting = png_with([xmp_chunk(xmp + padding[:-1], compressed)])
    assert codec.decode(fitting, codec.probe(fitting, LIMITS)).metadata.xmp == xmp + padding[:-1]


def test_a_compressed_profile_over_its_cap_is_refused_after_inflating_one_byte_past_it():
    icc = padded_profile(MAX_ICC_BYTES + 1, 1)
    chunk = png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc, 9))
    data = png_with([chunk])
    assert len(data) < 64 * 1024  # 4 MiB of profile in a few KiB
    with pytest.raises(PayloadTooLarge) as caught:
        codec.probe(data, LIMITS)
    assert caught.value.code == "metadata_too_large"
    assert caught.value.details == {"block": "icc", "size": MAX_ICC_BYTES + 1, "limit": MAX_ICC_BYTES}


# ----------------------------------------------------------------------------- ICC and EXIF caps


def test_a_profile_over_its_cap_is_refused_by_the_probe():
    data = webp_with_icc(bytes(MAX_ICC_BYTES + 1))
    with pytest.raises(PayloadTooLarge) as caught:
        codec.probe(data, LIMITS)
    assert caught.value.code == "metadata_too_large"
    assert caught.value.details["block"] == "icc"


def test_an_exif_over_its_cap_is_refused():
    exif = Image.Exif()
    exif[0x010E] = "x" * MAX_EXIF_BYTES  # ImageDescription
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "WEBP", lossless=True, exif=exif.tobytes())
    with pytest.raises(PayloadTooLarge) as caught:
        codec.probe(buf.getvalue(), LIMITS)
    assert (caught.value.code, caught.value.details["block"]) == ("metadata_too_large", "exif")
    png = png_with([png_chunk(b"eXIf", exif.tobytes()[6:])])
    with pytest.raises(PayloadTooLarge, match="EXIF"):
        codec.probe(png, LIMITS)


def test_profiles_are_cached_by_digest_within_a_byte_bound():
    """40 distinct 3 MiB profiles, each converted as a photo's would be: the caches keep at
    most ``CACHE_BYTES`` worth each, and the process does not keep them all."""
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    image = np.full((8, 8, 3), 100, np.uint8)
    colorm.usable(padded_profile(3 << 20, 0), "RGB")  # the libraries' first-use allocations
    before = rss_mib()
    for seed in range(40):
        icc = padded_profile(3 << 20, seed)
        assert colorm.usable(icc, "RGB")
        assert colorm.array_convert(image, icc, to_srgb=True) is not None
    grown = rss_mib() - before
    for cache in (colorm._PROFILES, colorm._TRANSFORMS):
        assert cache.weight <= colorm.CACHE_BYTES
        assert len(cache) <= colorm.CACHE_ENTRIES
    # Kept by the old lru_caches: 32 profiles' bytes as keys and 32 parsed copies (> 190 MiB).
    assert grown < 2 * colorm.CACHE_BYTES / 2**20 + 32, grown


def test_the_cache_evicts_the_oldest_first():
    cache = colorm.BoundedCache(max_entries=3, max_weight=10)
    for key in "abc":
        cache.get(key, 3, lambda k=key: k.upper())
    assert cache.get("a", 3, lambda: "new") == "A"  # a hit: "b" is now the oldest
    cache.get("d", 3, lambda: "D")
    assert (len(cache), cache.weight) == (3, 9)
    assert cache.get("b", 3, lambda: "made again") == "made again"
    assert cache.get("huge", 11, lambda: "not kept") == "not kept"
    assert "huge" not in cache._items


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize("make, fmt, message", [
    (truncated_tiff, "tiff", "broken tiff image: its header cannot be read"),
    (broken_heif, "heif", "broken heif image: its data is truncated or corrupt"),
    (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "heif",
     "broken heif image: its header cannot be read"),
])
def test_decoder_words_stay_in_the_log(make, fmt, message):
    data = make()
    with pytest.raises(InvalidImage) as caught:
        codec.decode(data, codec.probe(data, LIMITS))
    assert caught.value.message == message
    assert caught.value.code == "invalid_image"


# ----------------------------------------------------------------------------- over HTTP


def _read(response: httpx.Response) -> Image.Image:
    return Image.open(io.BytesIO(response.content))


XMP_OK = b'<x:xmpmeta><rdf:RDF><rdf:Description dc:format="image/png"/></rdf:RDF></x:xmpmeta>'
HTTP_CASES = {
    # name: (body, status, code); None: the photo is served, without the hostile block
    "control: a normal xmp": (lambda: png_with([xmp_chunk(XMP_OK)]), 200, "xmp kept"),
    "xmp unclosed thumbnails, at the cap": (lambda: png_with([xmp_chunk(unclosed_thumbnails(MAX_XMP_BYTES))]), 200, None),
    "xmp unclosed thumbnails, over the cap": (lambda: png_with([xmp_chunk(unclosed_thumbnails(MAX_XMP_BYTES + 16))]), 200, None),
    "200 zTXt chunks": (ztxt_bomb, 200, None),
    "webp with a 6 MiB profile": (lambda: webp_with_icc(padded_profile(6 << 20, 7)), 413, "metadata_too_large"),
    "broken heif": (broken_heif, 422, "invalid_image"),
    "truncated tiff": (truncated_tiff, 422, "invalid_image"),
}


def test_hostile_metadata_over_http_beside_good_requests(http, serve_url, images):
    started = http.get("/v1/models").json()["engine"]["started_at"]
    good = images.cv2_bytes(images.array(32, 48), ".png")

    def send(body: bytes) -> httpx.Response:
        with httpx.Client(base_url=serve_url, timeout=180) as client:
            return client.post(PLAIN, content=body, headers={"Content-Type": "application/octet-stream"})

    with ThreadPoolExecutor(max_workers=4) as pool:
        goods = [pool.submit(send, good) for _ in range(4)]
        answers = {name: pool.submit(send, make()) for name, (make, _, _) in HTTP_CASES.items()}
        answers = {name: future.result() for name, future in answers.items()}
        goods = [future.result() for future in goods]

    for response in goods:
        assert response.status_code == 200, response.text
    for name, (_, status, code) in HTTP_CASES.items():
        response = answers[name]
        assert response.status_code == status, (name, response.text)
        if code == "xmp kept":
            with _read(response) as im:
                assert im.info["xmp"] == XMP_OK, name
            continue
        if code is None:
            with _read(response) as im:
                assert im.size == (32, 32) and im.format == "PNG", name
                assert "xmp" not in im.info and not im.text, name
            continue
        error = response.json()["error"]
        assert error["code"] == code, (name, error)
        assert "0x" not in error["message"] and "BytesIO" not in error["message"], error
        assert "Decoder plugin" not in error["message"], error
    assert answers["webp with a 6 MiB profile"].json()["error"]["details"] == {
        "block": "icc", "size": 6 << 20, "limit": MAX_ICC_BYTES,
    }
    assert http.get("/v1/models").json()["engine"]["started_at"] == started


def test_many_distinct_profiles_over_http(http):
    """16 photos with distinct 3 MiB profiles (under the cap) are converted and answered;
    the bound on what stays is the unit test's (``CACHE_BYTES`` per cache)."""
    started = http.get("/v1/models").json()["engine"]["started_at"]
    for seed in range(16):
        r = http.post(PLAIN, content=webp_with_icc(padded_profile(3 << 20, 100 + seed)),
                      headers={"Content-Type": "image/webp"})
        assert r.status_code == 200, r.text
        with _read(r) as im:
            assert len(im.info["icc_profile"]) == 3 << 20  # color=keep: the photo's own profile
    assert http.get("/v1/models").json()["engine"]["started_at"] == started


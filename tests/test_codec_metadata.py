"""Metadata and colour: real files made here, checked tag by tag and colour by colour.

Each input is written with the libraries people's cameras and tools use (Pillow, OpenCV,
pillow-heif), decoded with ``codec.decode``, "enhanced" (resized x2, as the models would),
encoded with ``codec.encode`` and read back with Pillow, independently of our writer.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import _icc
import cv2
import numpy as np
import pillow_heif
import pytest
from conftest import job_ended, wait_job
from PIL import Image, ImageCms

from serve_app import codec
from serve_app.codec import color as colorm
from serve_app.codec.metadata import EXIF_PREFIX
from serve_app.config import LimitsConfig

LIMITS = LimitsConfig()
P3 = _icc.make_profile("p3")
ADOBE = _icc.make_profile("adobe")
PATCH = (200, 80, 60)  # RGB in the photo's own profile

MAKE, MODEL, DATE = 0x010F, 0x0110, 0x9003
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:exif="http://ns.adobe.com/exif/1.0/"'
    b' xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"'
    b' tiff:Orientation="6" exif:PixelXDimension="64" exif:GPSLatitude="52,31.2N"'
    b' photoshop:City="Berlin" dc:format="image/jpeg"><dc:creator>Ada</dc:creator>'
    b"<exif:GPSLongitude>13,24.0E</exif:GPSLongitude></rdf:Description></rdf:RDF></x:xmpmeta>"
)


def iim(record: int, dataset: int, value: bytes) -> bytes:
    return bytes([0x1C, record, dataset]) + struct.pack(">H", len(value)) + value


IPTC = iim(2, 5, b"Harbour at dusk") + iim(2, 90, b"Berlin") + iim(2, 116, b"(c) Ada")


def camera_exif(orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[MAKE], exif[MODEL] = "Canon", "EOS R5"
    exif[0x0112] = orientation
    exif[0x011A], exif[0x011B], exif[0x0128] = 300.0, 300.0, 2
    sub = exif.get_ifd(0x8769)
    sub[DATE] = "2024:05:06 07:08:09"
    sub[0xA002], sub[0xA003] = 64, 48
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (52.0, 31.0, 12.0), "E", (13.0, 24.0, 0.0)
    return exif


def with_thumbnail(exif_tiff: bytes) -> bytes:
    """EXIF (TIFF bytes, big-endian as Pillow writes) with an IFD1 thumbnail appended."""
    data = bytearray(exif_tiff)
    order = ">" if data[:2] == b"MM" else "<"
    ifd0 = struct.unpack_from(order + "I", data, 4)[0]
    count = struct.unpack_from(order + "H", data, ifd0)[0]
    next_at = ifd0 + 2 + 12 * count
    thumb = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(thumb, "JPEG")
    ifd1 = len(data)
    thumb_at = ifd1 + 2 + 3 * 12 + 4
    data += struct.pack(order + "H", 3)
    data += struct.pack(order + "HHII", 0x0103, 3, 1, 6 << (16 if order == ">" else 0))
    data += struct.pack(order + "HHII", 0x0201, 4, 1, thumb_at)
    data += struct.pack(order + "HHII", 0x0202, 4, 1, len(thumb.getvalue()))
    data += struct.pack(order + "I", 0) + thumb.getvalue()
    struct.pack_into(order + "I", data, next_at, ifd1)
    return bytes(data)


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def camera_jpeg(h: int = 48, w: int = 64, icc: bytes | None = None) -> bytes:
    """A JPEG as a camera writes it: EXIF (GPS, thumbnail), XMP, IPTC, an ICC profile."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:] = PATCH
    buf = io.BytesIO()
    exif_raw = with_thumbnail(camera_exif().tobytes()[len(EXIF_PREFIX):])
    Image.fromarray(rgb).save(buf, "JPEG", quality=98, exif=EXIF_PREFIX + exif_raw, xmp=XMP,
                              icc_profile=icc, dpi=(300, 300), subsampling=0)
    data = buf.getvalue()
    resource = b"8BIM\x04\x04\x00\x00" + struct.pack(">I", len(IPTC)) + IPTC + b"\x00" * (len(IPTC) % 2)
    return data[:2] + jpeg_segment(0xED, b"Photoshop 3.0\x00" + resource) + data[2:]


def enhance(data: bytes, fmt: str | None = None, **encode_args) -> tuple[codec.DecodedImage, bytes]:
    """decode -> x2 -> encode, as the service does (the models' place taken by a resize)."""
    decoded = codec.decode(data, codec.probe(data, LIMITS))
    h, w = decoded.image.shape[:2]
    bigger = cv2.resize(decoded.image, (w * 2, h * 2), interpolation=cv2.INTER_NEAREST)
    out_fmt = codec.output_format(fmt, decoded.format, bigger)
    return decoded, codec.encode(bigger, out_fmt, 95, metadata=decoded.metadata, **encode_args)


def read(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def iptc_of(im: Image.Image) -> dict[tuple[int, int], bytes]:
    from PIL import IptcImagePlugin

    return {k: v for k, v in (IptcImagePlugin.getiptcinfo(im) or {}).items()}


def centre_rgb(im: Image.Image, profile_to_srgb: bool = False) -> np.ndarray:
    """The centre pixel, optionally converted to sRGB with the image's embedded profile."""
    if profile_to_srgb and im.info.get("icc_profile"):
        src = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
        im = ImageCms.profileToProfile(im.convert("RGB"), src, ImageCms.createProfile("sRGB"),
                                       renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    arr = np.asarray(im.convert("RGB"))
    return arr[arr.shape[0] // 2, arr.shape[1] // 2].astype(np.float64)


# ----------------------------------------------------------------------------- metadata


def test_jpeg_keeps_every_tag_made_true():
    data = camera_jpeg()
    decoded, out = enhance(data)
    assert decoded.image.shape[:2] == (64, 48)  # orientation 6 applied
    im = read(out)
    assert im.format == "JPEG" and im.size == (96, 128)
    exif = im.getexif()
    assert (exif[MAKE], exif[MODEL]) == ("Canon", "EOS R5")
    assert exif[0x0112] == 1  # reset after it was applied
    sub = exif.get_ifd(0x8769)
    assert sub[DATE] == "2024:05:06 07:08:09"
    assert (sub[0xA002], sub[0xA003]) == (96, 128)  # the new pixel size
    assert float(exif[0x011A]) == pytest.approx(600.0) and exif[0x0128] == 2
    assert im.info["dpi"] == pytest.approx((600, 600))  # JFIF density too
    assert exif.get_ifd(0x8825)[2] == (52.0, 31.0, 12.0)
    assert b"Exif" in out[:200] and exif.get_ifd(0x0001) == {}  # no IFD1: thumbnail dropped
    xmp = im.info["xmp"]
    assert b'tiff:Orientation="1"' in xmp and b'exif:PixelXDimension="96"' in xmp
    assert b"<dc:creator>Ada</dc:creator>" in xmp and b"GPSLatitude" in xmp
    iptc = iptc_of(im)
    assert iptc[(2, 5)] == b"Harbour at dusk" and iptc[(2, 90)] == b"Berlin"
    assert iptc[(2, 116)] == b"(c) Ada"


def test_the_input_thumbnail_was_there():
    """The check above is meaningful: the input does carry an IFD1 thumbnail."""
    data = camera_jpeg()
    start = data.index(b"Exif\x00\x00") + 6
    tiff = data[start:start + 4000]
    ifd0 = struct.unpack_from(">I", tiff, 4)[0]
    count = struct.unpack_from(">H", tiff, ifd0)[0]
    assert struct.unpack_from(">I", tiff, ifd0 + 2 + 12 * count)[0] != 0


def test_keep_no_gps_drops_every_location():
    _, out = enhance(camera_jpeg(), keep="keep-no-gps")
    im = read(out)
    exif = im.getexif()
    assert 0x8825 not in exif and exif[MAKE] == "Canon"
    xmp = im.info["xmp"]
    assert b"GPS" not in xmp and b"Berlin" not in xmp and b"<dc:creator>Ada</dc:creator>" in xmp
    iptc = iptc_of(im)
    assert (2, 90) not in iptc and iptc[(2, 5)] == b"Harbour at dusk"


def test_strip_drops_metadata_but_not_colour():
    _, out = enhance(camera_jpeg(icc=P3), keep="strip")
    im = read(out)
    assert not im.getexif() and "xmp" not in im.info and not iptc_of(im)
    assert im.info["icc_profile"] == P3  # colour is not metadata: without it colours shift


@pytest.mark.parametrize("fmt", ["png", "webp", "avif"])
def test_other_outputs_carry_what_they_can_hold(fmt):
    _, out = enhance(camera_jpeg(icc=ADOBE), fmt)
    im = read(out)
    assert im.format == fmt.upper() and im.size == (96, 128)
    exif = im.getexif() if fmt != "webp" else Image.Exif()
    if fmt == "webp":
        exif.load(im.info["exif"])
    assert exif[MAKE] == "Canon" and exif.get(0x0112, 1) == 1
    assert exif.get_ifd(0x8769)[0xA002] == 96
    assert b'tiff:Orientation="1"' in im.info["xmp"]
    assert im.info["icc_profile"] == ADOBE
    if fmt == "png":
        assert im.info["dpi"] == pytest.approx((600, 600), abs=0.1)


# ----------------------------------------------------------------------------- colour


def png_with_profile(rgb: np.ndarray, icc: bytes) -> bytes:
    """A PNG (8 or 16 bits, written by OpenCV) with an iCCP chunk added by hand."""
    data = codec_free_png(rgb)
    chunk_body = b"profile\x00\x00" + zlib.compress(icc)
    chunk = struct.pack(">I", len(chunk_body)) + b"iCCP" + chunk_body
    chunk += struct.pack(">I", zlib.crc32(b"iCCP" + chunk_body))
    return data[:33] + chunk + data[33:]


def codec_free_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("space", ["p3", "adobe"])
def test_the_models_get_the_photos_own_values(space):
    """No conversion on the way in (as Lightroom's and Upscayl's upscalers): a round trip
    through sRGB would clip every colour outside it."""
    icc = _icc.make_profile(space)
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:] = PATCH
    decoded = codec.decode(png_with_profile(rgb, icc))
    assert not decoded.metadata.pixels_in_srgb and decoded.metadata.icc_profile == icc
    assert tuple(decoded.image[16, 16, ::-1]) == PATCH


@pytest.mark.parametrize("space", ["p3", "adobe"])
def test_color_keep_keeps_the_values_and_srgb_converts(space):
    icc = _icc.make_profile(space)
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:] = PATCH
    data = png_with_profile(rgb, icc)
    _, kept = enhance(data)
    im = read(kept)
    assert im.info["icc_profile"] == icc
    assert tuple(centre_rgb(im)) == PATCH  # the original numbers, exactly
    assert _icc.delta_e(centre_rgb(im, True), _icc.expected_srgb(space, PATCH)) < 1.0

    _, srgb = enhance(data, color="srgb")
    im = read(srgb)
    assert colorm.is_srgb(im.info["icc_profile"])
    assert _icc.delta_e(centre_rgb(im), _icc.expected_srgb(space, PATCH)) < 1.0


def test_jpeg_with_profile_round_trip():
    _, out = enhance(camera_jpeg(icc=P3))
    im = read(out)
    assert im.info["icc_profile"] == P3
    assert _icc.delta_e(centre_rgb(im, True), _icc.expected_srgb("p3", PATCH)) < 1.0


def test_sixteen_bits_stay_sixteen_bits_kept_and_converted():
    rgb = np.zeros((32, 32, 3), np.uint16)
    rgb[:] = [v * 257 for v in PATCH]
    rgb[:, :16] += np.arange(16, dtype=np.uint16)[None, :, None]  # detail below one 8-bit level
    data = png_with_profile(rgb, P3)
    decoded = codec.decode(data)
    assert decoded.image.dtype == np.uint16 and not decoded.metadata.pixels_in_srgb
    assert np.array_equal(decoded.image[..., ::-1], rgb)
    out = codec.encode(decoded.image, "png", metadata=decoded.metadata)
    back = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    assert read(out).info["icc_profile"] == P3 and np.array_equal(back[..., ::-1], rgb)

    out = codec.encode(decoded.image, "png", metadata=decoded.metadata, color="srgb")
    back = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and colorm.is_srgb(read(out).info["icc_profile"])
    got = back[16, 24, ::-1].astype(np.float64) / 257.0
    want = _icc.expected_srgb("p3", PATCH)
    assert _icc.delta_e(got, want) < 1.0 and np.abs(got - want).max() <= 0.5
    assert len(np.unique(back[16, :16, 0])) > 8  # the detail below one 8-bit level is kept


@pytest.mark.parametrize("space", ["p3", "adobe"])
def test_sixteen_bit_conversion_by_tables_is_within_two_levels_of_the_exact_one(space):
    """Every one of the 65536 levels in each channel (shuffled across channels), to sRGB by
    the tables against the per-pixel interpolation of the same curves."""
    shaper = colorm.matrix_shaper(_icc.make_profile(space))
    srgb = colorm.matrix_shaper(colorm.srgb_profile())
    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    rng = np.random.default_rng(1)
    image = np.dstack([levels, rng.permutation(levels), rng.permutation(levels.T)])
    m = (np.linalg.inv(srgb.matrix) @ shaper.matrix).astype(np.float32)
    lin = np.clip(shaper.to_linear(image[..., ::-1].astype(np.float32) / 65535.0) @ m.T, 0, 1)
    exact = (srgb.from_linear(lin)[..., ::-1] * 65535.0 + 0.5).astype(np.int64)
    got = shaper.convert(image, to_srgb=True)
    assert got.dtype == np.uint16
    assert np.abs(got.astype(np.int64) - exact).max() <= 2


def test_an_srgb_profile_is_kept_without_conversion():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:] = PATCH
    decoded = codec.decode(png_with_profile(rgb, colorm.srgb_profile()))
    assert not decoded.metadata.pixels_in_srgb
    assert tuple(decoded.image[8, 8, ::-1]) == PATCH


def test_a_broken_profile_is_ignored():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:] = PATCH
    decoded = codec.decode(png_with_profile(rgb, b"not a profile" * 20))
    assert tuple(decoded.image[8, 8, ::-1]) == PATCH
    assert codec.encode(decoded.image, "jpeg", metadata=decoded.metadata)[:2] == b"\xff\xd8"


def test_a_tiff_exif_holds_only_what_describes_the_photo():
    """A TIFF's EXIF is its first page directory: its XMP, ICC and Photoshop layer tags are
    not copied into the output's EXIF (XMP and ICC travel as blocks of their own)."""
    from PIL import TiffImagePlugin

    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[MAKE], tags[0x0112], tags[700], tags[37724] = "Camera", 1, XMP, b"layers" * 10_000
    tags.tagtype[700], tags.tagtype[37724] = 1, 7
    buf = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buf, "TIFF", tiffinfo=tags, icc_profile=P3)
    data = buf.getvalue()
    meta = codec.decode(data, codec.probe(data, LIMITS)).metadata
    exif = Image.Exif()
    exif.load(EXIF_PREFIX + meta.exif)
    assert sorted(exif) == [MAKE, 0x0112]
    assert (meta.xmp, meta.icc_profile, meta.dropped) == (XMP, P3, ())


def test_xmp_values_are_made_true_in_both_forms():
    xmp = XMP.replace(b"<dc:creator>", b"<tiff:ImageWidth>64</tiff:ImageWidth><dc:creator>")
    decoded = codec.decode(camera_jpeg())  # 64x48, orientation 6: 48 wide once turned
    meta = dataclasses.replace(decoded.metadata, xmp=xmp)
    out = read(codec.encode(decoded.image, "png", metadata=meta)).info["xmp"]
    assert b'tiff:Orientation="1"' in out and b"<tiff:ImageWidth>48</tiff:ImageWidth>" in out
    assert b'exif:PixelXDimension="48"' in out


# ----------------------------------------------------------------------------- HEIC, AVIF


def heic_bytes(rgb: np.ndarray, **save) -> bytes:
    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "HEIF", quality=-1, **save)
    return buf.getvalue()


def avif_bytes(rgb: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "AVIF", quality=100, subsampling="4:4:4", **save)
    return buf.getvalue()


@pytest.mark.parametrize("make", [heic_bytes, avif_bytes], ids=["heic", "avif"])
def test_heic_and_avif_inputs_with_metadata_and_profile(make):
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:] = PATCH
    upright = XMP.replace(b'tiff:Orientation="6"', b'tiff:Orientation="1"')
    data = make(rgb, exif=camera_exif(orientation=1), xmp=upright, icc_profile=P3)
    info = codec.probe(data, LIMITS)
    assert (info.format, info.width, info.height) == (
        "heif" if make is heic_bytes else "avif", 64, 48)
    decoded, out = enhance(data)
    expected_format = "JPEG" if make is heic_bytes else "AVIF"  # HEIC in: JPEG out
    im = read(out)
    assert im.format == expected_format and im.size == (128, 96)
    exif = im.getexif()
    assert exif[MAKE] == "Canon" and exif.get_ifd(0x8825)[1] == "N"
    assert b"<dc:creator>Ada</dc:creator>" in im.info["xmp"]
    assert im.info["icc_profile"] == P3
    # The patch, measured after conversion with the embedded profile, against what the
    # input itself decodes to (lossy codecs: the reference is the decoded input).
    reference = centre_rgb(read(data), True)
    assert _icc.delta_e(centre_rgb(im, True), reference) < 1.0
    assert _icc.delta_e(reference, _icc.expected_srgb("p3", PATCH)) < 2.0


def test_avif_orientation_is_applied_once():
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:8, :8] = 255  # a corner that shows where the top-left went
    data = avif_bytes(rgb, exif=camera_exif(orientation=6))
    decoded = codec.decode(data)
    from PIL import ImageOps

    expected = np.asarray(ImageOps.exif_transpose(read(data)).convert("RGB"))[..., ::-1]
    assert decoded.image.shape == expected.shape == (64, 48, 3)
    assert np.abs(decoded.image.astype(int) - expected.astype(int)).max() <= 2


def test_avif_output_is_recognised_and_lossy_but_close():
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:] = PATCH
    out = codec.encode(rgb[..., ::-1].copy(), "avif", 90)
    assert codec.sniff(out) == "avif"
    assert np.abs(centre_rgb(read(out)) - PATCH).max() <= 3


def test_heif_brands_are_sniffed():
    assert codec.sniff(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic") == "heif"
    assert codec.sniff(b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf") == "avif"
    assert codec.sniff(b"\x00\x00\x00\x14ftypisom\x00\x00\x00\x00isom") is None  # an MP4


# ----------------------------------------------------------------------------- over HTTP


def test_options_over_http(http):
    data = camera_jpeg(icc=P3)
    r = http.post("/v1/enhance?upscale=1&face=false&bg_model=none&metadata=keep-no-gps&color=srgb",
                  content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    im = read(r.content)
    assert im.getexif()[MAKE] == "Canon" and 0x8825 not in im.getexif()
    assert colorm.is_srgb(im.info["icc_profile"])
    assert _icc.delta_e(centre_rgb(im), _icc.expected_srgb("p3", PATCH)) < 1.5
    r = http.post("/v1/enhance?upscale=1&face=false&bg_model=none&format=avif",
                  content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/avif"
    assert read(r.content).info["icc_profile"] == P3


@pytest.mark.parametrize("query", ["metadata=all", "metadata=", "color=p3", "format=heic", "color=SRGB"])
def test_bad_codec_options_are_422(http, query):
    r = http.post(f"/v1/enhance?upscale=1&{query}", content=camera_jpeg(),
                  headers={"Content-Type": "image/jpeg"})
    if query == "metadata=":  # an empty value means "not given": the server's default
        assert r.status_code == 200
        return
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_option"


def test_models_describes_the_codec_options(http):
    body = http.get("/v1/models").json()
    assert body["options"]["metadata"] in ("keep", "strip", "keep-no-gps")
    assert body["options"]["color"] == "keep"
    assert {"heif", "avif"} <= set(body["formats"]["input"]) and "avif" in body["formats"]["output"]


def test_a_job_keeps_metadata_and_names_colliding_inputs_apart(http, images):
    """Jobs take the same options; two inputs named alike give two outputs."""
    import zipfile

    files = [
        ("files", ("image.bmp", images.cv2_bytes(images.array(24, 32), ".bmp"), "image/bmp")),
        ("files", ("image.tiff", images.cv2_bytes(images.array(24, 32), ".tiff"), "image/tiff")),
        ("files", ("camera.jpg", camera_jpeg(icc=ADOBE), "image/jpeg")),
    ]
    r = http.post("/v1/jobs", files=files, data={
        "upscale": "1", "face": "false", "bg_model": "none", "metadata": "keep-no-gps"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert wait_job(http, job_id, job_ended)["state"] == "completed"
    z = http.get(f"/v1/jobs/{job_id}/results.zip")
    with zipfile.ZipFile(io.BytesIO(z.content)) as archive:
        names = sorted(archive.namelist())
        assert len(names) == 3 and len({n.rsplit(".", 1)[0] for n in names}) == 3
        jpeg = read(archive.read(next(n for n in names if n.endswith(".jpg"))))
    assert jpeg.getexif()[MAKE] == "Canon" and 0x8825 not in jpeg.getexif()
    assert jpeg.info["icc_profile"] == ADOBE

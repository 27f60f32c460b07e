"""Photographers' files through the running app (issue 20: 3, 4, 5, 6, 8 and TIFF orientation).

Each case: a file made here, sent over HTTP to the session app with a null engine
(``face=false&bg_model=none``: Lanczos, which keeps a flat patch's values exactly), and the
answer read back with Pillow, ImageCms (LittleCMS) and OpenCV, not with the codec's reader.
"""

from __future__ import annotations

import io
import struct
import xml.etree.ElementTree as ET

import _icc
import cv2
import numpy as np
import pillow_heif
import pytest
from PIL import Image, ImageCms, JpegImagePlugin

from serve_app import codec
from serve_app.codec import color as colorm
from serve_app.codec.xmp import edit_xmp

P3 = _icc.make_profile("p3")
NULL = "face=false&bg_model=none"
EXIF_IFD, INTEROP_IFD, COLOR_SPACE = 0x8769, 0xA005, 0xA001


def post(http, data: bytes, query: str, media: str = "image/jpeg") -> bytes:
    r = http.post(f"/v1/enhance?{NULL}&{query}", content=data, headers={"Content-Type": media})
    assert r.status_code == 200, r.text
    return r.content


def read(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def centre(im: Image.Image) -> tuple[int, ...]:
    arr = np.asarray(im.convert("RGB"))
    return tuple(int(v) for v in arr[arr.shape[0] // 2, arr.shape[1] // 2])


def flat(rgb: tuple[int, int, int], h: int = 32, w: int = 48) -> Image.Image:
    return Image.new("RGB", (w, h), rgb)


def description(icc: bytes) -> str:
    return ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()


def to_srgb(rgb: tuple[int, int, int], icc: bytes) -> tuple[int, ...]:
    """LittleCMS's own conversion of one colour, relative colorimetric."""
    src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    out = ImageCms.profileToProfile(flat(rgb, 1, 1), src, ImageCms.createProfile("sRGB"),
                                    renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    return out.getpixel((0, 0))


# ------------------------------------------------------------------- 3: wide gamut, keep


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_p3_red_is_kept_with_its_profile(http, fmt):
    buf = io.BytesIO()
    flat((255, 0, 0)).save(buf, fmt, icc_profile=P3, **({"quality": 100, "subsampling": 0}
                                                         if fmt == "JPEG" else {}))
    media = f"image/{fmt.lower()}"
    im = read(post(http, buf.getvalue(), "upscale=2&color=keep", media))
    assert im.size == (96, 64) and im.info["icc_profile"] == P3
    tolerance = 0 if fmt == "PNG" else 1  # JPEG: one level of the codec's rounding
    assert np.abs(np.subtract(centre(im), (255, 0, 0))).max() <= tolerance  # was (234, 51, 35)

    im = read(post(http, buf.getvalue(), "upscale=2&color=srgb", media))
    assert colorm.is_srgb(im.info["icc_profile"])
    want = to_srgb((255, 0, 0), P3)
    assert np.abs(np.subtract(centre(im), want)).max() <= 1, (centre(im), want)


# ------------------------------------------------------------ 4: colour space facts


def dcf_adobe_jpeg(rgb: tuple[int, int, int], color_space: int = 0xFFFF) -> bytes:
    """A camera JPEG in Adobe RGB the DCF way: no ICC profile, InteropIndex R03."""
    exif = Image.Exif()
    exif[0x010F] = "Nikon"
    sub = exif.get_ifd(EXIF_IFD)
    sub[COLOR_SPACE] = color_space
    sub[INTEROP_IFD] = {1: "R03"}
    buf = io.BytesIO()
    flat(rgb).save(buf, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())
    return buf.getvalue()


def test_an_adobe_rgb_camera_jpeg_without_a_profile_is_recognised(http):
    patch = (40, 200, 60)  # a green outside sRGB's gamut in Adobe RGB
    data = dcf_adobe_jpeg(patch)
    assert "icc_profile" not in read(data).info
    im = read(post(http, data, "upscale=2&color=keep"))
    assert description(im.info["icc_profile"]) == "Adobe RGB (1998)"
    assert np.abs(np.subtract(centre(im), patch)).max() <= 1
    assert im.getexif().get_ifd(EXIF_IFD)[COLOR_SPACE] == 0xFFFF

    im = read(post(http, data, "upscale=2&color=srgb"))
    assert colorm.is_srgb(im.info["icc_profile"])
    want = _icc.expected_srgb("adobe", patch)
    assert _icc.delta_e(np.array(centre(im), float), want) < 1.5, (centre(im), want)
    exif = im.getexif()
    assert exif.get_ifd(EXIF_IFD)[COLOR_SPACE] == 1
    assert exif.get_ifd(INTEROP_IFD)[1] == "R98"


def test_colour_space_2_is_adobe_rgb_and_srgb_exif_is_not_reinterpreted():
    decoded = codec.decode(dcf_adobe_jpeg((10, 20, 30), color_space=2))
    assert description(decoded.metadata.icc_profile) == "Adobe RGB (1998)"
    decoded = codec.decode(dcf_adobe_jpeg((10, 20, 30), color_space=1))
    assert decoded.metadata.icc_profile is None


def gray_profile() -> bytes:
    """A gray ICC profile (gamma 2.2): an sRGB one's header with a gray colour space and a
    kTRC, as cameras' and scanners' gray profiles are."""
    from serve_app.codec import profiles

    return profiles.build(b"GRAY", [
        (b"desc", profiles.description("Gray 2.2 (test)")),
        (b"wtpt", profiles.xyz(0.9642, 1.0, 0.8249)),
        (b"kTRC", profiles.gamma_curve(0x0233)),
    ], year=2024)


def test_a_gray_jpeg_with_a_gray_profile_as_webp_carries_an_rgb_profile(http):
    gray = gray_profile()
    assert ImageCms.ImageCmsProfile(io.BytesIO(gray)).profile.xcolor_space.strip() == "GRAY"
    buf = io.BytesIO()
    Image.new("L", (48, 32), 100).save(buf, "JPEG", quality=100, icc_profile=gray)
    im = read(post(http, buf.getvalue(), "upscale=2&format=webp"))
    assert im.mode == "RGB"
    icc = im.info.get("icc_profile")
    assert icc and ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space.strip() == "RGB"
    # The same grey, as LittleCMS converts it from the gray profile to sRGB.
    src = ImageCms.ImageCmsProfile(io.BytesIO(gray))
    want = ImageCms.applyTransform(Image.new("L", (1, 1), 100), ImageCms.buildTransform(
        src, ImageCms.createProfile("sRGB"), "L", "RGB")).getpixel((0, 0))
    assert np.abs(np.subtract(centre(im), want)).max() <= 2, (centre(im), want)

    im = read(post(http, buf.getvalue(), "upscale=2&format=png"))  # gray stays gray
    assert im.mode == "L" and im.info["icc_profile"] == gray


# ------------------------------------------------------- 5: resolution and captions


XMP_RES = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/"'
    ' tiff:XResolution="300/1" tiff:ResolutionUnit="2"><tiff:YResolution>300/1</tiff:YResolution>'
    "</rdf:Description></rdf:RDF></x:xmpmeta>"
)


def iim(record: int, dataset: int, value: bytes) -> bytes:
    return bytes([0x1C, record, dataset]) + struct.pack(">H", len(value)) + value


def jpeg_with(exif_dpi: float, jfif_dpi: int, caption: bytes) -> bytes:
    exif = Image.Exif()
    exif[0x011A], exif[0x011B], exif[0x0128] = exif_dpi, exif_dpi, 2
    buf = io.BytesIO()
    flat((90, 120, 150)).save(buf, "JPEG", quality=95, dpi=(jfif_dpi, jfif_dpi), exif=exif.tobytes(),
                              xmp=XMP_RES.encode())
    data = buf.getvalue()
    iptc = iim(1, 90, b"\x1b%G") + iim(2, 120, caption) + iim(2, 116, b"(c) Ada")
    resource = b"8BIM\x04\x04\x00\x00" + struct.pack(">I", len(iptc)) + iptc + b"\x00" * (len(iptc) % 2)
    app13 = b"Photoshop 3.0\x00" + resource
    return data[:2] + struct.pack(">BBH", 0xFF, 0xED, len(app13) + 2) + app13 + data[2:]


def xmp_of(im: Image.Image) -> ET.Element:
    raw = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    assert raw, "no XMP in the output"
    text = raw.decode() if isinstance(raw, bytes) else raw
    return ET.fromstring(text[text.index("<x:xmpmeta"):text.rindex("</x:xmpmeta>") + 12])


TIFF_NS = "{http://ns.adobe.com/tiff/1.0/}"
DC_NS = "{http://purl.org/dc/elements/1.1/}"


def test_xmp_resolution_scales_and_exif_wins_over_jfif(http):
    data = jpeg_with(exif_dpi=300, jfif_dpi=72, caption="Hafen bei Dämmerung".encode())
    im = read(post(http, data, "upscale=2&format=jpeg"))
    assert im.info["jfif_density"] == (600, 600) and im.info["jfif_unit"] == 1
    exif = im.getexif()
    assert float(exif[0x011A]) == 600 and float(exif[0x011B]) == 600
    root = xmp_of(im)
    desc = root.find(".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    assert desc.get(TIFF_NS + "XResolution") == "600/1"
    assert desc.find(TIFF_NS + "YResolution").text == "600/1"


@pytest.mark.parametrize("fmt", ["png", "webp", "avif"])
def test_the_iptc_caption_goes_into_xmp_where_iptc_cannot(http, fmt):
    caption = "Hafen bei Dämmerung <1> & more"
    data = jpeg_with(exif_dpi=300, jfif_dpi=300, caption=caption.encode())
    im = read(post(http, data, f"upscale=2&format={fmt}"))
    found = [li.text for li in xmp_of(im).iter("{http://www.w3.org/1999/02/22-rdf-syntax-ns#}li")
             if li.get("{http://www.w3.org/XML/1998/namespace}lang") == "x-default"]
    assert found == [caption]
    assert [e.tag for e in xmp_of(im).iter(DC_NS + "description")] == [DC_NS + "description"]


def test_xmp_resolution_without_other_dpi_is_scaled_in_its_own_unit():
    xmp = XMP_RES.replace('tiff:ResolutionUnit="2"', 'tiff:ResolutionUnit="3"')
    out = edit_xmp(xmp, {"tiff:XResolution": lambda old: f"<{old}>"}, False)
    assert 'tiff:XResolution="&lt;300/1&gt;"' in out
    png = codec.encode(np.zeros((40, 60, 3), np.uint8), "png", metadata=codec.ImageMetadata(
        xmp=xmp.encode(), size=(30, 20)))
    text = read(png).info["XML:com.adobe.xmp"]
    assert 'tiff:XResolution="600/1"' in text and "<tiff:YResolution>600/1<" in text
    assert 'tiff:ResolutionUnit="3"' in text


# ------------------------------------------------------------------------ 6: chroma


@pytest.mark.parametrize(("query", "sampling"), [
    ("quality=95", 0), ("quality=90", 0), ("quality=89", 2), ("quality=95&chroma=420", 2),
    ("quality=60&chroma=444", 0), ("quality=95&chroma=auto", 0),
])
def test_jpeg_chroma_follows_quality_and_the_option(http, query, sampling):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, ::2] = (230, 20, 20)  # red edges, where 4:2:0 shows
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    im = read(post(http, buf.getvalue(), f"upscale=1&format=jpeg&{query}", "image/png"))
    assert JpegImagePlugin.get_sampling(im) == sampling  # 0: 4:4:4, 2: 4:2:0


def test_a_bad_chroma_is_422(http):
    r = http.post(f"/v1/enhance?{NULL}&chroma=411", content=b"x", headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "chroma"


# ------------------------------------------------------------------ 8: 10-bit HEIC


def test_a_ten_bit_heic_keeps_its_levels_in_a_16_bit_png(http):
    rgb = np.zeros((32, 48, 3), np.uint16)
    rgb[:] = (700 << 6, 500 << 6, 300 << 6)
    rgb[:, :, 0] += (np.arange(48, dtype=np.uint16) // 3 << 6)[None, :]  # 10-bit steps: 16 levels
    heif = pillow_heif.from_bytes("RGB;16", (48, 32), rgb.tobytes())
    buf = io.BytesIO()
    heif.save(buf, quality=-1)
    data = buf.getvalue()
    out = post(http, data, "upscale=1&format=png", "image/heic")
    back = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and back.shape == (32, 48, 3)
    # libheif's own 16-bit read, exactly; its 8-bit read has far fewer levels on the ramp.
    deep = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=False)
    assert np.array_equal(back[..., ::-1], np.asarray(deep))
    eight = np.asarray(pillow_heif.open_heif(io.BytesIO(data)))
    levels = len(np.unique(back[16, :, 2]))
    assert levels >= 12 and levels >= 2 * len(np.unique(eight[16, :, 0]))
    assert np.abs(back[16, :, 2].astype(np.int64) - rgb[16, :, 0]).max() <= 3 << 6


# ------------------------------------------------------------- TIFF orientation


@pytest.mark.parametrize("bits", [8, 16])
def test_a_tiff_with_orientation_6_is_turned_once(http, bits):
    import tifffile

    dtype = np.uint8 if bits == 8 else np.uint16
    rgb = np.zeros((48, 64, 3), dtype)
    rgb[0, 0] = np.iinfo(dtype).max  # top left, stored
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    out = post(http, buf.getvalue(), "upscale=1&format=png", "image/tiff")
    back = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.shape == (64, 48, 3)
    assert [tuple(p) for p in np.argwhere(back[..., 0] > 0)] == [(0, 47)]  # turned 90° clockwise



class FourFourFourOnly:
    """A device JPEG encoder that writes one subsampling (4:4:4), as nvJPEG through
    torchvision does: libjpeg through Pillow in its place, since this machine has no GPU."""

    def __init__(self) -> None:
        self.calls = 0

    def decode(self, data: bytes, info: codec.ImageInfo) -> np.ndarray | None:
        return None

    def encode(self, image: np.ndarray, quality: int) -> bytes | None:
        self.calls += 1
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image[..., ::-1])).save(
            buf, "JPEG", quality=quality, subsampling=0)
        return buf.getvalue()


def test_a_device_encoder_of_one_subsampling_is_used_only_for_it():
    from serve_app.config import AppConfig
    from serve_app.deployments.transcode import Transcoder

    device = FourFourFourOnly()
    t = Transcoder(AppConfig(), accelerator=device)
    image = np.zeros((32, 48, 3), np.uint8)
    image[:, ::2] = (20, 20, 230)
    try:
        def sampling(quality: int, chroma: str = "auto") -> int:
            data, fmt = t.encode_now(image, "jpeg", "png", quality, chroma=chroma)
            assert fmt == "jpeg"
            return JpegImagePlugin.get_sampling(read(data))

        assert sampling(95) == 0 and device.calls == 1
        assert sampling(80) == 2 and device.calls == 1  # 4:2:0: the CPU, the device not asked
        assert sampling(80, "444") == 0 and device.calls == 2
        assert sampling(95, "420") == 2 and device.calls == 2
    finally:
        t.close()

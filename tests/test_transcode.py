"""Decoding and encoding in the model replica (``deployments.transcode``), the PNG settings,
and nvJPEG: its eligibility rules run everywhere, the GPU round trips only on CUDA."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from serve_app import codec
from serve_app.config import AppConfig, EncodingConfig
from serve_app.deployments.transcode import Transcoder, accelerator_for
from serve_app.errors import TooManyPixels, UnsupportedMediaType


def _photo(h: int = 96, w: int = 128) -> np.ndarray:
    """A smooth image with some texture: what JPEG and PNG filters are made for."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.dstack([x * 2, y * 2, (x + y)]).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 3, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _transcoder(**overrides: Any) -> Transcoder:
    return Transcoder(AppConfig.model_validate(overrides))


def test_pool_size_follows_the_replica_cpus() -> None:
    assert _transcoder(model={"num_cpus": 3.5}).threads == 4
    assert _transcoder(model={"num_cpus": 0.25}).threads == 1
    assert _transcoder(model={"num_cpus": 8, "codec_threads": 2}).threads == 2


def test_round_trip_on_the_codec_threads() -> None:
    t = _transcoder()
    image = _photo()
    data = codec.encode(image, "png")

    async def run() -> tuple[codec.DecodedImage, bytes, str]:
        decoded = await t.decode(data, 2)
        out, fmt = await t.encode(decoded.image, None, decoded.format, 95)
        return decoded, out, fmt

    try:
        decoded, out, fmt = asyncio.run(run())
    finally:
        t.close()
    assert decoded.format == "png" and np.array_equal(decoded.image, image)
    assert fmt == "png" and np.array_equal(codec.decode(out).image, image)


def test_the_replica_refuses_bombs_itself() -> None:
    """A handle may call the model replica directly: it probes before it decodes."""
    t = _transcoder(limits={"max_pixels": 10_000})
    try:
        with pytest.raises(TooManyPixels):
            t.decode_now(codec.encode(np.zeros((200, 200, 3), np.uint8), "png"), 1)
        with pytest.raises(UnsupportedMediaType):
            t.decode_now(b"<svg/>", 1)
    finally:
        t.close()


def test_output_format_rules_apply() -> None:
    t = _transcoder()
    rgba = np.dstack([_photo(), np.full(_photo().shape[:2], 200, np.uint8)])
    try:
        out, fmt = t.encode_now(rgba, None, "jpeg", 90)  # alpha from a JPEG input: PNG
        assert fmt == "png" and codec.decode(out).image.shape[2] == 4
        out, fmt = t.encode_now(_photo(), "jpeg", "png", 90)
        assert fmt == "jpeg" and codec.sniff(out) == "jpeg"
    finally:
        t.close()


def test_no_accelerator_on_a_cpu_replica() -> None:
    import torch

    assert accelerator_for(AppConfig(), torch.device("cpu")) is None


# ---------------------------------------------------------------------------- PNG settings


@pytest.mark.parametrize("strategy", ["default", "filtered", "huffman", "rle", "fixed"])
@pytest.mark.parametrize("png_filter", ["none", "sub", "up", "avg", "paeth", "all", "fast"])
def test_png_settings_are_lossless(strategy: str, png_filter: str) -> None:
    settings = EncodingConfig(png_strategy=strategy, png_filter=png_filter, png_compression=2)
    images = [
        _photo(),
        cv2.cvtColor(_photo(), cv2.COLOR_BGR2GRAY),
        np.dstack([_photo(), np.arange(96 * 128, dtype=np.uint32).reshape(96, 128).astype(np.uint8)]),
        (_photo().astype(np.uint16) * 257 + 3),
    ]
    for image in images:
        out = codec.encode(image, "png", settings=settings)
        assert np.array_equal(codec.decode(out).image, image), (strategy, png_filter, image.shape)


def test_default_png_is_smaller_than_zlib_level_3() -> None:
    """The measured default (docs/BENCHMARKS.md, "Encoders") must not cost bytes."""
    image = cv2.resize(_photo(), (512, 384), interpolation=cv2.INTER_LANCZOS4)
    old = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 3])[1]
    assert len(codec.encode(image, "png")) <= len(old)


# ---------------------------------------------------------------------------- nvJPEG


def _jpeg(image: np.ndarray, **save: Any) -> bytes:
    buf = io.BytesIO()
    mode_image = Image.fromarray(image[..., ::-1] if image.ndim == 3 else image)
    mode_image.save(buf, "JPEG", quality=92, **save)
    return buf.getvalue()


def _info(data: bytes) -> codec.ImageInfo:
    return codec.probe(data, AppConfig().limits)


def test_nvjpeg_takes_only_plain_jpegs() -> None:
    from serve_app.engine.nvjpeg import eligible

    plain = _jpeg(_photo())
    assert eligible(plain, _info(plain))
    gray = _jpeg(cv2.cvtColor(_photo(), cv2.COLOR_BGR2GRAY))
    assert eligible(gray, _info(gray))

    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _jpeg(_photo(), exif=exif.tobytes())
    assert not eligible(rotated, _info(rotated))
    exif[0x0112] = 1
    upright = _jpeg(_photo(), exif=exif.tobytes())
    assert eligible(upright, _info(upright))

    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    profiled = _jpeg(_photo(), icc_profile=srgb)
    assert not eligible(profiled, _info(profiled))

    cmyk = io.BytesIO()
    Image.fromarray(_photo()).convert("CMYK").save(cmyk, "JPEG")
    assert not eligible(cmyk.getvalue(), _info(cmyk.getvalue()))
    png = codec.encode(_photo(), "png")
    assert not eligible(png, _info(png))


def _cuda() -> Any:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: nvJPEG runs on the GPU only (the CPU path is tested above)")
    return torch.device("cuda")


def test_nvjpeg_decode_matches_the_cpu() -> None:
    from serve_app.engine.nvjpeg import GpuJpeg

    gpu = GpuJpeg.probe(_cuda())
    for image in (_photo(), cv2.cvtColor(_photo(), cv2.COLOR_BGR2GRAY)):
        data = _jpeg(image)
        want = codec.decode(data).image
        got = gpu.decode(data, _info(data))
        assert got is not None and got.shape == want.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        # Two JPEG decoders: IDCT and chroma upsampling round differently, by a few levels.
        assert diff.mean() < 1.5 and diff.max() <= 24


def test_nvjpeg_encode_and_fallbacks() -> None:
    from serve_app.engine.nvjpeg import GpuJpeg

    gpu = GpuJpeg.probe(_cuda())
    image = _photo()
    data = gpu.encode(image, 95)
    assert data is not None and codec.sniff(data) == "jpeg"
    back = codec.decode(data).image
    assert back.shape == image.shape and np.abs(back.astype(int) - image.astype(int)).mean() < 4
    assert gpu.encode(np.dstack([image, image[..., 0]]), 95) is None  # alpha: the CPU flattens
    assert gpu.encode(image.astype(np.uint16), 95) is None
    png = codec.encode(image, "png")
    assert gpu.decode(png, _info(png)) is None

    t = Transcoder(AppConfig(), gpu)
    try:
        out, fmt = t.encode_now(image, "jpeg", "png", 90)
        assert fmt == "jpeg" and codec.decode(out).image.shape == image.shape
        decoded = t.decode_now(_jpeg(image), 1)
        assert decoded.format == "jpeg" and decoded.image.shape == image.shape
    finally:
        t.close()


def test_small_images_may_skip_the_workers() -> None:
    """``limits.codec_inline_pixels``: small JPEG/PNG/WebP/BMP on the threads, the rest (and
    everything with the default 0) in the stoppable workers."""
    image = _photo()
    data = codec.encode(image, "png")

    async def run(t: Transcoder, fmt: str | None = None) -> bytes:
        decoded = await t.decode(data, 1)
        out, _ = await t.encode(decoded.image, fmt, decoded.format, 90)
        return out

    inline = _transcoder(limits={"codec_inline_pixels": 96 * 128})
    workers = _transcoder()
    try:
        assert codec.decode(asyncio.run(run(inline))).image.shape == image.shape
        assert inline.workers._idle == [] and inline.workers.busy == {"decode": 0, "encode": 0}
        assert codec.sniff(asyncio.run(run(inline, "avif"))) == "avif"  # AVIF: a worker
        assert len(inline.workers._idle) == 1
        assert codec.decode(asyncio.run(run(workers))).image.shape == image.shape
        assert len(workers.workers._idle) == 1
    finally:
        inline.close()
        workers.close()

"""Decoding and encoding in the model replica, where the pixels are needed.

The ingress forwards the encoded bytes and gets the encoded result back, so only compressed
images cross the network (docs/CAPACITY.md). Each model replica probes on its own threads
and decodes and encodes in its own ``model.codec_threads`` codec worker processes
(``codec.workers``): while the engine runs one batch, they decode the next images and encode
the last ones. So the CPU side grows with the model replicas and is sized per GPU replica
from the config. The workers are processes, not threads, so that a decode or encode past its
CPU or memory budget, past the request's deadline, or whose caller was cancelled (its client
went away) is stopped (docs/SECURITY.md, "Decoding").

On a CUDA replica, plain JPEGs are decoded and encoded with nvJPEG (``GpuJpeg``), with
``codec`` as the fallback. Ray-free: tested and benchmarked without a cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np

from serve_app import codec
from serve_app.codec import ImageMetadata
from serve_app.codec.workers import CodecWorkers
from serve_app.config import AppConfig

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")
# Formats whose decoding and encoding cost is bounded by the pixel and structure limits alone
# (AVIF's encoder, HEIF's and TIFF's many variants are not): small ones may skip the workers.
_INLINE_FORMATS = frozenset({"jpeg", "png", "webp", "bmp"})


class JpegAccelerator(Protocol):
    """A device JPEG codec; ``None`` from either method means "use the CPU"."""

    def decode(self, data: bytes, info: codec.ImageInfo) -> np.ndarray | None: ...

    def encode(self, image: np.ndarray, quality: int) -> bytes | None: ...


class Transcoder:
    """``decode`` and ``encode`` of one model replica, in its codec workers."""

    def __init__(self, config: AppConfig, accelerator: JpegAccelerator | None = None) -> None:
        self.limits = config.limits
        self.encoding = config.encoding
        self.threads = config.model.codec_pool_size()
        self.accelerator = accelerator
        self._gpu_sampling: str | None = None  # the chroma subsampling the device encoder wrote
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="codec")
        self.workers = CodecWorkers(self.threads, self.limits.codec_memory_mb)

    def start(self) -> None:
        """Start the worker processes now rather than on the first images."""
        self.workers.start()

    async def decode(
        self, data: bytes, upscale: int, *, deadline: float | None = None
    ) -> codec.DecodedImage:
        # One hop to a thread for the probe and, where it may run here, the decode: each hop
        # costs the event loop a wake-up, a sizeable share of a small image's whole cost.
        done = await self._run(self._probe_and_decode_here, data, upscale)
        if isinstance(done, codec.DecodedImage):
            return done
        info = done
        decoded: codec.DecodedImage = await self.workers.run(
            codec.decode, data, info, cpu_s=self.limits.decode_cpu_s, deadline=deadline,
            what="decode",
        )
        return decoded

    async def encode(
        self, image: np.ndarray, requested: str | None, input_format: str, quality: int, *,
        metadata: ImageMetadata | None = None, keep: str | None = None, color: str = "keep",
        chroma: str = "auto", deadline: float | None = None,
    ) -> tuple[bytes, str]:
        fmt = codec.output_format(requested, input_format, image)
        keep = keep or self.encoding.metadata
        if self.accelerator is not None and fmt == "jpeg":
            data = await self._run(
                self._accelerated_jpeg, image, quality, metadata, keep, color, chroma
            )
            if data is not None:
                return data, fmt
        pixels = int(image.shape[0]) * int(image.shape[1])
        if fmt in _INLINE_FORMATS and pixels <= self.limits.codec_inline_pixels:
            data = await self._run(
                _encode, image, fmt, quality, self.encoding, metadata, keep, color, chroma
            )
            return data, fmt
        out: bytes = await self.workers.run(
            _encode, image, fmt, quality, self.encoding, metadata, keep, color, chroma,
            cpu_s=self.limits.encode_cpu_s, deadline=deadline, what="encode",
        )
        return out, fmt

    def _probe_and_decode_here(self, data: bytes, upscale: int) -> codec.DecodedImage | codec.ImageInfo:
        """The decoded image where this thread may decode it (the device's JPEG decoder, or an
        inline format within ``codec_inline_pixels``), else the probe's facts for a worker."""
        info = codec.probe(data, self.limits, upscale)
        if self.accelerator is not None and info.format == "jpeg":
            image = self.accelerator.decode(data, info)
            if image is not None:
                return codec.DecodedImage(image, info.format, codec.header_metadata(data, info))
        if info.format in _INLINE_FORMATS and info.pixels <= self.limits.codec_inline_pixels:
            return codec.decode(data, info)
        return info

    # In the caller's thread: for callers without an event loop (and the tests).

    def decode_now(self, data: bytes, upscale: int) -> codec.DecodedImage:
        """Probe again (a handle may call the model replica directly), then decode."""
        done = self._probe_and_decode_here(data, upscale)
        return done if isinstance(done, codec.DecodedImage) else codec.decode(data, done)

    def encode_now(
        self, image: np.ndarray, requested: str | None, input_format: str, quality: int, *,
        metadata: ImageMetadata | None = None, keep: str | None = None, color: str = "keep",
        chroma: str = "auto",
    ) -> tuple[bytes, str]:
        fmt = codec.output_format(requested, input_format, image)
        keep = keep or self.encoding.metadata
        if self.accelerator is not None and fmt == "jpeg":
            data = self._accelerated_jpeg(image, quality, metadata, keep, color, chroma)
            if data is not None:
                return data, fmt
        return _encode(image, fmt, quality, self.encoding, metadata, keep, color, chroma), fmt

    def _accelerated_jpeg(
        self, image: np.ndarray, quality: int, metadata: ImageMetadata | None, keep: str,
        color: str, chroma: str = "auto",
    ) -> bytes | None:
        assert self.accelerator is not None
        wanted = codec.jpeg_subsampling(chroma, quality)
        if self._gpu_sampling not in (None, wanted):
            return None  # the device encoder writes one subsampling only: the CPU writes this
        pixels, out = codec.prepare_output(image, "jpeg", metadata, keep, color)
        data = self.accelerator.encode(pixels, quality)
        if data is None:
            return None
        self._gpu_sampling = codec.jpeg_sampling(data)
        return codec.attach(data, "jpeg", out) if self._gpu_sampling == wanted else None

    def info(self) -> dict[str, Any]:
        return {
            "codec_threads": self.threads,
            "gpu_jpeg": self.accelerator is not None,
            "codec_stopped": dict(self.workers.stopped),
            "codec_busy": dict(self.workers.busy),
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.workers.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


_encode = codec.encode_positional


def accelerator_for(config: AppConfig, device: Any) -> JpegAccelerator | None:
    """nvJPEG on a CUDA replica when ``encoding.gpu_jpeg`` is on and it works, else None."""
    if not config.encoding.gpu_jpeg or getattr(device, "type", None) != "cuda":
        return None
    from serve_app.engine import GpuJpeg

    try:
        return GpuJpeg.probe(device)
    except Exception:  # a missing nvJPEG must not keep the replica from serving
        LOGGER.warning("nvJPEG unavailable; JPEGs are decoded and encoded on the CPU", exc_info=True)
        return None

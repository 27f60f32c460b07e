"""Decoding and encoding in the model replica, where the pixels are needed.

The ingress forwards the encoded bytes and gets the encoded result back, so only compressed
images cross the network (docs/CAPACITY.md). Each model replica runs ``codec`` on its own pool
of ``model.codec_threads`` threads: while the engine runs one batch, the pool decodes the next
images and encodes the last ones (OpenCV and Pillow release the GIL while they work). So the
CPU side grows with the model replicas and is sized per GPU replica from the config.

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
from serve_app.config import AppConfig

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


class JpegAccelerator(Protocol):
    """A device JPEG codec; ``None`` from either method means "use the CPU"."""

    def decode(self, data: bytes, info: codec.ImageInfo) -> np.ndarray | None: ...

    def encode(self, image: np.ndarray, quality: int) -> bytes | None: ...


class Transcoder:
    """``decode`` and ``encode`` of one model replica, on its own threads."""

    def __init__(self, config: AppConfig, accelerator: JpegAccelerator | None = None) -> None:
        self.limits = config.limits
        self.encoding = config.encoding
        self.threads = config.model.codec_pool_size()
        self.accelerator = accelerator
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="codec")

    async def decode(self, data: bytes, upscale: int) -> codec.DecodedImage:
        return await self._run(self.decode_now, data, upscale)

    async def encode(
        self, image: np.ndarray, requested: str | None, input_format: str, quality: int
    ) -> tuple[bytes, str]:
        return await self._run(self.encode_now, image, requested, input_format, quality)

    def decode_now(self, data: bytes, upscale: int) -> codec.DecodedImage:
        """Probe again (a handle may call the model replica directly), then decode."""
        info = codec.probe(data, self.limits, upscale)
        if self.accelerator is not None and info.format == "jpeg":
            image = self.accelerator.decode(data, info)
            if image is not None:
                return codec.DecodedImage(image=image, format=info.format)
        return codec.decode(data, info)

    def encode_now(
        self, image: np.ndarray, requested: str | None, input_format: str, quality: int
    ) -> tuple[bytes, str]:
        fmt = codec.output_format(requested, input_format, image)
        if self.accelerator is not None and fmt == "jpeg":
            data = self.accelerator.encode(image, quality)
            if data is not None:
                return data, fmt
        return codec.encode(image, fmt, quality, self.encoding), fmt

    def info(self) -> dict[str, Any]:
        return {"codec_threads": self.threads, "gpu_jpeg": self.accelerator is not None}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


def accelerator_for(config: AppConfig, device: Any) -> JpegAccelerator | None:
    """nvJPEG on a CUDA replica when ``encoding.gpu_jpeg`` is on and it works, else None."""
    if not config.encoding.gpu_jpeg or getattr(device, "type", None) != "cuda":
        return None
    from serve_app.engine.nvjpeg import GpuJpeg

    try:
        return GpuJpeg.probe(device)
    except Exception:  # a missing nvJPEG must not keep the replica from serving
        LOGGER.warning("nvJPEG unavailable; JPEGs are decoded and encoded on the CPU", exc_info=True)
        return None

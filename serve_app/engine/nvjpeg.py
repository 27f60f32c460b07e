"""JPEG decoding and encoding on a CUDA device with nvJPEG (``torchvision.io``).

Used by the model replica's ``Transcoder`` for the JPEGs whose pixels ``codec`` would return
as they are: 8-bit RGB or gray (no CMYK), no ICC profile (``codec`` may convert those), EXIF
orientation absent or 1. Results come back in ``codec``'s layout (HxWx3 BGR or HxW gray).
Encoding takes 8-bit 3-channel images (alpha must be flattened, gray nvJPEG cannot write).
Everything else returns ``None`` and the CPU path runs; so does any nvJPEG failure.

nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: decoded pixels may differ from
the CPU's by a few levels, as between any two JPEG decoders. The work runs on its own CUDA
stream so that it does not wait for the engine's batch on the default stream.
torchvision marks its image I/O deprecated (0.29) in favour of TorchCodec, which is not a
dependency here; the warning is silenced once, below.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from typing import Any

import numpy as np
import torch

from serve_app.codec import ImageInfo

LOGGER = logging.getLogger(__name__)

warnings.filterwarnings("ignore", message=r".*TorchCodec.*", category=UserWarning)
warnings.filterwarnings("ignore", message=r".*deprecated.*", module=r"torchvision\.io")

_EXIF_ORIENTATION = 0x0112


def eligible(data: bytes, info: ImageInfo) -> bool:
    """Whether nvJPEG's pixels would be ``codec.decode``'s (up to decoder rounding)."""
    if info.format != "jpeg" or info.mode not in ("RGB", "L"):
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=("JPEG", "MPO")) as im:
            if im.info.get("icc_profile"):
                return False
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # let the CPU path report what is wrong with it
        return False
    return orientation in (None, 1)


class GpuJpeg:
    """nvJPEG on one device; thread-safe (one call at a time on its own stream)."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError("nvJPEG needs a CUDA device")
        self.device = device
        self._stream = torch.cuda.Stream(device=device)
        self._lock = threading.Lock()

    @classmethod
    def probe(cls, device: Any) -> GpuJpeg:
        """A working instance: one small image round-trips, or this raises."""
        gpu = cls(torch.device(device))
        image = np.zeros((16, 16, 3), np.uint8)
        image[:, 8:] = (40, 120, 200)
        data = gpu.encode(image, 90)
        if data is None or gpu._decode(data, "RGB").shape != image.shape:
            raise RuntimeError("nvJPEG round trip failed")
        return gpu

    def decode(self, data: bytes, info: ImageInfo) -> np.ndarray | None:
        if not eligible(data, info):
            return None
        try:
            return self._decode(data, info.mode)
        except Exception as exc:  # progressive or unusual files nvJPEG refuses: the CPU decodes
            LOGGER.debug("nvJPEG decode fell back to the CPU: %s", exc)
            return None

    def encode(self, image: np.ndarray, quality: int) -> bytes | None:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            return None
        try:
            return self._encode(image, quality)
        except Exception as exc:
            LOGGER.debug("nvJPEG encode fell back to the CPU: %s", exc)
            return None

    def _decode(self, data: bytes, mode: str) -> np.ndarray:
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        read = ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB
        with self._lock, torch.cuda.stream(self._stream):
            chw = decode_jpeg(raw, mode=read, device=self.device)
            hwc = chw[0] if mode == "L" else chw.flip(0).permute(1, 2, 0)  # RGB -> BGR
            out = hwc.contiguous().cpu()
        return out.numpy()

    def _encode(self, image: np.ndarray, quality: int) -> bytes:
        from torchvision.io import encode_jpeg

        with self._lock, torch.cuda.stream(self._stream):
            bgr = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
            chw = bgr.permute(2, 0, 1).flip(0).contiguous()  # BGR -> RGB, CHW
            encoded = encode_jpeg(chw, quality=int(quality))
            out = encoded.cpu()
        return out.numpy().tobytes()

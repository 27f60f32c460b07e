"""Chunked forwards: chunk sizes from a memory budget, and out-of-memory turned into splits."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch

from serve_app.errors import is_out_of_memory

LOGGER = logging.getLogger(__name__)


class ItemTooLarge(MemoryError):
    """One item alone does not fit the device; ``index`` is its position in the input.

    A ``MemoryError``, so that ``serve_app.errors.engine_error`` answers it with a 413."""

    def __init__(self, index: int) -> None:
        super().__init__(f"item {index} does not fit the device alone")
        self.index = index


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and is_out_of_memory(exc)


def chunk_size(budget_mb: int, bytes_per_item: float, cap: int = 64) -> int:
    """How many items one forward may take within ``budget_mb`` of activations."""
    return max(1, min(cap, int(budget_mb * 2**20 // max(bytes_per_item, 1.0))))


def forward_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor],
    items: Sequence[torch.Tensor],
    chunk: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, outputs)`` for consecutive chunks of equally shaped ``items``.

    On out-of-memory the chunk is halved and retried; a chunk of one that still does not
    fit raises ``ItemTooLarge`` naming the item, after the chunks before it were yielded.
    """
    i, n = 0, len(items)
    while i < n:
        k = min(chunk, n - i)
        try:
            out = fn(torch.stack(list(items[i : i + k])))
        except Exception as exc:
            if not is_oom(exc):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if k == 1:
                raise ItemTooLarge(i) from exc
            chunk = max(1, k // 2)
            LOGGER.warning("out of memory with a chunk of %d; retrying with %d", k, chunk)
            continue
        yield i, out
        i += k


# Activation estimates (bytes per item, fp32): rough, by design; OOM handling covers misses.
def gfpgan_bytes(net: torch.nn.Module, elem: int) -> float:
    c_unet = net.conv_body_first.out_channels
    c_dec = net.stylegan_decoder.to_rgbs[-1].modulated_conv.in_channels
    return 512 * 512 * (6 * c_unet + 8 * c_dec + 16) * elem


def parse_bytes(net: torch.nn.Module, elem: int) -> float:
    c = net.encoder[0].conv2d.out_channels if hasattr(net.encoder[0], "conv2d") else 64
    return 512 * 512 * (8 * c + 64) * elem


def sr_bytes(net: torch.nn.Module, h: int, w: int, scale: int, elem: int) -> float:
    feat = getattr(net, "conv_first", None)
    c = feat.out_channels if feat is not None else 64
    grow = 32 if c >= 64 else max(4, c // 2)
    return h * w * (6 * c + 8 * grow) * elem + h * w * scale * scale * (3 * c + 6) * elem


def detect_bytes(h: int, w: int, elem: int) -> float:
    return h * w * 160 * elem

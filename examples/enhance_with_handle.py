"""A small Ray driver that calls the running application's handle (README: "From Python").

    ray job submit --working-dir examples -- python enhance_with_handle.py IN_DIR OUT_DIR

Enhances every image of IN_DIR (absolute path, not recursive) at x2 and writes
OUT_DIR/<name>.<format>; prints one line per image and exits 1 if any failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ray
from ray import serve

from serve_app.errors import PhotoEnhanceError

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def main(source: Path, target: Path) -> int:
    ray.init(address="auto", namespace="serve", log_to_driver=False)
    handle = serve.get_app_handle("photoenhance")
    target.mkdir(parents=True, exist_ok=True)
    paths = sorted(p for p in source.iterdir() if p.suffix.lower() in SUFFIXES)
    # Start them all, then collect: the model deployment batches what arrives together.
    responses = [handle.enhance.remote(p.read_bytes(), {"upscale": 2}) for p in paths]
    failed = 0
    for path, response in zip(paths, responses, strict=True):
        try:
            result = response.result()
        except PhotoEnhanceError as exc:
            failed += 1
            print(f"FAILED {path.name}: {exc.status} {exc.code}: {exc.message}")
            continue
        (target / f"{path.stem}.{result.format}").write_bytes(result.data)
        print(f"{path.name}: {result.width}x{result.height}, {result.faces} faces")
    print(f"{len(paths) - failed} of {len(paths)} enhanced into {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))

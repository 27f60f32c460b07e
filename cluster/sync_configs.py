"""Keep ``cluster/rayservice.yaml``'s ``serveConfigV2`` equal to ``configs/gpu.yaml``.

    .venv/bin/python cluster/sync_configs.py           # rewrite the block
    .venv/bin/python cluster/sync_configs.py --check   # exit 1 when they differ
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "configs" / "gpu.yaml"
TARGET = ROOT / "cluster" / "rayservice.yaml"
KEY = "  serveConfigV2: |"
INDENT = " " * 4


def render(manifest: str, serve_config: str) -> str:
    """``manifest`` with the block under ``serveConfigV2: |`` replaced by ``serve_config``."""
    lines = manifest.splitlines()
    start = lines.index(KEY) + 1
    end = start
    while end < len(lines) and (lines[end].startswith(INDENT) or not lines[end].strip()):
        end += 1
    block = [INDENT + line if line.strip() else "" for line in serve_config.rstrip().splitlines()]
    return "\n".join(lines[:start] + block + lines[end:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    current = TARGET.read_text()
    wanted = render(current, SOURCE.read_text())
    if current == wanted:
        return 0
    if args.check:
        print(f"{TARGET} is out of date: run cluster/sync_configs.py", file=sys.stderr)
        return 1
    TARGET.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

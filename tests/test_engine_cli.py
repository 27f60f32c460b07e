"""``photoenhance verify-upstream`` and ``photoenhance bench`` on one small image (tiny
profile): exit codes and the JSON they print."""

from __future__ import annotations

import json
import math
import shutil

import cv2
from click.testing import CliRunner

from serve_app.cli.bench import bench, verify_upstream

try:
    from _engine_fixtures import DATA, tiny_weights  # noqa: F401
except ImportError:
    from tests._engine_fixtures import DATA, tiny_weights  # noqa: F401


def _small(tmp_path):
    img = cv2.imread(str(DATA / "0014.jpg"))
    path = tmp_path / "imgs" / "small.png"
    path.parent.mkdir()
    cv2.imwrite(str(path), cv2.resize(img, (96, 96), interpolation=cv2.INTER_AREA))
    return path


def _rows(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_verify_upstream_prints_json_and_fails_beyond_the_tolerance(tiny_weights, tmp_path):
    path = _small(tmp_path)
    args = [str(path), "--profile", "tiny", "--upscale", "2",
            "--weights-dir", str(tiny_weights.dir)]
    res = CliRunner().invoke(verify_upstream, args)
    assert res.exit_code == 0, res.output
    [row] = _rows(res.output)
    assert row["ok"] is True and row["image"] == str(path) and row["upscale"] == 2
    assert row["profile"] == "tiny" and row["tolerance"] == 1
    assert 0 <= row["max_abs_diff"] <= 1 and 0 <= row["mean_abs_diff"] <= row["max_abs_diff"]
    assert row["faces"] == row["upstream_faces"] >= 1
    # no difference can be <= -1: an impossible tolerance must fail
    bad = CliRunner().invoke(verify_upstream, [*args, "--tolerance", "-1"])
    assert bad.exit_code == 1
    [row] = _rows(bad.output)
    assert row["ok"] is False and row["tolerance"] == -1


def test_bench_prints_one_json_row_per_batch(tiny_weights, tmp_path):
    path = _small(tmp_path)
    shutil.copy(path, path.parent / "again.png")
    res = CliRunner().invoke(bench, ["--profile", "tiny", "--batch", "1,2", "--images",
                                     str(path.parent), "--upscale", "2", "--json",
                                     "--weights-dir", str(tiny_weights.dir)])
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("images_per_s", "faces_per_s", "seconds", "upstream_images_per_s",
                    "upstream_seconds", "speedup", "peak_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["faces"] >= r["batch"] and r["device"] == "cpu" and r["profile"] == "tiny"
        assert math.isclose(r["images_per_s"], r["batch"] / r["seconds"], rel_tol=1e-6)
        assert math.isclose(r["speedup"], r["upstream_seconds"] / r["seconds"], rel_tol=1e-6)
        assert r["upscale"] == 2 and r["threads"] >= 1

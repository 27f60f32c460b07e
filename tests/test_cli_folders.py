"""``photoenhance enhance FOLDER --out OUT`` on real folder trees, run as a user runs it
(the installed script, against the session's server); every server option is a CLI flag
and a README row."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.cli.enhance import enhance_cmd
from serve_app.options import EnhanceOptions

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("photoenhance"))
FAST = ["--upscale", "1", "--no-face", "--bg-model", "none"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "enhance", *args], capture_output=True, text=True, timeout=600,
                          check=False)


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def tree(tmp_path: Path, images) -> Path:
    src = tmp_path / "shoot"
    png = images.cv2_bytes(images.array(16, 24), ".png")
    jpg = images.cv2_bytes(images.array(16, 24), ".jpg")
    for rel, data in {"a.png": png, "b.jpg": jpg, "sub/x.jpg": jpg, "other/x.jpg": jpg,
                      "sub/deeper/Été 1.png": png, "notes.txt": b"not an image",
                      "sub/.DS_Store": b"\0", ".hidden/y.png": png}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "z.png").write_bytes(png)
    os.symlink(outside, src / "link")  # a symlinked folder: not followed
    return src


def test_folders_are_walked_and_mirrored(serve_url: str, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(str(tree), "--out", str(out), "--server", serve_url, "-v", *FAST)
    assert r.returncode == 0, r.stderr
    assert files_under(out) == ["a.png", "b.jpg", "other/x.jpg", "sub/deeper/Été 1.png",
                                "sub/x.jpg"]
    assert (f"5 of 5 written into {out}, 2 skipped (not images), "
            "1 symlinked folders not followed") in r.stdout
    assert f"skipped (not an image): {tree / 'notes.txt'}" in r.stderr
    assert f"skipped (not an image): {tree / 'sub' / '.DS_Store'}" in r.stderr
    assert f"skipped (symlinked folder, not followed): {tree / 'link'}" in r.stderr

    # --no-recursive: the top level only.
    flat = tmp_path / "flat"
    r = run(str(tree), "--out", str(flat), "--server", serve_url, "--no-recursive", *FAST)
    assert r.returncode == 0, r.stderr
    assert files_under(flat) == ["a.png", "b.jpg"]
    assert "2 of 2 written" in r.stdout and "1 skipped (not images)" in r.stdout


def test_skip_existing_finds_outputs_when_the_inputs_change(
    serve_url: str, tree: Path, tmp_path: Path, images
) -> None:
    out = tmp_path / "out"
    assert run(str(tree), "--out", str(out), "--server", serve_url, *FAST).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # New files beside old ones, one with an old one's stem: no old output changes name.
    png = images.cv2_bytes(images.array(16, 24), ".png")
    (tree / "b.png").write_bytes(png)
    (tree / "sub" / "x.png").write_bytes(png)
    r = run(str(tree), "--out", str(out), "--server", serve_url, "--skip-existing", *FAST)
    assert r.returncode == 0, r.stderr
    assert "2 of 7 written" in r.stdout and "5 skipped (output exists)" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert files_under(out) == ["a.png", "b.jpg", "b.png", "other/x.jpg",
                                "sub/deeper/Été 1.png", "sub/x.jpg", "sub/x.png"]
    # Files removed: the rest are still recognised.
    (tree / "a.png").unlink()
    r = run(str(tree), "--out", str(out), "--server", serve_url, "--skip-existing", *FAST)
    assert "0 of 6 written" in r.stdout and "6 skipped (output exists)" in r.stdout


def test_out_inside_the_folder_is_not_an_input(serve_url: str, tree: Path) -> None:
    out = tree / "enhanced"
    for _ in range(2):
        r = run(str(tree), "--out", str(out), "--server", serve_url, *FAST)
        assert r.returncode == 0, r.stderr
        assert "5 of 5 written" in r.stdout
    assert files_under(out) == ["a.png", "b.jpg", "other/x.jpg", "sub/deeper/Été 1.png",
                                "sub/x.jpg"]


def test_every_option_is_a_cli_flag_and_a_readme_row() -> None:
    flags = {o for p in enhance_cmd.params for o in [*p.opts, *p.secondary_opts]}
    readme = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", readme, re.M))
    for name in EnhanceOptions.model_fields:
        assert "--" + name.replace("_", "-") in flags, f"option {name} has no CLI flag"
        assert name in rows, f"option {name} has no row in README's options table"
    assert "--no-face" in flags and "--denoise" in flags

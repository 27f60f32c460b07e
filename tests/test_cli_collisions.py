"""`photoenhance enhance` never overwrites one input's result with another's."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from serve_app.cli.enhance import enhance_cmd, output_stems

FAST = ["--upscale", "1", "--no-face", "--bg-model", "none"]


def test_output_stems_are_distinct():
    paths = [Path("in/image.bmp"), Path("in/image.tiff"), Path("in/other.png"),
             Path("a/x.jpg"), Path("b/x.jpg"), Path("in/Image.PNG"), Path("in/image.bmp.png")]
    stems = output_stems(paths)
    assert stems[Path("in/other.png")] == "other"  # no collision: the plain stem
    # image.bmp's whole name is image.bmp.png's stem: the one that needs it least yields.
    assert stems[Path("in/image.bmp.png")] == "image.bmp"
    assert stems[Path("in/image.bmp")] == "image.bmp-2"
    assert stems[Path("in/image.tiff")] == "image.tiff"
    assert stems[Path("in/Image.PNG")] == "Image.PNG"
    assert len({s.lower() for s in stems.values()}) == len(paths)
    assert {stems[Path("a/x.jpg")], stems[Path("b/x.jpg")]} == {"x.jpg", "x.jpg-2"}


def _run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(enhance_cmd, args, catch_exceptions=False)
    return result.exit_code, result.output


def test_colliding_inputs_give_two_files_and_the_count_is_true(serve_url, images, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "image.bmp").write_bytes(images.cv2_bytes(images.array(24, 32), ".bmp"))
    (src / "image.tiff").write_bytes(images.cv2_bytes(images.array(24, 32), ".tiff"))
    (src / "photo.jpg").write_bytes(images.cv2_bytes(images.array(24, 32), ".jpg"))
    code, output = _run([str(src), "--out", str(out), "--server", serve_url, *FAST])
    assert code == 0, output
    on_disk = sorted(p.name for p in out.iterdir())
    assert on_disk == ["image.bmp.png", "image.tiff.png", "photo.jpg"]
    assert f"3 of 3 written into {out}" in output

    # --skip-existing: nothing is written again, and the summary says so.
    code, output = _run([str(src), "--out", str(out), "--server", serve_url, "--skip-existing", *FAST])
    assert code == 0, output
    assert "0 of 3 written" in output and "3 skipped" in output
    assert sorted(p.name for p in out.iterdir()) == on_disk

    # --overwrite (the default): written again, still one file per input.
    code, output = _run([str(src), "--out", str(out), "--server", serve_url, "--format", "png", *FAST])
    assert code == 0, output
    assert "3 of 3 written" in output
    assert sorted(p.name for p in out.iterdir()) == ["image.bmp.png", "image.tiff.png", "photo.png"]


def test_job_output_names_never_collide():
    from serve_app.jobs.naming import output_name

    names = [output_name(i, n, "png") for i, n in enumerate(["image.bmp", "image.tiff", "a/x.jpg", "b/x.jpg"])]
    assert len(set(names)) == 4 and names[0] == "000000_image.png"
    assert output_name(0, "heic.heic", "avif").endswith(".avif")

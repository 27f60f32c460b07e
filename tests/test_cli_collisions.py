"""`photoenhance enhance` never overwrites one input's result with another's."""

from __future__ import annotations

from pathlib import PurePath

from click.testing import CliRunner

from serve_app.cli.enhance import enhance_cmd
from serve_app.cli.files import output_path, plan

FAST = ["--upscale", "1", "--no-face", "--bg-model", "none"]


def test_output_names_are_distinct(tmp_path):
    for name in ["image.bmp", "image.tiff", "other.png", "Image.PNG", "image.bmp.png"]:
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    for name in ["a/x.jpg", "b/x.jpg"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = plan([tmp_path / "in", tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"])
    rels = {p.relative_to(tmp_path).as_posix(): str(rel) for p, rel in found.inputs}
    # Two files given alone with one name: the later one yields.
    assert rels["a/x.jpg"] == "x.jpg" and rels["b/x.jpg"] == "x-2.jpg"
    taken = {r.casefold() for r in rels.values()}
    out = {k: str(output_path(PurePath(v), "png", taken)) for k, v in rels.items()}
    assert out["in/other.png"] == "other.png"  # its own format: its own name
    assert out["in/image.tiff"] == "image.tiff.png"
    assert out["in/image.bmp.png"] == "image.bmp.png"
    # image.bmp's converted name is image.bmp.png's own: the converted one yields.
    assert out["in/image.bmp"] == "image.bmp-2.png"
    assert out["a/x.jpg"] == "x.jpg.png"
    assert out["in/Image.PNG"] == "Image.PNG"
    assert len({o.lower() for o in out.values()}) == len(out)


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
    # photo.jpg converted: the new extension is appended, its JPEG output of before removed.
    assert sorted(p.name for p in out.iterdir()) == ["image.bmp.png", "image.tiff.png", "photo.jpg.png"]


def test_job_output_names_never_collide():
    from serve_app.jobs.naming import OutputNames

    rels = ["image.bmp", "image.tiff", "a/x.jpg", "b/x.jpg", "x.jpg", "X.png"]
    names = OutputNames(lambda start, stop: rels[start:stop])
    names.assign(len(rels), complete=True)
    out = [names.name(i, "png") for i in range(len(rels))]
    assert out == ["image.png", "image (1).png", "a/x.png", "b/x.png", "x.png", "X (1).png"]
    assert names.name(0, "avif") == "image.avif"

"""Job outputs keep their names: Unicode (NFC), an upload's folders, only what is unsafe
replaced, collisions told apart with a suffix; the same names after a restart; the ZIP
extracts safely anywhere."""

from __future__ import annotations

import io
import unicodedata
import zipfile
from pathlib import Path, PurePosixPath

import httpx
from conftest import job_ended, noise_png, wait_job

from serve_app.jobs import sources
from serve_app.jobs.job import Job
from serve_app.jobs.naming import (
    OutputNames,
    new_job_id,
    plain_name,
    safe_component,
    zip_member,
)
from serve_app.jobs.spec import JobSpec

WINDOWS_FORBIDDEN = set('<>:"\\|?*') | {chr(c) for c in range(32)}


def names_of(rels: list[str], fmt: str = "png") -> list[str]:
    names = OutputNames(lambda start, stop: rels[start:stop])
    names.assign(len(rels), complete=True)
    return [names.name(i, fmt) for i in range(len(rels))]


def test_hostile_names_stay_under_the_root_and_are_safe_everywhere() -> None:
    cases = {
        "../x.jpg": "x",
        "../../../etc/x.jpg": "etc/x",
        "/etc/passwd": "etc/passwd",
        "C:\\x.jpg": "x",
        "C:\\Users\\me\\x.jpg": "Users/me/x",
        "CON.jpg": "_CON",
        "nul": "_nul",
        "com1.tar.gz": "_com1.tar",
        "a<b>c:d\"e|f?g*.jpg": "a_b_c_d_e_f_g_",
        "tab\there\x00.jpg": "tab_here_",
        "trailing. . .jpg": "trailing",
        ".bashrc": "_bashrc",
        "..": "image",
        "": "image",
        "a.png/x.jpg": "a.png_/x",  # a folder never ends like a file's output
        "Été à Paris #1.jpg": "Été à Paris #1",
        "写真.jpg": "写真",
    }
    for raw, expected in cases.items():
        got = plain_name(raw)
        assert got == expected, (raw, got)
        for part in PurePosixPath(got).parts:
            assert part not in ("..", ".") and not part.startswith(".")
            assert not WINDOWS_FORBIDDEN & set(part)
            assert not part.endswith((".", " "))


def test_names_are_nfc_and_cut_by_utf8_bytes() -> None:
    decomposed = "E\u0301te\u0301.jpg"  # as macOS spells it
    assert plain_name(decomposed) == unicodedata.normalize("NFC", "Été")
    long_ascii = plain_name("x" * 300 + ".jpg")
    assert long_ascii == "x" * 200
    long_cjk = plain_name("写" * 300 + ".jpg")  # 3 bytes a character: cut between two
    assert len(long_cjk.encode()) == 198 and set(long_cjk) == {"写"}
    assert safe_component("a" * 199 + "é") == "a" * 199  # never half a character


def test_collisions_get_a_suffix_the_lower_index_keeps_the_name() -> None:
    rels = ["x.jpg", "x.png", "X.JPG", "x (1).jpg", "a?.jpg", "a*.jpg", "day1/a.jpg", "Day1/a.jpg"]
    assert names_of(rels) == [
        "x.png", "x (1).png", "X (2).png", "x (1) (1).png",  # sanitised alike, case too
        "a_.png", "a_ (1).png", "day1/a.png", "Day1/a (1).png",
    ]
    # The extension is the output format's; the stem does not depend on it.
    assert names_of(["photo.heic"], "jpeg") == ["photo.jpg"]


def test_a_name_depends_only_on_the_items_before_it() -> None:
    rels = ["x.jpg", "x.png", "y.jpg"]
    assert names_of(rels)[:2] == names_of(rels[:2])
    names = OutputNames(lambda start, stop: rels[start:stop])
    names.assign(1)
    first = names.name(0, "png")
    names.assign(3, complete=True)  # items added later (a listing) do not rename it
    assert first == names.name(0, "png") == "x.png" and names.name(1, "png") == "x (1).png"


def test_a_reopened_job_gives_the_same_names(tmp_path: Path) -> None:
    job_id = new_job_id()
    folder = tmp_path / "jobs" / job_id
    folder.mkdir(parents=True)
    items = [(f"/spool/{i}", n) for i, n in
             enumerate(["a.jpg", "A.png", "day1/IMG_0000.jpg", "day1/IMG_0000.png", "写真.jpg"])]
    sources.write_inputs(folder / sources.INPUTS, items)
    spec = JobSpec(job_id=job_id, created_at=0.0, kind="upload",
                   output=str(folder / "outputs"), total=len(items))
    job = Job.create(spec, folder)
    # Asked out of order, as items finish.
    first = {i: job.output_name(i, "png") for i in (4, 1, 3, 0, 2)}
    again = Job.open(folder)
    assert {i: again.output_name(i, "png") for i in range(5)} == first
    assert [first[i] for i in range(5)] == [
        "a.png", "A (1).png", "day1/IMG_0000.png", "day1/IMG_0000 (1).png", "写真.png"]


def test_zip_members_extract_safely() -> None:
    seen: set[str] = set()
    members = [zip_member(n, seen) for n in
               ["a.png", "A.png", "../b.png", "/abs/c.png", "C:\\d.png", "a (1).png", "e\\f.png"]]
    assert members == ["a.png", "A (1).png", "b.png", "abs/c.png", "d.png", "a (1) (1).png",
                       "e/f.png"]


def test_upload_names_kept_through_a_real_job(http: httpx.Client, data_dir: Path) -> None:
    """Multipart filenames as a browser sends a dropped folder (the relative path) and
    Unicode names: the job folder and the ZIP hold them, collisions suffixed."""
    sent = ["Été à Paris #1.png", "写真.png", "day1/IMG_0000.png", "day1/IMG_0000.PNG",
            "../escape.png", "CON.png", "E\u0301te\u0301 à Paris #1.png"]
    files = [("files", (n, noise_png(400 + i, 16), "image/png")) for i, n in enumerate(sent)]
    r = http.post("/v1/jobs", files=files, data={"upscale": "1", "face": "false",
                                                 "bg_model": "none"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert wait_job(http, job_id, job_ended)["state"] == "completed"
    expected = ["Été à Paris #1.png", "写真.png", "day1/IMG_0000.png",
                "day1/IMG_0000 (1).png", "escape.png", "_CON.png", "Été à Paris #1 (1).png"]

    items = http.get(f"/v1/jobs/{job_id}/items").json()["items"]
    assert [i["name"] for i in items] == expected
    assert [i["source"] for i in items] == sent  # the client's names, as sent
    root = data_dir / "jobs" / job_id / "outputs"
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert on_disk == sorted(expected)

    one = http.get(f"/v1/jobs/{job_id}/items/1/result")
    assert one.status_code == 200
    assert one.headers["content-disposition"] == "inline; filename*=utf-8''%E5%86%99%E7%9C%9F.png"

    z = http.get(f"/v1/jobs/{job_id}/results.zip")
    assert z.status_code == 200
    with zipfile.ZipFile(io.BytesIO(z.content)) as archive:
        names = archive.namelist()
        assert sorted(names) == sorted(expected)
        assert len({n.casefold() for n in names}) == len(names)
        for info in archive.infolist():
            assert info.flag_bits & 0x800  # names stored as UTF-8
            assert not info.filename.startswith("/") and ".." not in info.filename.split("/")
        assert archive.read("day1/IMG_0000 (1).png") == (root / "day1/IMG_0000 (1).png").read_bytes()

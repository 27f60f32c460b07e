"""Bad input gets a clear 4xx answer, sent alongside good requests that all still succeed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

SHARED_BAD = {  # ../shared/data/bad: (status, code)
    "empty.jpg": (415, "empty_body"),
    "not_an_image.png": (415, "unsupported_media_type"),
    "truncated.jpg": (422, "invalid_image"),
}


def bad_requests(images, shared_data, app_config) -> list[tuple[str, dict, tuple[int, str]]]:
    """(name, httpx request kwargs, expected (status, code))."""
    limits = app_config.limits
    small = images.cv2_bytes(images.array(16, 16), ".png")
    cases: list[tuple[str, dict, tuple[int, str]]] = [
        (f"shared/{p.name}", {"content": p.read_bytes()}, SHARED_BAD[p.name])
        for p in sorted((shared_data / "bad").iterdir())
    ]
    big_png = images.cv2_bytes(images.array(64, 64), ".png")
    cases += [
        ("svg", {"content": b'<svg xmlns="http://www.w3.org/2000/svg"/>',
                 "headers": {"content-type": "image/svg+xml"}}, (415, "unsupported_media_type")),
        ("svg-as-png", {"content": b'<svg xmlns="http://www.w3.org/2000/svg"/>',
                        "headers": {"content-type": "image/png"}}, (415, "unsupported_media_type")),
        ("html", {"content": b"<!doctype html><html></html>"}, (415, "unsupported_media_type")),
        ("text", {"content": b"hello", "headers": {"content-type": "text/plain"}},
         (415, "unsupported_media_type")),
        ("png-bomb", {"content": images.png_header(100_000, 100_000)}, (413, "too_many_pixels")),
        ("jpeg-bomb", {"content": images.jpeg_claiming(50_000, 50_000)}, (413, "too_many_pixels")),
        ("too-wide", {"content": images.png_header(limits.max_side + 1, 10)},
         (413, "too_many_pixels")),
        ("output-too-big", {"content": images.png_header(1500, 1500), "params": {"upscale": 4}},
         (413, "too_many_output_pixels")),
        ("too-many-bytes", {"content": b"\xff\xd8\xff" + b"\0" * limits.max_bytes},
         (413, "payload_too_large")),
        ("too-many-bytes-chunked", {"content": iter([b"\xff\xd8\xff"] + [b"\0" * 65536] * (
            limits.max_bytes // 65536 + 2))}, (413, "payload_too_large")),
        ("truncated-png", {"content": big_png[: len(big_png) // 2]}, (422, "invalid_image")),
        ("garbage-after-magic", {"content": b"\x89PNG\r\n\x1a\n" + b"\x13" * 200},
         (422, "invalid_image")),
        ("bad-option", {"content": small, "params": {"upscale": "9"}}, (422, "invalid_option")),
        ("multipart-empty-image", {"files": {"image": ("a.png", b"", "image/png")}},
         (415, "empty_body")),
    ]
    return cases


def test_bad_inputs_beside_good_requests(http, serve_url, images, shared_data, app_config):
    info_before = http.get("/v1/models").json()["engine"]
    good = [
        {"content": images.photo("0014.jpg", max_side=96), "params": {"upscale": 2}},
        {"content": images.cv2_bytes(images.array(32, 48), ".png"),
         "params": {"face": "false", "bg_model": "none"}},
    ] * 3
    bad = bad_requests(images, shared_data, app_config)

    def send(kwargs: dict) -> httpx.Response:
        with httpx.Client(base_url=serve_url, timeout=120) as client:
            return client.post("/v1/enhance", **kwargs)

    with ThreadPoolExecutor(max_workers=8) as pool:
        good_futures = [pool.submit(send, kw) for kw in good]
        bad_futures = [(name, pool.submit(send, kw), want) for name, kw, want in bad]
        answers = {name: (f.result(), want) for name, f, want in bad_futures}
        goods = [f.result() for f in good_futures]

    for response in goods:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("image/")
    for name, (response, (status, code)) in answers.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        body = response.json()
        assert body["error"]["code"] == code, (name, body)
        assert body["error"]["message"], name

    # Still alive, and the same model replica: nothing crashed or restarted.
    assert http.get("/readyz").status_code == 200
    assert http.get("/v1/models").json()["engine"]["started_at"] == info_before["started_at"]
    r = http.post("/v1/enhance", params={"face": "false", "bg_model": "none"},
                  content=images.cv2_bytes(images.array(8, 8), ".png"))
    assert r.status_code == 200

"""The engine on tiny synthetic weights: layouts, sizes, options, errors, the sparse detector."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serve_app.engine.types import EnhanceResult
from serve_app.errors import InvalidImage, PhotoEnhanceError
from serve_app.options import EnhanceOptions

try:
    from _engine_fixtures import engine, read, tiny_weights  # noqa: F401
except ImportError:
    from tests._engine_fixtures import engine, read, tiny_weights  # noqa: F401

WHOLE = ["10045.png", "Blake_Lively.jpg", "0014.jpg", "children-alpha.png", "00017_gray.png"]


def test_synthetic_detector_is_sparse_and_deterministic(engine):
    from serve_app.engine import detect

    imgs = [np.ascontiguousarray(read(n)[:, :, :3]) if read(n).ndim == 3 else
            np.dstack([read(n)] * 3) for n in WHOLE]
    net = engine.net("detection_Resnet50_Final")
    first = detect.detect(net, imgs, 0.97, 64)
    second = detect.detect(net, imgs, 0.97, 64)
    for img, a, b in zip(imgs, first, second, strict=True):
        assert 1 <= len(a) <= 2, (img.shape, a)
        np.testing.assert_array_equal(a, b)
        # landmarks sit on a face template: eyes level, eye distance well above 5 px
        assert abs(a[0, 6] - a[0, 8]) < 0.5 and a[0, 7] - a[0, 5] > 20


def test_whole_photos_keep_size_layout_and_dtype(engine):
    imgs = [read(n, 256) for n in WHOLE]
    res = engine.enhance_batch(imgs, [EnhanceOptions(upscale=2)] * len(imgs))
    for img, r in zip(imgs, res, strict=True):
        assert isinstance(r, EnhanceResult), r
        h, w = img.shape[:2]
        assert r.image.shape == (2 * h, 2 * w, *img.shape[2:])
        assert r.image.dtype == img.dtype
        assert 1 <= r.faces <= 2
        assert {"detect", "restore", "upsample", "paste"} <= set(r.timings)


@pytest.mark.parametrize("upscale", [1, 2, 4])
def test_output_size_follows_upscale(engine, upscale):
    img = read("0014.jpg", 96)
    [r] = engine.enhance_batch([img], [EnhanceOptions(upscale=upscale)])
    assert r.image.shape == (img.shape[0] * upscale, img.shape[1] * upscale, 3)


@pytest.mark.parametrize("upscale", [1, 2, 4])
def test_face_boxes_are_the_detectors_in_output_pixels(engine, upscale):
    from serve_app.engine import detect

    img = read("Blake_Lively.jpg", 128)
    dets = detect.detect(engine.net("detection_Resnet50_Final"), [img], 0.97, 64)[0]
    found = detect.select(dets, img.shape[0], img.shape[1], False)
    assert 1 <= len(found) <= 2
    opts = [EnhanceOptions(upscale=upscale), EnhanceOptions(upscale=upscale, only_center_face=True),
            EnhanceOptions(upscale=upscale, face=False)]
    every, center, off = engine.enhance_batch([img] * 3, opts)
    assert len(every.face_boxes) == every.faces == len(found)
    for (x, y, bw, bh), (_, (x0, y0, x1, y1)) in zip(every.face_boxes, found, strict=True):
        assert bw > 0 and bh > 0
        assert (x, y) == (int(np.floor(x0 * upscale)), int(np.floor(y0 * upscale)))
        assert (x + bw, y + bh) == (int(np.ceil(x1 * upscale)), int(np.ceil(y1 * upscale)))
    assert len(center.face_boxes) == center.faces == 1 and center.face_boxes[0] in every.face_boxes
    assert off.face_boxes == [] and off.faces == 0


def test_an_aligned_face_is_the_whole_output(engine):
    [r] = engine.enhance_batch([read("Adele_crop.png")], [EnhanceOptions(aligned=True, upscale=2)])
    assert r.face_boxes == [(0, 0, 1024, 1024)]


def test_gray_rgba_and_16_bit_inputs(engine):
    gray = read("00017_gray.png", 128)
    rgba = read("children-alpha.png", 128)
    deep = read("0014.jpg", 96).astype(np.uint16) * 257
    for face in (True, False):
        res = engine.enhance_batch([gray, rgba, deep], [EnhanceOptions(upscale=2, face=face)] * 3)
        for img, r in zip([gray, rgba, deep], res, strict=True):
            assert r.image.ndim == img.ndim and r.image.shape[2:] == img.shape[2:]
            assert r.image.dtype == img.dtype
    # alpha survives: a transparent region of the input stays mostly transparent
    [r] = engine.enhance_batch([rgba], [EnhanceOptions(upscale=2, face=False, bg_model="none")])
    assert (r.image[:, :, 3] < 128).mean() == pytest.approx((rgba[:, :, 3] < 128).mean(), abs=0.05)


def test_aligned_faces_restore_directly(engine):
    img = read("Adele_crop.png")
    [r2, r1] = engine.enhance_batch(
        [img, img], [EnhanceOptions(aligned=True, upscale=2), EnhanceOptions(aligned=True, upscale=1)]
    )
    assert r2.image.shape == (1024, 1024, 3) and r1.image.shape == (512, 512, 3)
    assert r2.faces == r1.faces == 1


def test_background_model_choices_and_face_off(engine):
    img = read("Blake_Lively.jpg", 128)
    opts = [EnhanceOptions(upscale=4, face=False, bg_model="realesr-general-x4v3"),
            EnhanceOptions(upscale=2, face=False, bg_model="none"),
            EnhanceOptions(upscale=2, bg_model="RealESRGAN_x4plus", only_center_face=True)]
    res = engine.enhance_batch([img] * 3, opts)
    assert [r.faces for r in res] == [0, 0, 1]
    assert res[0].image.shape[:2] == (img.shape[0] * 4, img.shape[1] * 4)


def test_device_stages_and_paste_split_and_overlap(engine):
    """``forward_batch`` then ``finish_batch`` is ``enhance_batch``; a batch's paste runs in
    another thread while the next batch is in its device stages (as the replica runs them),
    with the same results as one after the other. The overlap is forced: the next batch's
    detector forward (a real forward hook, the first device stage) waits until the paste
    has finished, and the paste starts only once that forward has begun."""
    a = [read("Blake_Lively.jpg", 128), read("0014.jpg", 96)]
    b = [read("children-alpha.png", 128), np.zeros((4,), np.uint8)]
    opt = [EnhanceOptions(upscale=2)] * 2
    want_a, want_b = engine.enhance_batch(a, opt), engine.enhance_batch(b, opt)

    staged_a = engine.forward_batch(a, opt)
    b_on_device, a_pasted = threading.Event(), threading.Event()
    order: list[str] = []

    def hold_b(_module, _inputs):
        if not b_on_device.is_set():
            order.append("b forward started")
            b_on_device.set()
            # Holds B in its device stages until A's paste is done (the deadline only
            # turns a broken test into a failure instead of a hang).
            assert a_pasted.wait(120), "the paste never ran while B was on the device"

    pasted: list = []

    def paste_a():
        assert b_on_device.wait(120)
        pasted.extend(engine.finish_batch(staged_a))
        order.append("a pasted")
        a_pasted.set()

    hook = engine.net("detection_Resnet50_Final").register_forward_pre_hook(hold_b)
    try:
        paster = threading.Thread(target=paste_a)
        paster.start()
        staged_b = engine.forward_batch(b, opt)
        order.append("b forward done")
        paster.join(120)
    finally:
        hook.remove()
    assert order == ["b forward started", "a pasted", "b forward done"]
    got_b = engine.finish_batch(staged_b)
    for want, got in zip([*want_a, *want_b], [*pasted, *got_b], strict=True):
        if isinstance(want, PhotoEnhanceError):
            assert isinstance(got, InvalidImage) and type(got) is type(want)
            continue
        np.testing.assert_array_equal(got.image, want.image)
        assert (got.faces, got.face_boxes) == (want.faces, want.face_boxes)
        assert "paste" in got.timings and got.timings["total"] >= got.timings["paste"]


def test_a_cuda_fault_fails_the_image_and_marks_the_engine(engine):
    """The words torch raises on a broken device (here from a stage, as a kernel would):
    the images get a generic 500, and ``Engine.fault`` is set, which fails a model replica's
    health check so that Serve replaces it. Another failure leaves the engine healthy."""
    from serve_app.engine import stages
    from serve_app.errors import EngineFailure

    def faulty(message):
        def stage(_engine, _items):
            raise RuntimeError(message)
        return stage

    items = [stages.BatchItem(src=read("0014.jpg", 64), opt=EnhanceOptions()) for _ in range(2)]
    try:
        stages._run_stage(engine, "upsample", faulty("some other bug"), items)
        assert engine.fault is None and all(isinstance(j.error, EngineFailure) for j in items)
        for j in items:
            j.error = None
        stages._run_stage(engine, "upsample",
                         faulty("CUDA error: an illegal memory access was encountered"), items)
        assert all(isinstance(j.error, EngineFailure) for j in items)
        assert engine.fault is not None and engine.fault.startswith("CUDA error")
    finally:
        engine.fault = None


def test_a_stopped_batch_fails_abandoned_without_marking_the_engine(engine):
    """Setting ``stop`` mid-batch (every caller gone) ends its device stages at the next
    tile: the upsampler's forward runs for a few of the many tiles, every image fails with
    ``Abandoned``, the engine stays healthy, and the next batch runs whole."""
    from serve_app.errors import Abandoned

    img = read("0014.jpg", 256)
    opt = [EnhanceOptions(upscale=2, face=False, bg_model="RealESRGAN_x2plus", tile=32)] * 2
    stop = threading.Event()
    forwards: list[int] = []

    def count(_module, _inputs):
        forwards.append(1)
        stop.set()

    net = engine.net("RealESRGAN_x2plus")
    hook = net.register_forward_pre_hook(count)
    try:
        staged = engine.forward_batch([img, img], opt, stop)
        stopped = len(forwards)
        forwards.clear()
        whole = engine.enhance_batch([img, img], opt)  # no stop: every tile
    finally:
        hook.remove()
    res = engine.finish_batch(staged)
    assert all(isinstance(r, Abandoned) and r.code == "abandoned" for r in res), res
    assert engine.fault is None
    assert all(isinstance(r, EnhanceResult) for r in whole)
    assert 1 <= stopped < len(forwards), (stopped, len(forwards))


def test_one_bad_image_does_not_fail_the_others(engine):
    good = read("0014.jpg", 96)
    bad = [np.zeros((4,), np.uint8), np.zeros((8, 8, 3), np.float32), "nope", np.zeros((1, 9), np.uint8)]
    res = engine.enhance_batch([good, *bad, good], [EnhanceOptions()] * (len(bad) + 2))
    assert isinstance(res[0], EnhanceResult) and isinstance(res[-1], EnhanceResult)
    for r in res[1:-1]:
        assert isinstance(r, InvalidImage) and r.status == 422
    np.testing.assert_array_equal(res[0].image, res[-1].image)


def test_a_failing_stage_stays_with_its_image(engine, monkeypatch):
    from serve_app.engine import stages

    real = stages._finish_one

    def flaky(job):
        if job.src.shape[0] == 97:
            raise RuntimeError("boom")
        real(job)

    monkeypatch.setattr(stages, "_finish_one", flaky)
    good, odd = read("0014.jpg", 96), read("0014.jpg", 97)
    res = engine.enhance_batch([good, odd, good], [EnhanceOptions(upscale=1)] * 3)
    assert isinstance(res[1], PhotoEnhanceError) and res[1].code == "engine_error"
    assert res[1].status == 500 and "boom" not in res[1].message  # generic: no exception text
    assert isinstance(res[0], EnhanceResult) and isinstance(res[2], EnhanceResult)


def test_concurrent_calls_agree(engine):
    img = read("0014.jpg", 96)
    outs: dict[int, np.ndarray] = {}

    def call(k):
        [r] = engine.enhance_batch([img], [EnhanceOptions(upscale=2)])
        outs[k] = r.image

    threads = [threading.Thread(target=call, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_info_and_warmup(engine):
    engine.warmup()
    info = engine.info()
    assert info["synthetic"] is True and engine.synthetic
    assert info["profile"] == "tiny" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert "GFPGANv1.4" in info["loaded_models"]


def test_only_requests_that_run_a_synthetic_network_are_marked_synthetic(engine):
    """``X-Weights-Synthetic`` follows what a request ran (added models: tests/
    test_models_http.py): any built-in network on synthetic weights, and nothing else."""
    E = EnhanceOptions
    assert engine.synthetic
    assert engine.uses_synthetic(E())  # detector, face model, background
    assert engine.uses_synthetic(E(face=False))  # the background model
    assert engine.uses_synthetic(E(face=True, bg_model="none"))  # the detector
    assert engine.uses_synthetic(E(face=True, aligned=True, bg_model="none"))  # the face model
    assert not engine.uses_synthetic(E(face=False, bg_model="none"))  # no network runs


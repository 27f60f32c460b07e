"""The batched engine equals upstream's one-image path (GFPGANer / RealESRGANer), fp32 CPU.

Tolerance: at most 1 grey level (max abs difference on uint8). 16-bit inputs with faces
on go through the 8-bit pipeline (as upstream.Reference defines), so there 1 level is 257.
Photos are downscaled to keep the suite fast on 2 cores, except the small one and the
512 px Adele crop (whole photo, x4: a 2048 px output).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from serve_app.engine.upstream import Reference
from serve_app.options import EnhanceOptions

try:
    from _engine_fixtures import engine, read, tiny_weights  # noqa: F401
except ImportError:
    from tests._engine_fixtures import engine, read, tiny_weights  # noqa: F401

SIDE = 200


@pytest.fixture(scope="module")
def inputs():
    photo = read("Blake_Lively.jpg", SIDE)
    return {
        "aligned": read("Adele_crop.png"),
        "photo": photo,
        "tall": read("10045.png", SIDE),
        "small": read("0014.jpg"),
        "gray": read("00017_gray.png", SIDE),
        "rgba": read("children-alpha.png", SIDE),
        "deep": photo.astype(np.uint16) * 257,
    }


@pytest.fixture(scope="module")
def reference(engine):
    return Reference.sharing(engine)


def _compare(engine, reference, imgs, opts):
    res = engine.enhance_batch(imgs, opts)
    diffs = []
    for img, opt, r in zip(imgs, opts, res, strict=True):
        with contextlib.redirect_stdout(io.StringIO()):  # upstream prints per tile
            want, faces = reference.enhance(img, opt)
        assert r.image.shape == want.shape and r.image.dtype == want.dtype
        assert r.faces == faces
        diffs.append(np.abs(r.image.astype(np.int64) - want.astype(np.int64)))
    return diffs


@pytest.mark.parametrize("upscale", [2, 4])
def test_whole_photos_with_faces(engine, reference, inputs, upscale):
    names = ["photo", "tall", "small", "gray", "rgba"]
    diffs = _compare(engine, reference, [inputs[n] for n in names],
                     [EnhanceOptions(upscale=upscale)] * len(names))
    for name, d in zip(names, diffs, strict=True):
        assert d.max() <= 1, (name, d.max())


def test_sixteen_bit_with_faces_follows_the_8_bit_path(engine, reference, inputs):
    [d] = _compare(engine, reference, [inputs["deep"]], [EnhanceOptions(upscale=2)])
    assert d.max() <= 257


@pytest.mark.parametrize("upscale", [2, 4])
def test_background_only_equals_realesrganer(engine, reference, inputs, upscale):
    names = ["photo", "gray", "rgba", "deep"]
    opts = [EnhanceOptions(upscale=upscale, face=False)] * len(names)
    for name, d in zip(names, _compare(engine, reference, [inputs[n] for n in names], opts),
                       strict=True):
        assert d.max() <= 1, (name, d.max())


def test_small_tiles_and_the_compact_model(engine, reference, inputs):
    opt = EnhanceOptions(upscale=4, face=False, bg_model="realesr-general-x4v3", tile=64)
    [d] = _compare(engine, reference, [inputs["photo"]], [opt])
    assert d.max() <= 1


@pytest.mark.parametrize("upscale", [1, 2])
def test_aligned_faces(engine, reference, inputs, upscale):
    [d] = _compare(engine, reference, [inputs["aligned"]],
                   [EnhanceOptions(aligned=True, upscale=upscale)])
    assert d.max() <= 1


def test_background_none_and_centre_face(engine, reference, inputs):
    opts = [EnhanceOptions(upscale=2, bg_model="none"),
            EnhanceOptions(upscale=2, only_center_face=True)]
    for d in _compare(engine, reference, [inputs["photo"], inputs["rgba"]], opts):
        assert d.max() <= 1


def test_whole_photo_x4_at_full_size(engine, reference):
    """The full-size 512 px Adele crop as a whole photo, x4 (2048 px output): the case that
    was 2 levels off when the paste warps were translated into the face's box."""
    img = read("Adele_crop.png")
    [d] = _compare(engine, reference, [img], [EnhanceOptions(upscale=4)])
    assert d.max() <= 1, d.max()


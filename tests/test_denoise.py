"""Denoise strength of realesr-general-x4v3: upstream's ``dni`` of the plain and wdn weights
with ``[strength, 1 - strength]``, one blended network per 0.05 step (synthetic weights)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from serve_app.errors import InvalidOption
from serve_app.options import EnhanceOptions

try:
    from _engine_fixtures import engine, tiny_weights  # noqa: F401
except ImportError:
    from tests._engine_fixtures import engine, tiny_weights  # noqa: F401

PLAIN, WDN = "realesr-general-x4v3", "realesr-general-wdn-x4v3"


def _opt(denoise: float | None) -> EnhanceOptions:
    return EnhanceOptions(face=False, upscale=4, bg_model=PLAIN, denoise=denoise)


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _file_state(tiny_weights, name):  # noqa: F811
    return torch.load(tiny_weights.path(name), weights_only=True)["params"]


def test_strength_one_is_the_plain_network(engine):  # noqa: F811
    assert engine.bg_key(_opt(1.0)) == engine.bg_key(_opt(None)) == PLAIN


def test_strength_zero_is_the_wdn_weights(engine, tiny_weights):  # noqa: F811
    key = engine.bg_key(_opt(0.0))
    assert key != PLAIN
    blended = _state(engine.net(key))
    wdn = _file_state(tiny_weights, WDN)
    assert blended.keys() == wdn.keys()
    assert all(torch.equal(blended[k], wdn[k]) for k in wdn)
    plain = _file_state(tiny_weights, PLAIN)
    assert any(not torch.equal(plain[k], wdn[k]) for k in wdn)  # the twins differ


def test_half_equals_upstream_dni_end_to_end(engine, tiny_weights):  # noqa: F811
    from realesrgan import RealESRGANer

    from serve_app.engine import models
    from serve_app.engine.weights import spec

    paths = [str(tiny_weights.path(PLAIN)), str(tiny_weights.path(WDN))]
    # upstream's own dni, as its CLI calls it for realesr-general-x4v3
    dni = RealESRGANer.dni(None, paths[0], paths[1], [0.5, 0.5])["params"]
    blended = _state(engine.net(engine.bg_key(_opt(0.5))))
    assert all(torch.equal(blended[k], dni[k]) for k in dni)

    cfg = engine.cfg
    upstream = RealESRGANer(
        scale=4, model_path=paths, dni_weight=[0.5, 0.5],
        model=models.construct(spec(PLAIN), tiny_weights.profile), tile=cfg.tile,
        tile_pad=cfg.tile_pad, pre_pad=cfg.pre_pad, half=False, device=torch.device("cpu"),
    )
    img = np.random.default_rng(4).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    with contextlib.redirect_stdout(io.StringIO()):
        want, _ = upstream.enhance(img, outscale=4)
    [got] = engine.enhance_batch([img], [_opt(0.5)])
    assert np.abs(got.image.astype(int) - want.astype(int)).max() <= 1
    [plain] = engine.enhance_batch([img], [_opt(None)])
    assert np.abs(plain.image.astype(int) - want.astype(int)).max() > 1  # it made a difference


def test_nearby_strengths_share_one_network(engine):  # noqa: F811
    from serve_app.options import resolve_options

    a = resolve_options({"bg_model": PLAIN, "denoise": "0.31"})
    b = resolve_options({"bg_model": PLAIN, "denoise": "0.29"})
    assert engine.bg_key(a) == engine.bg_key(b)
    assert engine.net(engine.bg_key(a)) is engine.net(engine.bg_key(b))


def test_missing_wdn_weights_is_a_clear_422(tiny_weights):  # noqa: F811
    from dataclasses import replace

    from serve_app.config import EngineConfig
    from serve_app.engine.engine import Engine

    files = {k: v for k, v in tiny_weights.files.items() if k != WDN}
    eng = Engine(EngineConfig(device="cpu"), replace(tiny_weights, files=files))
    [res] = eng.enhance_batch([np.zeros((8, 8, 3), np.uint8)], [_opt(0.5)])
    assert isinstance(res, InvalidOption) and res.status == 422 and "wdn" in res.message


@pytest.mark.parametrize("raw", [{"denoise": "0.5"}, {"bg_model": "auto", "denoise": "0.5"}])
def test_denoise_needs_the_general_model(raw):
    from serve_app.options import resolve_options

    with pytest.raises(InvalidOption, match="denoise applies to"):
        resolve_options(raw)

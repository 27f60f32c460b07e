"""Added models (`photoenhance models add`): recognised by spandrel, stored, served by the
engine like the built-in ones and equal to spandrel's own single-image call (fp32 CPU,
within 1 grey level); refusals with their reasons; the registry's sums."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from serve_app.config import EngineConfig
from serve_app.engine import added, catalog
from serve_app.engine.catalog import Catalog
from serve_app.engine.engine import Engine
from serve_app.errors import InvalidOption, WeightsError
from serve_app.options import EnhanceOptions

try:
    from _added_models import FAMILIES, SLOW, model_name, write_state
    from _engine_fixtures import tiny_weights  # noqa: F401
except ImportError:
    from tests._added_models import FAMILIES, SLOW, model_name, write_state
    from tests._engine_fixtures import tiny_weights  # noqa: F401


def test_every_accepted_family_has_a_test_model():
    assert set(FAMILIES) == set(added.ACCEPTED)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An added-models folder holding one small model of each fast family."""
    src = tmp_path_factory.mktemp("sources")
    location = str(tmp_path_factory.mktemp("added"))
    for arch in FAMILIES:
        if arch not in SLOW:
            added.add([write_state(arch, src)], location, model_name(arch))
    return location


@pytest.fixture(scope="module")
def cpu_engine(tiny_weights, store):  # noqa: F811
    return Engine(EngineConfig(device="cpu", tile=64), tiny_weights, Catalog(store))


def _spandrel(desc, img: np.ndarray, normalise: bool = False) -> np.ndarray:
    """spandrel's own single-image call on a uint8 BGR image, back to uint8 BGR."""
    x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1]).astype(np.float32) / 255.0)
    x = x.permute(2, 0, 1)[None]
    if normalise:  # GFPGAN: upstream's [-1, 1] around spandrel's network (see added.build)
        with torch.inference_mode():
            y = (desc.model(x * 2 - 1, return_rgb=False)[0].clamp(-1, 1) + 1) / 2
    else:
        y = desc(x)
    y = y[0].permute(1, 2, 0).numpy()[:, :, ::-1]
    return (y * 255.0).round().astype(np.uint8)


def _check_equal(engine, location, arch, img, opt):
    model = catalog.read(location)[model_name(arch)]
    desc = added.inspect(added._load_bytes(catalog.read_file(location, model))).descriptor
    [res] = engine.enhance_batch([img], [opt])
    assert not isinstance(res, Exception), res
    want = _spandrel(desc, img, normalise=arch == "GFPGAN")
    assert res.image.shape == want.shape
    assert np.abs(res.image.astype(int) - want.astype(int)).max() <= 1
    assert want.std() > 1  # not a flat image: the comparison means something


@pytest.mark.parametrize("arch", sorted(set(FAMILIES) - SLOW))
def test_added_model_equals_spandrel(cpu_engine, store, arch):
    model = catalog.read(store)[model_name(arch)]
    rng = np.random.default_rng(1)
    if model.kind == "face":
        img = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
        opt = EnhanceOptions(face=True, aligned=True, upscale=1, face_model=model.name)
    else:
        # 40x36 in 32 px tiles: several tiles of two shapes, batched per shape
        img = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
        opt = EnhanceOptions(face=False, bg_model=model.name, upscale=model.scale, tile=64)
    _check_equal(cpu_engine, store, arch, img, opt)


@pytest.mark.slow
def test_added_gfpgan_equals_spandrel_network(tiny_weights, tmp_path):  # noqa: F811
    location = str(tmp_path / "added")
    added.add([write_state("GFPGAN", tmp_path)], location, model_name("GFPGAN"))
    engine = Engine(EngineConfig(device="cpu"), tiny_weights, Catalog(location))
    img = np.random.default_rng(2).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    opt = EnhanceOptions(face=True, aligned=True, upscale=1, face_model=model_name("GFPGAN"))
    _check_equal(engine, location, "GFPGAN", img, opt)


def test_records_facts_and_sums(store, tmp_path):
    rec = catalog.read(store)[model_name("ESRGAN")]
    assert (rec.kind, rec.arch, rec.scale, rec.in_channels, rec.out_channels) == (
        "bg", "ESRGAN", 2, 3, 3)
    assert rec.tiling == "supported" and rec.size["minimum"] == 2 and rec.half
    src = write_state("ESRGAN", tmp_path)
    assert rec.source["sha256"] == {src.name: catalog.sha256_bytes(src.read_bytes())}
    stored = catalog.read_file(store, rec)
    assert catalog.sha256_bytes(stored) == rec.sha256
    face = catalog.read(store)[model_name("RestoreFormer")]
    assert face.kind == "face" and face.scale == 1 and face.size["multiple_of"] == 32
    swinir = catalog.read(store)[model_name("SwinIR")]
    assert swinir.tiling == "discouraged" and swinir.source["format"] == "safetensors"


def test_scale_mismatch_runs_the_model_then_lanczos(cpu_engine):
    img = np.random.default_rng(3).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    opt = EnhanceOptions(face=False, bg_model=model_name("Compact"), upscale=2)  # an x4 model
    [res] = cpu_engine.enhance_batch([img], [opt])
    assert res.image.shape == (40, 48, 3)


def test_wrong_kind_and_unknown_names_are_refused(cpu_engine):
    img = np.zeros((16, 16, 3), np.uint8)
    cases = [
        (EnhanceOptions(face=False, bg_model=model_name("RestoreFormer")), "wrong_model_kind"),
        (EnhanceOptions(face=True, face_model=model_name("ESRGAN")), "wrong_model_kind"),
        (EnhanceOptions(face=False, bg_model="never-added"), "unknown_model"),
        (EnhanceOptions(face=True, face_model="never-added", bg_model="none"), "unknown_model"),
    ]
    results = cpu_engine.enhance_batch([img] * len(cases), [c[0] for c in cases])
    for res, (_, code) in zip(results, cases, strict=True):
        assert isinstance(res, InvalidOption) and res.code == code and res.status == 422


def test_a_tampered_file_is_not_loaded(store, tmp_path, tiny_weights):  # noqa: F811
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    rec = catalog.read(str(copy))[model_name("Compact")]
    path = copy / rec.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256"):
        catalog.read_file(str(copy), rec)


def _refusal(state: dict, tmp_path) -> str:
    path = tmp_path / "m.pth"
    torch.save(state, path)
    with pytest.raises(added.Refused) as info:
        added.add([path], str(tmp_path / "added"), "m")
    assert not (tmp_path / "added" / "models.json").exists()
    return str(info.value)


def test_unrecognised_architecture_refused_with_reason(tmp_path):
    msg = _refusal({"encoder.weight": torch.zeros(4, 4)}, tmp_path)
    assert "not a recognised architecture" in msg and "CodeFormer" in msg


def test_detected_but_not_accepted_architecture_refused(tmp_path):
    from spandrel.architectures.DnCNN import DnCNN

    msg = _refusal(DnCNN(in_nc=3, out_nc=3, nc=8, nb=8, act_mode="R").state_dict(), tmp_path)
    assert "DnCNN is detected but not accepted" in msg


def test_non_rgb_model_refused(tmp_path):
    from spandrel.architectures.ESRGAN import ESRGAN

    gray = ESRGAN(in_nc=1, out_nc=1, num_filters=8, num_blocks=1, scale=2).state_dict()
    assert "only RGB models" in _refusal(gray, tmp_path)


def test_names_are_checked(store, tmp_path):
    src = write_state("Compact", tmp_path)
    for bad, why in [("../x", "letters, digits"), ("RealESRGAN_x4plus", "built-in"),
                     (model_name("Compact"), "already added")]:
        with pytest.raises((ValueError, FileExistsError), match=why):
            added.add([src], store, bad)


def test_cli_add_list_remove(tmp_path):
    from serve_app.cli import main

    src = write_state("Compact", tmp_path)
    where = str(tmp_path / "added")
    runner = CliRunner()
    res = runner.invoke(main, ["models", "add", str(src), "--name", "mine", "--dir", where])
    assert res.exit_code == 0, res.output
    assert "Compact x4" in res.output and "bg_model=mine" in res.output
    res = runner.invoke(main, ["models", "list", "--json", "--dir", where])
    row = json.loads(res.output.splitlines()[0])
    assert row["name"] == "mine" and "file" not in row and "files" not in row["source"]
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a model")
    res = runner.invoke(main, ["models", "add", str(junk), "--dir", where])
    assert res.exit_code != 0 and "refused" in res.output
    res = runner.invoke(main, ["models", "remove", "mine", "--dir", where])
    assert res.exit_code == 0 and catalog.read(where) == {}
    assert not (tmp_path / "added" / "mine.safetensors").exists()


def test_added_models_live_in_any_fsspec_location(tiny_weights, tmp_path):  # noqa: F811
    # fsspec's in-memory filesystem stands for a bucket: same code path as s3:// or gs://
    location = f"memory://added-{tmp_path.name}"
    rec = added.add([write_state("Compact", tmp_path)], location, "in-a-bucket")
    assert catalog.read(location)["in-a-bucket"].sha256 == rec.sha256
    engine = Engine(EngineConfig(device="cpu"), tiny_weights, Catalog(location))
    img = np.random.default_rng(5).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    [res] = engine.enhance_batch([img], [EnhanceOptions(face=False, bg_model="in-a-bucket",
                                                        upscale=4)])
    assert res.image.shape == (48, 40, 3)
    assert [m["name"] for m in engine.info()["added_models"]] == ["in-a-bucket"]
    catalog.remove(location, "in-a-bucket")
    assert catalog.read(location) == {}

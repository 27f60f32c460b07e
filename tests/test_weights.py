"""The weights registry, offline: sums, fetch (with a fake transport), synth, resolve."""

from __future__ import annotations

import hashlib
import logging
import re
from contextlib import contextmanager

import pytest
import torch

from serve_app.config import WeightsConfig
from serve_app.engine import models, weights, weights_folder
from serve_app.errors import WeightsError

try:
    from _engine_fixtures import tiny_weights  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests._engine_fixtures import tiny_weights  # noqa: F401

OFFICIAL = {
    "GFPGANv1.3.pth", "GFPGANv1.4.pth", "RealESRGAN_x2plus.pth", "RealESRGAN_x4plus.pth",
    "realesr-general-x4v3.pth", "realesr-general-wdn-x4v3.pth",
    "detection_Resnet50_Final.pth", "parsing_parsenet.pth",
}


def test_registry_lists_the_official_files():
    assert {s.filename for s in weights.REGISTRY.values()} == OFFICIAL
    for s in weights.REGISTRY.values():
        assert re.fullmatch(r"[0-9a-f]{64}", s.sha256)
        assert s.url.startswith("https://github.com/") and s.url.endswith(s.filename)
    assert weights.spec("RealESRGAN_x4plus").multi_source
    assert not weights.spec("GFPGANv1.4").multi_source


def test_one_source_mismatch_warns_naming_the_file(caplog):
    s = weights.spec("GFPGANv1.4")
    assert weights.check_sum(s, s.sha256)
    with caplog.at_level(logging.WARNING):
        assert not weights.check_sum(s, "0" * 64)
    assert "GFPGANv1.4.pth" in caplog.text


def test_multi_source_mismatch_is_refused():
    with pytest.raises(WeightsError, match="detection_Resnet50_Final.pth"):
        weights.check_sum(weights.spec("detection_Resnet50_Final"), "0" * 64)


def _fake_stream(payload: bytes):
    class Resp:
        headers = {"content-length": str(len(payload))}

        def raise_for_status(self):
            pass

        def iter_bytes(self, n):
            yield payload[: len(payload) // 2]
            yield payload[len(payload) // 2 :]

    @contextmanager
    def stream(method, url, **kw):
        assert method == "GET" and url.startswith("https://")
        yield Resp()

    return stream


def test_fetch_checks_sums_without_the_network(tmp_path, monkeypatch, caplog):
    import httpx

    payload = b"not really a model"
    good = hashlib.sha256(payload).hexdigest()
    monkeypatch.setattr(httpx, "stream", _fake_stream(payload))
    # a matching multi-source sum: kept
    s = weights.spec("parsing_parsenet")
    monkeypatch.setitem(weights.REGISTRY, s.name, weights.WeightSpec(**{**s.__dict__, "sha256": good}))
    [path] = weights.fetch(tmp_path, ["parsing_parsenet"])
    assert path.read_bytes() == payload
    # a differing one-source sum: kept, with a warning
    with caplog.at_level(logging.WARNING):
        [path] = weights.fetch(tmp_path, ["GFPGANv1.3"])
    assert path.exists() and "GFPGANv1.3.pth" in caplog.text
    # a differing multi-source sum: refused, and nothing (not even a temp file) left behind
    with pytest.raises(WeightsError):
        weights.fetch(tmp_path, ["RealESRGAN_x4plus"])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".sha256")) == [
        "GFPGANv1.3.pth", "parsing_parsenet.pth"]


def test_synth_writes_official_names_and_keys(tiny_weights):
    assert {p.name for p in tiny_weights.dir.iterdir()} >= OFFICIAL | {weights.MARKER}
    assert weights.read_marker(tiny_weights.dir)["profile"] == "tiny"
    for s in weights.REGISTRY.values():
        raw = torch.load(tiny_weights.path(s.name), map_location="cpu", weights_only=True)
        if s.key:
            assert list(raw) == [s.key]
        net = models.build(s.name, tiny_weights)  # the strict loader
        assert not net.training


def test_tiny_gfpgan_keeps_the_official_keys():
    s = weights.spec("GFPGANv1.4")
    full = models.construct(s, "full").state_dict()
    tiny = models.construct(s, "tiny").state_dict()
    assert list(full) == list(tiny)
    assert sum(v.numel() for v in tiny.values()) < sum(v.numel() for v in full.values()) / 20


def test_tiny_gfpgan_loads_through_upstreams_loading_code(tiny_weights):
    # GFPGANer's own lines: pick params_ema, strict load into GFPGANv1Clean.
    # (serve_app.engine.models, imported above, installed the torchvision shim.)
    from gfpgan.archs.gfpganv1_clean_arch import GFPGANv1Clean

    net = GFPGANv1Clean(**weights.spec("GFPGANv1.4").kwargs("tiny"))
    loadnet = torch.load(tiny_weights.path("GFPGANv1.4"))
    net.load_state_dict(loadnet["params_ema" if "params_ema" in loadnet else "params"], strict=True)


def test_unknown_model_name_is_an_error(tiny_weights):
    with pytest.raises(WeightsError, match="unknown weights"):
        models.build("GFPGANv9", tiny_weights)


def test_resolve_official_refuses_and_says_how_to_fetch(tmp_path):
    with pytest.raises(WeightsError, match="photoenhance weights fetch"):
        weights_folder.resolve(WeightsConfig(dir=tmp_path, source="official"))


def test_resolve_auto_falls_back_to_synthetic_loudly(tmp_path, caplog, tiny_weights, monkeypatch):
    # Reuse the session's files instead of writing new ones (keeps the test fast).
    target = tmp_path / "synthetic-tiny"
    target.mkdir()
    for p in tiny_weights.dir.iterdir():
        (target / p.name).symlink_to(p)
    with caplog.at_level(logging.WARNING):
        info = weights_folder.resolve(WeightsConfig(dir=tmp_path, source="auto", profile="tiny"))
    assert info.synthetic and info.dir == target and "SYNTHETIC" in caplog.text
    again = weights_folder.resolve(WeightsConfig(dir=tmp_path, source="synthetic", profile="tiny"))
    assert again.dir == target


def test_resolve_reads_a_synth_folder_directly(tiny_weights):
    info = weights_folder.resolve(WeightsConfig(dir=tiny_weights.dir, source="auto"))
    assert info.synthetic and info.profile == "tiny"

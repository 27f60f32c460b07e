"""Options from strings, forms and JSON; presets, built-in and saved."""

from __future__ import annotations

import json
import threading

import pytest

from serve_app.api.http import parse_option_sources
from serve_app.errors import Conflict, InvalidOption, NotFound
from serve_app.options import BUILTIN_PRESETS, EnhanceOptions, resolve_options
from serve_app.presets import PresetStore


def test_strings_are_coerced():
    opts = resolve_options(
        {"upscale": "4", "face": "false", "weight": "0.3", "only_center_face": "yes",
         "aligned": "0", "format": "webp", "quality": "80", "tile": "64",
         "face_model": "GFPGANv1.3", "bg_model": "none"}
    )
    assert opts == EnhanceOptions(
        upscale=4, face=False, weight=0.3, only_center_face=True, aligned=False,
        format="webp", quality=80, tile=64, face_model="GFPGANv1.3", bg_model="none",
    )


@pytest.mark.parametrize(
    "raw",
    [{"upscale": "3"}, {"upscale": "x"}, {"weight": "2"}, {"face": "maybe"}, {"format": "gif"},
     {"quality": "0"}, {"tile": "8"}, {"face_model": "v9/x"}, {"bg_model": "../big"}, {"nope": 1},
     {"preset": "missing"}, {"bg_model": "x" * 65}, {"denoise": "0.5"},
     {"bg_model": "realesr-general-x4v3", "denoise": "1.5"},
     {"bg_model": "realesr-general-x4v3", "denoise": "nan"}],
)
def test_bad_options_are_422(raw):
    with pytest.raises(InvalidOption) as err:
        resolve_options(raw)
    assert err.value.status == 422 and err.value.code == "invalid_option"


def test_denoise_is_quantised_and_model_names_may_be_added_ones():
    opts = resolve_options({"bg_model": "realesr-general-x4v3", "denoise": "0.33"})
    assert opts.denoise == 0.35
    assert resolve_options({"bg_model": "realesr-general-x4v3"}).denoise is None
    # an added model's name passes here; the model replica checks that it exists (422 there)
    assert resolve_options({"bg_model": "my-upscaler_x4.v2"}).bg_model == "my-upscaler_x4.v2"


def test_presets_apply_under_explicit_values():
    assert resolve_options({"preset": "photo-x4"}).upscale == 4
    assert resolve_options({"preset": "photo-x4", "upscale": "2"}).upscale == 2
    custom = {"mine": {"upscale": 1, "face": False}}
    assert resolve_options({"preset": "mine"}, presets=custom).face is False


def test_option_sources_merge_and_json():
    merged = parse_option_sources(
        {"upscale": "2", "face": "true"},
        {"options": json.dumps({"upscale": 4, "weight": 0.1})},
    )
    assert merged == {"upscale": 4, "face": "true", "weight": 0.1}
    with pytest.raises(InvalidOption):
        parse_option_sources({"upscal": "2"})
    with pytest.raises(InvalidOption):
        parse_option_sources({"options": "[1, 2]"})
    with pytest.raises(InvalidOption):
        parse_option_sources({"options": "{not json"})


def test_preset_store_crud(tmp_path):
    store = PresetStore(tmp_path / "presets.json")
    stored, created = store.put("soft", {"weight": "0.2", "upscale": "4"})
    assert created and stored == {"weight": 0.2, "upscale": 4}
    _, created = store.put("soft", {"weight": 0.3})
    assert not created and store.custom() == {"soft": {"weight": 0.3}}
    # Another replica (another store on the same file) sees it.
    assert PresetStore(tmp_path / "presets.json").custom()["soft"] == {"weight": 0.3}
    names = [p["name"] for p in store.listing()]
    assert names[: len(BUILTIN_PRESETS)] == list(BUILTIN_PRESETS) and "soft" in names
    store.delete("soft")
    assert store.custom() == {}
    with pytest.raises(NotFound):
        store.delete("soft")


def test_preset_store_refuses(tmp_path):
    store = PresetStore(tmp_path / "presets.json")
    with pytest.raises(Conflict):
        store.put("portrait", {"upscale": 1})
    with pytest.raises(Conflict):
        store.delete("default")
    with pytest.raises(InvalidOption):
        store.put("bad name!", {})
    with pytest.raises(InvalidOption):
        store.put("ok", {"upscale": 3})
    with pytest.raises(InvalidOption):
        store.put("loop", {"preset": "portrait"})
    assert not (tmp_path / "presets.json").exists()


def test_preset_store_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "presets.json"

    def writer(i: int) -> None:
        PresetStore(path).put(f"p{i}", {"quality": 50 + i})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(json.loads(path.read_text())) == sorted(f"p{i}" for i in range(12))
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]

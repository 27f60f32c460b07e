"""Shared fixtures of the engine tests: tiny synthetic weights, an engine, test photos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "images"


def read(name: str, max_side: int | None = None) -> np.ndarray:
    img = cv2.imread(str(DATA / name), cv2.IMREAD_UNCHANGED)
    assert img is not None, f"missing test image {DATA / name}"
    if max_side and max(img.shape[:2]) > max_side:
        # Keep CI fast on 2 cores: the pipeline's cost follows the pixel count.
        f = max_side / max(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)),
                         interpolation=cv2.INTER_AREA)
    return img


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    from serve_app.engine import synthetic

    return synthetic.synth(tmp_path_factory.mktemp("weights") / "tiny", "tiny")


@pytest.fixture(scope="session")
def engine(tiny_weights):
    from serve_app.config import AppConfig
    from serve_app.engine.engine import Engine

    cfg = AppConfig.model_validate(
        {"weights": {"dir": str(tiny_weights.dir)}, "engine": {"device": "cpu"}}
    )
    return Engine.from_config(cfg)

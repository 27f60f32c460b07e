"""The Python handle a Ray job or driver uses: ``serve.get_app_handle(...).enhance``."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from ray import serve

from serve_app.api.schemas import EnhancedImage
from serve_app.errors import InvalidOption, PhotoEnhanceError, UnsupportedMediaType
from serve_app.options import EnhanceOptions


def test_handle_enhance(serve_url, images):
    handle = serve.get_app_handle("photoenhance")
    data = images.photo("0014.jpg", max_side=96)
    result = handle.enhance.remote(data, {"upscale": 2}).result()
    assert isinstance(result, EnhancedImage)
    out = cv2.imdecode(np.frombuffer(result.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out.shape[:2] == (result.height, result.width) == (192, 192)
    assert result.format == "jpeg" and result.media_type == "image/jpeg"
    assert result.synthetic is True and "decode" in result.timings
    # The session's synthetic detector (seed 0) finds two faces here: none found (or a
    # different count) must fail, not leave the box checks below with nothing to check.
    assert result.faces == 2 and len(result.face_boxes) == 2, result.face_boxes
    for x, y, w, h in result.face_boxes:  # output pixels; a box may reach past the edges
        assert w > 0 and h > 0 and x < 192 and y < 192 and x + w > 0 and y + h > 0


def test_handle_with_options_object(serve_url, images):
    handle = serve.get_app_handle("photoenhance")
    opts = EnhanceOptions(upscale=1, face=False, bg_model="none", format="png")
    result = handle.enhance.remote(images.cv2_bytes(images.array(10, 12), ".jpg"), opts).result()
    assert (result.width, result.height, result.format) == (12, 10, "png")
    assert result.synthetic is False  # no network ran: nothing synthetic in this output


def test_handle_errors_keep_their_type(serve_url, images):
    handle = serve.get_app_handle("photoenhance")
    with pytest.raises(UnsupportedMediaType) as err:
        handle.enhance.remote(b"<svg/>").result()
    assert err.value.status == 415
    with pytest.raises(PhotoEnhanceError) as err:
        handle.enhance.remote(images.cv2_bytes(images.array(8, 8), ".png"), {"upscale": 3}).result()
    assert isinstance(err.value, InvalidOption) and err.value.code == "invalid_option"

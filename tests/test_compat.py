"""The torchvision shim lets basicsr 1.4.2 import on a current torchvision."""

import importlib


def test_basicsr_and_friends_import_after_the_shim():
    import serve_app.compat  # noqa: F401

    for name in ("basicsr.utils", "gfpgan", "realesrgan", "facexlib.utils.face_restoration_helper"):
        importlib.import_module(name)
    legacy = importlib.import_module("torchvision.transforms.functional_tensor")
    assert callable(legacy.rgb_to_grayscale)


def test_install_is_idempotent():
    from serve_app import compat

    compat.install()
    compat.install()

"""The torchvision shim lets basicsr 1.4.2 import on a current torchvision.

Each check runs in a fresh interpreter: this one may have imported basicsr (and the shim)
already, which would hide both the failure without the shim and the shim's effect.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

LEGACY = "torchvision.transforms.functional_tensor"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_without_the_shim_basicsr_does_not_import():
    """The control: on this torchvision the legacy module is gone, so basicsr's
    ``basicsr.data.degradations`` fails to import. If torchvision brings it back (or basicsr
    stops using it), the shim is dead code and this test says so."""
    r = _run("import basicsr.data.degradations")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"No module named '{LEGACY}'" in r.stderr, r.stderr[-2000:]


def test_with_the_shim_basicsr_imports_and_gets_torchvisions_function():
    """The shim's promise: the upstream packages import, and what basicsr takes from the
    legacy module is torchvision's current ``rgb_to_grayscale`` (same object, same values)."""
    r = _run(f"""
        import importlib, sys
        import serve_app.engine.compat
        import torch
        from torchvision.transforms import functional
        for name in ("basicsr.utils", "basicsr.data.degradations", "gfpgan", "realesrgan",
                     "facexlib.utils.face_restoration_helper"):
            importlib.import_module(name)
        import basicsr.data.degradations as deg
        legacy = sys.modules["{LEGACY}"]
        assert deg.rgb_to_grayscale is functional.rgb_to_grayscale is legacy.rgb_to_grayscale
        img = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
        want = 0.2989 * img[0] + 0.587 * img[1] + 0.114 * img[2]
        torch.testing.assert_close(deg.rgb_to_grayscale(img)[0], want, rtol=0, atol=1e-6)
        print("ok")
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "ok"


def test_install_is_idempotent_and_keeps_a_module_already_there():
    """A second ``install()`` changes nothing, and a module already registered under the
    legacy name (a torchvision that still has it, or another shim) is never replaced."""
    r = _run(f"""
        import sys, types
        from serve_app.engine import compat
        first = sys.modules["{LEGACY}"]
        compat.install()
        compat.install()
        assert sys.modules["{LEGACY}"] is first
        own = types.ModuleType("{LEGACY}")
        sys.modules["{LEGACY}"] = own
        compat.install()
        assert sys.modules["{LEGACY}"] is own
        print("ok")
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "ok"

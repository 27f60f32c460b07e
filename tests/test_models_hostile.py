"""Hostile model files: `photoenhance models add` runs nothing from a file it is given.

Each payload writes a marker file when it runs. The control cases prove that it does (a
TorchScript archive loaded with ``torch.jit.load``, a pickle loaded with ``pickle.loads``);
then the real CLI, in its own process, is handed the same kind of file under each name it
reads as a pickle (.pt, .pth, .ckpt) and must refuse it with a clear message, exit non-zero,
write nothing, and leave no marker.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from serve_app.engine import checkpoint, models
from serve_app.engine.weights import spec
from serve_app.errors import WeightsError

PHOTOENHANCE = Path(sys.executable).parent / "photoenhance"
PICKLED = (".pt", ".pth", ".ckpt")


class _Scripted(nn.Module):
    """Compiled by ``torch.jit.script``; its ``__setstate__`` runs inside ``torch.jit.load``
    and creates ``marker`` (``from_file`` with ``shared=True`` opens it with O_CREAT)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.marker = marker

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.marker = state[1]
        self.training = state[2]
        # Used in the result, or TorchScript drops the call as dead code.
        self.w = state[0] + torch.from_file(self.marker, shared=True, size=3) * 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def torchscript_archive(path: Path, marker: Path) -> Path:
    torch.jit.save(torch.jit.script(_Scripted(str(marker))), str(path))
    return path


class _Reduce:
    """A pickle payload: unpickling calls ``open(marker, "w")``, which creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def add_cli(path: Path, location: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PHOTOENHANCE_WEIGHTS": str(location)}
    env.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    # The environment switch that would turn torch's default back to full unpickling.
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    return subprocess.run(
        [str(PHOTOENHANCE), "models", "add", str(path), "--name", "hostile",
         "--dir", str(location)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )


def assert_refused(res: subprocess.CompletedProcess[str], marker: Path, location: Path,
                   why: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "Error: refused: " in out and why in out, out
    assert "Traceback" not in out, out
    assert not marker.exists(), "the file's code ran"
    assert not (location / "models.json").exists() and not list(location.glob("*.safetensors"))


def test_the_payloads_run_when_loaded_the_unsafe_way(tmp_path: Path) -> None:
    """Controls: the files below really carry code that writes a file."""
    ts_marker, pk_marker = tmp_path / "ts-ran", tmp_path / "pickle-ran"
    archive = torchscript_archive(tmp_path / "control.pt", ts_marker)
    subprocess.run([sys.executable, "-c", f"import torch; torch.jit.load({str(archive)!r})"],
                   check=True, capture_output=True, timeout=300)
    assert ts_marker.exists()
    pickle.loads(pickle.dumps({"w": torch.zeros(1), "x": _Reduce(pk_marker)}))
    assert pk_marker.exists()


@pytest.mark.parametrize("ext", PICKLED)
def test_a_torchscript_archive_is_refused_unopened(tmp_path: Path, ext: str) -> None:
    marker, location = tmp_path / "ran", tmp_path / "added"
    location.mkdir()
    archive = torchscript_archive(tmp_path / f"model{ext}", marker)
    assert_refused(add_cli(archive, location), marker, location, "a TorchScript archive")


@pytest.mark.parametrize("ext", PICKLED)
def test_a_plain_pickle_with_a_reduce_payload_is_refused(tmp_path: Path, ext: str) -> None:
    marker, location = tmp_path / "ran", tmp_path / "added"
    location.mkdir()
    path = tmp_path / f"model{ext}"
    path.write_bytes(pickle.dumps({"params_ema": {"conv.weight": torch.zeros(1)},
                                   "x": _Reduce(marker)}))
    assert_refused(add_cli(path, location), marker, location,
                   "Python objects other than tensors")


def test_a_reduce_payload_inside_a_torch_zip_is_refused(tmp_path: Path) -> None:
    marker, location = tmp_path / "ran", tmp_path / "added"
    location.mkdir()
    path = tmp_path / "model.pth"
    torch.save({"params_ema": {"conv.weight": torch.zeros(1)}, "x": _Reduce(marker)}, path)
    assert not marker.exists()
    assert_refused(add_cli(path, location), marker, location,
                   "Python objects other than tensors")


def test_torchscript_is_recognised_by_its_members() -> None:
    assert checkpoint.torchscript_members(
        ["m/data.pkl", "m/code/__torch__.py", "m/constants.pkl", "m/data/0"]
    ) == ["m/code/__torch__.py", "m/constants.pkl"]
    # A torch.save zip: a pickle and its tensors, nothing compiled.
    assert checkpoint.torchscript_members(["m/data.pkl", "m/data/0", "m/version"]) == []


def test_a_checkpoint_with_tensors_and_numbers_still_loads(tmp_path: Path) -> None:
    """What trainers write (.ckpt with a state_dict beside epoch numbers) is still read."""
    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": {"conv.weight": torch.ones(2)}, "epoch": 3}, path)
    raw = checkpoint.load(path)
    assert raw["epoch"] == 3 and torch.equal(raw["state_dict"]["conv.weight"], torch.ones(2))


def test_a_torchscript_file_in_the_weights_folder_is_not_loaded(tmp_path: Path) -> None:
    """A built-in weights file replaced by hand with an archive: a WeightsError, no code."""
    marker = tmp_path / "ran"
    path = torchscript_archive(tmp_path / "RealESRGAN_x4plus.pth", marker)
    with pytest.raises(WeightsError, match="TorchScript archive"):
        models.load_state(path, spec("RealESRGAN_x4plus"))
    assert not marker.exists()

"""The tree's structure (docs/ARCHITECTURE.md): layers import one way, other layers use jobs,
the engine and the codec through their front doors (the engine's loads torch only when used),
the api uses the engine only for its catalog, no import cycles, and no torch where only the
CPU side runs (nor in a command that runs nothing of the engine).

The layer and torch rules are import-linter contracts in ``pyproject.toml``; cycles are found
with grimp (import-linter's graph) counting imports inside functions too, so a cycle cannot
hide in a function-level import. Each check also runs on a copy of the package with one bad
import added, to show it fails when it should.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"

LINT = (
    "import sys; from importlinter.cli import lint_imports; "
    "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"
)
# Every direct import a -> b (TYPE_CHECKING blocks aside) where b leads back to a.
CYCLES = """
import grimp
g = grimp.build_graph("serve_app", exclude_type_checking_imports=True, cache_dir=None)
for a in sorted(g.modules):
    for b in sorted(g.find_modules_directly_imported_by(a)):
        if a != b and g.chain_exists(importer=b, imported=a):
            print(a, "->", b)
"""
# Imports the modules named in argv; prints whether torch came with them.
LOADS_TORCH = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print("torch" in sys.modules)
"""
# What an ingress replica and the job actor import.
CPU_SIDE = ("serve_app.deployments.app", "serve_app.deployments.ingress", "serve_app.jobs")
# The engine's front door: whether torch came with it, then with each of its names (each the
# one its module holds), and whether it makes up a name it does not have.
ENGINE_DOOR = """
import importlib, json, sys
import serve_app.engine as door
before = "torch" in sys.modules
homes = {"Engine": "engine", "EnhanceResult": "types", "GpuJpeg": "nvjpeg", "Staged": "stages"}
same = all(getattr(door, name) is getattr(importlib.import_module("serve_app.engine." + home), name)
           for name, home in homes.items())
print(json.dumps([before, "torch" in sys.modules, sorted(door.__all__) == sorted(homes), same,
                  hasattr(door, "nope")]))
"""


def run(code: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_with(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package in ``tmp_path`` whose ``module`` ends with ``line``."""
    shutil.copytree(ROOT / "serve_app", tmp_path / "serve_app",
                    ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + "\n" + line + "\n")
    return tmp_path


def test_layers_import_one_way_and_torch_stays_in_the_engine():
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    assert len(contracts) >= 4
    res = run(LINT, ROOT, str(PYPROJECT))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Contracts: {len(contracts)} kept, 0 broken." in res.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken", "chain"),
    [
        ("serve_app.api.errors", "from serve_app.deployments import ingress",
         "Layers import one way BROKEN", "serve_app.api.errors -> serve_app.deployments.ingress"),
        ("serve_app.api.routes", "from serve_app.jobs import manifest  # noqa",
         "Other layers reach jobs through its public entry (serve_app.jobs) BROKEN",
         "serve_app.api.routes -> serve_app.jobs.manifest"),
        ("serve_app.options", "def _f():\n    import torch  # noqa",
         "the model replica loads it lazily BROKEN", "serve_app.options -> torch"),
        # A command that runs nothing of the engine must not load torch through it.
        ("serve_app.cli.enhance", "from serve_app.engine import synthetic  # noqa",
         "the model replica loads it lazily BROKEN", "serve_app.cli.enhance -> serve_app.engine"),
        # Beyond its catalog, the api knows the engine only through a Serve handle.
        ("serve_app.api.routes", "from serve_app.engine import weights  # noqa",
         "The api uses the engine only for its model catalog (else a Serve handle) BROKEN",
         "serve_app.api.routes -> serve_app.engine.weights"),
        # The deployments know the engine by its front door, every layer the codec by its own.
        ("serve_app.deployments.ingress", "from serve_app.engine import weights  # noqa",
         "Other layers reach the engine through its front door (serve_app.engine) BROKEN",
         "serve_app.deployments.ingress -> serve_app.engine.weights"),
        ("serve_app.jobs.reader", "from serve_app.codec import probing  # noqa",
         "Other layers reach the codec through its front door (serve_app.codec) BROKEN",
         "serve_app.jobs.reader -> serve_app.codec.probing"),
    ],
    ids=["wrong-way", "into-jobs", "torch-inside-a-function", "torch-in-a-light-command",
         "api-past-the-catalog", "past-the-engine-door", "past-the-codec-door"],
)
def test_a_bad_import_breaks_its_contract(tmp_path, module, line, broken, chain):
    root = copy_with(tmp_path, module, line)
    res = run(LINT, root, str(PYPROJECT))
    assert res.returncode == 1, res.stdout + res.stderr
    assert broken in res.stdout and chain in res.stdout, res.stdout


def test_no_import_cycles():
    res = run(CYCLES, ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "", "import cycles:\n" + res.stdout


def test_a_cycle_inside_a_function_is_found(tmp_path):
    root = copy_with(tmp_path, "serve_app.engine.weights",
                     "def _f():\n    from serve_app.engine import synthetic  # noqa")
    res = run(CYCLES, root)
    assert res.returncode == 0, res.stderr
    assert "serve_app.engine.weights -> serve_app.engine.synthetic" in res.stdout


def test_the_ingress_and_the_job_actor_load_without_torch():
    res = run(LOADS_TORCH, ROOT, *CPU_SIDE)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_torch_in_a_module_of_the_ingress_is_seen(tmp_path):
    # api.metrics is one of the ingress's modules; importing it alone keeps this test short.
    root = copy_with(tmp_path, "serve_app.api.metrics", "import torch  # noqa")
    res = run(LOADS_TORCH, root, "serve_app.api.metrics")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True"


def test_the_engine_front_door_loads_torch_on_first_use():
    # Every import of an engine module runs the front door: the api's catalog and the
    # ingress's EnhanceResult come through it without torch.
    res = run(ENGINE_DOOR, ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[false, true, true, true, false]"

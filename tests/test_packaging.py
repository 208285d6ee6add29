"""The top-level folders install as subpackages of lsdb, for an editable install and a wheel."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SUBPACKAGES = {"lsdb.schema": "schema", "lsdb.ingest": "ingest", "lsdb.probes": "probes", "lsdb.query": "query",
               "lsdb.train": "lsdb/train", "lsdb.examples": "examples"}
PROBE = ("import importlib, json; mods = {m: importlib.import_module(m).__file__ for m in %r}; "
         "import lsdb.examples, pathlib; toml = sorted(p.name for p in pathlib.Path(lsdb.examples.__file__).parent.glob('*.toml')); "
         "print(json.dumps([mods, toml]))") % (list(SUBPACKAGES),)


def test_editable_install_maps_the_top_level_folders(tmp_path):
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, check=True)
    mods, toml = json.loads(out.stdout)
    for mod, folder in SUBPACKAGES.items():
        assert Path(mods[mod]).parent == REPO / folder, (mod, mods[mod])
    assert "quick.toml" in toml


@pytest.mark.slow
def test_built_wheel_in_a_fresh_venv(tmp_path):
    import json

    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
                   check=True, capture_output=True)
    wheel = next(dist.glob("lsdb-*.whl"))
    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    fresh_python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    # dependencies come from this environment's site-packages, but not its editable lsdb finder:
    # paths listed in a .pth file are not themselves scanned for .pth files
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run([str(fresh_python), "-c", PROBE], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    mods, toml = json.loads(out.stdout)
    for mod in SUBPACKAGES:
        assert Path(mods[mod]).is_relative_to(site), (mod, mods[mod])
    assert "quick.toml" in toml


def test_the_version_is_said_once_and_repeated_faithfully():
    import tomllib

    from lsdb import __version__
    from tests.conftest import REPO

    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"] == __version__

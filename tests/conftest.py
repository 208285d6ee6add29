"""Shared fixtures: tiny real specs and stores under tmp_path (real DuckDB files, real training)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A real but tiny study: sklearn digits, an MLP, 2 seeds, one spawn time with 2 children.
TINY_SPEC = """
[experiment]
name = "tiny"
seeds = [0, 1]

[data]
name = "digits"
probe_set_size = 32

[model]
name = "mlp"
width = 32
depth = 1

[optim]
lr = 0.05
batch_size = 128
epochs = 3
lr_drops = [2.0]

[checkpoints]
log_points = 3
log_until = 0.5
every_epochs = 1

[spawn]
times = [1.0]
children = 2

[probes.eval]
max_train = 256

[probes.weights]
"""


@pytest.fixture
def tiny_spec_path(tmp_path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY_SPEC)
    return p


@pytest.fixture
def store(tmp_path):
    from lsdb.store import Store

    return Store.init(tmp_path / "store")


def lsdb_cmd() -> list[str]:
    """The installed console script, run as a subprocess (what a user types)."""
    exe = Path(sys.executable).with_name("lsdb")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lsdb.cli"]


@pytest.fixture
def cli_env(tmp_path):
    env = dict(os.environ)
    env.pop("LSDB_STORE", None)
    return env

"""Docs cannot go stale: README's commands match CI, and every command and spec key is documented."""

from __future__ import annotations

import dataclasses
import re

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    assert test_cmd in ci


def test_readme_demo_command_exists():
    assert "lsdb demo --quick" in README


def test_every_command_is_in_the_readme():
    import typer.main

    from lsdb.cli import app

    for name in typer.main.get_command(app).commands:
        assert f"`lsdb {name}" in README, f"command {name} missing from README"


def test_every_spec_key_is_in_the_readme():
    from lsdb.spec import SECTIONS, ProbeSelection

    for section, cls in list(SECTIONS.items()) + [("probes.NAME", ProbeSelection)]:
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in README, f"{section}.{f.name} missing from README's spec table"
    from lsdb.spec import FINETUNE_KEYS

    for key in FINETUNE_KEYS:
        assert f"`{key}`" in README, f"finetunes.NAME.{key} missing from README's spec table"


def test_every_probe_is_in_the_readme():
    from lsdb.probes import PROBES

    for name in PROBES:
        assert f"`{name}`" in README, name

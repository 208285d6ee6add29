"""The import layers of DESIGN (docs in README, "How it works"): each part imports only parts of
its own layer or below, counting imports inside functions and under TYPE_CHECKING, and no two parts
import each other in any way (no cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

FOLDERS = {"lsdb": "lsdb", "lsdb.schema": "schema", "lsdb.ingest": "ingest", "lsdb.probes": "probes",
           "lsdb.query": "query"}
WHOLE = ("lsdb.train", "lsdb.schema", "lsdb.ingest", "lsdb.probes", "lsdb.query")

# top to bottom; a part may import parts of its own layer or of any layer below
LAYERS = [
    {"lsdb", "lsdb.cli", "lsdb.cli_query", "lsdb.cli_common", "lsdb.demo", "lsdb.__main__", "lsdb.submit"},
    {"lsdb.runner"},
    {"lsdb.plan", "lsdb.ingest", "lsdb.probes", "lsdb.query", "lsdb.integrity"},
    {"lsdb.train", "lsdb.schema", "lsdb.store", "lsdb.spec", "lsdb.spool", "lsdb.artifacts"},
    {"lsdb.ids", "lsdb.errors", "lsdb.atomic", "lsdb.faults", "lsdb._version", "lsdb.progress"},
]


def part(module: str) -> str | None:
    if not module.startswith("lsdb"):
        return None
    for whole in WHOLE:
        if module == whole or module.startswith(whole + "."):
            return whole
    bits = module.split(".")
    return ".".join(bits[:2])


def modules():
    for pkg, folder in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            names = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            if pkg == "lsdb" and names and names[0] in ("schema", "ingest", "probes", "query"):
                continue
            yield ".".join([pkg, *names]), path


def edges() -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for name, path in modules():
        src = part(name)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    targets = [".".join(base + ([node.module] if node.module else []))]
                elif node.module == "lsdb":  # `from lsdb import cli_query` names a module; `__version__` does not
                    targets = [f"lsdb.{a.name}" if (REPO / "lsdb" / f"{a.name}.py").exists() else "lsdb"
                               for a in node.names]
                elif node.module:
                    targets = [node.module]
            for t in targets:
                dst = part(t)
                if dst and src and dst != src:
                    out.setdefault((src, dst), []).append(f"{Path(path).relative_to(REPO)}:{node.lineno}")
    return out


def layer_of(p: str) -> int:
    for i, layer in enumerate(LAYERS):
        if p in layer:
            return i
    raise AssertionError(f"part {p} is in no layer: add it to LAYERS (and to the README's layer list)")


def test_every_part_imports_only_its_layer_or_below():
    wrong = [f"{a} -> {b} ({', '.join(where)})" for (a, b), where in edges().items() if layer_of(b) < layer_of(a)]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_two_parts_import_each_other():
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        graph.setdefault(a, set()).add(b)

    def reaches(start, goal, seen):
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted({a for a in graph if reaches(a, a, set())})
    assert not cycles, f"parts in import cycles: {cycles}"

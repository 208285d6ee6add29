"""``lsdb demo``: run the embedded Fort et al. style study and evaluate the findings."""

from __future__ import annotations

from importlib import resources

from lsdb.plan import parse_spec
from lsdb.spec import Spec

FULL = "fort2020-mnist1d.toml"
QUICK = "fort2020-mnist1d-quick.toml"


def demo_spec(quick: bool) -> Spec:
    name = QUICK if quick else FULL
    text = resources.files("lsdb.examples").joinpath(name).read_text()
    return parse_spec(text, source=f"lsdb/examples/{name}")


def run_demo(store, quick: bool = False, workers: int = 1, device: str | None = None,
             progress: str | bool | None = None):
    """Train and probe the demo study into ``store``; returns (run summary, findings of the demo's
    own experiment, whatever else the store holds). ``progress`` as for ``lsdb.runner.run``
    (silent by default)."""
    from lsdb import runner
    from lsdb.query.findings import findings_results
    from lsdb.query.session import Session

    spec = demo_spec(quick)
    summary = runner.run(spec, store, workers=workers, device=device, progress=progress)
    return summary, findings_results(Session(store).within(spec.identity()))

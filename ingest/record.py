"""Recording an experiment and its runs, before anything trains.

The rows go through the spool like every other write, so that the ingested log holds everything
the database can be rebuilt from (``lsdb rebuild``). Only what the store lacks is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from lsdb.ids import utcnow
from lsdb.ingest.ingest import ingest
from lsdb.spool import write_experiment_shard
from lsdb.plan import PlannedRun, run_row
from lsdb.spec import Spec


def record_experiment(spec: Spec, store, runs: list[PlannedRun]) -> None:
    """Record ``spec``'s experiment row (with its probe set, stored as an artifact), every run it
    declares that the store lacks, and the experiment's membership of all of them."""
    from lsdb.train.data import load_data, probe_indices
    from lsdb.train.models import build_model, num_params

    with store.read() as con:
        have_exp = con.execute("SELECT count(*) FROM experiment WHERE id = ?", [spec.identity()]).fetchone()[0] > 0
        have_runs = {r[0] for r in con.execute("SELECT id FROM run WHERE id IN (SELECT unnest(?::VARCHAR[]))",
                                               [[r.id for r in runs]]).fetchall()}
        have_links = {r[0] for r in con.execute("SELECT run_id FROM experiment_run WHERE experiment_id = ?",
                                                [spec.identity()]).fetchall()}
    new = [r for r in runs if r.id not in have_runs]
    links = sorted({r.id for r in runs})
    if have_exp and not new and set(links) <= have_links:
        return
    data = load_data(spec.data)
    indices = probe_indices(data, spec.data.probe_set_size, spec.data.probe_set_seed)
    probe_sha = store.artifacts().put(indices.numpy())
    sizes: dict = {}
    for r in new:
        if r.config.model not in sizes:
            sizes[r.config.model] = num_params(build_model(r.config.model, data.input_shape, data.num_classes))
    experiment = dict(id=spec.identity(), name=spec.name, spec_toml=_spec_text(spec), dataset=spec.data.label,
                      probe_set_size=spec.data.probe_set_size, probe_set_seed=spec.data.probe_set_seed,
                      probe_set_sha256=probe_sha, created_at=utcnow().isoformat())
    rows = [run_row(r, spec.identity(), sizes[r.config.model]) for r in new]
    rows.sort(key=lambda row: row["parent_run_id"] is not None)  # parents first: children reference them
    write_experiment_shard(store.spool, experiment, rows, links)
    report = ingest(store)
    if report.rejected:
        from lsdb.errors import StoreError

        raise StoreError(f"recording experiment {spec.name} failed: {report.rejected[0]}")


def _spec_text(spec: Spec) -> str:
    src = Path(spec.source) if spec.source and not spec.source.startswith("<") else None
    if src and src.is_file():
        try:
            return src.read_text()
        except (OSError, UnicodeDecodeError):
            pass
    return json.dumps(spec.canonical(), sort_keys=True)

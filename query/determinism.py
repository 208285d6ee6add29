"""How much a network's end point depends on its data order versus its initialisation (the SoK's
"determinism" aspect, Khan et al. 2024), as one table.

Each row is a pair of final checkpoints measured by the same probes with the same settings:

- ``data order``: two children of one spawn (same weights and optimiser state at the spawn time,
  different data order afterwards; ``spawn_epoch``/``spawn_frac`` say when they split);
- ``initialisation``: two parent runs of one variant with different seeds (different initial
  weights and data order; no spawn time).

Columns: ``disagreement`` (fraction of test points whose predicted labels differ),
``disagreement_over_error``, ``weight_distance`` ‖w_a − w_b‖₂ and ``relative_weight_distance``
(÷ ‖w_a‖₂), ``loss_barrier_test``/``error_barrier_test`` on the straight path (the ``barrier``
probe's roles "siblings" and "cross_init"), and ``kernel_distance`` between the two final NTKs
(the ``ntk_distance`` probe's roles of the same names). A measure not taken is null: the barrier
needs ``[probes.barrier] cross_init = true`` for the initialisation rows, the kernel distance
``[probes.ntk]`` on final checkpoints and ``[probes.ntk_distance]`` with those roles.
"""

from __future__ import annotations

ROLES = {"siblings": "data order", "cross_init": "initialisation"}

# Each probe's latest row per pair and role (a pair measured again with new settings counts once).
_LATEST = """SELECT j.role, t.checkpoint_id AS a, t.other_checkpoint_id AS b, t.anchor_checkpoint_id AS anchor, {cols}
    FROM {table} t JOIN probe_job j ON j.id = t.job_id
    WHERE j.state = 'done' AND j.role IN ('siblings', 'cross_init')
    QUALIFY row_number() OVER (PARTITION BY j.role, t.checkpoint_id, t.other_checkpoint_id
                               ORDER BY j.version DESC, j.started_at DESC, j.id) = 1"""

BARRIER_COLUMNS = ("disagreement", "disagreement_over_error", "weight_distance", "relative_weight_distance",
                   "loss_barrier_test", "error_barrier_test")

SQL = f"""WITH b AS ({_LATEST.format(cols=", ".join(f"t.{c}" for c in BARRIER_COLUMNS), table="barrier")}),
k AS ({_LATEST.format(cols="t.distance AS kernel_distance", table="ntk_distance")}),
pairs AS (SELECT role, a, b, anchor FROM b UNION SELECT role, a, b, anchor FROM k)
SELECT CASE p.role WHEN 'siblings' THEN 'data order' ELSE 'initialisation' END AS source,
       r.variant, r.seed, CASE WHEN p.role = 'siblings' THEN c.epoch END AS spawn_epoch,
       CASE WHEN p.role = 'siblings' THEN c.frac END AS spawn_frac, p.a AS checkpoint_a, p.b AS checkpoint_b,
       {", ".join(f"b.{c}" for c in BARRIER_COLUMNS)}, k.kernel_distance
FROM pairs p JOIN checkpoint c ON c.id = p.anchor JOIN run r ON r.id = c.run_id
LEFT JOIN b ON b.role = p.role AND b.a = p.a AND b.b = p.b
LEFT JOIN k ON k.role = p.role AND k.a = p.a AND k.b = p.b
ORDER BY source, r.variant, r.seed, spawn_epoch NULLS LAST, checkpoint_a, checkpoint_b"""


def determinism(session):
    """Every measured pair of final checkpoints, by source of difference (module docstring)."""
    return session.sql(SQL)


def summary(session):
    """Per variant and source (and spawn time for data order): the pairs' mean of each measure."""
    measures = [*BARRIER_COLUMNS, "kernel_distance"]
    return session.sql(
        f"SELECT source, variant, spawn_epoch, spawn_frac, count(*) AS pairs, "
        + ", ".join(f"avg({m}) AS {m}" for m in measures)
        + f" FROM ({SQL}) GROUP BY ALL ORDER BY source, variant, spawn_epoch NULLS LAST")

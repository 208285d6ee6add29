"""Every probe job records what it used: ``probe_job.peak_memory_mb`` (``PeakMemory``) and
``probe_job.threads``; logs written before those columns replay with nulls."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lsdb.probes.worker import PeakMemory

MB = 2**20


def test_the_cpu_sampler_sees_a_transient_allocation():
    """200 MiB held for a moment inside the window: the peak is about that far above the baseline
    (the allocator may reuse a few pages it held already), though the memory is freed before
    ``stop``."""
    with PeakMemory("cpu") as memory:
        big = torch.ones(200 * MB // 4, dtype=torch.float32)  # ones, not empty: the pages are touched
        time.sleep(0.1)  # ten sampling intervals
        del big
    assert memory.baseline_mb > 0
    assert memory.peak_mb - memory.baseline_mb >= 190


def test_the_sampler_stops_when_the_job_raises():
    memory = PeakMemory("cpu")
    with pytest.raises(RuntimeError):
        with memory:
            raise RuntimeError("a job that fails")
    assert memory._thread is None and memory.peak_mb >= memory.baseline_mb > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_peak_is_max_allocated_during_the_job():
    dev = torch.device("cuda")
    held = torch.ones(64 * MB // 4, device=dev)  # allocated before the job: part of both figures
    with PeakMemory(dev) as memory:
        big = torch.ones(200 * MB // 4, device=dev)
        del big
    assert memory.peak_mb - memory.baseline_mb == pytest.approx(200, abs=1)
    assert memory.baseline_mb >= 64
    del held


@pytest.mark.slow
def test_every_job_records_its_peak_memory_and_threads_and_older_logs_replay(tmp_path):
    import lsdb
    from lsdb import runner
    from lsdb.integrity import rebuild
    from lsdb.plan import parse_spec
    from lsdb.store import Store
    from tests.conftest import TINY_SPEC

    store = Store.init(tmp_path / "store")
    assert runner.run(parse_spec(TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]")), store).ok
    jobs = lsdb.open(store.root).sql("SELECT state, peak_memory_mb, threads FROM probe_job").rows()
    assert jobs and all(state == "done" for state, _, _ in jobs)
    assert all(peak > 0 and threads >= 1 for _, peak, threads in jobs)

    old, bad, worse = sorted(p for p in store.ingested.iterdir() if (p / "eval.parquet").exists())[:3]
    edits = ((old, lambda job: (job.pop("peak_memory_mb"), job.pop("threads"))),
             (bad, lambda job: job.update(threads=0)), (worse, lambda job: job.update(peak_memory_mb=-1.0)))
    for shard, edit in edits:
        meta = json.loads((shard / "meta.json").read_text())
        edit(meta["job"])
        (shard / "meta.json").write_text(json.dumps(meta))
    report = rebuild(store)
    reasons = sorted(report.ingest.rejected)
    assert len(reasons) == 2
    assert any("job threads 0 is not a positive count" in r for r in reasons), reasons
    assert any("job peak_memory_mb -1.0 is not a size in MiB" in r for r in reasons), reasons
    old_id = json.loads((old / "meta.json").read_text())["job"]["id"]
    row = lsdb.open(store.root).sql(f"SELECT peak_memory_mb, threads FROM probe_job WHERE id = '{old_id}'").rows()
    assert row == [(None, None)]


def test_a_store_without_the_columns_gains_them(tmp_path):
    import sqlalchemy as sa

    from lsdb.store import Store

    store = Store.init(tmp_path / "store")
    with store.write() as conn:  # a schema-2 store, written before the columns existed
        for view in [r[0] for r in conn.execute(sa.text("SELECT view_name FROM duckdb_views() WHERE NOT internal"))]:
            conn.execute(sa.text(f'DROP VIEW "{view}"'))
        for index in ("ix_probe_job_probe", "ix_probe_job_checkpoint_id"):  # DuckDB alters no indexed table
            conn.execute(sa.text(f"DROP INDEX {index}"))
        for column in ("peak_memory_mb", "threads"):
            conn.execute(sa.text(f"ALTER TABLE probe_job DROP COLUMN {column}"))
        conn.execute(sa.text("UPDATE schema_version SET version = 2"))
    store.migrate()
    with store.read() as con:
        columns = {r[0]: r[1] for r in con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'probe_job'").fetchall()}
    assert columns["peak_memory_mb"] == "DOUBLE" and columns["threads"] == "INTEGER"


# ------------------------------------------------------------------- lsdb plan's memory estimates

def _net(globs=()):
    from lsdb.probes import _ntk_core as core
    from tests import tiny_cases as tc

    model, state, data = tc.case("cnn").build()
    return core.bind(model.float(), {k: v.float() for k, v in state.items()}, "cpu", torch.float32, globs), \
        data.x_train.float()


@pytest.mark.parametrize("variant", ["full", "trace", "sum_logits"])
@pytest.mark.parametrize("cache_blocks", [0, 2, 9])
def test_the_ntk_estimate_counts_the_tensors_ntk_allocates(variant, cache_blocks, monkeypatch):
    """Kernel, Jacobian block and the blocks the cache keeps, as ``_ntk_core.ntk`` allocates them."""
    from lsdb.plan import ntk_memory
    from lsdb.probes import _ntk_core as core

    net, x = _net()
    chunk, n = 2, x.shape[0]
    block = core.jacobian(net, x[:chunk], variant == "sum_logits")
    cache_mb = (cache_blocks * block.nbytes + 1) / 2**20
    held = []

    class Spy(core._JacobianCache):
        def get(self, k):
            out = super().get(k)
            held.append(len(self.held))
            return out

    monkeypatch.setattr(core, "_JacobianCache", Spy)
    kernel = core.ntk(net, x, variant, "jacobian", chunk, cache_mb)
    est = ntk_memory(n, 3, net.num_params, variant, chunk, cache_mb)
    assert est["kernel_bytes"] == kernel.nbytes
    assert est["block_bytes"] == block.nbytes
    assert est["blocks"] == len(core._blocks(n, chunk)) == 5
    assert est["cached_blocks"] == max(held) == min(cache_blocks, 5)


def test_the_kernel_accuracy_estimate_counts_the_probe_sets_jacobian():
    from lsdb.plan import kernel_accuracy_memory
    from lsdb.probes import _ntk_core as core

    net, x = _net(("features.2.*",))
    whole = torch.cat([core.jacobian(net, x[b]) for b in core._blocks(x.shape[0], 4)])
    est = kernel_accuracy_memory(x.shape[0], 3, net.num_params, ("kernel_regression",), chunk=4)
    assert est["jacobian_bytes"] >= 2 * whole.nbytes  # the blocks and their concatenation
    assert est["total_bytes"] > est["jacobian_bytes"] + est["kernel_bytes"]
    lin = kernel_accuracy_memory(x.shape[0], 3, net.num_params, ("linearised",), chunk=4)
    assert lin["jacobian_bytes"] == 2 * core.jacobian(net, x[:4]).nbytes and lin["kernel_bytes"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["ntk", "kernel_accuracy"])
def test_the_estimate_bounds_the_measured_peak(probe, tmp_path):
    """The estimate tracks the RSS a job adds on the CPU: not below 70 % of it, and above it by no
    more than what the C allocator keeps of freed small blocks (tens of MiB that RSS still counts)."""
    from lsdb.plan import kernel_accuracy_memory, ntk_memory
    from lsdb.probes import kernel_accuracy, ntk
    from lsdb.train.models import CNN1d
    from tests import tiny_cases as tc

    torch.manual_seed(0)
    model = CNN1d((1, 40), 10, width=64)  # 28k parameters
    P = sum(p.numel() for p in model.parameters())
    data = tc.random_data(256, 64, (1, 40), 10, dtype=torch.float32)
    ctx = tc.context(model, data, tmp_path, probe_indices=torch.arange(256), dtype=torch.float32,
                     runs=[tc.run_ref("r", [0])])
    if probe == "ntk":
        from lsdb.probes._ntk_core import trace_layout

        layout = trace_layout(model, [n for n, _ in model.named_parameters()], (1, 40), 10)
        assert layout[0] < P  # the late convolution and the read-out take their kernels from signals
        est = ntk_memory(256, 10, P, "trace", 64, 200.0, layout=layout)
        module, params = ntk, ntk.Params(chunk=64, cache_mb=200.0)
    else:
        est = kernel_accuracy_memory(256, 10, P, ("kernel_regression",), chunk=64)
        module, params = kernel_accuracy, kernel_accuracy.Params(methods=("kernel_regression",), chunk=64)
    with PeakMemory("cpu", interval=0.002) as memory:
        module.compute(ctx, params)
    used = (memory.peak_mb - memory.baseline_mb) * 2**20
    assert 0.7 * est["total_bytes"] <= used <= 1.05 * est["total_bytes"] + 64 * MB, (used / MB, est["total_bytes"] / MB)


def test_plan_refuses_a_job_that_cannot_fit_naming_the_sizes():
    from lsdb.errors import SpecError
    from lsdb.plan import check_memory, memory_estimates, parse_spec
    from tests.conftest import TINY_SPEC

    spec = parse_spec(TINY_SPEC + '\n[probes.ntk]\nvariant = "full"\nparams = ["net.2.*"]\n')
    (est,) = memory_estimates(spec)
    # the tiny MLP: 64 → 32 → 10 on digits; net.2 is the read-out, 32·10 + 10 parameters
    assert (est.probe, est.n, est.classes, est.params, est.kernel_variant) == ("ntk", 32, 10, 330, "full")
    assert est.kernel_bytes == (32 * 10) ** 2 * 4
    assert "Jacobian in 1 block of 32 inputs" in est.describe()
    check_memory([est], available=est.total_bytes)
    with pytest.raises(SpecError) as err:
        check_memory([est], available=est.total_bytes // 2)
    msg = str(err.value)
    assert msg.startswith("probe ntk needs about ") and "is available (given)" in msg
    assert "lower data.probe_set_size" in msg and "\n" not in msg


def test_plan_names_a_glob_that_matches_no_parameter():
    from lsdb.errors import SpecError
    from lsdb.plan import check_scopes, parse_spec
    from tests.conftest import TINY_SPEC

    check_scopes(parse_spec(TINY_SPEC + '\n[probes.hessian]\nparams = ["net.0.*"]\n'))
    with pytest.raises(SpecError, match=r"probes.flatness.params: 'layer3.\*' matches no parameter of the model; "
                                        r"its parameters are net.0.weight, net.0.bias"):
        check_scopes(parse_spec(TINY_SPEC + '\n[probes.flatness]\nparams = ["layer3.*"]\n'))


def test_available_memory_is_known_on_linux():
    import sys

    from lsdb.plan import available_memory

    size, where = available_memory("cpu")
    if sys.platform.startswith("linux"):
        assert size > 0 and where == "MemAvailable"


def test_the_trace_estimate_counts_per_layer_signals_not_the_jacobian():
    """The ``auto`` trace NTK holds per-layer signals for layers whose kernel is cheaper from them:
    the tiny MLP (64 → 32 → 10) takes every layer's that way, C·out + in floats per input each."""
    from lsdb.plan import memory_estimates, parse_spec
    from tests.conftest import TINY_SPEC

    (est,) = memory_estimates(parse_spec(TINY_SPEC + '\n[probes.ntk]\nvariant = "trace"\n'))
    b = min(est.chunk, est.n)
    assert est.block_bytes == b * ((10 * 32 + 64) + (10 * 10 + 32)) * 4
    (full,) = memory_estimates(parse_spec(TINY_SPEC + '\n[probes.ntk]\nvariant = "full"\n'))
    assert full.block_bytes == b * 10 * est.params * 4  # the full kernel keeps the Jacobian

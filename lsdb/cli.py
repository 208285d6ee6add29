"""The ``lsdb`` command line. Each command parses options, makes one library call and prints.

Errors that are the user's input (``LsdbError``) become one line on stderr and exit code 1.
torch is never imported at module level, so ``lsdb --help`` starts fast.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lsdb import cli_query
from lsdb.cli_common import (ExperimentOpt, Format, FormatOpt, HelpGroup, OutOpt, StoreOpt, VariantOpt, VersionOpt,
                             emit, emit_batches, emit_sections)
from lsdb.errors import LsdbError

app = typer.Typer(
    name="lsdb",
    help="A declarative experiment database for loss-landscape research.\n\n"
    "Declare an experiment in TOML; `lsdb run` trains what is missing, probes every checkpoint "
    "(NTK, barriers, Hessian, flatness …) and stores every number in DuckDB; `lsdb sql`, "
    "`lsdb correlate`, `lsdb findings` and `lsdb chart` answer questions.\n\n"
    "\b\nQuick start:\n"
    "  lsdb run examples/quick.toml\n"
    "  lsdb sql \"SELECT * FROM metric_series LIMIT 5\"",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: text as written ([i] is not Rich markup) and paragraphs re-flowed
    rich_markup_mode=None,
    cls=HelpGroup,
)


@app.callback()
def _options(version: VersionOpt = False) -> None:
    """Options given before the command (lsdb --version)."""

SpecArg = Annotated[Path, typer.Argument(help="Experiment spec (TOML). See README, 'The spec'.", show_default=False)]
WorkersOpt = Annotated[int, typer.Option("--workers", "-w", min=1, help="Worker processes (1 = run inline).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="Torch device for probes (default: cuda if present, else cpu).")]


@app.command()
def init(store: StoreOpt = None):
    """Create a store (a directory with lsdb.duckdb, checkpoints/, spool/, artifacts/, exports/)."""
    from lsdb.store import Store

    s = Store.init(store)
    typer.echo(f"store ready at {s.root}")


@app.command()
def plan(spec: SpecArg, store: StoreOpt = None,
         manifest: Annotated[Optional[Path], typer.Option(
             help="Also write the probe jobs ready now as JSON lines, for `lsdb worker` on other machines.")] = None):
    """Print what `lsdb run SPEC` would do (runs to train, checkpoints and probe jobs missing)."""
    from lsdb import runner
    from lsdb.plan import MAX_ATTEMPTS, check_memory, check_scopes, load_spec, memory_estimates
    from lsdb.store import Store, resolve_store_path

    sp = load_spec(spec)
    st = Store(resolve_store_path(store))  # planning creates nothing
    if manifest is not None:
        from lsdb.probes.manifest import write_manifest

        n = write_manifest(runner.ready_jobs(sp, st), manifest)
        typer.echo(f"wrote {n} ready probe jobs to {manifest}; run them with: lsdb worker {manifest} --store {st.root}")
    p = runner.plan(sp, st)
    typer.echo(f"experiment {sp.name} ({p.experiment_id[:12]}): {p.runs_total} runs declared")
    if not st.db_path.exists():
        typer.echo(f"store {st.root} does not exist yet: `lsdb run` will create it")
    if p.nothing_to_do:
        typer.echo("nothing to do: the store holds everything this spec declares")
        return
    parents = sum(r.kind == "parent" for r in p.runs_to_train)
    finetunes = sum(r.kind == "finetune" for r in p.runs_to_train)
    typer.echo(f"  runs to train:       {len(p.runs_to_train)} ({parents} parents, "
               f"{len(p.runs_to_train) - parents - finetunes} children"
               + (f", {finetunes} fine-tunes)" if finetunes else ")"))
    typer.echo(f"  checkpoints missing: {p.checkpoints_missing}"
               + (f" ({p.checkpoints_damaged} stored but damaged, to retrain)" if p.checkpoints_damaged else ""))
    typer.echo(f"  probe jobs missing:  {p.jobs_missing}" + ("" if not p.jobs_by_probe else
               "  (" + ", ".join(f"{k}: {v}" for k, v in sorted(p.jobs_by_probe.items())) + ")"))
    if p.jobs_given_up:
        typer.echo(f"  probe jobs given up: {p.jobs_given_up} (failed {MAX_ATTEMPTS} times; see lsdb jobs --failed)")
    check_scopes(sp)  # a params glob that matches no parameter of the model: one line now, not per job
    estimates = memory_estimates(sp)
    for e in estimates:
        typer.echo(f"  memory: {e.describe()}")
    check_memory(estimates)  # names the probe, the size it needs and the memory available
    typer.echo("probes that need other probes' results (e.g. ntk_distance) are planned once those exist")


@app.command()
def run(spec: SpecArg, store: StoreOpt = None, workers: WorkersOpt = 1, device: DeviceOpt = None,
        progress: Annotated[bool, typer.Option(help="Show progress on stderr: bars on a terminal, otherwise "
                                                       "a line every 10 % or 30 s.")] = True,
        probes: Annotated[bool, typer.Option(help="Run probe jobs (--no-probes: train only, e.g. to probe "
                                                  "elsewhere with `lsdb plan --manifest` and `lsdb worker`).")] = True,
        executor: Annotated[Optional[str], typer.Option(
            help="inline, process or ray (default: inline for --workers 1, else process). ray runs each job "
                 "as a Ray task: pip install 'lsdb[ray]'; see docs/cluster.md.", show_default=False)] = None,
        address: Annotated[Optional[str], typer.Option(
            help="Ray cluster to join: auto or HOST:PORT (default: $RAY_ADDRESS, else a local Ray with "
                 "--workers CPUs).",
            show_default=False)] = None,
        gpus_per_job: Annotated[Optional[float], typer.Option(
            help="GPUs each Ray probe task asks for (default: 1 where the cluster has GPUs, else 0).",
            show_default=False)] = None,
        path: Annotated[Optional[list[Path]], typer.Option(
            "--path", help="A folder holding the modules of the spec's model or data factory (repeatable; "
                           "added to $LSDB_PATH, which worker processes inherit).", show_default=False)] = None):
    """Train and probe everything SPEC declares that the store lacks. Safe to interrupt and rerun.

    Checkpoint files that were lost or altered are retrained first. Exits 1 when a probe job
    failed or was given up (failed 3 times), naming the jobs."""
    from lsdb import runner
    from lsdb.plan import load_spec
    from lsdb.store import Store, resolve_store_path
    from lsdb.train.factories import add_import_path

    add_import_path(*map(str, path or []))
    sp = load_spec(spec)
    st = Store(resolve_store_path(store))  # created under the store's lock, by runner.run
    s = runner.run(sp, st, workers=workers, device=device, progress="auto" if progress else None, probes=probes,
                   executor=executor, address=address, gpus_per_job=gpus_per_job)
    _report_run(s)


def _report_run(s) -> None:
    """Print a run's summary; exit 1 when anything failed."""
    if s.nothing_to_do:
        typer.echo("nothing to do: the store holds everything this spec declares")
    else:
        typer.echo(f"trained {s.trained} runs ({s.checkpoints} checkpoints"
                   + (f", {s.repaired} damaged ones restored" if s.repaired else "")
                   + f"); probe jobs: {s.jobs_done} done, {s.jobs_skipped} skipped, {s.jobs_failed} failed; "
                   f"{s.seconds:.1f} s")
    for d in s.diverged:
        typer.echo(f"diverged: {d}")
    for f in s.failures[:20]:
        typer.echo(f"failed: {f}", err=True)
    for p in s.problems[:20]:
        typer.echo(f"not restored: {p}", err=True)
    for r in s.rejected[:20]:
        typer.echo(f"rejected (moved to spool/rejected/): {r}", err=True)
    if s.given_up:
        typer.echo(f"given up: {len(s.given_up)} probe jobs failed 3 times and are not retried "
                   f"(lsdb jobs --failed shows them whole):", err=True)
        for g in s.given_up[:20]:
            typer.echo(f"  {g}", err=True)
    if not s.ok:
        raise typer.Exit(1)


@app.command()
def demo(quick: Annotated[bool, typer.Option("--quick", help="The reduced study (a few minutes on 2 cores).")] = False,
         store: StoreOpt = None, workers: WorkersOpt = 2, device: DeviceOpt = None,
         progress: Annotated[bool, typer.Option(help="Show progress on stderr: bars on a terminal, otherwise "
                                                        "a line every 10 % or 30 s.")] = True,
         report: Annotated[Optional[Path], typer.Option(help="Also write the offline HTML report here.")] = None):
    """Run the embedded Fort et al. (2020) style study on MNIST-1D and print the findings table."""
    from lsdb.demo import demo_spec, run_demo
    from lsdb.query.findings import as_text
    from lsdb.store import Store, resolve_store_path

    st = Store(resolve_store_path(store))
    sp = demo_spec(quick)
    typer.echo(f"running {sp.name} into {st.root} (rerun to resume; nothing is redone)")
    s, results = run_demo(st, quick=quick, workers=workers, device=device,
                          progress="auto" if progress else None)
    typer.echo(as_text(results))
    if report is not None:
        from lsdb.query.report import report as write_report
        from lsdb.query.session import Session

        write_report(Session(st).within(sp.identity()), report)
        typer.echo(f"report written to {report}")
    _report_run(s)  # as lsdb run: failed, given-up and rejected work named, and exit 1


@app.command()
def ingest(store: StoreOpt = None):
    """Ingest result shards waiting in the store's spool/ (e.g. written by `lsdb worker` elsewhere)."""
    from lsdb.ingest.ingest import ingest as do_ingest
    from lsdb.store import Store, resolve_store_path

    st = Store(resolve_store_path(store))
    with st.lock("lsdb ingest"):
        Store.open(st.root)
        r = do_ingest(st)
    typer.echo(f"ingested {r.shards} shards: {r.checkpoints} checkpoints, {r.jobs} probe jobs, "
               f"{r.result_rows} result rows ({r.skipped_known} already stored)")
    for line in r.rejected:
        typer.echo(f"rejected (moved to spool/rejected/): {line}", err=True)
    if r.rejected:
        raise typer.Exit(1)


@app.command("import")
def import_(folder: Annotated[Path, typer.Argument(help="Folder of state dicts (safetensors or torch.save files).",
                                                  show_default=False)],
            spec: Annotated[Path, typer.Option("--spec", help="The spec whose model the files are, and that "
                                               "will probe them.", show_default=False)],
            pattern: Annotated[str, typer.Option(help="File names, with {epoch} or {step} where the time is.")]
            = "epoch_{epoch}.pt",
            seed: Annotated[int, typer.Option(help="The spec's seed the run stands for.")] = 0,
            variant: Annotated[str, typer.Option(help="The spec's variant the run stands for.")] = "base",
            store: StoreOpt = None):
    """Register checkpoints you trained elsewhere as the spec's parent run (for one seed and
    variant), so that `lsdb run SPEC` probes them and spawns the spec's children from them.

    Files are read without pickle (safetensors, or torch.load with weights_only=True) and must fit
    the spec's model and cover its checkpoint schedule for that run; every error names the file.
    Importing the same files again changes nothing.

    Example: lsdb import runs/seed0 --spec mine.toml --pattern 'step_{step}.pt'
    """
    from lsdb.ingest.importer import import_checkpoints
    from lsdb.plan import load_spec

    r = import_checkpoints(store, load_spec(spec), folder, pattern, seed=seed, variant=variant)
    typer.echo(f"run {r.run_id}: {len(r.imported)} checkpoints imported, {len(r.known)} already stored; "
               f"probe them with: lsdb run {spec}")


@app.command()
def check(store: StoreOpt = None):
    """Verify the store; print what is wrong and exit 1 if anything is.

    Checks every checkpoint file (present, matching its hash), orphan rows, each job's identity and
    state, and that every shard of the ingested log is in the database."""
    from lsdb.integrity import check as do_check
    from lsdb.store import Store

    r = do_check(Store.open(store))
    for note in r.notes:
        typer.echo(f"note: {note}")
    for p in r.problems:
        typer.echo(f"problem: {p}")
    typer.echo(f"checked {r.checkpoints} checkpoints, {r.jobs} probe jobs, {r.log_shards} log shards: "
               + ("all consistent" if r.ok else f"{len(r.problems)} problems"))
    if not r.ok:
        raise typer.Exit(1)


@app.command()
def rebuild(store: StoreOpt = None):
    """Recreate the database from the ingested log, e.g. when lsdb.duckdb will not open.

    Replays every shard of spool/ingested/ into a new database; the old file is kept as
    lsdb.duckdb.broken-<time>."""
    from lsdb.integrity import rebuild as do_rebuild
    from lsdb.store import Store, resolve_store_path

    st = Store(resolve_store_path(store))
    with st.lock("lsdb rebuild"):
        r = do_rebuild(st)
    if r.moved_to:
        typer.echo(f"old database kept as {r.moved_to}")
    typer.echo(f"rebuilt {st.db_path} from {r.ingest.shards} shards: {r.ingest.experiments} experiments, "
               f"{r.ingest.runs} run rows and statuses, {r.ingest.checkpoints} checkpoints, {r.ingest.jobs} "
               f"probe jobs, {r.ingest.result_rows} result rows; verify with: lsdb check --store {st.root}")
    for line in r.ingest.rejected:
        typer.echo(f"not ingested: {line}", err=True)


@app.command()
def worker(manifest: Annotated[Path, typer.Argument(help="A job manifest written by `lsdb plan SPEC --manifest FILE`.")],
           store: StoreOpt = None, device: DeviceOpt = None,
           shard: Annotated[str, typer.Option(help="Run every n-th job starting at i (i/n), to split a manifest "
                                                   "across machines.")] = "0/1"):
    """Run probe jobs from a manifest, writing result shards to the store's spool/ (never the database).
    Then `lsdb ingest` on the coordinating machine."""
    from lsdb.errors import LsdbError
    from lsdb.probes.manifest import run_manifest
    from lsdb.store import resolve_store_path

    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise LsdbError(f"--shard {shard!r}: expected i/n, e.g. 0/4") from None
    counts = run_manifest(resolve_store_path(store), manifest, (i, n), device)
    typer.echo("jobs: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none to run") +
               "; ingest them with: lsdb ingest")


@app.command()
def submit(spec: SpecArg, store: StoreOpt = None,
           slurm: Annotated[bool, typer.Option("--slurm", help="Submit to Slurm (the only scheduler so far).")] = False,
           array_size: Annotated[int, typer.Option(help="Probe tasks in the array (each runs every N-th job).")] = 4,
           gpus: Annotated[int, typer.Option(help="GPUs per probe task (0: CPU).")] = 0,
           cpus: Annotated[int, typer.Option(help="CPU cores per task.")] = 2,
           time: Annotated[str, typer.Option(help="Time limit per job (Slurm's --time).")] = "04:00:00",
           partition: Annotated[Optional[str], typer.Option(help="Slurm partition.", show_default=False)] = None,
           folder: Annotated[Optional[Path], typer.Option(
               "--dir", help="Where to write the scripts, manifest and logs (default: STORE/slurm/SPEC-NAME).",
               show_default=False)] = None,
           dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the scripts; write and submit nothing.")]
           = False):
    """Run SPEC on a Slurm cluster as three chained jobs: training (lsdb run --no-probes, then the
    probe manifest), an array of probe workers, and a final lsdb run that ingests their shards and
    runs whatever is left. Every node must see the store directory.

    Example: lsdb submit examples/quick.toml --slurm --array-size 8 --gpus 1 --dry-run
    """
    from lsdb.plan import load_spec
    from lsdb.store import resolve_store_path
    from lsdb.submit import SlurmPlan, scripts, submit as do_submit

    if not slurm:
        raise LsdbError("choose a scheduler: lsdb submit SPEC --slurm (for Ray: lsdb run SPEC --executor ray)")
    sp = load_spec(spec)  # a bad spec fails here, not hours later on the cluster
    root = resolve_store_path(store)
    plan = SlurmPlan(spec=spec, store=root, folder=folder or root / "slurm" / sp.name, array_size=array_size,
                     gpus=gpus, cpus=cpus, time=time, partition=partition)
    if dry_run:
        for name, text in scripts(plan).items():
            typer.echo(f"# ---- {plan.folder / name}\n{text}")
        return
    typer.echo(do_submit(plan))


@app.command()
def sql(query: Annotated[str, typer.Argument(help="A read-only SQL query (DuckDB dialect).")],
        store: StoreOpt = None, experiment: ExperimentOpt = None, variant: VariantOpt = None,
        format: FormatOpt = Format.table, out: OutOpt = None,
        allow_files: Annotated[bool, typer.Option(
            "--allow-files", help="Let the query read local files (read_csv, read_parquet, ...); "
                                  "writing stays refused.")] = False):
    """Run a read-only SQL query: SELECT, WITH, PIVOT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN and
    read-only PRAGMAs; anything that writes or changes a setting is refused. Tables: experiment,
    experiment_run, run, checkpoint, probe_job, one per probe; the views metric_series(run_id,
    checkpoint_id, step, epoch, frac, metric, value, experiment) and experiment_current. With
    --experiment every table holds only that experiment's rows."""
    from lsdb.query.session import Session

    db = Session.open(store, experiment, variant)
    if format in (Format.csv, Format.parquet) and out is not None:
        _stream(db, query, format, out, allow_files)
        return
    emit(db.sql(query, allow_files=allow_files), format, out)


def _stream(db, query, format, out, allow_files=False):
    """Large exports stream in record batches instead of building one frame in memory."""
    emit_batches(db.sql_batches(query, allow_files=allow_files), format, out)


@app.command()
def experiments(store: StoreOpt = None, format: FormatOpt = Format.table, out: OutOpt = None):
    """List the experiments in the store: name, id, data set, runs, when recorded, and whether it
    is the current version of its name (editing a spec records a new version)."""
    from lsdb.query.session import Session

    emit(Session.open(store).experiments(), format, out)


@app.command()
def runs(store: StoreOpt = None, experiment: ExperimentOpt = None, variant: VariantOpt = None,
         format: FormatOpt = Format.table, out: OutOpt = None):
    """List the runs with their experiment, data set, model, status and final test error."""
    from lsdb.query.session import Session

    emit(Session.open(store, experiment, variant).runs(), format, out)


@app.command()
def show(run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
         store: StoreOpt = None, experiment: ExperimentOpt = None, format: FormatOpt = Format.table,
         out: OutOpt = None):
    """Show one run: hyperparameters and checkpoints (JSON: one document {run, checkpoints}; CSV
    and parquet: the checkpoints, the run's own row being in lsdb runs)."""
    from lsdb.query.session import Session

    info, checkpoints = Session.open(store, experiment).show(run_id)
    if format == Format.json:
        emit_sections({"run": info, "checkpoints": checkpoints}, out)
        return
    if format == Format.table:
        for k, v in info.row(0, named=True).items():
            typer.echo(f"{k:>22}: {v}")
    emit(checkpoints, format, out)


@app.command()
def metrics(store: StoreOpt = None, experiment: ExperimentOpt = None, variant: VariantOpt = None,
            format: FormatOpt = Format.table, out: OutOpt = None):
    """List the metrics in metric_series: the table each is read from, what alike-looking names
    mean (test_error is the trainer's, eval_test_error the eval probe's), values and runs."""
    from lsdb.query.session import Session

    emit(Session.open(store, experiment, variant).metrics(), format, out)


@app.command()
def jobs(store: StoreOpt = None, experiment: ExperimentOpt = None,
         failed: Annotated[bool, typer.Option(help="Only failed or skipped jobs.")] = False,
         format: FormatOpt = Format.table, out: OutOpt = None):
    """Probe jobs by probe and state (with --failed: each failed job and its error)."""
    from lsdb.query.session import Session

    db = Session.open(store, experiment)
    if failed:
        emit(db.sql("SELECT id, probe, role, state, attempts, error FROM probe_job WHERE state <> 'done' "
                    "ORDER BY probe"), format, out)
    else:
        emit(db.sql("SELECT probe, state, count(*) AS jobs, round(sum(seconds), 2) AS seconds FROM probe_job "
                    "GROUP BY ALL ORDER BY probe, state"), format, out)


cli_query.register(app)


def environment_error(e: BaseException) -> str | None:
    """One line for a failure of the machine rather than of lsdb or its input: a full disk, a
    read-only or unwritable store, a database file the OS will not give us. None for anything else
    (a bug keeps its traceback). Nothing stored is lost in these cases: rerun after fixing them."""
    orig = getattr(e, "orig", None) or e  # SQLAlchemy wraps the driver's error
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if isinstance(orig, OSError):
        where = f" ({orig.filename})" if orig.filename else ""
        what = orig.strerror or text
        if orig.errno == errno.ENOSPC:
            return f"disk full{where}: free some space and rerun; nothing stored was lost"
        return f"{what}{where}: fix it and rerun; nothing stored was lost"
    if type(orig).__module__.split(".")[0] in ("duckdb", "_duckdb") and type(orig).__name__ in (
            "IOException", "PermissionException", "OutOfMemoryException"):
        if "No space left" in text:
            return f"disk full while writing the database ({text}): free some space and rerun; nothing stored was lost"
        return f"the database could not be written ({text}): fix it and rerun; nothing stored was lost"
    return None


def main() -> None:
    """Console entry point: user errors → one line on stderr, exit code 1."""
    try:
        code = app(prog_name="lsdb", standalone_mode=False)  # not "python -m lsdb" or __main__.py
    except LsdbError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to finish the work", err=True)
        sys.exit(130)
    except Exception as e:
        code = getattr(e, "exit_code", None)
        if code is not None:  # usage errors and exits from Typer's (vendored) click
            if hasattr(e, "show"):
                e.show()
            sys.exit(code)
        message = environment_error(e)  # the machine failed lsdb: full disk, read-only store …
        if message is None:
            raise
        typer.echo(f"error: {message}", err=True)
        sys.exit(1)
    if isinstance(code, int) and code:  # typer.Exit(n) from a command, e.g. `lsdb check` finding problems
        sys.exit(code)


if __name__ == "__main__":
    main()

"""``Recorder``: store checkpoints of a training loop you write yourself.

The spec still declares the data, the architecture and the probes; you own the loop. The recorded
run gets the id lsdb would give the spec's parent run for that seed, so a later ``lsdb run SPEC``
sees it finished, spawns the spec's children from your checkpoints (record the spawn steps, with
your SGD optimiser) and runs every probe::

    from lsdb.ingest.recorder import Recorder
    with Recorder("lsdb-store", "my.toml", seed=0) as rec:
        model = rec.model()                      # the spec's architecture, seeded
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(rec.total_steps + 1):
            if step in rec.save_steps:
                rec.checkpoint(model, step, opt)  # weights + optimiser state + train/test loss, error
            if step < rec.total_steps:
                ...                              # your training step
    # then: lsdb run my.toml   (children and probes only)

The recorder holds the store's lock while it is open and ingests each checkpoint at once.
"""

from __future__ import annotations

from lsdb.errors import LsdbError
from lsdb.ids import checkpoint_id
from lsdb.ingest.ingest import ingest
from lsdb.ingest.record import record_experiment
from lsdb.plan import expand_runs, load_spec
from lsdb.spec import Spec
from lsdb.spool import write_checkpoint_shard, write_status_shard
from lsdb.store import Store, resolve_store_path


class Recorder:
    def __init__(self, store, spec, seed: int = 0, variant: str = "base"):
        from lsdb.train.data import load_data

        self.store = store if isinstance(store, Store) else Store(resolve_store_path(store))
        self.spec = spec if isinstance(spec, Spec) else load_spec(spec)
        self.data = load_data(self.spec.data)
        self._runs = expand_runs(self.spec, self.data.x_train.shape[0])
        matches = [r for r in self._runs if r.kind == "parent" and r.seed == seed and r.variant == variant]
        if not matches:
            seeds = sorted({r.seed for r in self._runs if r.variant == variant})
            raise LsdbError(f"the spec declares no parent run for seed {seed} in variant '{variant}' "
                            f"(its seeds: {seeds}); add the seed to [experiment] seeds")
        self.run = matches[0]
        self._lock = None
        self._shapes = None  # the spec's model, built once, to check what checkpoint() is given

    # --------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "Recorder":
        self._lock = self.store.lock("lsdb Recorder")
        self._lock.__enter__()
        try:
            self.store.create()
            record_experiment(self.spec, self.store, self._runs)
        except BaseException:
            self._lock.__exit__(None, None, None)
            self._lock = None
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.finish()
        finally:
            self._lock.__exit__(exc_type, exc, tb)
            self._lock = None
        return False

    # ------------------------------------------------------------------------------- facts
    @property
    def run_id(self) -> str:
        return self.run.id

    @property
    def total_steps(self) -> int:
        return self.run.total_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.run.steps_per_epoch

    @property
    def save_steps(self) -> tuple[int, ...]:
        """The spec's checkpoint schedule (spawn steps included); you may record other steps too."""
        return self.run.save_steps

    def model(self):
        """The spec's architecture, initialised with the run's seed as lsdb's trainer would."""
        from lsdb.train.models import build_model

        return build_model(self.run.config.model, self.data.input_shape, self.data.num_classes, seed=self.run.seed)

    def _reference(self):
        """The spec's model for shape checks, built once and without touching torch's global
        random state (``model()`` seeds it: at every checkpoint it would reset your loop's)."""
        import torch

        if self._shapes is None:
            with torch.random.fork_rng(devices=[]):
                self._shapes = self.model()
        return self._shapes

    # ------------------------------------------------------------------------------ record
    def checkpoint(self, model, step: int, optimizer=None, lr: float | None = None, *,
                   expected_sha: str | None = None, source=None) -> str:
        """Store ``model``'s weights at ``step`` (and ``optimizer``'s momentum, needed to spawn
        children from this step); returns the checkpoint id. ``expected_sha``: the step is stored
        already with these weights, so nothing is written, and other weights are an error naming
        ``source`` (the file they came from)."""
        from lsdb.errors import SpecError
        from lsdb.train.checkpoints import tensors_sha256
        from lsdb.train.models import check_fits
        from lsdb.train.trainer import save_checkpoint

        self._check_open()
        if not 0 <= step <= self.total_steps:
            raise LsdbError(f"step {step} is outside the run (0..{self.total_steps} steps in the spec)")
        try:
            check_fits(self._reference(), model.state_dict(), "your model")
        except SpecError as e:
            raise LsdbError(f"{e}; build it with rec.model() (the spec's architecture)") from None
        cid = checkpoint_id(self.run.id, step)
        if expected_sha is not None:
            sha = tensors_sha256({k: v.detach() for k, v in model.state_dict().items()})
            if sha != expected_sha:
                raise LsdbError(f"step {step} of run {self.run.id} is stored with other weights; "
                                f"{source or 'these weights'} would replace them (nothing was changed)")
            return cid
        if lr is None:
            lr = optimizer.param_groups[0]["lr"] if optimizer is not None else self.run.config.optim.lr
        was_training = model.training
        model.eval()
        try:
            row = save_checkpoint(self.store.checkpoints, cid, self.run.id, step, self.steps_per_epoch,
                                  self.total_steps, lr, model, optimizer, self.data)
        finally:
            model.train(was_training)
        write_checkpoint_shard(self.store.spool, row)
        ingest(self.store)
        return cid

    def finish(self, status: str = "finished", reason: str | None = None) -> None:
        """Mark the run ended (``finished``, or ``diverged`` with a reason)."""
        self._check_open()
        if status not in ("finished", "diverged"):
            raise LsdbError(f"status must be 'finished' or 'diverged', got {status!r}")
        write_status_shard(self.store.spool, self.run.id, status, reason=reason)
        ingest(self.store)

    def _check_open(self):
        if self._lock is None:
            raise LsdbError("use the recorder in a `with Recorder(...) as rec:` block (it holds the store's lock)")

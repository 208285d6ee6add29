"""``lsdb import``: a folder of checkpoints you trained elsewhere, registered as a parent run of a spec.

The files are state dicts of the spec's model (safetensors, or ``torch.save`` files read with
``torch.load(weights_only=True)``: never pickle), named by a pattern with ``{epoch}`` or ``{step}``.
They become the run the spec declares for that seed and variant, stored content-addressed like
lsdb's own checkpoints (through ``Recorder``), so ``lsdb run SPEC`` then probes them and spawns the
spec's children from them. lsdb never trains an imported run itself, so the files must cover every
step of that run's schedule (step 0, the spawn times, the end); the error lists what is missing and
the ``[checkpoints]`` that matches the files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lsdb.errors import LsdbError, SpecError
from lsdb.ingest.recorder import Recorder
from lsdb.spec import Spec

MAX_FILES = 100_000
_FIELDS = {"epoch": r"(?P<epoch>\d+(?:\.\d+)?)", "step": r"(?P<step>\d+)"}


@dataclass
class ImportReport:
    run_id: str
    imported: list[int] = field(default_factory=list)  # steps newly stored
    known: list[int] = field(default_factory=list)  # steps stored already with the same weights


def import_checkpoints(store, spec: Spec, folder, pattern: str = "epoch_{epoch}.pt", seed: int = 0,
                       variant: str = "base") -> ImportReport:
    """Register the files of ``folder`` matching ``pattern`` as ``spec``'s parent run for ``seed``
    and ``variant``. Importing the same files again changes nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LsdbError(f"no folder {folder} to import")
    with Recorder(store, spec, seed=seed, variant=variant) as rec:
        files = _match(folder, pattern, rec.steps_per_epoch, rec.total_steps)
        missing = sorted(set(rec.save_steps) - set(files))
        if missing:
            raise LsdbError(_coverage_message(folder, pattern, missing, sorted(files), rec.steps_per_epoch))
        stored = _stored(rec)
        report = ImportReport(rec.run_id)
        model = rec.model()
        for step, path in sorted(files.items()):
            state = load_state_dict(path)
            _fit(model, state, path)
            model.load_state_dict(state)
            rec.checkpoint(model, step, expected_sha=stored.get(step), source=path)
            (report.known if step in stored else report.imported).append(step)
    return report


def load_state_dict(path: Path) -> dict:
    """A file's tensors by name, never through pickle; a ``{"state_dict": …}`` or ``{"model": …}``
    wrapper and DataParallel's ``module.`` prefix are taken off."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a tensor file, or one that needs pickle
        raise LsdbError(f"file {path} is not a state dict lsdb can read safely ({type(e).__name__}: "
                        f"{_first(e)})") from None
    if isinstance(state, dict) and len(state) >= 1 and not _tensors(state):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state.get(key), dict) and _tensors(state[key]):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not _tensors(state):
        raise LsdbError(f"file {path} is not a state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _tensors(d: dict) -> bool:
    import torch

    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _fit(model, state: dict, path: Path) -> None:
    from lsdb.train.models import check_fits

    try:
        check_fits(model, state, f"file {path}")
    except SpecError as e:
        raise LsdbError(str(e)) from None


def _match(folder: Path, pattern: str, steps_per_epoch: int, total_steps: int) -> dict[int, Path]:
    """step -> file for every file of ``folder`` whose name matches ``pattern``."""
    regex = _pattern_regex(pattern)
    files: dict[int, Path] = {}
    for n, path in enumerate(sorted(folder.iterdir())):
        if n >= MAX_FILES:
            raise LsdbError(f"{folder} holds more than {MAX_FILES} files; import a smaller folder")
        m = regex.fullmatch(path.name)
        if not m or not path.is_file():
            continue
        if "step" in regex.groupindex:
            step = int(m["step"])
        else:
            epoch = float(m["epoch"])
            step = round(epoch * steps_per_epoch)
            if abs(step - epoch * steps_per_epoch) > 1e-6 * max(1, steps_per_epoch):
                raise LsdbError(f"file {path}: epoch {m['epoch']} is not a whole step ({steps_per_epoch} steps "
                                f"per epoch in the spec); name the files by {{step}}")
        if not 0 <= step <= total_steps:
            raise LsdbError(f"file {path}: step {step} is outside the spec's run (0..{total_steps} steps); "
                            f"check [optim] epochs and batch_size")
        if step in files:
            raise LsdbError(f"files {files[step].name} and {path.name} are both step {step}")
        files[step] = path
    if not files:
        raise LsdbError(f"no file in {folder} matches {pattern!r}")
    return files


def _pattern_regex(pattern: str) -> re.Pattern:
    names = re.findall(r"\{(\w+)\}", pattern)
    if len(names) != 1 or names[0] not in _FIELDS:
        raise LsdbError(f"--pattern {pattern!r} must hold exactly one of {{epoch}} or {{step}}, "
                        f"e.g. 'epoch_{{epoch}}.pt' or 'step_{{step}}.safetensors'")
    before, after = pattern.split("{" + names[0] + "}")
    return re.compile(re.escape(before) + _FIELDS[names[0]] + re.escape(after))


def _coverage_message(folder, pattern, missing, have, steps_per_epoch) -> str:
    epochs = ", ".join(f"{s / steps_per_epoch:g}" for s in have)
    return (f"the files in {folder} ({pattern}) do not cover the spec's schedule for this run: steps "
            f"{', '.join(map(str, missing[:8]))}{' …' if len(missing) > 8 else ''} are missing (lsdb never "
            f"trains an imported run). Make the spec save exactly what you have: [checkpoints] log_points = 0, "
            f"every_epochs = 0, epochs = [{epochs}], [optim] epochs = {have[-1] / steps_per_epoch:g}, and spawn "
            f"times among those epochs; step 0 (the initial weights) is always needed")


def _stored(rec: Recorder) -> dict[int, str]:
    with rec.store.read() as con:
        return dict(con.execute("SELECT step, sha256 FROM checkpoint WHERE run_id = ?", [rec.run_id]).fetchall())


def _first(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"

"""Large arrays (kernel matrices, probe-set indices …) stored by content hash under ``artifacts/``.

``put`` writes ``<sha256>.npy`` atomically (temporary name, fsync, rename) and returns the hash;
``get`` verifies it and raises ``ArtifactCorrupt`` naming the file when it is missing or altered.
Arrays are saved without pickle and loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lsdb.atomic import temp_path
from lsdb.errors import ArtifactCorrupt


class Artifacts:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, sha: str) -> Path:
        return self.root / f"{sha}.npy"

    def put(self, array) -> str:
        import numpy as np

        array = np.ascontiguousarray(array)
        sha = array_sha256(array)
        target = self.path(sha)
        if not target.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(target)
            with open(tmp, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        return sha

    def get(self, sha: str):
        import numpy as np

        target = self.path(sha)
        if not target.exists():
            raise ArtifactCorrupt(f"artifact {target} is missing; rerun the probe that wrote it (lsdb run)")
        try:
            array = np.load(target, allow_pickle=False)
        except Exception as e:  # truncated or garbled file
            raise ArtifactCorrupt(f"artifact {target} is unreadable ({e}); delete it and rerun") from None
        if array_sha256(array) != sha:
            raise ArtifactCorrupt(f"artifact {target} does not match its hash {sha[:12]}…; delete it and rerun")
        return array


def array_sha256(array) -> str:
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(memoryview(array).cast("B"))
    return h.hexdigest()

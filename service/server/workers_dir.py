"""The supervisor's working directory (prometheus_client's multiprocess files and the
workers' status files): made per supervisor, locked for as long as it or any of its
workers lives, and swept away by the next supervisor once nobody holds it.

A supervisor that exits removes its directory, but one killed by SIGKILL or the OOM killer
cannot, and in a container whose /tmp is an ``emptyDir`` (our manifest's is; it outlives
container restarts, and counts against the pod's memory when memory-backed) every such
restart would leave 64 KiB per metric file and worker behind for good. The
process id cannot tell whether the owner lives: in a container the supervisor is PID 1
after every restart. An advisory lock can: the kernel drops a ``flock`` when the last
process holding its open file description exits, whatever killed it, and forked workers
share the supervisor's description, so a directory stays locked until its last worker is
gone too.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

PREFIX = "imgclf-workers-"
LOCK_NAME = "supervisor.lock"


def _try_lock(handle: IO[bytes]) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class WorkersDirectory:
    """``WorkersDirectory.create()`` in the supervisor, before forking; ``remove()`` when it
    is done. The lock's file stays open (and inherited by every forked worker) meanwhile."""

    def __init__(self, path: Path, lock: IO[bytes]):
        self.path = path
        self._lock = lock

    @classmethod
    def create(cls, parent: Path | None = None) -> WorkersDirectory:
        root = Path(parent or tempfile.gettempdir())
        swept = sweep(root)
        if swept:
            log.info("removed %d workers directories left by killed servers", swept)
        path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=root))
        # Locked under a temporary name and then renamed (the lock follows the file), so a
        # sweeper never sees the lock file of a live directory unlocked.
        staging = path / f".{LOCK_NAME}"
        lock = open(staging, "wb")  # noqa: SIM115 — held for the supervisor's life
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.rename(staging, path / LOCK_NAME)
        return cls(path, lock)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()


def sweep(root: Path) -> int:
    """Remove the workers directories under ``root`` that no process holds any more.

    Only directories with a lock file are touched: one without is being made, or belongs
    to a server from before the lock existed, and might be in use."""
    removed = 0
    for path in root.glob(PREFIX + "*"):
        try:
            handle = open(path / LOCK_NAME, "rb")  # noqa: SIM115 — closed below
        except OSError:  # no lock file, not a directory, or another user's
            continue
        with handle:
            if _try_lock(handle):
                shutil.rmtree(path, ignore_errors=True)
                removed += 0 if path.exists() else 1
    return removed

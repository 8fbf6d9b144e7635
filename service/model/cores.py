"""How many cores this process may use: the one answer every thread pool and the worker
count are sized from (stdlib only, so anything may import it)."""

from __future__ import annotations

import math
import os
from pathlib import Path


def cpu_count(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

    A container limited to 2 CPUs on a 64-core node still sees all 64 in its affinity
    mask; only the quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` in v1) says 2.
    Worker processes and thread pools sized from the mask would oversubscribe the quota
    and be throttled.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def _cgroup_cpu_quota(root: Path) -> float | None:
    """CPUs allowed by the cgroup's CFS quota, or None when there is none."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 = none
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None

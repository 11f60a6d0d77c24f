"""How many CPUs this process may actually use: its affinity and its cgroup's CPU quota.

``os.cpu_count()`` and ``torch.get_num_threads()`` count the host's cores. In a container
started with ``docker --cpus=2`` on a 16-core host they say 16 while the kernel lets the
process run for 2 CPU-seconds per second: 16 busy threads then take turns on 2 CPUs.
The quota is the cgroup's ``cpu.max`` (cgroup v2: "<quota> <period>" in microseconds,
or "max <period>" for none) or ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (cgroup v1,
quota -1 for none); see the kernel's Documentation/admin-guide/cgroup-v2.rst ("cpu.max")
and Documentation/scheduler/sched-bwc.rst. The same rule as loky's / joblib's
``cpu_count``, which reads only the root cgroup's files; here the process's own cgroup
and each ancestor count, as the tightest limit on the path applies.

Reading system files is this module's whole job; it reads no data and no params.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def available_cpus(
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_CGROUP,
    affinity: int | None = None,
) -> int:
    """CPUs this process may use: min(affinity, ceil(cgroup quota)), at least 1.

    Args:
        cgroup_root: where the cgroup file systems are mounted (v2: the unified tree;
            v1: one directory per controller such as ``cpu,cpuacct``).
        proc_cgroup: the process's cgroup membership, lines
            "<hierarchy id>:<controllers>:<path>" (``man 7 cgroups``).
        affinity: CPUs in the affinity mask; default ``len(os.sched_getaffinity(0))``
            (``os.cpu_count()`` where the platform has no affinity call).

    Returns:
        int >= 1. A quota of 1.5 CPUs gives 2: a half-used CPU still runs a thread.
        Missing or unreadable cgroup files mean no quota.
    """
    if affinity is None:
        getaffinity = getattr(os, "sched_getaffinity", None)
        affinity = len(getaffinity(0)) if getaffinity else os.cpu_count() or 1
    quota = cgroup_quota(cgroup_root, proc_cgroup)
    cpus = affinity if quota is None else min(affinity, math.ceil(quota))
    return max(1, cpus)


def cgroup_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs, quota / period) on the process's cgroup path and
    its ancestors, cgroup v1 and v2 alike; None when there is none (or no cgroups)."""
    quotas = [q for d in _cpu_dirs(cgroup_root, proc_cgroup) if (q := _read_quota(d)) is not None]
    return min(quotas, default=None)


def _cpu_dirs(cgroup_root: Path, proc_cgroup: Path) -> Iterator[Path]:
    """Directories that may hold the process's CPU limits: its own cgroup in each
    hierarchy that has the cpu controller (v2's unified one has it at every level), then
    every ancestor up to the mount point. A path absent from this mount namespace (a
    container seeing its host's path) just has no files until its mounted root."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: "0::/path"
            mounts = [cgroup_root, cgroup_root / "unified"]
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            mounts = [cgroup_root / controllers, cgroup_root / "cpu"]
        else:
            continue
        rel = Path(path.lstrip("/"))
        for mount in mounts:
            for sub in (rel, *rel.parents):
                if ".." not in sub.parts:  # "/../x": outside this cgroup namespace
                    yield mount / sub


def _read_quota(directory: Path) -> float | None:
    """CPUs allowed by ``directory``'s cpu.max (v2) or cfs quota and period (v1); None
    for no limit, no such files, or contents that are not two integers."""
    try:
        if (directory / "cpu.max").is_file():
            quota, period = (directory / "cpu.max").read_text(encoding="ascii").split()
        else:
            quota = (directory / "cpu.cfs_quota_us").read_text(encoding="ascii").strip()
            period = (directory / "cpu.cfs_period_us").read_text(encoding="ascii").strip()
        if quota in ("max", "-1"):
            return None
        q, p = int(quota), int(period)
    except (OSError, ValueError):
        return None
    return q / p if q > 0 and p > 0 else None

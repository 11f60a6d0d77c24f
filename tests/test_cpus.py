"""charlm.cpus.available_cpus on fake cgroup trees (issue 11, item 7: a container's CPU
quota, not the host's core count, sizes training's worker threads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from charlm import engine
from charlm.config import ModelConfig, TrainConfig, VariantConfig
from charlm.cpus import available_cpus, cgroup_quota
from charlm.init import build_mlp

HOST = 16  # cores in the affinity mask of the fake host


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n", encoding="ascii")


def cpus(tmp_path: Path, proc: str, files: dict[str, str], affinity: int = HOST) -> int:
    """available_cpus with /sys/fs/cgroup at tmp_path/cg and /proc/self/cgroup = ``proc``."""
    write(tmp_path, {"proc_cgroup": proc, **{f"cg/{k}": v for k, v in files.items()}})
    return available_cpus(tmp_path / "cg", tmp_path / "proc_cgroup", affinity)


V1_PROC = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/"
V2_PROC = "0::/system.slice/job.scope"


@pytest.mark.parametrize(
    ("proc", "files", "expected"),
    [
        # cgroup v2: "quota period", at the process's own path
        (V2_PROC, {"system.slice/job.scope/cpu.max": "200000 100000"}, 2),
        (V2_PROC, {"system.slice/job.scope/cpu.max": "150000 100000"}, 2),  # ceil(1.5)
        (V2_PROC, {"system.slice/job.scope/cpu.max": "50000 100000"}, 1),  # ceil(0.5)
        (V2_PROC, {"system.slice/job.scope/cpu.max": "max 100000"}, HOST),
        # an ancestor's quota binds its descendants; the tightest one on the path wins
        (V2_PROC, {"system.slice/cpu.max": "300000 100000"}, 3),
        (
            V2_PROC,
            {"system.slice/cpu.max": "300000 100000", "system.slice/job.scope/cpu.max": "max 1"},
            3,
        ),
        (
            V2_PROC,
            {"system.slice/cpu.max": "800000 100000", "system.slice/job.scope/cpu.max": "4 1"},
            4,
        ),
        # a container that sees its host's path: only its mounted root has files
        ("0::/../host.slice/docker-1.scope", {"cpu.max": "200000 100000"}, 2),
        # hybrid layout: the unified tree mounted at /sys/fs/cgroup/unified
        ("0::/", {"unified/cpu.max": "400000 100000"}, 4),
        # cgroup v1: cfs quota / period in the cpu controller's hierarchy
        (
            V1_PROC,
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
            },
            3,
        ),
        (
            V1_PROC,
            {"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"},
            1,
        ),
        (V1_PROC, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, HOST),
        # another controller's hierarchy does not limit CPUs
        (
            V1_PROC,
            {
                "memory/docker/abc/cpu.cfs_quota_us": "100000",
                "memory/docker/abc/cpu.cfs_period_us": "100000",
            },
            HOST,
        ),
        # no cgroup files at all, or unreadable contents: no quota
        (V2_PROC, {}, HOST),
        (V1_PROC, {"cpu/cpu.cfs_quota_us": "100000"}, HOST),  # period missing
        (V2_PROC, {"cpu.max": "garbage"}, HOST),
        ("", {"cpu.max": "100000 100000"}, HOST),  # in no cgroup
    ],
)
def test_available_cpus_on_fake_cgroups(tmp_path, proc, files, expected):
    assert cpus(tmp_path, proc, files) == expected


def test_affinity_smaller_than_the_quota_wins(tmp_path):
    assert cpus(tmp_path, V2_PROC, {"cpu.max": "800000 100000"}, affinity=3) == 3


def test_at_least_one_cpu(tmp_path):
    assert cpus(tmp_path, V2_PROC, {"cpu.max": "1000 100000"}, affinity=1) == 1
    assert cpus(tmp_path, V2_PROC, {}, affinity=0) == 1


def test_no_proc_file_means_no_quota(tmp_path):
    assert cgroup_quota(tmp_path, tmp_path / "missing") is None
    assert available_cpus(tmp_path, tmp_path / "missing", affinity=5) == 5


def test_this_machine_is_within_its_affinity():
    """On the real files: between 1 and the affinity mask (here 2 cores, no quota)."""
    n = available_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_train_sizes_its_workers_by_available_cpus(monkeypatch):
    """engine.train's default worker count is available_cpus(), not torch's thread count."""
    seen = []
    real = engine.seed_groups
    monkeypatch.setattr(engine, "available_cpus", lambda: 7)
    monkeypatch.setattr(engine, "seed_groups", lambda S, w: seen.append(w) or real(S, w))
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    model = build_mlp(ModelConfig(), VariantConfig(), 27, 3, gens)
    X, Y = torch.randint(0, 27, (64, 3)), torch.randint(0, 27, (64,))
    cfg = TrainConfig(seeds=[0, 1, 2, 3], max_steps=2, lr_decay_step=1, record_every=1)
    engine.train(model, X, Y, gens, cfg)
    assert seen == [7]

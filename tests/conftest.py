"""Shared fixtures: the real names file, and throwaway copies of this repository.

Integration tests copy the tracked files of the repository into a temporary
directory, make it a git repository, set tiny parameters and run dvc there, so the
developer's workspace and DVC cache are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_NAMES = ROOT.parent / "shared" / "data" / "names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"

# Parameters small enough for a whole pipeline run in seconds.
TINY: dict[str, Any] = {
    "train": {
        "seeds": [2147483647, 1],
        "max_steps": 300,
        "lr_decay_step": 200,
        "record_every": 100,
    },
    "evaluate": {"n_novelty": 50},
}


def strict_json(path: Path) -> dict:
    """Parse JSON refusing NaN/Infinity tokens (invalid JSON DVC could not compare)."""

    def reject(token: str):
        raise AssertionError(f"{path}: non-finite token {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def names_file() -> Path | None:
    """The real names.txt: $NAMES_MIRROR if set (a path), else the shared copy."""
    env = os.environ.get("NAMES_MIRROR", "").removeprefix("file://")
    for candidate in (Path(env) if env else None, SHARED_NAMES):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def names_path() -> Path:
    """Path of the real names file; fails in CI when missing, skips elsewhere."""
    path = names_file()
    if path is None:
        msg = "real names.txt not found: set NAMES_MIRROR=/path/to/names.txt"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def deep_update(base: dict, changes: dict) -> dict:
    """Recursively merge ``changes`` into a copy of ``base``."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def run(
    cmd: list[str] | str,
    cwd: Path,
    env: dict | None = None,
    check: bool = True,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools first on PATH; output captured as text."""
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=full_env,
        text=True,
        capture_output=True,
        timeout=timeout,
        shell=isinstance(cmd, str),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def make_repo(dest: Path, params: dict | None = None, names: Path | None = None) -> Path:
    """Copy the tracked files of this repository to ``dest`` as a fresh git repo.

    ``params`` is deep-merged into params.yaml before the first commit. The copy's
    environment for dvc should set NAMES_MIRROR (see ``repo_env``).
    """
    files = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.exists():  # deleted in the work tree but not yet committed
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    # untracked files the work tree has (new modules not yet committed)
    for rel in (
        subprocess.run(
            ["git", "ls-files", "-z", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    ):
        if rel and (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for stale in ("dvc.lock", "reports/metrics.json"):
        (dest / stale).unlink(missing_ok=True)
    shutil.rmtree(dest / "reports" / "curves", ignore_errors=True)
    if params:
        p = dest / "params.yaml"
        p.write_text(
            yaml.safe_dump(deep_update(yaml.safe_load(p.read_text()), params), sort_keys=False)
        )
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        [
            "git",
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.invalid",
            "commit",
            "-qm",
            "test copy",
        ],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


@pytest.fixture
def repo_env(names_path: Path) -> dict[str, str]:
    """Environment for dvc in a repository copy: the mirror and a test identity."""
    return {
        "NAMES_MIRROR": str(names_path),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }


@pytest.fixture
def tiny_repo(tmp_path: Path, repo_env: dict[str, str]) -> Callable[..., Path]:
    """Factory: ``tiny_repo(extra_params)`` -> a repo copy with TINY (+ extra) params."""

    def factory(extra: dict | None = None, name: str = "repo") -> Path:
        return make_repo(tmp_path / name, deep_update(TINY, extra or {}))

    return factory

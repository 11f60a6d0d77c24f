"""Shared fixtures: the real names file, and throwaway copies of this repository.

Integration tests copy the tracked files of the repository into a temporary
directory, make it a git repository, set tiny parameters and run dvc there, so the
developer's workspace and DVC cache are never touched. The whole tiny pipeline runs once
per session (``tiny_run``); the modules that need its outputs each take a copy of it.
The plain helpers these fixtures use (and test modules import) are in support.py;
nothing imports this file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import pytest
from support import GIT_ID, TINY_RUN, TinyRun, make_repo, names_file, run


@pytest.fixture(scope="session")
def names_path() -> Path:
    """Absolute path of the real names file; fails in CI when missing, skips elsewhere."""
    path = names_file()
    if path is None:
        msg = "real names.txt not found: set NAMES_MIRROR=/path/to/names.txt"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def repo_env(names_path: Path) -> Mapping[str, str]:
    """Environment for dvc in a repository copy: the mirror and a test identity.

    Session-scoped (module fixtures that build a repository use it) and read-only:
    extend it with ``{**repo_env, ...}``.
    """
    return MappingProxyType({"NAMES_MIRROR": str(names_path), **GIT_ID})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, repo_env: Mapping[str, str]) -> TinyRun:
    """One ``dvc repro`` of a repository copy with TINY_RUN params, committed
    (``git add dvc.lock reports``), shared by the session: take ``tiny_run.copy(dest)``,
    never change ``tiny_run.root``."""
    root = make_repo(tmp_path_factory.mktemp("tiny_run") / "repo", TINY_RUN)
    repro = run(["dvc", "repro"], cwd=root, env=repo_env)
    run("git add dvc.lock reports && git commit -qm 'tiny run'", cwd=root, env=repo_env)
    return TinyRun(root, repro, repo_env)

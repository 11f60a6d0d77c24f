"""Helpers shared by the test modules: paths, tiny params, subprocesses, repository copies.

A plain module, imported as ``from support import ...`` (pytest puts tests/ on sys.path),
rather than fixtures in conftest.py: these are functions called with arguments, also at
collection time (``dvc_stages()`` feeds ``parametrize``), and conftest.py is not meant to
be imported (pytest loads it itself; importing it makes a second copy of the module).
Fixtures built on these helpers live in conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

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
# The default deep variants override train's length and seeds (params.yaml): tiny too.
TINY["variants"] = {
    v: {"train": {k: TINY["train"][k] for k in ("seeds", "max_steps", "record_every")}}
    for v in ("deep_bn", "deep_tanh")
}
# A depth atlas small enough for seconds (params.yaml's default atlas takes minutes):
# make_repo puts it into every repository copy unless the test's params replace it.
TINY_ATLAS: dict[str, Any] = {
    "depths": [2],
    "nonlinearities": ["tanh", "relu"],
    "batchnorm": [False, True],
    "widths": [8],
    "gain_factors": [0.5, 1.0],
    "extra_gains": [1.0],
    "seeds": [0, 1],
    "init_batches": 1,
    "batch_size": 8,
    "batch_seed": 1234,
    "threshold": 0.97,
    "width_sweep": {"depth": 2, "nonlinearity": "tanh", "widths": [8, 16], "gain_factors": [1.0]},
    "train": {"depths": [2], "nonlinearities": ["tanh"], "batchnorm": [False, True],
              "width": 8, "gain_factors": [1.0], "seeds": [0, 1], "steps": 20,
              "batch_size": 8, "lr": 0.1},
    "he": {"depth": 3, "width": 8, "gains": [1.0, 1.4142135623730951], "seeds": [0],
           "steps": 20, "batch_size": 8, "lr": 0.1, "lower_lr": 0.01},
}  # fmt: skip

# The params of the one tiny run the test modules share (``tiny_run`` in conftest.py):
# TINY with loss curves averaged over windows of 50 steps, so that the report of a
# 300-step run draws lines, not single points (the default window is 1000 steps). No
# other output the tests check depends on the window.
TINY_RUN: dict[str, Any] = {**TINY, "evaluate": {**TINY["evaluate"], "curve_window": 50}}


# The lecture's names of its one-layer network (reference.lecture.lecture_train),
# keyed by 'has BatchNorm' -> the layer-list MLP's parameter names:
# Linear 0 -> [BatchNorm1d 1] -> Tanh -> output Linear (layer 2, or 3 after a BatchNorm).
LECTURE_NAMES = {
    False: {"C": "C", "W1": "layers.0.weight", "b1": "layers.0.bias",
            "W2": "layers.2.weight", "b2": "layers.2.bias"},
    True: {"C": "C", "W1": "layers.0.weight", "W2": "layers.3.weight", "b2": "layers.3.bias",
           "bngain": "layers.1.gamma", "bnbias": "layers.1.beta"},
}  # fmt: skip


def strict_json(path: Path) -> dict:
    """Parse JSON refusing NaN/Infinity tokens (invalid JSON DVC could not compare)."""

    def reject(token: str):
        raise AssertionError(f"{path}: non-finite token {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def names_file() -> Path | None:
    """The real names.txt, absolute: $NAMES_MIRROR if set (a path), else the shared copy."""
    env = os.environ.get("NAMES_MIRROR", "").removeprefix("file://")
    for candidate in (Path(env) if env else None, SHARED_NAMES):
        if candidate is not None and candidate.is_file():
            return candidate.resolve()  # absolute: queued experiments run elsewhere
    return None


# A git identity for commits made by dvc (experiments) and by the tests in repo copies.
GIT_ID = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


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
    env: Mapping[str, str] | None = None,
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


def make_repo(dest: Path, params: dict | None = None) -> Path:
    """Copy the tracked files of this repository to ``dest`` as a fresh git repo.

    ``params`` is deep-merged into params.yaml before the first commit, over
    ``TINY_ATLAS`` (the default atlas would add minutes to every ``dvc repro``). The
    copy's environment for dvc should set NAMES_MIRROR (see ``repo_env``).
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
    p = dest / "params.yaml"
    merged = deep_update(yaml.safe_load(p.read_text()), {"atlas": TINY_ATLAS, **(params or {})})
    p.write_text(yaml.safe_dump(merged, sort_keys=False))
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


def copy_repo(src: Path, dest: Path, env: Mapping[str, str] | None = None) -> Path:
    """Copy the repository ``src`` (a copy made by ``make_repo``, after a run) to ``dest``.

    The whole tree: .git, the DVC cache in .dvc/cache and the workspace, symlinks kept as
    symlinks; .dvc/tmp (DVC's state database, keyed by inode, and its locks) is left out
    and rebuilt by DVC. Every file is copied (``shutil.copy2``: hard links become separate
    files; DVC's default cache.type here is reflink,copy, so the workspace holds no links
    into the cache), so a test may edit any file of its copy in place. Raises
    AssertionError when ``dvc status`` in the copy is not clean.
    """

    def ignore(directory: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(directory) == src / ".dvc" else []

    shutil.copytree(src, dest, symlinks=True, ignore=ignore)
    status = run(["dvc", "status", "--json"], cwd=dest, env=env).stdout.strip()
    assert status == "{}", f"{dest}: the copy of {src} is not clean: {status}"
    return dest


@dataclass(frozen=True)
class TinyRun:
    """A repository copy with TINY_RUN params after one committed ``dvc repro``.

    ``root`` must stay as it is (every module copies it): use ``copy``. ``repro`` is
    that run's completed process (its stdout names the stages that ran).
    """

    root: Path
    repro: subprocess.CompletedProcess
    env: Mapping[str, str]

    def copy(self, dest: Path) -> Path:
        """An independent copy of the run at ``dest`` (see ``copy_repo``)."""
        return copy_repo(self.root, dest, self.env)


# ---- the stages and params declared in dvc.yaml


def dvc_stages(root: Path = ROOT) -> dict[str, tuple[str, list[str]]]:
    """Every stage of ``root``'s dvc.yaml, foreach and matrix expanded over its params.yaml:
    name -> (module, declared params)."""
    dvc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    p = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    variants = p["variants"]
    out = {}
    for name, stage in dvc["stages"].items():
        if "foreach" in stage:
            assert stage["foreach"] == "${variants}"
            for key in variants:
                body = yaml.safe_dump(stage["do"]).replace("${key}", key)
                out[f"{name}@{key}"] = yaml.safe_load(body)
        elif "matrix" in stage:  # one key over a params list, as the atlas stages use
            ((item, ref),) = stage["matrix"].items()
            values: Any = p
            for part in ref.removeprefix("${").removesuffix("}").split("."):
                values = values[part]
            body = yaml.safe_dump({k: v for k, v in stage.items() if k != "matrix"})
            for value in values:
                out[f"{name}@{value}"] = yaml.safe_load(
                    body.replace(f"${{item.{item}}}", str(value))
                )
        else:
            out[name] = stage
    result = {}
    for name, stage in out.items():
        module = re.search(r"python -m (pipeline\.stages\.\w+)", stage["cmd"]).group(1)
        declared = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]
        result[name] = (module, declared)
    return result


def covered(key: str, declared: list[str]) -> bool:
    """Whether dvc tracks ``key`` through one of the ``declared`` params."""
    return any(key == d or key.startswith(d + ".") for d in declared)


# ---- the report's table of contents (pipeline.stages.report.add_contents)


class _Outline(HTMLParser):
    """The ids, h2/h3 headings and table-of-contents links of an HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: list[str] = []  # every id attribute, in page order
        self.headings: list[tuple[str, str, str]] = []  # (tag, id, text) of h2 and h3
        self.links: list[tuple[str, str]] = []  # (href, text) inside nav.report-contents
        self.nav_before_first_h2: bool | None = None
        self._in_nav = 0  # nesting depth inside the contents' <nav>
        self._heading: list | None = None  # [tag, id, text] while inside an h2/h3
        self._link: list | None = None  # [href, text] while inside a contents link

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "nav" and "report-contents" in (a.get("class") or "").split():
            self._in_nav = 1
            if self.nav_before_first_h2 is None:
                self.nav_before_first_h2 = True
            return
        if self._in_nav:
            self._in_nav += tag == "nav"
            if tag == "a":
                self._link = [a.get("href", ""), ""]
            return
        if tag in ("h2", "h3"):
            if tag == "h2" and self.nav_before_first_h2 is None:
                self.nav_before_first_h2 = False
            self._heading = [tag, a.get("id"), ""]

    def handle_endtag(self, tag: str) -> None:
        if self._in_nav:
            if tag == "a" and self._link is not None:
                self.links.append((self._link[0], self._link[1].strip()))
                self._link = None
            self._in_nav -= tag == "nav"
            return
        if self._heading is not None and tag == self._heading[0]:
            tag_, ident, text = self._heading
            self.headings.append((tag_, ident, text.replace("¶", "").strip()))
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self._link is not None:
            self._link[1] += data
        elif self._heading is not None:
            self._heading[2] += data


def contents_problems(page: str) -> list[str]:
    """What is wrong with the table of contents of the HTML ``page``, one line each:
    missing, placed after the first section, a link whose target id is not on the page
    (or on it twice, or not a section heading), or a section (h2) or subsection (h3)
    that the contents do not list in page order. [] when every link resolves and every
    section is listed."""
    outline = _Outline()
    outline.feed(page)
    if outline.nav_before_first_h2 is None:
        return ["no table of contents (nav.report-contents) and no section"]
    out = []
    if not outline.links:
        out.append("no table of contents (nav.report-contents)")
    elif not outline.nav_before_first_h2:
        out.append("the table of contents comes after the first section")
    heading_ids = {ident for _, ident, _ in outline.headings}
    for href, text in outline.links:
        target = href[1:] if href.startswith("#") else None
        count = outline.ids.count(target) if target is not None else 0
        if count != 1:
            out.append(f"link {text!r} -> {href!r}: {count} elements have that id")
        elif target not in heading_ids:
            out.append(f"link {text!r} -> {href!r}: not a section heading")
    listed = [(href[1:], text) for href, text in outline.links]
    shown = [(ident, text) for _, ident, text in outline.headings]
    if listed != shown:
        missing = [text for ident, text in shown if (ident, text) not in listed]
        out.append(f"the contents list {listed} but the page has {shown} (missing: {missing})")
    return out

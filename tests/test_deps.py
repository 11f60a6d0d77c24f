"""Every stage's ``deps`` in dvc.yaml are exactly the project files its command executes.

A stage runs ``python -m pipeline.stages.<name>``: Python executes that module, the
``__init__.py`` of each package above it, and every module of this repository it imports,
directly or not (imports inside functions included). The report stage also executes
reporting/template.ipynb in a kernel, so the template and its code cells' imports count.
The closure is derived here from the code, statically (``ast`` over each file, imports
resolved with ``importlib.machinery.PathFinder`` restricted to the repository: nothing is
imported), and compared with the stages as DVC itself expands them (``Repo.index``).

A dep missing from dvc.yaml leaves results stale after a code change (issue 11, item 1:
editing ``BatchNorm1d.forward`` did not rerun evaluate); a dep listed but not executed
reruns a stage for nothing. Not covered: modules imported by a computed name
(``importlib.import_module(x)``); this project has none.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
from collections.abc import Iterator
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

import nbformat
import pytest
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo
from IPython.core.inputtransformer2 import TransformerManager
from support import ROOT, run

from charlm.cpus import available_cpus
from pipeline.stages import report

# Stages that execute a notebook besides their module: module -> the notebook.
NOTEBOOKS = {"pipeline.stages.report": report.TEMPLATE}
CODE_SUFFIXES = (".py", ".ipynb")
MODULE_CMD = re.compile(r"^python -m ([\w.]+)(\s|$)")


@functools.cache
def find(name: str) -> ModuleSpec | None:
    """Spec of module ``name`` if it lies in the repository, else None (nothing imported)."""
    parent = name.rpartition(".")[0]
    if parent:
        spec = find(parent)
        if spec is None or spec.submodule_search_locations is None:
            return None
        path = list(spec.submodule_search_locations)
    else:
        path = [str(ROOT)]
    return PathFinder.find_spec(name, path)


def imported_names(source: str, filename: str, package: str | None) -> Iterator[str]:
    """Dotted names ``source`` may import: ``a.b`` for ``import a.b``; ``a`` and the
    candidate submodule ``a.x`` for ``from a import x`` (relative forms resolved)."""
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            if base == "__future__":
                continue
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def with_parents(name: str) -> list[str]:
    """``a.b.c`` -> [a, a.b, a.b.c]: importing a module first runs each package above it."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def closure(module: str, notebook: Path | None = None) -> set[str]:
    """Repository files (relative paths) that ``python -m module`` executes, plus those
    ``notebook``'s code cells import and the notebook itself."""
    files: set[str] = set()
    todo: list[tuple[str, str, str | None]] = []  # (source, filename, package)
    seen: set[str] = set()

    def add(name: str) -> None:
        for n in with_parents(name):
            spec = find(n)
            if n in seen or spec is None or spec.origin is None:
                continue  # done, not in the repository, or not a module (an attribute)
            seen.add(n)
            path = Path(spec.origin)
            files.add(path.relative_to(ROOT).as_posix())
            package = n if spec.submodule_search_locations is not None else n.rpartition(".")[0]
            todo.append((path.read_text(encoding="utf-8"), str(path), package))

    add(module)
    if notebook is not None:
        files.add(notebook.relative_to(ROOT).as_posix())
        to_python = TransformerManager().transform_cell  # IPython magics -> Python
        for cell in nbformat.read(notebook, as_version=4).cells:
            if cell.cell_type == "code":
                todo.append((to_python(cell.source), f"{notebook}:cell", None))
    while todo:
        for name in imported_names(*todo.pop()):
            add(name)
    return files


def dvc_stages(root: Path = ROOT) -> dict[str, tuple[str, list[str], list[str]]]:
    """Stages as DVC expands them (foreach over params.yaml):
    name -> (module run, file deps, outs), paths relative to ``root``."""
    with Repo(str(root)) as repo:
        out = {}
        for stage in repo.index.stages:
            match = MODULE_CMD.match(stage.cmd)
            assert match, f"{stage.addressing}: cmd is not 'python -m <module> ...': {stage.cmd}"
            deps = [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)]
            out[stage.addressing] = (match.group(1), deps, [o.def_path for o in stage.outs])
        return out


STAGES = dvc_stages()


def is_code(path: str) -> bool:
    return path.endswith(CODE_SUFFIXES)


def expected(module: str) -> set[str]:
    return closure(module, NOTEBOOKS.get(module))


@pytest.mark.parametrize("stage", list(STAGES))
def test_deps_are_exactly_the_code_the_stage_executes(stage):
    module, deps, _ = STAGES[stage]
    code = {d for d in deps if is_code(d)}
    executed = expected(module)
    missing, stale = sorted(executed - code), sorted(code - executed)
    assert not (missing or stale), (
        f"dvc.yaml, stage {stage}: add the deps it executes {missing}, "
        f"remove the code deps it never executes {stale}"
    )


@pytest.mark.parametrize("stage", list(STAGES))
def test_other_deps_are_outputs_of_other_stages(stage):
    """A non-code dep is data other stages write: one of their outs, inside one or holding
    some (else it is a source file this test does not know how the stage uses)."""
    outs = {o for name, (_, _, stage_outs) in STAGES.items() if name != stage for o in stage_outs}
    for dep in STAGES[stage][1]:
        if not is_code(dep):
            related = (dep == o or dep.startswith(o + "/") or o.startswith(dep + "/") for o in outs)
            assert any(related), f"dvc.yaml: {stage} dep {dep} is no other stage's output"


def test_the_closure_follows_imports_inside_functions_and_the_template():
    """The derivation itself: known edges the stages rely on (so an empty closure fails)."""
    assert {"charlm/evaluate.py", "charlm/model.py", "pipeline/stages/__init__.py"} <= expected(
        "pipeline.stages.evaluate"
    )
    assert "charlm/evaluate.py" not in expected("pipeline.stages.train")
    # params.main imports pipeline.outputs inside a function
    assert "pipeline/outputs.py" in closure("pipeline.params")
    # reporting/stats.py is imported only by the template's cells
    assert "reporting/stats.py" not in closure("pipeline.stages.report")
    assert {"reporting/stats.py", "reporting/template.ipynb"} <= expected("pipeline.stages.report")


@pytest.mark.integration
@pytest.mark.slow
def test_editing_an_imported_module_makes_dvc_status_list_the_stage(tmp_path, tiny_run, repo_env):
    """Issue 11, item 1: after any edit to a module a stage imports, ``dvc status`` lists
    that stage, and no stage that does not import it. Takes a copy of the session's tiny
    run, then edits each module of the closures of the stages up to evaluate@naive in
    turn."""
    root = tiny_run.copy(tmp_path / "repo")
    ran = ("download", "split", "train@naive", "evaluate@naive")
    # the run record names the worker threads train used (charlm.cpus, issue 11 item 7)
    record = json.loads((root / "data" / "runs" / "train@naive.json").read_text())
    assert record["workers"] == available_cpus(), record

    def changed() -> set[str]:
        proc = run(["dvc", "status", "--json", *ran], cwd=root, env=repo_env)
        return set(json.loads(proc.stdout))

    assert changed() == set()
    closures = {s: expected(STAGES[s][0]) for s in ran}
    for rel in sorted(set().union(*closures.values())):
        path = root / rel
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        try:
            assert changed() == {s for s in ran if rel in closures[s]}, rel
        finally:
            path.write_bytes(original)
    assert changed() == set()

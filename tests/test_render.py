"""The report's kernel: its own interpreter, no shared ports, nothing from the caller's home.

Each test renders a small notebook through ``pipeline.stages.report.render`` (the same
path as the report: papermill, the stage's kernel manager, nbconvert), not the full
report, so no pipeline has to run. The notebook prints what its kernel runs on (the
interpreter, the ZMQ transport, a marker a foreign kernelspec would set) and draws a
matplotlib figure (the font cache and the matplotlib config dir are used). Every
render must give the bytes of a plain serial render.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

from pipeline.stages import report

CODE = """\
import os, sys
from pathlib import Path
from ipykernel.kernelapp import IPKernelApp
import reporting
print("python:", sys.executable)
print("transport:", IPKernelApp.instance().transport)
print("hostile:", os.environ.get("HOSTILE_KERNEL"))
print("reporting:", Path(reporting.__file__).parent.parent)
"""
PLOT = """\
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
ax.plot([0, x], [0, 1])
ax.set_title(f"x = {x}")
plt.show()
"""
PARAMS = {"x": 2}


@pytest.fixture(scope="module")
def kernel_home(tmp_path_factory) -> Path:
    """A fresh KERNEL_HOME for this module (the first render builds its font cache)."""
    return tmp_path_factory.mktemp("kernel-home")


@pytest.fixture(autouse=True)
def private_kernel_home(monkeypatch, kernel_home, tmp_path):
    """Every render uses the module's KERNEL_HOME and runs from an unrelated directory,
    so the repository is importable only through the kernel's environment."""
    monkeypatch.setattr(report, "KERNEL_HOME", kernel_home, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def notebook(tmp_path_factory) -> Path:
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell(CODE),
            nbformat.v4.new_code_cell(PLOT),
        ]
    )
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = tmp_path_factory.mktemp("nb") / "tiny.ipynb"
    nbformat.write(nb, path)
    return path


def render_to(notebook: Path, out: Path) -> tuple[bytes, bytes]:
    """Render ``notebook`` into ``out``; the bytes of the notebook and of the page."""
    report.render(notebook, out / "tiny.ipynb", out / "tiny.html", PARAMS)
    return (out / "tiny.ipynb").read_bytes(), (out / "tiny.html").read_bytes()


def printed(nb_bytes: bytes) -> str:
    nb = nbformat.reads(nb_bytes.decode(), as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def reference(notebook, kernel_home, tmp_path_factory) -> tuple[bytes, bytes]:
    """A plain serial render, the first in KERNEL_HOME (so it builds the font cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "KERNEL_HOME", kernel_home, raising=False)
        return render_to(notebook, tmp_path_factory.mktemp("reference"))


def test_reference_render_runs_the_stage_interpreter_over_ipc(reference):
    text = printed(reference[0])
    assert f"python: {sys.executable}\n" in text
    assert "transport: ipc\n" in text
    assert "hostile: None\n" in text
    assert f"reporting: {report.ROOT}\n" in text
    # the first render built the font cache outside the notebook: no stderr at all
    nb = nbformat.reads(reference[0].decode(), as_version=4)
    assert [o for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stderr"] == []
    figures = [
        o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(figures) == 1, "the figure is missing"


# ---- item 4: a foreign python3 kernelspec first on the Jupyter path -------------------

HOSTILE = {
    "bin-false": ["/bin/false"],
    "missing-interpreter": ["/nonexistent/python3", "-m", "ipykernel_launcher"],
    # a kernel that starts fine but is not ours (stands for another environment)
    "other-environment": [sys.executable, "-m", "ipykernel_launcher"],
}


@pytest.mark.parametrize(
    ("where", "kind"),
    [
        ("JUPYTER_DATA_DIR", "bin-false"),  # a user-level kernelspec
        ("JUPYTER_PATH", "missing-interpreter"),
        ("JUPYTER_PATH", "other-environment"),
    ],
)
def test_hostile_python3_kernelspec_is_ignored(
    notebook, reference, tmp_path, monkeypatch, where, kind
):
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [*HOSTILE[kind], "-f", "{connection_file}"],
        "display_name": f"hostile {kind}",
        "language": "python",
        "env": {"HOSTILE_KERNEL": kind},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv(where, str(tmp_path / "jupyter"))
    # in a virtualenv jupyter_core prefers the env's kernelspecs to the user's; outside
    # one (or with this set) a user-level kernelspec wins
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "0")
    got = render_to(notebook, tmp_path / "out")
    assert f"python: {sys.executable}\n" in printed(got[0])
    assert "hostile: None\n" in printed(got[0])
    assert got == reference


# ---- item 5: renders at the same moment ---------------------------------------------

N_PARALLEL = 4


def test_parallel_renders_all_succeed_with_the_serial_bytes(notebook, reference, tmp_path):
    """Four renders start at the same moment (as ``dvc queue start -j 4`` can): all
    succeed and give the serial render's bytes. Their kernels listen on no TCP port
    (``transport: ipc``), so no pick-and-bind port race is possible. Threads of one
    process, not processes, to keep the test fast: the race is between the kernels,
    which are separate processes either way, and render shares no mutable state."""
    barrier = threading.Barrier(N_PARALLEL)

    def one(i: int) -> tuple[bytes, bytes]:
        barrier.wait(timeout=60)
        return render_to(notebook, tmp_path / f"out{i}")

    with ThreadPoolExecutor(N_PARALLEL) as pool:
        results = list(pool.map(one, range(N_PARALLEL)))
    for got in results:
        assert "transport: ipc\n" in printed(got[0])
        assert got == reference


# ---- item 6: no dependence on the caller's home ---------------------------------------


def _unwritable_home(tmp_path: Path) -> str:
    # beneath a regular file: no one can create it, not even root (chmod would not stop root)
    (tmp_path / "a-file").write_text("")
    return str(tmp_path / "a-file" / "home")


@pytest.mark.parametrize(
    "setting",
    ["MPLCONFIGDIR=<a file>", "HOME=<unwritable>", "HOME=<read-only dir>", "HOME unset"],
)
def test_render_ignores_an_unwritable_matplotlib_dir_and_home(
    notebook, reference, kernel_home, tmp_path, monkeypatch, setting
):
    """The notebook holds no temporary path and keeps the reference's bytes; the font
    cache that the first render built in KERNEL_HOME is reused, not rebuilt."""

    def font_caches() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in (kernel_home / "matplotlib").glob("fontlist-*")}

    built = font_caches()
    if setting == "MPLCONFIGDIR=<a file>":
        (tmp_path / "mplrc-file").write_text("")
        monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mplrc-file"))
    elif setting == "HOME=<unwritable>":
        monkeypatch.setenv("HOME", _unwritable_home(tmp_path))
    elif setting == "HOME=<read-only dir>":
        home = tmp_path / "home"
        home.mkdir(mode=0o555)
        monkeypatch.setenv("HOME", str(home))
    else:
        monkeypatch.delenv("HOME", raising=False)
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    got = render_to(notebook, tmp_path / "out")
    text = got[0].decode()
    assert "matplotlib-" not in text and "temporary" not in text, printed(got[0])
    assert got == reference
    assert built, "the first render built no font cache in KERNEL_HOME"
    assert font_caches() == built, "the font cache was rebuilt"


def test_font_cache_is_built_before_the_kernel_starts(tmp_path):
    """On a busy machine a build over 5 s would print a notice into the notebook."""
    env = {**report.kernel_env(), "MPLCONFIGDIR": str(tmp_path)}
    report._build_font_cache(env)
    assert list(tmp_path.glob("fontlist-*.json"))


def test_font_cache_failure_names_the_cause(tmp_path):
    broken = tmp_path / "site" / "matplotlib"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('no backend here')\n")
    env = {**report.kernel_env(), "PYTHONPATH": str(tmp_path / "site")}
    with pytest.raises(report.ReportError, match=r"matplotlib failed to start.*no backend here"):
        report._build_font_cache(env)

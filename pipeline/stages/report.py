"""Gather every variant's results and render the HTML report.

Reads params (all sections: the report shows them), ``--eval`` (one subdirectory per
variant, written by the evaluate stage), ``--data`` (counts.json) and ``--runs`` (the
stages' run records: wall times, revision, versions); writes
``--metrics`` (reports/metrics.json, the DVC metrics), ``--notebook`` (the executed
notebook) and ``--html`` (the report: a table of contents, code hidden, figures embedded
as PNG, no script or font fetched from the network, byte-identical when rerun on the
same inputs). The notebook's kernel is this interpreter's, whatever kernelspecs the
machine has (see ``ReportKernelManager``).
Run: python -m pipeline.stages.report --eval data/eval --data data/processed --runs data/runs \
    --metrics reports/metrics.json --notebook reports/report.ipynb --html reports/report.html
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import nbformat
import papermill
from ipykernel.kernelspec import RESOURCES, get_kernel_dict
from jinja2 import DictLoader
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import (
    NATIVE_KERNEL_NAME,
    KernelSpec,
    KernelSpecManager,
    NoSuchKernel,
)
from nbconvert import HTMLExporter
from traitlets import default
from traitlets.config import Config

from pipeline import outputs, params

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "reporting" / "template.ipynb"
START_TIMEOUT = 120  # seconds for the kernel to start
CELL_TIMEOUT = 600  # seconds per cell
# The kernel's matplotlib, IPython and Jupyter config dirs: private to this repository,
# stable across renders, never the caller's home. DVC's scratch directory is git-ignored
# by DVC itself (.dvc/.gitignore), is neither a dep nor an output, and is writable
# whenever dvc can run a stage (it keeps its locks there).
KERNEL_HOME = ROOT / ".dvc" / "tmp" / "report-kernel"

# nbconvert's lab template, minus everything it would load from a CDN: require.js,
# MathJax and mermaid.js (the report has no widgets, maths or diagrams). Its CSS is
# inlined by nbconvert itself; figures are PNG data URIs.
HTML_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""
# The table of contents (``add_contents``): the page's h2 sections, each with its h3
# subsections, in page order, placed before the first section.
CONTENTS_CLASS = "report-contents"
_HEADING = re.compile(r"<h([23])\b([^>]*)>(.*?)</h\1>", re.S)
_ID = re.compile(r"""\bid=(["'])(.*?)\1""", re.S)
_ANCHOR_LINK = re.compile(r'<a class="anchor-link"[^>]*>.*?</a>', re.S)
# papermill metadata that changes on every run (times, temporary paths, environment)
VOLATILE = (
    "start_time",
    "end_time",
    "duration",
    "input_path",
    "output_path",
    "environment_variables",
    "exception",
)


class ReportError(ValueError):
    """The report notebook failed (a cell raised, timed out, or the kernel did not start)."""


def kernel_env() -> dict[str, str]:
    """Variables set for the report's kernel (on top of this process's environment).

    The repository is importable (``reporting.*``) from any working directory, and the
    kernel reads no configuration from the caller's home: a private, stable
    ``MPLCONFIGDIR`` (no temporary cache dir named in the notebook, no font cache
    rebuilt per render, no user matplotlibrc), ``IPYTHONDIR`` (no user startup files)
    and ``JUPYTER_CONFIG_DIR`` (no user kernel config, e.g. another figure format).
    """
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
        "MPLCONFIGDIR": str(KERNEL_HOME / "matplotlib"),
        "IPYTHONDIR": str(KERNEL_HOME / "ipython"),
        "JUPYTER_CONFIG_DIR": str(KERNEL_HOME / "jupyter"),
    }


class OwnKernelSpecManager(KernelSpecManager):
    """One kernelspec, ``python3``: ipykernel in this interpreter (``sys.executable``).

    Installed kernelspecs (user-level, ``JUPYTER_PATH``, ``JUPYTER_DATA_DIR``, system)
    are never consulted, so another environment's ``python3`` cannot take over.
    """

    def find_kernel_specs(self) -> dict[str, str]:
        return {NATIVE_KERNEL_NAME: RESOURCES}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name != NATIVE_KERNEL_NAME:
            raise NoSuchKernel(kernel_name)
        # jupyter_client applies string.Template to the env values: escape any '$'
        env = {k: v.replace("$", "$$") for k, v in kernel_env().items()}
        return KernelSpec(resource_dir=RESOURCES, env=env, **get_kernel_dict())


class ReportKernelManager(AsyncKernelManager):
    """nbclient's default kernel manager, with the kernelspec of ``OwnKernelSpecManager``.

    ``render`` configures it for ZMQ's ``ipc`` transport (Unix sockets in a private
    directory): TCP ports picked by bind-and-release could be taken by a concurrent
    render between the pick and the kernel's bind.
    """

    @default("kernel_spec_manager")
    def _own_kernel_specs(self) -> KernelSpecManager:
        return OwnKernelSpecManager(parent=self)


def _kernel_config(private_dir: str) -> Config:
    """ipc transport, connection file and sockets in ``private_dir`` (one per render)."""
    config = Config()
    config.ReportKernelManager.transport = "ipc"
    config.ReportKernelManager.connection_file = os.path.join(private_dir, "kernel.json")
    config.ReportKernelManager.ip = os.path.join(private_dir, "kernel-ipc")
    return config


def _build_font_cache(env: dict[str, str]) -> None:
    """Build matplotlib's font cache in the kernel's MPLCONFIGDIR if it is missing.

    Outside the notebook: a build that takes over 5 s (a busy machine) makes matplotlib
    announce it on stderr, which the kernel would capture into the first render's
    notebook only. Takes about 0.5 s when the cache exists.

    Raises:
        ReportError: matplotlib cannot be imported with ``env``.
    """
    proc = subprocess.run(
        [sys.executable, "-c", "import matplotlib.font_manager"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ReportError(f"matplotlib failed to start for the report kernel: {tail}")


def gather(eval_dir: Path, variants: list[str]) -> dict:
    """reports/metrics.json: variant -> canonical split losses, init_loss, mean, std,
    parameters per model (``n_params``) and ``depth`` (the first and last hidden
    layers' statistics at the lecture's snapshot step and at the end, seed means; every
    variant since diagnostics format 6, absent from older metrics)."""
    out = {}
    for v in variants:
        m = json.loads((eval_dir / v / "metrics.json").read_text(encoding="utf-8"))
        out[v] = {
            **m["canonical"],
            "mean": m["mean"],
            "std": m["std"],
            "n_seeds": len(m["seeds"]),
            "n_diverged": m["n_diverged"],
            "n_params": m.get("n_params"),
        }
        if "depth" in m:
            out[v]["depth"] = m["depth"]
    return out


def make_deterministic(nb: nbformat.NotebookNode) -> None:
    """Drop what differs between two executions of the same inputs, in place.

    Papermill's timings and temporary paths, nbclient's execution timestamps, and the
    random id papermill gives the cell it injects.
    """
    meta = nb.metadata.get("papermill", {})
    for key in VOLATILE:
        meta.pop(key, None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.id = "injected-parameters"


def to_html(nb: nbformat.NotebookNode) -> str:
    """The notebook as one self-contained HTML page without code or stderr output, with
    a table of contents of the sections it renders (``add_contents``)."""
    nb = nbformat.from_dict(nb)  # a copy
    for cell in nb.cells:  # warnings (e.g. a font cache being built) are not the report
        if cell.cell_type == "code":
            cell.outputs = [
                o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")
            ]
    exporter = HTMLExporter(
        template_name="lab",
        template_file="charlm_report.html.j2",
        extra_loaders=[DictLoader({"charlm_report.html.j2": HTML_TEMPLATE})],
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": "report"}})
    return add_contents(body)


def _heading_id(text: str) -> str:
    """An id for a heading that has none, made as nbconvert 7 makes them for markdown
    headings: its text, spaces as '-', what a URL fragment may not hold %-escaped."""
    return quote(text.replace(" ", "-"), safe="?/:@!$&'()*+,;=")


def add_contents(page: str) -> str:
    """``page`` with a table of contents before its first h2 heading: a link to every
    h2 section, with its h3 subsections nested, in page order.

    Built from the headings that the page actually has (a section that a run's
    variants leave out, such as BatchNorm's without a BatchNorm variant, has no entry),
    and linked to the ids they carry: nbconvert's ids for markdown headings (cells and
    ``display(Markdown(...))`` outputs alike). A heading without an id gets one, made as
    nbconvert makes them; a repeated id gets a suffix (-2, -3, ...), so that every link
    has one target. A page without an h2 heading is returned unchanged.
    """
    ids = {m.group(2) for m in _ID.finditer(page)}  # every id on the page
    taken: set[str] = set()  # the ids of the headings visited so far
    sections: list[tuple[str, str, list[tuple[str, str]]]] = []  # (id, text, subsections)

    def visit(m: re.Match) -> str:
        level, attrs, inner = m.group(1), m.group(2), m.group(3)
        text = html.unescape(re.sub(r"<[^>]+>", "", _ANCHOR_LINK.sub("", inner))).strip()
        found = _ID.search(attrs)
        ident = found.group(2) if found else html.escape(_heading_id(text))
        if ident in taken or (not found and ident in ids):
            k = 2
            while f"{ident}-{k}" in ids or f"{ident}-{k}" in taken:
                k += 1
            inner = inner.replace(f'href="#{ident}"', f'href="#{ident}-{k}"')
            ident, found = f"{ident}-{k}", None
        taken.add(ident)
        if level == "2":
            sections.append((ident, text, []))
        elif sections:  # an h3 before the first h2 stays out of the contents
            sections[-1][2].append((ident, text))
        if found:
            return m.group(0)
        rest = _ID.sub("", attrs).strip()
        return f'<h{level} id="{ident}"{" " + rest if rest else ""}>{inner}</h{level}>'

    page = _HEADING.sub(visit, page)
    if not sections:
        return page

    def link(ident: str, text: str) -> str:
        return f'<a href="#{ident}">{html.escape(text)}</a>'

    items = []
    for ident, text, subsections in sections:
        sub = "".join(f"<li>{link(i, t)}</li>" for i, t in subsections)
        items.append(f"<li>{link(ident, text)}{f'<ul>{sub}</ul>' if sub else ''}</li>")
    nav = (
        f'<nav class="{CONTENTS_CLASS}" aria-label="Contents">'
        f"<p><strong>Contents</strong></p><ul>{''.join(items)}</ul></nav>\n"
    )
    first = re.search(r"<h2\b", page).start()
    return page[:first] + nav + page[first:]


def _failure(e: Exception) -> ReportError:
    if isinstance(e, papermill.PapermillExecutionError):
        first = (e.source or "").strip().splitlines()
        where = f"cell {e.exec_count}" + (f" ({first[0][:60]!r})" if first else "")
        return ReportError(
            f"the report notebook failed in {where}: {e.ename}: {e.evalue}; "
            f"no report was written (CHARLM_TRACEBACK=1 shows the traceback)"
        )
    if isinstance(e, TimeoutError):
        return ReportError(f"the report notebook timed out ({e}); no report was written")
    return ReportError(f"the report kernel failed ({type(e).__name__}: {e}); no report was written")


def render(notebook_in: Path, notebook_out: Path, html_out: Path, parameters: dict) -> None:
    """Execute ``notebook_in`` with papermill and export it to HTML without code.

    The kernel is ``ReportKernelManager``'s: this interpreter, over Unix sockets in a
    private temporary directory (concurrent renders share no port), with the
    environment of ``kernel_env`` (this repository importable, so
    ``reporting.stats``/``reporting.figures`` load from any directory; no config from
    the caller's home). It runs in the current directory. This process's environment
    is not modified. Both outputs are written atomically.

    Raises:
        ReportError: a cell raised or exceeded CELL_TIMEOUT, or the kernel did not
            start within START_TIMEOUT; neither output is written then.
    """
    env = kernel_env()
    for key in ("MPLCONFIGDIR", "IPYTHONDIR", "JUPYTER_CONFIG_DIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    _build_font_cache(env)
    with (
        tempfile.TemporaryDirectory(prefix="charlm-kernel-") as private_dir,
        outputs.atomic_path(notebook_out) as nb_tmp,
        outputs.atomic_path(html_out) as html_tmp,
    ):
        try:
            papermill.execute_notebook(
                str(notebook_in),
                str(nb_tmp),
                parameters=parameters,
                kernel_name=NATIVE_KERNEL_NAME,
                kernel_manager_class=ReportKernelManager,
                config=_kernel_config(private_dir),
                start_timeout=START_TIMEOUT,
                execution_timeout=CELL_TIMEOUT,
                progress_bar=False,
                # the kernel's own log (not cell output): keep its connection notice quiet
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
                cwd=str(Path.cwd()),
            )
        except (papermill.PapermillExecutionError, TimeoutError, RuntimeError) as e:
            raise _failure(e) from e
        nb = nbformat.read(nb_tmp, as_version=4)
        make_deterministic(nb)
        nbformat.write(nb, nb_tmp)
        html_tmp.write_text(to_html(nb), encoding="utf-8")


def report(
    params_path: Path,
    eval_dir: Path,
    data_dir: Path,
    metrics: Path,
    notebook: Path,
    html: Path,
    variants: list[str],
    runs_dir: Path | None = None,
) -> dict:
    """Do the work; returns the metrics written to ``metrics``.

    ``runs_dir`` holds the stages' run records (data/runs/<stage>.json); the report's
    header shows them, and says "not recorded" for any that is missing."""
    summary = gather(eval_dir, variants)
    render(
        TEMPLATE,
        notebook,
        html,
        {
            "params_path": str(params_path),
            "eval_dir": str(eval_dir),
            "data_dir": str(data_dir),
            "runs_dir": None if runs_dir is None else str(runs_dir),
            "variants": variants,
        },
    )
    outputs.write_json(metrics, summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name in ("eval", "data", "metrics", "notebook", "html"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--runs", type=Path, help="the stages' run records (data/runs)")
    args = parser.parse_args()
    p = params.load(args.params, params.stage_keys("report"))
    variants = list(p["variants"])
    report(
        args.params,
        args.eval,
        args.data,
        args.metrics,
        args.notebook,
        args.html,
        variants,
        args.runs,
    )
    print(f"wrote {args.metrics} and {args.html}")


if __name__ == "__main__":
    outputs.run(main)

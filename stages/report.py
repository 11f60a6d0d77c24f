"""Gather every variant's results and render the HTML report.

Reads params (all sections: the report shows them), ``--eval`` and ``--models`` (one
subdirectory per variant); writes ``--metrics`` (reports/metrics.json, the DVC metrics),
``--notebook`` (the executed notebook) and ``--html`` (the report, code hidden).
Run: python -m stages.report --eval data/eval --models data/models --data data/processed \
    --metrics reports/metrics.json --notebook reports/report.ipynb --html reports/report.html
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nbformat
import papermill
from nbconvert import HTMLExporter

from stages import io, params

PARAMS = ["data", "split", "model", "train", "evaluate", "variants", "report"]
TEMPLATE = Path(__file__).with_name("report_template.ipynb")
START_TIMEOUT = 120  # seconds for the kernel to start
CELL_TIMEOUT = 600  # seconds per cell


def gather(eval_dir: Path, variants: list[str]) -> dict:
    """reports/metrics.json: variant -> canonical split losses, init_loss, mean, std."""
    out = {}
    for v in variants:
        m = json.loads((eval_dir / v / "metrics.json").read_text(encoding="utf-8"))
        out[v] = {
            **m["canonical"],
            "mean": m["mean"],
            "std": m["std"],
            "n_seeds": len(m["seeds"]),
            "n_diverged": m["n_diverged"],
        }
    return out


def render(notebook_in: Path, notebook_out: Path, html_out: Path, parameters: dict) -> None:
    """Execute ``notebook_in`` with papermill and export it to HTML without code.

    Raises papermill.PapermillExecutionError when a cell fails; nothing is written then.
    """
    with io.atomic_path(notebook_out) as nb_tmp, io.atomic_path(html_out) as html_tmp:
        papermill.execute_notebook(
            str(notebook_in), str(nb_tmp), parameters=parameters, kernel_name="python3",
            start_timeout=START_TIMEOUT, execution_timeout=CELL_TIMEOUT, progress_bar=False,
            cwd=str(Path.cwd()),
        )
        nb = nbformat.read(nb_tmp, as_version=4)
        exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                                exclude_output_prompt=True)
        body, _ = exporter.from_notebook_node(nb)
        html_tmp.write_text(body, encoding="utf-8")


def report(params_path: Path, eval_dir: Path, models_dir: Path, data_dir: Path,
           metrics: Path, notebook: Path, html: Path, variants: list[str]) -> dict:
    """Do the work; returns the metrics written to ``metrics``."""
    summary = gather(eval_dir, variants)
    render(TEMPLATE, notebook, html, {
        "params_path": str(params_path),
        "eval_dir": str(eval_dir),
        "models_dir": str(models_dir),
        "data_dir": str(data_dir),
        "variants": variants,
    })
    io.write_json(metrics, summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name in ("eval", "models", "data", "metrics", "notebook", "html"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    p = params.load(args.params, PARAMS)
    variants = list(p["variants"])
    report(args.params, args.eval, args.models, args.data, args.metrics, args.notebook,
           args.html, variants)
    print(f"wrote {args.metrics} and {args.html}")


if __name__ == "__main__":
    io.run(main)

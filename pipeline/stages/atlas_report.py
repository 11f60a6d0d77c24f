"""Render the depth atlas page (reports/atlas.html) and its DVC metrics.

Reads params atlas (the grids: the page shows exactly the cells of the current grid,
and a missing one is an error naming its file, whatever else data/atlas holds), the
atlas stages' JSON under ``--init`` / ``--train`` (d<depth>.json), ``--width``,
``--he`` and their run records under ``--runs``. Writes ``--html`` (contents; the
trainability heatmaps over depth x gain with 6 xi_c on the tanh map; per-layer
profiles with the theory's curves; the gradient ratio against depth with and without
BatchNorm; the measured-vs-predicted table with the sentences generated from it; the
He et al. analogue; where the cells ran and what the full atlas would cost) and
``--metrics`` (reports/atlas.json, for ``dvc exp show``: each table row's relative
error, the trainability counts per family, the He et al. sentence).
Run: python -m pipeline.stages.atlas_report --init data/atlas/init \
    --train data/atlas/train --width data/atlas/width.json --he data/atlas/he.json \
    --runs data/atlas/runs --html reports/atlas.html --metrics reports/atlas.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from charlm.atlas_theory import comparisons, sentences, width_rows
from charlm.config import AtlasConfig
from pipeline import outputs, params
from reporting import atlas as page


class MissingCell(FileNotFoundError):
    """An atlas output of the current grid is absent (its stage has not run)."""


def _load(path: Path, stage: str) -> dict[str, Any]:
    if not path.is_file():
        raise MissingCell(f"{path}: missing; run 'dvc repro {stage}' (it belongs to the grid)")
    return json.loads(path.read_text(encoding="utf-8"))


def _records(runs: Path) -> list[dict[str, Any]]:
    """The run records present (a record is no result: a missing one is skipped)."""
    out = []
    for path in sorted(runs.glob("atlas_*.json")):
        out.append(json.loads(path.read_text(encoding="utf-8")))
    return out


def collect(args: argparse.Namespace, cfg: AtlasConfig) -> dict[str, Any]:
    """Every cell of the current grid: 'init', 'train' (lists of cells), 'width' (list),
    'he' (the lr run and the lower_lr run)."""
    inits = [
        c for d in cfg.depths for c in _load(args.init / f"d{d}.json", f"atlas_init@{d}")["cells"]
    ]
    inits = [c for c in inits if c["nonlinearity"] in cfg.nonlinearities
             and c["batchnorm"] in cfg.batchnorm and c["width"] in cfg.widths]  # fmt: skip
    t = cfg.train
    trains = [
        c for d in t.depths for c in _load(args.train / f"d{d}.json", f"atlas_train@{d}")["cells"]
    ]
    return {
        "init": inits,
        "train": trains,
        "width": _load(args.width, "atlas_width")["cells"],
        "he": _load(args.he, "atlas_he")["cells"],
    }


def render(
    cells: dict[str, Any], records: list[dict[str, Any]], cfg: AtlasConfig
) -> tuple[str, dict]:
    """The page's HTML and the metrics."""
    rows = comparisons(cells["init"], cfg.batch_size)
    wrows = width_rows(cells["width"])
    text = sentences(rows, wrows)
    counts: dict[str, dict[str, int]] = {}
    for c in cells["train"]:
        fam = f"{c['nonlinearity']}{'_bn' if c['batchnorm'] else ''}"
        for row in c["status"]:
            for s in row:
                counts.setdefault(fam, {"trained": 0, "stalled": 0, "diverged": 0})[s] += 1
    he_fig, he_sentence = page.he_figure(cells["he"])
    he_depth = cells["he"][0]["depth"] if cells["he"] else cfg.he.depth  # what ran
    cols = ["group", "case", "quantity", "measured", "q10", "q90", "predicted", "rel_err", "note"]
    sections = [
        ("trainability", "Trainability: depth x gain", page.trainability_intro(cells["train"])
         + page.heatmaps(cells["train"])),
        ("profiles", "Per-layer profiles at init", page.profiles(cells["init"], cfg.batch_size)),
        ("gradients", "Gradient ratio, first / last layer, against depth",
         page.gradient_ratio_figure(cells["init"], cfg.batch_size)),
        ("table", "Measured vs predicted", "<ul>" + "".join(f"<li>{s}</li>" for s in text)
         + "</ul>" + page.table(rows, cols)),
        ("width", "Finite width", page.table(wrows, ["width", "gain", "measured", "predicted",
                                                     "rel_err"])),
        ("he", f"He et al. 2015's analogue: a {he_depth}-layer relu net",
         f"<p>{he_sentence}</p>{he_fig}"),
        ("cost", "Where the cells ran, and what the full atlas costs", page.cost(records, cfg)),
    ]  # fmt: skip
    intro = (
        f"{len(cells['init'])} architectures at init ({len(cfg.seeds)} seeds each, "
        f"{cfg.init_batches} minibatch(es) of {cfg.batch_size} real contexts), "
        f"{len(cells['width'])} widths, {len(cells['train'])} trained architectures. "
        "Hidden layers are numbered 1..L, input side first. Bands: 10-90% over seeds. "
        "Theory: charlm.theory (mean field, docs/theory.md), started from each cell's "
        "measured first-layer input; nothing is fitted."
    )
    metrics = {
        "theory_vs_measured": {
            f"{r['group']} | {r['case']} | {r['quantity']}": {"rel_err": r["rel_err"]} for r in rows
        },
        "trainability": counts,
        "he": he_sentence,
    }
    return page.page(sections, intro), metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    for name in ("init", "train", "width", "he", "runs", "html", "metrics"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args()
    cfg = params.load(args.params, params.stage_keys("atlas_report"))["atlas"]
    html, metrics = render(collect(args, cfg), _records(args.runs), cfg)
    outputs.write_text(args.html, html)
    outputs.write_json(args.metrics, metrics)
    print(f"wrote {args.html} and {args.metrics}: {len(metrics['theory_vs_measured'])} theory rows")


if __name__ == "__main__":
    outputs.run(main)

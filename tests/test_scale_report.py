"""The report with a learner's own variants (issue 16): deeper nets, relu, short runs.

The session's tiny run plus what a learner fresh from the lecture adds with
``-S '+variants.<name>={...}'``: relu5 (5 relu layers of 100 units) with and without
BatchNorm, and tanh nets of 1, 10 and 20 layers, each a short run with one seed. The
page must not claim a length, a seed count or a depth that a variant did not have;
every figure has axis titles and no legend more than LEGEND_MAX entries; the relu
tables report the share of zeros.
"""

from __future__ import annotations

import copy
import html
import json
import re
from pathlib import Path

import matplotlib
import pytest
import yaml
from support import TinyRun, run

pytestmark = pytest.mark.slow

SHORT = {"max_steps": 200, "seeds": [2147483647]}
LEARNER = {
    "relu5": {"layers": 5, "n_hidden": 100, "nonlinearity": "relu"},
    "relu5_bn": {"layers": 5, "n_hidden": 100, "nonlinearity": "relu", "batchnorm": True},
    "tanh1": {"init": "second_half", "layers": 1, "n_hidden": 100},
    "tanh10": {"init": "second_half", "layers": 10, "n_hidden": 100},
    "tanh20": {"init": "second_half", "layers": 20, "n_hidden": 100},
}


@pytest.fixture(scope="module")
def learner_run(tiny_run: TinyRun, tmp_path_factory) -> Path:
    """A copy of the tiny run with the learner's variants added and reproduced."""
    root = tiny_run.copy(tmp_path_factory.mktemp("learner") / "repo")
    path = root / "params.yaml"
    p = yaml.safe_load(path.read_text(encoding="utf-8"))
    for name, v in LEARNER.items():
        p["variants"][name] = {**v, "train": copy.deepcopy(SHORT)}
    path.write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
    run(["dvc", "repro"], cwd=root, env=tiny_run.env)
    return root


def prose(page: str) -> str:
    """The page's text outside tables, figures and the params listing."""
    page = re.sub(r"<pre.*?</pre>|<table.*?</table>|<style.*?</style>", " ", page, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    return re.sub(r"\s+", " ", text)


def sentences_naming(text: str, name: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.;])\s", text) if re.search(rf"\b{name}\b", s)]


def test_words_claim_only_what_each_variant_ran(learner_run: Path):
    page = (learner_run / "reports" / "report.html").read_text(encoding="utf-8")
    text = prose(page)
    assert "Seeds per variant" not in text  # variants differ: no global claim
    for name in LEARNER:
        said = sentences_naming(text, name)
        assert said, f"{name} is never named in the page's text"
        for s in said:
            steps = {int(n.replace(",", "")) for n in re.findall(r"([\d,]+) steps", s)}
            seeds = {int(n) for n in re.findall(r"(\d+) seeds?\b", s)}
            # a sentence naming several groups states several lengths: the short one
            # must be among them, and the lecture's 200,000 is never claimed for it
            assert not steps or SHORT["max_steps"] in steps, s
            assert 200_000 not in steps, s
            assert not seeds or 1 in seeds, s
            for depth in re.findall(r"(\d+) hidden \w+ layers", s):
                assert int(depth) in {x["layers"] for x in LEARNER.values()} | {5}, s
    assert "At depth (" not in text  # depths 1, 5, 10 and 20 ran: no single depth
    for s in sentences_naming(text, "lecture trains"):
        assert not any(name in s for name in LEARNER), s
    assert "relu5, relu5_bn, tanh1, tanh10, tanh20: 1 seed × 200 steps" in text


def test_relu_tables_report_the_share_of_zeros(learner_run: Path):
    page = (learner_run / "reports" / "report.html").read_text(encoding="utf-8")
    assert "share zero (relu)" in page  # the activation table of every variant
    section = re.split(r"<h4[^>]*>relu5\b", page)[1].split("<h4")[0]
    assert "% zero" in section and "% saturated" not in section
    assert "h = 0" in section or "out = 0" in section


def test_every_figure_has_axis_titles_and_short_legends(learner_run: Path, monkeypatch):
    """Executes the report's cells in this process with ``display`` collecting the
    figures, and checks each visible panel (colour bars aside)."""
    import IPython.display

    from reporting.figures import LEGEND_MAX

    matplotlib.use("Agg")
    figures = []

    def collect(obj, *args, **kwargs):
        if isinstance(obj, matplotlib.figure.Figure):
            figures.append(obj)

    monkeypatch.setattr(IPython.display, "display", collect)
    monkeypatch.chdir(learner_run)
    nb = json.loads((learner_run / "reporting" / "template.ipynb").read_text(encoding="utf-8"))
    p = yaml.safe_load((learner_run / "params.yaml").read_text(encoding="utf-8"))
    ns = {"__name__": "report"}
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    exec("".join(code[0]["source"]), ns)  # the parameters cell's defaults, then ours
    ns.update(variants=list(p["variants"]), runs_dir="data/runs")
    problems = []
    for cell in code[1:]:
        exec("".join(cell["source"]), ns)
        for fig in figures:
            title = fig._suptitle.get_text() if fig._suptitle else ""
            for ax in fig.axes:
                if not ax.axison or ax.get_label() == "<colorbar>":
                    continue
                where = f"{title!r} / {ax.get_title()!r}"
                if not (ax.get_xlabel() and ax.get_ylabel()):
                    problems.append(f"{where}: axis title missing")
                legend = ax.get_legend()
                if legend is not None and len(legend.get_texts()) > LEGEND_MAX:
                    problems.append(f"{where}: legend of {len(legend.get_texts())} entries")
            matplotlib.pyplot.close(fig)
        figures.clear()
    assert not problems, "\n".join(problems)

"""The HTML report: statistics, self-containment, determinism, degenerate inputs.

Unit tests check the numbers and sentences the report is made of (the t quantile
against the printed table, the paired t and bootstrap intervals, verdicts, the repeated
names) and the HTML export. Integration tests
take a copy of the session's tiny pipeline run, open the report in headless Chromium
(Debian's ``chromium``, driven by Playwright), check that this check catches faults
injected into a copy of it, rerun the report stage and compare bytes, and feed it
degenerate diagnostics.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
import torch
import yaml
from support import contents_problems, run, strict_json

from charlm import artefacts
from charlm.diagnostics import activation_summary
from pipeline import outputs
from pipeline import params as params_file
from pipeline.stages import report
from pipeline.stages.evaluate import summarise
from reporting import intervals as report_intervals
from reporting import stats as report_stats

SECTIONS = (
    "This run", "Split losses beside the published numbers", "Across seeds",
    "Paired comparisons of the validation loss", "Training loss", "Loss at step 0",
    "Hidden activations on a fixed probe batch", "Gradients at initialisation",
    "Update:data ratio over training", "BatchNorm: running statistics vs calibrated ones",
    "Layer by layer during training", "Samples", "The depth atlas", "Parameters used",
)  # fmt: skip
# Offline and quiet: no background services, updates, first-run pages or GPU.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
    "--disable-extensions", "--mute-audio",
]  # fmt: skip


# ---- unit: statistics and sentences ---------------------------------------------------

# t_{0.975, df} from the printed table (NIST/SEMATECH e-Handbook, 1.3.6.7.2), 3 decimals
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
           9: 2.262, 10: 2.228, 30: 2.042, 100: 1.984}  # fmt: skip


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_paired_t_interval_uses_the_printed_t_quantile(df):
    """n = df + 1 paired seeds: the quantile and the half-width t * sd / sqrt(n)."""
    d = [0.01 * ((7 * i) % 5 - 2) + 0.003 for i in range(df + 1)]
    c = report_intervals.paired_difference([2 + x for x in d], [2.0] * (df + 1))
    assert c.t == pytest.approx(T_TABLE[df], abs=5e-4)
    half = T_TABLE[df] * c.sd / math.sqrt(df + 1)
    assert (c.hi - c.lo) / 2 == pytest.approx(half, rel=5e-4 / T_TABLE[df] + 1e-9)
    assert (c.lo + c.hi) / 2 == pytest.approx(c.mean, abs=1e-12)


def test_bootstrap_interval_is_seeded_and_close_to_t_for_many_seeds():
    g = torch.Generator().manual_seed(0)
    a = (2 + 0.01 * torch.randn(200, generator=g, dtype=torch.float64)).tolist()
    b = [2.0] * 200
    c = report_intervals.paired_difference(a, b)
    again = report_intervals.paired_difference(a, b)
    assert (c.boot_lo, c.boot_hi) == (again.boot_lo, again.boot_hi)  # deterministic
    assert c.boot_lo < c.mean < c.boot_hi
    # 200 pairs: the percentile bootstrap and the t interval nearly agree (both estimate
    # the same normal-theory width; 10 % covers the bootstrap's resampling error)
    assert c.boot_hi - c.boot_lo == pytest.approx(c.hi - c.lo, rel=0.1)
    assert (c.boot_lo + c.boot_hi) / 2 == pytest.approx(c.mean, abs=0.1 * (c.hi - c.lo))
    # equal differences: both intervals shrink to the point
    same = report_intervals.paired_difference([2.1, 2.2, 2.3], [2.0, 2.1, 2.2])
    assert same.boot_lo == pytest.approx(0.1) and same.boot_hi == pytest.approx(0.1)


def test_paired_difference_skips_missing_pairs_and_builds_the_t_interval():
    a = [2.10, 2.12, None, 2.11, float("nan")]
    b = [2.00, 2.03, 2.05, 2.00, 2.01]
    c = report_intervals.paired_difference(a, b, "a", "b")
    d = [0.10, 0.09, 0.11]
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    half = 4.302652729749 * sd / math.sqrt(3)
    assert c.n == 3
    assert c.mean == pytest.approx(mean)
    assert c.sd == pytest.approx(sd)
    assert (c.lo, c.hi) == pytest.approx((mean - half, mean + half), abs=1e-9)
    assert c.boot_lo == pytest.approx(0.09) and c.boot_hi == pytest.approx(0.11)  # min, max
    assert "b beats a by 0.1000" in report_intervals.verdict(c, 0.01, 0.02)
    assert "larger than the seed-to-seed sd (0.0200)" in report_intervals.verdict(c, 0.01, 0.02)


def test_verdicts_when_the_interval_includes_zero_or_is_missing():
    c = report_intervals.paired_difference([1.0, 2.0, 3.0], [1.1, 1.9, 3.05])
    assert "no clear difference" in report_intervals.verdict(c, 1.0, 1.0)
    one = report_intervals.paired_difference([1.0, None], [2.0, 2.0])
    assert one.n == 1 and one.lo is None and one.boot_lo is None
    assert "needs at least two" in report_intervals.verdict(one, None, None)
    none = report_intervals.paired_difference([None], [float("inf")])
    assert "no comparison" in report_intervals.verdict(none, None, None)


def test_mean_std_formatting_of_missing_values():
    assert report_stats.fmt_mean_std([None, float("nan")]) == "– (no finite value)"
    assert report_stats.fmt_mean_std([1.0, None]) == "1.0000 (n = 1)"
    assert report_stats.fmt_mean_std([1.0, 3.0], 2) == "2.00 ± 1.41 (n = 2)"


def test_duplicates_sentence_states_the_counts():
    counts = {"names": 32_033, "words": {"train": 25_626, "val": 3_203, "test": 3_204},
              "duplicates": {"distinct_names": 29_494, "repeated_lines": 2_539,
                             "also_in_train": {"val": 424, "test": 377},
                             "unseen": {"val": 2_779, "test": 2_827},
                             "unseen_windows": {"val": 19_000, "test": 19_500}}}  # fmt: skip
    text = report_stats.duplicates_sentence(counts)
    assert "repeats 2,539 lines (29,494 distinct names in 32,033 lines)" in text
    assert "424 of the 3,203 val names and 377 of the 3,204 test names also occur" in text
    assert "val_unseen 19,000, test_unseen 19,500" in text


# ---- unit: HTML export ----------------------------------------------------------------


def test_html_export_loads_nothing_from_the_network():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# title $x$")])
    page = report.to_html(nb)
    assert "<script src=" not in page
    assert "cdnjs" not in page and "unpkg" not in page and "mathjax" not in page.lower()
    assert 'href="http' not in page and "@import" not in page
    assert "<title>report</title>" in page


def contents_notebook(batchnorm: bool) -> nbformat.NotebookNode:
    """A notebook shaped like the report's: a title, markdown sections, subsections, a
    section emitted by a code cell only for some runs (as BatchNorm's is), a heading
    repeated, and one written as raw HTML without an id."""
    v4 = nbformat.v4
    cells = [
        v4.new_markdown_cell("# Title\n\nThe summary."),
        v4.new_markdown_cell("## This run\n\ntext"),
        v4.new_markdown_cell("## Across seeds"),
        v4.new_markdown_cell("### Paired comparisons of the validation loss"),
        v4.new_markdown_cell("### By architecture"),
        v4.new_code_cell("x"),
        v4.new_markdown_cell("## Samples"),
        v4.new_markdown_cell("#### naive"),  # below h3: not in the contents
        v4.new_markdown_cell("## Samples"),
        v4.new_code_cell("y"),
        v4.new_markdown_cell("## The depth atlas\n\n[atlas.html](atlas.html)"),
    ]
    if batchnorm:
        cells[5].outputs = [v4.new_output("display_data", data={
            "text/markdown": "## BatchNorm: running statistics vs calibrated ones\n\ntext",
            "text/plain": "<IPython.core.display.Markdown object>"})]  # fmt: skip
    cells[9].outputs = [v4.new_output("display_data", data={
        "text/html": "<h2>Raw &amp; HTML</h2>", "text/plain": "x"})]  # fmt: skip
    return v4.new_notebook(cells=cells)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_table_of_contents_links_every_section_that_renders(batchnorm):
    nb = contents_notebook(batchnorm)
    page = report.to_html(nb)
    assert contents_problems(page) == []
    nav = re.search(r'<nav class="report-contents".*?</nav>', page, re.S).group(0)
    assert page.index(nav) < page.index("<h2") and page.index("<h1") < page.index(nav)
    titles = re.findall(r"<a href=[^>]*>([^<]*)</a>", nav)
    assert titles == [
        "This run", "Across seeds", "Paired comparisons of the validation loss",
        "By architecture",
        *(["BatchNorm: running statistics vs calibrated ones"] if batchnorm else []),
        "Samples", "Samples", "Raw &amp; HTML", "The depth atlas",
    ]  # fmt: skip
    # nbconvert's own ids (checked in this nbconvert version), a suffix for the repeat
    # and an id for the heading that had none
    hrefs = re.findall(r'<a href="([^"]*)"', nav)
    assert "#Across-seeds" in hrefs and "#Samples" in hrefs and "#Samples-2" in hrefs
    assert "#Raw-&amp;-HTML" in hrefs
    assert ('href="#BatchNorm:-running-statistics-vs-calibrated-ones"' in nav) == batchnorm
    assert report.to_html(nb) == page  # deterministic


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("drop the contents", "no table of contents"),
        ("a link to no id", "0 elements have that id"),
        ("a section not listed", "missing: ['Across seeds']"),
        ("contents after the first section", "after the first section"),
    ],
)
def test_contents_check_catches_a_broken_table_of_contents(fault, expected):
    """The checker itself: each fault in a good page gives its problem."""
    page = report.to_html(contents_notebook(True))
    nav = re.search(r'<nav class="report-contents".*?</nav>\n', page, re.S).group(0)
    if fault == "drop the contents":
        bad = page.replace(nav, "")
    elif fault == "a link to no id":
        bad = page.replace('href="#This-run">', 'href="#This-run-typo">', 1)
    elif fault == "a section not listed":
        bad = page.replace('<li><a href="#Across-seeds">Across seeds</a>', "<li>", 1)
    else:
        bad = page.replace(nav, "").replace("</body>", nav + "</body>")
    assert any(expected in p for p in contents_problems(bad)), contents_problems(bad)


def test_atlas_link_points_beside_the_report_and_the_report_reads_no_atlas_output():
    """The template's relative link 'atlas.html' resolves, from where the report stage
    writes report.html, to the page the atlas_report stage writes (dvc.yaml), and the
    report stage depends on nothing of the atlas (a link only: its deps and params are
    those of the report)."""
    from support import ROOT

    nb = json.loads((ROOT / "reporting" / "template.ipynb").read_text(encoding="utf-8"))
    text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    (href,) = re.findall(r"\]\(([^)]*atlas[^)]*)\)", text)
    assert "`dvc repro atlas_report`" in text
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]

    def html_out(stage: str) -> Path:
        return Path(re.search(r"--html (\S+)", stages[stage]["cmd"]).group(1))

    assert (html_out("report").parent / href) == html_out("atlas_report")
    deps = stages["report"]["deps"]
    assert not [d for d in deps if "atlas" in d], deps
    assert "atlas" not in stages["report"]["params"]


def test_make_deterministic_drops_times_paths_and_random_ids():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nb.cells[0].metadata = {
        "tags": ["injected-parameters"],
        "papermill": {"start_time": "now"},
        "execution": {"iopub.status.idle": "now"},
    }
    nb.metadata["papermill"] = {
        "start_time": "t",
        "end_time": "t",
        "duration": 1.0,
        "input_path": "/tmp/a",
        "output_path": "/tmp/b",
        "parameters": {"x": 1},
    }
    report.make_deterministic(nb)
    assert nb.cells[0].id == "injected-parameters"
    assert nb.cells[0].metadata == {"tags": ["injected-parameters"]}
    assert nb.metadata["papermill"] == {"parameters": {"x": 1}}


# ---- integration: the tiny pipeline's report ------------------------------------------


def _require(ok: bool, msg: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@dataclass
class PageVisit:
    """What loading one page in Chromium did (the page's file:// URL itself aside)."""

    requests: list[str] = field(default_factory=list)  # other URLs asked for (all aborted)
    console_errors: list[str] = field(default_factory=list)  # console.error, failed loads
    page_errors: list[str] = field(default_factory=list)  # uncaught exceptions
    images: list[dict] = field(default_factory=list)  # one entry per <img>, see IMAGES_JS
    text: str = ""  # document.body.innerText
    contents: list[dict] = field(default_factory=list)  # table-of-contents links, CONTENTS_JS
    links: dict[str, str] = field(default_factory=dict)  # other links: text -> absolute URL
    jump: dict | None = None  # after clicking a contents link (``visit_page(jump_to=...)``)


IMAGES_JS = """Array.from(document.images).map(img => {
  const r = img.getBoundingClientRect();
  return {complete: img.complete, natural_w: img.naturalWidth, natural_h: img.naturalHeight,
          w: r.width, h: r.height, src: img.src.slice(0, 40)};
})"""


# Each table-of-contents link: its text, its href and whether the browser finds the
# element it points to (the fragment as the id, as a click looks it up first).
CONTENTS_JS = """Array.from(document.querySelectorAll('nav.report-contents a')).map(a => ({
  text: a.textContent, href: a.getAttribute('href'),
  found: document.getElementById(a.getAttribute('href').slice(1)) !== null}))"""
LINKS_JS = """Object.fromEntries(Array.from(document.querySelectorAll('a[href]'))
  .filter(a => !a.closest('nav.report-contents') && !a.classList.contains('anchor-link'))
  .map(a => [a.textContent, a.href]))"""
# After a click on a contents link: the URL's fragment and where its target now sits.
JUMP_JS = """(() => { const id = decodeURIComponent(location.hash.slice(1));
  const el = document.getElementById(id) || document.getElementById(location.hash.slice(1));
  return {hash: location.hash, top: el ? el.getBoundingClientRect().top : null,
          scrolled: window.scrollY}; })()"""


def visit_page(chromium, page: Path, jump_to: str | None = None) -> PageVisit:
    """Open ``page`` in a fresh context of the Playwright browser ``chromium``.

    Every request other than file:// is recorded and aborted, so nothing leaves the
    machine; returns once the page has loaded, the network has been idle for 500 ms (late
    requests and messages are caught) and every image is complete. With ``jump_to``,
    clicks the table-of-contents link of that text last (``PageVisit.jump``).
    """
    out = PageVisit()

    def route(r) -> None:
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            out.requests.append(r.request.url)
            r.abort()

    def console(message) -> None:
        if message.type in ("error", "assert"):
            out.console_errors.append(message.text[:300])

    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    try:
        context.route("**/*", route)
        tab = context.new_page()
        tab.on("console", console)
        tab.on("pageerror", lambda e: out.page_errors.append(str(e)[:300]))
        tab.goto(page.resolve().as_uri(), wait_until="load", timeout=60_000)
        tab.wait_for_load_state("networkidle", timeout=60_000)
        tab.wait_for_function("Array.from(document.images).every(i => i.complete)")
        out.images = tab.evaluate(IMAGES_JS)
        out.text = tab.inner_text("body")
        out.contents = tab.evaluate(CONTENTS_JS)
        out.links = tab.evaluate(LINKS_JS)
        if jump_to is not None:
            tab.click(f'nav.report-contents a:text-is("{jump_to}")')
            tab.wait_for_function("location.hash !== ''")
            out.jump = tab.evaluate(JUMP_JS)
    finally:
        context.close()
    return out


@pytest.fixture(scope="module")
def browser():
    """``visit(path) -> PageVisit`` in Debian's headless Chromium, driven by Playwright.

    No browser is downloaded (no ``playwright install``): Playwright's bundled driver
    launches the system ``chromium``, once per module. Missing Playwright or Chromium: a
    skip, a failure in CI (.ci/run installs chromium).
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "playwright is not installed (pip install -r requirements.txt)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    _require(binary is not None, "chromium not found: apt-get install chromium (Debian)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=binary, args=CHROMIUM_FLAGS)
        try:
            yield functools.partial(visit_page, chromium)
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_run, repo_env):
    """A copy of the session's tiny run (committed; curves in windows of 50 steps, so
    that the 300-step run draws lines, not single points), with its environment."""
    root = tiny_run.copy(tmp_path_factory.mktemp("report") / "repo")
    return root, dict(repo_env)


def expected_figures(root: Path) -> int:
    """The figures the report of the run in ``root`` draws, from its params and records:
    seeds and curves (2), gradients at init and update ratios (2), then per variant one
    activation figure per hidden layer, one running-vs-calibrated figure when it has
    BatchNorm (every module in it) and, with snapshots, 4 layer-by-layer figures
    (activations, gradients, weight gradients, update ratio); a variant of more than
    PER_LAYER_MAX hidden layers has one activation figure of all its layers; the
    by-architecture figure when some variants differ in one knob only."""
    from types import SimpleNamespace

    from reporting.figures import PER_LAYER_MAX
    from reporting.stats import knob_families

    config = params_file.validate(root / "params.yaml")
    n = 2 + 2
    for v in config.variants:
        d = load_records(root / "data" / "eval" / v / "diagnostics.pt")
        layers = len(d.layers) if len(d.layers) <= PER_LAYER_MAX else 1
        n += layers + (d.batchnorm is not None) + (4 if d.snapshots else 0)
    view = SimpleNamespace(params=config, variants=list(config.variants))
    return n + bool(knob_families(view))


def short_of_snapshot(root: Path) -> list[str]:
    """The variants of ``root``'s run without the lecture's step-1,000 snapshot."""
    variants = params_file.validate(root / "params.yaml").variants
    snaps = {
        v: load_records(root / "data" / "eval" / v / "diagnostics.pt").snapshots for v in variants
    }
    return [v for v in variants if "snapshot" not in (snaps[v] or {})]


def render_cli(root: Path, eval_dir: Path, out: Path, check: bool = True):
    """Run the report stage by hand on ``eval_dir``, writing into ``out``."""
    return run(
        [
            sys.executable,
            "-m",
            "pipeline.stages.report",
            "--eval",
            str(eval_dir),
            "--data",
            "data/processed",
            "--metrics",
            str(out / "metrics.json"),
            "--notebook",
            str(out / "report.ipynb"),
            "--html",
            str(out / "report.html"),
        ],
        cwd=root,
        check=check,
        env={"CHARLM_TRACEBACK": ""},
    )


def page_problems(visit: PageVisit) -> list[str]:
    """Everything that makes a page not self-contained or broken, one line each."""
    out = [f"network request: {u}" for u in visit.requests]
    out += [f"console error: {e}" for e in visit.console_errors]
    out += [f"page error: {e}" for e in visit.page_errors]
    for img in visit.images:
        ok = img["complete"] and img["natural_w"] > 0 and img["natural_h"] > 0
        if not (ok and img["w"] > 0 and img["h"] > 0):
            out.append(f"broken image: {img}")
        elif not img["src"].startswith("data:image/png;base64,"):
            out.append(f"image not an inline PNG: {img}")
    return out


def assert_complete_page(visit: PageVisit) -> None:
    assert page_problems(visit) == []
    for heading in SECTIONS:
        assert heading in visit.text, f"section {heading!r} missing"
    assert "Traceback" not in visit.text
    assert visit.images, "no figure at all"


@pytest.mark.integration
@pytest.mark.slow
def test_report_opens_in_headless_chromium_self_contained(tiny, browser):
    root, _ = tiny
    page = root / "reports" / "report.html"
    text = page.read_text(encoding="utf-8")
    assert "<script src=" not in text and 'href="http' not in text
    visit = browser(page, jump_to="Training loss")
    assert_complete_page(visit)
    # the table of contents: every section, every link resolves, in the file and in the
    # browser, and a click brings its section to the top of the window
    assert contents_problems(text) == []
    assert [c for c in visit.contents if not c["found"]] == []
    listed = [c["text"] for c in visit.contents]
    assert [s for s in SECTIONS if s not in listed] == []
    assert visit.jump["hash"] == "#Training-loss" and visit.jump["scrolled"] > 0
    assert abs(visit.jump["top"]) < 5, visit.jump
    # the atlas page is linked where the atlas_report stage writes it (beside the report)
    assert visit.links["atlas.html"] == (root / "reports" / "atlas.html").as_uri()
    assert len(visit.images) == expected_figures(root)
    summary = visit.text.split("This run")[0]
    assert "reaches the lowest mean validation loss" in summary
    # 300 steps cannot reach the published numbers, and the summary says why
    assert "Outside the tolerance: naive, kaiming, batchnorm." in " ".join(summary.split())
    # the tiny run stops before the lecture's snapshot step (1,000): the layer-by-layer
    # figures say so for that moment (and draw the final step); nothing else may be left
    # undrawn
    short = "snapshot: not recorded (the run is shorter than the lecture's step)."
    undrawn = re.findall(r"Not drawn: [^\n]*", visit.text)
    assert sorted(undrawn) == sorted(
        f"Not drawn: {v}, {short}" for v in short_of_snapshot(root) for _ in (0, 1, 2)
    ), undrawn
    # the section, not its entry in the table of contents: the text after the last "This run"
    header = visit.text.split("This run")[-1].split("Split losses beside")[0]
    for stage in ("download", "split", "train@kaiming", "evaluate@batchnorm"):
        assert stage in header, f"no run record of {stage} in the header"
    assert "not recorded" not in header
    strict_json(root / "reports" / "metrics.json")


# Faults injected into a copy of the real report, and the problem each must produce.
INJECTED = {
    "remote image": ('<img src="https://example.com/x.png">',
                     ["network request: https://example.com/x.png", "broken image"]),
    "remote stylesheet": ('<link rel="stylesheet" href="http://127.0.0.1:9/a.css">',
                          ["network request: http://127.0.0.1:9/a.css"]),
    "fetch": ('<script>fetch("https://example.com/data.json")</script>',
              ["network request: https://example.com/data.json"]),
    "console error": ('<script>console.error("boom")</script>', ["console error: boom"]),
    "uncaught exception": ('<script>throw new Error("uncaught")</script>',
                           ["page error: uncaught"]),
    "broken inline image": ('<img src="data:image/png;base64,AAAA">', ["broken image"]),
}  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("fault", list(INJECTED))
def test_browser_check_catches_a_fault_injected_into_the_report(fault, tiny, tmp_path, browser):
    """The checker itself: the real report plus one fault fails for that fault's reason."""
    root, _ = tiny
    snippet, expected = INJECTED[fault]
    page = tmp_path / "report.html"
    text = (root / "reports" / "report.html").read_text(encoding="utf-8")
    page.write_text(text.replace("</body>", snippet + "</body>", 1), encoding="utf-8")
    visit = browser(page)
    problems = page_problems(visit)
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)
    with pytest.raises(AssertionError):
        assert_complete_page(visit)


@pytest.mark.integration
@pytest.mark.slow
def test_report_rerun_is_byte_identical_even_after_a_commit(tiny):
    root, env = tiny
    outs = [root / "reports" / n for n in ("report.html", "report.ipynb", "metrics.json")]
    before = [p.read_bytes() for p in outs]
    # a new commit changes HEAD but no input of the report: the revision it shows was
    # recorded by the evaluate stage, so the page must not change (the run is committed
    # already: the new commit may be empty)
    run("git add -A && git commit -q --allow-empty -m 'lock and metrics'", cwd=root, env=env)
    proc = run(["dvc", "repro", "--force", "--single-item", "report"], cwd=root, env=env)
    assert "Running stage 'report'" in proc.stdout + proc.stderr
    for p, b in zip(outs, before, strict=True):
        assert p.read_bytes() == b, f"{p.name} changed on rerun"


def load_records(path: Path) -> artefacts.Diagnostics:
    return artefacts.from_state(torch.load(path, weights_only=True), str(path))


def save_records(path: Path, d: artefacts.Diagnostics) -> None:
    torch.save(artefacts.to_state(d), path)


def make_degenerate(src: Path, dst: Path) -> None:
    """Copy evaluate's outputs and break them the ways a real run can.

    naive: an all-zero gradient at init (as when W2 = 0), so every update ratio is
    log10(0) = -inf; kaiming: hidden unit 0 saturated on every probe example, at init
    and after training (a dead unit); batchnorm: the canonical seed diverged at step
    150, so its split losses are null and its diagnostics NaN.
    """
    shutil.copytree(src, dst)
    path = dst / "naive" / "diagnostics.pt"
    d = load_records(path)
    for layer in d.layers:
        layer.dh.zero_()
    for w in d.weights.values():
        for t in (w.grad_mean, w.grad_std, w.grad_data_ratio):
            t.zero_()
        w.update_ratio.fill_(-math.inf)
    save_records(path, d)

    path = dst / "kaiming" / "diagnostics.pt"
    d = load_records(path)
    for when, acts in d.layers[0].activations.items():
        acts.h[:, :, 0] = 1.0
        acts.hpreact[:, :, 0] = 50.0
        summary = activation_summary(acts.h, acts.hpreact, tuple(d.thresholds))
        d.layers[0].activations[when] = acts.model_copy(update=summary)
    save_records(path, d)

    m = json.loads((dst / "batchnorm" / "metrics.json").read_text(encoding="utf-8"))
    m["per_seed"]["diverged_at"][0] = 150
    m["per_seed"]["diverged"][0] = True
    m["n_diverged"] = 1
    for k in ("train", "val", "test", "val_unseen", "test_unseen"):
        m["per_seed"][k][0] = None
        m["canonical"][k] = None
        m["mean"][k], m["std"][k] = summarise(m["per_seed"][k])
    m["share_samples_in_train"][0] = None
    (dst / "batchnorm" / "metrics.json").write_text(outputs.dumps_json(m), encoding="utf-8")
    s = json.loads((dst / "batchnorm" / "samples.json").read_text(encoding="utf-8"))
    s["share_in_train"][0] = None
    (dst / "batchnorm" / "samples.json").write_text(outputs.dumps_json(s), encoding="utf-8")
    path = dst / "batchnorm" / "diagnostics.pt"
    d = load_records(path)
    d.diverged_at[0] = 150
    d.curve.log10_loss[d.curve.step >= 150, 0] = math.nan
    acts = d.layers[0].activations["final"]
    acts.h[0], acts.hpreact[0] = math.nan, math.nan
    summary = activation_summary(acts.h, acts.hpreact, tuple(d.thresholds))
    d.layers[0].activations["final"] = acts.model_copy(update=summary)
    for w in d.weights.values():
        w.update_ratio[d.update_steps >= 150, 0] = math.nan
    for bn in d.batchnorm.layers.values():
        bn.running_mean[0], bn.running_std[0] = math.nan, math.nan
    for losses in (d.batchnorm.loss_running, d.batchnorm.loss_calibrated):
        for k in losses:
            losses[k][0] = math.nan
    save_records(path, d)


@pytest.mark.integration
@pytest.mark.slow
def test_report_on_degenerate_diagnostics_is_complete_with_notes(tiny, tmp_path, browser):
    root, _ = tiny
    make_degenerate(root / "data" / "eval", tmp_path / "eval")
    render_cli(root, tmp_path / "eval", tmp_path)
    visit = browser(tmp_path / "report.html")
    assert_complete_page(visit)
    text = visit.text
    assert "Not drawn: naive: the gradient at h is exactly zero" in text
    assert "Not drawn: naive: no update:data ratio is finite" in text
    assert "Note: batchnorm: 1 diverged seed(s) have no split losses" in text
    assert "kaiming 1 → 1" in text  # the dead unit, at init and after training
    assert "no value (diverged)" in text  # batchnorm's canonical seed vs the reference
    metrics = strict_json(tmp_path / "metrics.json")
    assert metrics["batchnorm"]["val"] is None and metrics["batchnorm"]["n_diverged"] == 1


@pytest.mark.integration
@pytest.mark.slow
def test_report_stage_fails_cleanly_when_a_cell_fails(tiny, tmp_path):
    root, _ = tiny
    shutil.copytree(root / "data" / "eval", tmp_path / "eval")
    path = tmp_path / "eval" / "kaiming" / "diagnostics.pt"
    d = torch.load(path, weights_only=True)
    d["format"] = 3  # written by an older evaluate stage: the loading cell refuses it
    torch.save(d, path)
    out = tmp_path / "out"
    proc = render_cli(root, tmp_path / "eval", out, check=False)
    assert proc.returncode == 1
    assert "error: the report notebook failed in cell" in proc.stderr
    assert "ValueError" in proc.stderr and "Traceback" not in proc.stderr
    assert "diagnostics format 3" in proc.stderr and "evaluate@kaiming" in proc.stderr
    assert not (out / "report.html").exists() and not (out / "report.ipynb").exists()
    assert not (out / "metrics.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")] if out.exists() else True

"""DVC experiments at scale: queued sweeps, variants added from the command line, sharing.

Unit tests feed the sweep report synthetic ``dvc.api`` answers and expand Hydra sweep
overrides the way DVC does (the Makefile's sweep among them). Integration tests run
dvc in copies of one baseline repository (kaiming only, one seed, 200 steps, run and
committed once per module), each under subprocess time limits, with queue workers
stopped in a ``finally``.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import yaml
from dvc.exceptions import DvcException
from dvc.utils.hydra import get_hydra_sweeps
from support import ROOT, TINY, deep_update, make_repo, run

from tools import sweep_report as sr
from tools.sweep_figures import numeric, solo_keys, swept_keys

# One seed, 200 steps, only the kaiming variant: the smallest run that still learns.
SMALL = deep_update(
    TINY,
    {
        "train": {"seeds": [2147483647], "max_steps": 200, "lr_decay_step": 100,
                  "record_every": 50},
        "evaluate": {"n_novelty": 0, "n_samples": 3},
    },
)  # fmt: skip
QUEUE_LIMIT = 240  # seconds for a queued sweep to finish
STEP_LIMIT = 180  # seconds for any single dvc command
# The lecture's rows (2) and (3) as new variants (DESIGN.md; makemore part 3 loss log).
OUT_SCALED = (
    "{init: first_half, weight_scale: 1.0, bias_scale: 1.0, out_weight_scale: 0.01, "
    "out_bias_scale: 0.0}"
)
HIDDEN_SCALED = (
    "{init: first_half, weight_scale: 0.2, bias_scale: 0.01, out_weight_scale: 0.01, "
    "out_bias_scale: 0.0}"
)


# --- unit: the experiments dvc.api lists ---------------------------------------------------


def _variant(val: float, std: float | None) -> dict:
    return {
        "train": val - 0.1,
        "val": val,
        "test": val + 0.01,
        "init_loss": 3.3,
        "mean": {"val": val},
        "std": {"val": std},
        "n_seeds": 2,
    }


DATA = {"url": "https://example.invalid/names.txt", "sha256": "0" * 64}


def _params(gain: object, extra: dict | None = None) -> dict:
    variants = {"kaiming": {"init": "first_half", "gain": gain}, **(extra or {})}
    return {"data": DATA, "train": {"seeds": [1, 2]}, "variants": variants}


def _row(name: str | None, rev: str, state: str | None = None) -> dict:
    """A row of ``dvc.api.exp_show()`` (its flat param and metric columns left out)."""
    typ = "baseline" if name is None else "branch_commit"
    return {"Experiment": name, "rev": rev, "typ": typ, "State": state, "Executor": None}


class Synthetic:
    """``dvc.api.exp_show()`` rows and the params and metrics dvc.api gives per rev: the
    workspace, a baseline (gain null: calculate_gain('tanh')), two finished gains (one run
    outside the queue: no state; an int gain), a queued and a running experiment (whose
    metrics are stale and must be ignored), a new variant, a failure."""

    def __init__(self) -> None:
        self.rows = [_row(None, "workspace"), _row(None, "main")]
        self.params = {"workspace": _params(9.0), "main": _params(None)}
        self.metrics = {"workspace": {"kaiming": _variant(1.0, 0.0)},
                        "main": {"kaiming": _variant(2.50, 0.02)}}  # fmt: skip
        exps = [(0.5, 2.60, "Success"), (1, 2.55, None), (2.0, 9.9, "Queued"),
                (3.0, 9.9, "Running")]  # fmt: skip
        for i, (gain, val, state) in enumerate(exps):
            metrics = {"kaiming": _variant(val, 0.01)}
            self.add(f"exp-{i}", f"{i}" * 7, state, _params(gain), metrics)
        new = {"out_scaled": {"init": "first_half", "weight_scale": 1.0, "out_weight_scale": 0.01}}
        metrics = {"kaiming": _variant(2.50, 0.02), "out_scaled": _variant(2.7, None)}
        self.add("new-variant", "e" * 7, None, _params(None, new), metrics)
        self.add("broken", "f" * 7, "Failed", _params(99), {"kaiming": _variant(9.9, 0.0)})

    def add(self, name, rev, state, params, metrics) -> None:
        self.rows.append(_row(name, rev, state))
        self.params[rev], self.metrics[rev] = params, metrics

    def runs(self) -> list[sr.Run]:
        def lookup(table: dict) -> Callable[[str], dict]:
            def get(rev: str) -> dict:
                if rev not in table:
                    raise DvcException(f"unknown Git revision '{rev}'")
                return copy.deepcopy(table[rev])

            return get

        return sr.collect(self.rows, lookup(self.params), lookup(self.metrics))


def test_collect_keeps_finished_runs_metrics_only() -> None:
    runs = Synthetic().runs()
    assert [r.name for r in runs] == ["main", "exp-0", "exp-1", "exp-2", "exp-3", "new-variant",
                                      "broken"]  # fmt: skip
    assert [r.state for r in runs] == ["baseline", "success", "success", "queued", "running",
                                       "success", "failed"]  # fmt: skip
    assert numeric("variants.kaiming.gain", runs[2].params["variants.kaiming.gain"]) == 1.0
    assert runs[3].params["variants.kaiming.gain"] == 2.0 and runs[3].metrics == {}
    assert runs[-1].params["variants.kaiming.gain"] == 99 and runs[-1].metrics == {}
    table = sr.loss_table(runs)
    # stale metrics of queued/running/failed experiments and the workspace are left out
    assert sorted(table.loc[table.variant == "kaiming", "loss"]) == [2.50, 2.50, 2.55, 2.60]
    assert table.loc[table.variant == "out_scaled", "loss"].tolist() == [2.7]
    finished = [r.params for r in runs if r.state in sr.FINISHED]
    assert swept_keys(finished) == ["variants.kaiming.gain"]


def test_unfinished_and_failed_experiments_are_counted_not_dropped(tmp_path: Path) -> None:
    data = Synthetic()
    data.add("gone", "a" * 7, None, _params(4.0), {})
    del data.metrics["a" * 7]  # metrics_show fails for it: named, not plotted
    runs = data.runs()
    assert runs[-1].error == "DvcException: unknown Git revision 'aaaaaaa'"
    missing = "1 queued, 1 running, 1 failed (broken), 1 unreadable (gone)"
    assert sr.not_plotted(runs) == missing
    assert sr.summary(runs, Path("s.html")) == (
        f"wrote s.html: 3 finished experiment(s), 1 baseline(s); not plotted: {missing}"
    )
    assert f"<b>Not plotted: {missing}.</b>" in sr.render(runs)
    done = [r for r in runs if r.state in sr.FINISHED and not r.error]
    assert sr.not_plotted(done) == "" and "Not plotted:" not in sr.render(done)


def test_changes_names_overrides_and_new_variants() -> None:
    base = sr.flatten(_params(None))
    new = sr.flatten(_params(0.5, {"out_scaled": {"init": "first_half", "bias_scale": 0.1}}))
    assert sr.changes(base, new) == (
        "variants.kaiming.gain=0.5, +variants.out_scaled={init: first_half, bias_scale: 0.1}"
    )
    # params are validated before they reach the figures: a string is a category
    assert numeric("variants.kaiming.gain", "tanh") is None
    assert numeric("variants.kaiming.init", "first_half") is None


def test_render_is_self_contained(tmp_path: Path) -> None:
    page = sr.render(Synthetic().runs())
    assert page.count('src="data:image/png;base64,') == 1  # one swept key: the gain
    assert "<h2>variants.kaiming.gain</h2>" in page
    assert (
        "+variants.out_scaled={init: first_half, weight_scale: 1.0, out_weight_scale: 0.01, "
        "gain: 1.6666666666666667}" in page
    )  # the variant's keys as given, and its gain's value (unused beside weight_scale)
    assert "2.6000 ± 0.0100" in page  # exp-0
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched


def covarying() -> Synthetic:
    """The synthetic experiments with tiny settings (a list among them) overridden
    together in every experiment, as in a gain sweep run with ``-S train.max_steps=...``."""
    data = Synthetic()
    data.params["main"]["train"] = {"seeds": [1, 2], "max_steps": 5000}
    data.params["main"]["evaluate"] = {"n_novelty": 100}
    for row in data.rows[2:]:
        data.params[row["rev"]]["train"] = {"seeds": [7], "max_steps": 200}
        data.params[row["rev"]]["evaluate"] = {"n_novelty": 0}
    return data


def test_render_plots_only_parameters_swept_on_their_own() -> None:
    runs = [r.params for r in covarying().runs() if r.state in sr.FINISHED]
    differing = swept_keys(runs)
    assert differing == ["evaluate.n_novelty", "train.max_steps", "train.seeds",
                         "variants.kaiming.gain"]  # fmt: skip
    assert solo_keys(runs, differing) == ["variants.kaiming.gain"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Tight layout not applied"
        page = sr.render(covarying().runs())
    assert page.count('src="data:image/png;base64,') == 1
    # the gain runs that also changed a non-training key are named, not silently dropped
    assert re.findall(r"<h2>([^<]*)</h2>", page) == [
        "variants.kaiming.gain", "Gain sensitivity at depth", "Experiments"]  # fmt: skip
    assert "Left out of this section:</b>" in page and "evaluate.n_novelty" in page
    assert "held fixed per group: <code>evaluate.n_novelty, train.max_steps, train.seeds" in page


# --- unit: what a Hydra sweep override queues ---------------------------------------------


def queued_values(override: str) -> list[str]:
    """The values ``dvc exp run --queue -S override`` queues, one experiment each: DVC's
    own expansion (dvc.utils.hydra.get_hydra_sweeps: Hydra's OverridesParser and
    BasicSweeper), as the text it writes into params.yaml."""
    sweeps = get_hydra_sweeps({"params.yaml": [override]})
    return [s["params.yaml"][0].partition("=")[2] for s in sweeps]


def makefile_sweep() -> list[str]:
    """The -S overrides of the command ``make sweep`` runs (``make -n``: printed, not run)."""
    commands = run(["make", "-n", "sweep"], ROOT).stdout.splitlines()
    (queue,) = [shlex.split(c) for c in commands if c.startswith("dvc exp run --queue")]
    return [queue[i + 1] for i, arg in enumerate(queue) if arg == "-S"]


def test_the_makefile_sweep_queues_exactly_the_values_written() -> None:
    (override,) = makefile_sweep()
    key, _, written = override.partition("=")
    assert key == "variants.kaiming.gain"
    assert queued_values(override) == written.split(",")
    assert [float(v) for v in written.split(",")] == [0.5 + 0.25 * i for i in range(11)]


def test_hydra_range_sweeps_queue_values_nobody_wrote() -> None:
    """docs/experiments.md's caveat: a float range() steps by the exact binary value of the step
    (Decimal(0.1) is 0.1000000000000000055...); sorted in reverse it starts from the stop
    value, so the grid shifts by 0.01 and gains 0.26; an explicit list queues what it says."""
    assert queued_values("g=sort(range(0.5,3.01,0.25),reverse=true)")[:4] == [
        "2.76", "2.51", "2.26", "2.01"]  # fmt: skip
    assert queued_values("g=sort(range(0.5,3.01,0.25),reverse=true)")[-1].startswith("0.2599")
    assert queued_values("g=range(0.1,0.75,0.1)")[2] == "0.30000000000000004"
    assert queued_values("g=range(0.5,3.01,0.3)")[1:3] == ["0.7999999999999999",
                                                          "1.0999999999999999"]  # fmt: skip
    assert queued_values("g=range(0.5,3.01,0.25)") == [str(0.5 + 0.25 * i) for i in range(11)]


# --- integration: dvc in repository copies ------------------------------------------------


@pytest.fixture(scope="module")
def env(repo_env: Mapping[str, str]) -> dict[str, str]:
    """repo_env (its NAMES_MIRROR is absolute: queued experiments run in .dvc/tmp/exps/,
    not in the repo) and one thread per process: two queue workers on two shared cores
    would oversubscribe."""
    return {**repo_env, "OMP_NUM_THREADS": "1"}


def dvc(args: list[str], cwd: Path, env: dict, timeout: float = STEP_LIMIT, check: bool = True):
    return run(["dvc", *args], cwd, env=env, timeout=timeout, check=check)


def stop_queue(cwd: Path, env: dict) -> None:
    """Kill running tasks and stop the workers (the finally of every queue test)."""
    dvc(["queue", "stop", "--kill"], cwd, env, timeout=60, check=False)


def wait_for_queue(cwd: Path, env: dict, n: int, limit: float = QUEUE_LIMIT) -> str:
    """Wait until ``n`` experiments are done; returns the final ``dvc queue status``.

    Polls the experiment refs with git (cheap) and, every 20 s or once all ``n`` exist,
    ``dvc queue status`` (a second of CPU each) to stop early on a failure.
    """
    deadline = time.monotonic() + limit
    last = 0.0
    while True:
        refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd, env).stdout
        done = len(re.findall(r"^refs/exps/[0-9a-f]{2}/", refs, re.MULTILINE))
        if done >= n or time.monotonic() - last > 20:
            last = time.monotonic()
            status = dvc(["queue", "status"], cwd, env).stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                return status
        if time.monotonic() > deadline:
            raise AssertionError(f"queue not done after {limit} s:\n{status}")
        time.sleep(2)


def wait_for_no_worker(cwd: Path, env: dict, limit: float = 60) -> None:
    """Wait until the queue's workers have exited (after ``stop_queue``)."""
    deadline = time.monotonic() + limit
    while "0 active, 0 idle" not in (status := dvc(["queue", "status"], cwd, env).stdout):
        if time.monotonic() > deadline:
            raise AssertionError(f"queue workers still alive after {limit} s:\n{status}")
        time.sleep(2)


def exp_show(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> list[sr.Run]:
    """The sweep report's view of ``cwd``'s experiments (dvc.api, in this process)."""
    with monkeypatch.context() as m:
        m.chdir(cwd)
        return sr.dvc_runs()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """A repository copy with SMALL params and only kaiming, reproduced and committed."""
    repo = make_repo(tmp_path_factory.mktemp("baseline") / "repo")
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p = deep_update(p, SMALL)
    p["variants"] = {"kaiming": p["variants"]["kaiming"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    dvc(["repro"], repo, env, timeout=300)
    run(["git", "add", "params.yaml", "dvc.lock", "reports"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    return repo


def copy_of(baseline: Path, dest: Path) -> Path:
    """An independent copy (git history, DVC cache, workspace) of the baseline."""
    shutil.copytree(baseline, dest, symlinks=True)
    return dest


@pytest.mark.integration
@pytest.mark.slow
def test_queued_gain_sweep_and_sweep_report(
    baseline: Path, tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3-point sweep (an explicit list, as in ``make sweep``) and one experiment that
    fails, run by two workers; then one more queued and not run. The sweep report plots
    the three and counts the failed and the queued one instead of silently leaving them out."""
    repo = copy_of(baseline, tmp_path / "repo")
    try:
        queued = dvc(
            ["exp", "run", "--queue", "-S", "variants.kaiming.gain=0.5,1.5,2.5"], repo, env
        ).stdout
        assert queued.count("Queued experiment") == 3, queued
        # not a gain: the train stage's params check fails it in seconds
        dvc(["exp", "run", "--queue", "-n", "bad-gain", "-S", "variants.kaiming.gain=bogus"],
            repo, env)  # fmt: skip
        dvc(["queue", "start", "-j", "2"], repo, env)
        status = wait_for_queue(repo, env, 3)
    finally:
        stop_queue(repo, env)
    assert status.count("Success") == 3 and status.count("Failed") == 1, status
    wait_for_no_worker(repo, env)
    dvc(["exp", "run", "--queue", "-n", "later", "-S", "variants.kaiming.gain=3.5"], repo, env)
    everything = exp_show(repo, monkeypatch)
    assert {r.name: r.state for r in everything if r.state != "success"} == {
        "bad-gain": "failed", "later": "queued", everything[0].name: "baseline"}  # fmt: skip
    runs = [r for r in everything if r.state == "success"]
    gains = sorted(r.params["variants.kaiming.gain"] for r in runs)
    assert gains == [0.5, 1.5, 2.5]
    vals = {r.params["variants.kaiming.gain"]: r.metrics["kaiming"]["val"] for r in runs}
    assert len(set(vals.values())) == 3 and all(2.0 < v < 3.5 for v in vals.values()), vals

    out = run(
        ["python", "-m", "tools.sweep_report", "--out", "reports/sweep.html"],
        repo,
        env,
        timeout=STEP_LIMIT,
    ).stdout
    missing = "1 queued, 1 failed (bad-gain)"
    assert f"3 finished experiment(s), 1 baseline(s); not plotted: {missing}" in out, out
    page = (repo / "reports" / "sweep.html").read_text(encoding="utf-8")
    assert f"Not plotted: {missing}." in page
    assert "<h2>variants.kaiming.gain</h2>" in page and "data:image/png;base64," in page
    for r in runs:
        assert r.name in page and f"{r.metrics['kaiming']['val']:.4f}" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


@pytest.mark.integration
@pytest.mark.slow
def test_exp_show_sorts_by_a_gain(baseline: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """Issue 11, item 9: one queued experiment sets a gain, another a learning rate; DVC
    must sort all rows by the gain. With the old default ``gain: tanh`` (a string beside
    the experiment's 1.0) ``dvc exp show --sort-by`` failed with "'<' not supported
    between instances of 'float' and 'str'"; the default is now null (calculate_gain)."""
    repo = copy_of(baseline, tmp_path / "repo")
    dvc(["exp", "run", "--queue", "-n", "g1", "-S", "variants.kaiming.gain=1.0"], repo, env)
    dvc(["exp", "run", "--queue", "-n", "lr05", "-S", "train.lr=0.05"], repo, env)
    key = "variants.kaiming.gain"
    proc = dvc(["exp", "show", "--csv", "--sort-by", key, "--keep", key], repo, env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "g1" in proc.stdout and "lr05" in proc.stdout, proc.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_new_variants_from_the_command_line(
    baseline: Path, tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = copy_of(baseline, tmp_path / "repo")
    proc = dvc(
        [
            "exp",
            "run",
            "-n",
            "lecture-rows",
            "-S",
            f"+variants.out_scaled={OUT_SCALED}",
            "-S",
            f"+variants.hidden_scaled={HIDDEN_SCALED}",
        ],
        repo,
        env,
    )
    # foreach made a train/evaluate pair per new variant; kaiming's stages were kept
    for name in ("out_scaled", "hidden_scaled"):
        assert f"Running stage 'train@{name}'" in proc.stdout
        assert f"Running stage 'evaluate@{name}'" in proc.stdout
    assert "Stage 'train@kaiming' didn't change, skipping" in proc.stdout
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert list(metrics) == ["kaiming", "out_scaled", "hidden_scaled"]
    # W2 x 0.01, b2 x 0: near-uniform logits at step 0, loss close to ln 27 = 3.2958
    for name in ("out_scaled", "hidden_scaled"):
        assert abs(metrics[name]["init_loss"] - math.log(27)) < 0.1, metrics[name]
        assert math.isfinite(metrics[name]["val"])
    assert "hidden_scaled" in (repo / "reports" / "report.html").read_text(encoding="utf-8")

    (lecture_rows,) = [r for r in exp_show(repo, monkeypatch) if r.name == "lecture-rows"]
    for k in ("init_loss", "train", "val", "test"):  # (dvc drops the null std of one seed)
        assert lecture_rows.metrics["out_scaled"][k] == metrics["out_scaled"][k]
    run(
        ["python", "-m", "tools.sweep_report", "--out", "reports/sweep.html"],
        repo,
        env,
        timeout=STEP_LIMIT,
    )
    page = (repo / "reports" / "sweep.html").read_text(encoding="utf-8")
    assert "+variants.hidden_scaled={init: first_half, weight_scale: 0.2" in page


@pytest.mark.integration
@pytest.mark.slow
def test_share_experiment_through_git_and_dvc_remotes(
    baseline: Path, tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    origin, storage = tmp_path / "origin.git", tmp_path / "storage"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path, env)
    one = copy_of(baseline, tmp_path / "one")
    branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"], one, env).stdout.strip()
    run(["git", "remote", "add", "origin", str(origin)], one, env)
    dvc(["remote", "add", "-d", "storage", str(storage)], one, env)
    run(["git", "commit", "-qm", "DVC remote", "--", ".dvc/config"], one, env)
    run(["git", "push", "-q", "origin", branch], one, env)
    dvc(["push"], one, env)
    dvc(["exp", "run", "-n", "gain-1", "-S", "variants.kaiming.gain=1.0"], one, env)
    model = (one / "data" / "models" / "kaiming" / "model.pt").read_bytes()
    val = json.loads((one / "reports" / "metrics.json").read_text())["kaiming"]["val"]
    pushed = dvc(["exp", "push", "origin", "gain-1"], one, env).stdout
    assert "gain-1" in pushed, pushed
    dvc(["push"], one, env)  # a no-op after `exp push`, which pushes the cache by default

    two = tmp_path / "two"
    run(["git", "clone", "-q", "-b", branch, str(origin), str(two)], tmp_path, env)
    assert not (two / ".dvc" / "cache").exists()
    dvc(["exp", "pull", "origin", "gain-1"], two, env)
    (shared,) = [r for r in exp_show(two, monkeypatch) if r.name == "gain-1"]
    assert shared.params["variants.kaiming.gain"] == 1.0
    assert shared.metrics["kaiming"]["val"] == val
    dvc(["exp", "apply", "gain-1"], two, env)
    dvc(["pull"], two, env)
    assert (two / "data" / "models" / "kaiming" / "model.pt").read_bytes() == model
    assert json.loads((two / "reports" / "metrics.json").read_text())["kaiming"]["val"] == val
    assert dvc(["status"], two, env).stdout.strip().endswith("up to date.")

"""DVC experiments at scale: queued sweeps, variants added from the command line, sharing.

Unit tests parse a synthetic ``dvc exp show --json`` document. Integration tests run
dvc in copies of one baseline repository (kaiming only, one seed, 200 steps, run and
committed once per module), each under subprocess time limits, with queue workers
stopped in a ``finally``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest
import yaml

from support import TINY, deep_update, make_repo, run
from tools import sweep_report as sr

GIT_ID = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}
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
OUT_SCALED = "{w1_init: normal, w1_scale: 1.0, b1_scale: 1.0, w2_scale: 0.01, b2_scale: 0.0}"
HIDDEN_SCALED = "{w1_init: normal, w1_scale: 0.2, b1_scale: 0.01, w2_scale: 0.01, b2_scale: 0.0}"


# --- unit: parsing `dvc exp show --json` -------------------------------------------------


def _state(rev: str, name: str | None, params: dict, metrics: dict | None) -> dict:
    data = {
        "rev": rev,
        "params": {"params.yaml": {"data": params}},
        "metrics": {"reports/metrics.json": {"data": metrics}} if metrics else {},
    }
    return {"rev": rev, "name": name, "data": data, "error": None, "experiments": None}


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


def _params(gain: object, extra: dict | None = None) -> dict:
    variants = {"kaiming": {"w1_init": "kaiming", "gain": gain}, **(extra or {})}
    return {"train": {"seeds": [1, 2]}, "variants": variants}


def synthetic_exp_show() -> list[dict]:
    """Workspace, a baseline (gain tanh), two finished gains, one new variant, a queued
    and a running experiment (whose metrics are stale and must be ignored), a failure."""
    base = _state("a" * 40, "main", _params("tanh"), {"kaiming": _variant(2.50, 0.02)})
    exps = []
    for i, (gain, val, state) in enumerate(
        [(0.5, 2.60, "success"), ("1e0", 2.55, None), (2.0, 9.9, "queued"), (3.0, 9.9, "running")]
    ):
        s = _state(f"{i}" * 40, f"exp-{i}", _params(gain), {"kaiming": _variant(val, 0.01)})
        exps.append(
            {
                "revs": [s],
                "name": f"exp-{i}",
                "executor": state and {"state": state, "name": "dvc-task"},
            }
        )
    new = {"out_scaled": {"w1_init": "normal", "w2_scale": 0.01}}
    s = _state(
        "e" * 40,
        "new-variant",
        _params("tanh", new),
        {"kaiming": _variant(2.50, 0.02), "out_scaled": _variant(2.7, None)},
    )
    exps.append({"revs": [s], "name": "new-variant", "executor": None})
    failed = {"rev": "f" * 40, "name": "broken", "data": None, "error": {"msg": "boom"}}
    exps.append({"revs": [failed], "name": "broken", "executor": {"state": "failed"}})
    base["experiments"] = exps
    workspace = _state("workspace", None, _params(9.0), {"kaiming": _variant(1.0, 0.0)})
    return [workspace, base]


def test_parse_exp_show_keeps_finished_runs_only() -> None:
    runs = sr.parse_exp_show(synthetic_exp_show())
    assert [r.name for r in runs] == ["main", "exp-0", "exp-1", "exp-2", "exp-3", "new-variant",
                                      "broken"]  # fmt: skip
    assert [r.state for r in runs] == ["baseline", "success", "success", "queued", "running",
                                       "success", "failed"]  # fmt: skip
    assert sr.numeric("variants.kaiming.gain", runs[2].params["variants.kaiming.gain"]) == 1.0
    assert runs[-1].error is not None
    table = sr.loss_table(runs)
    # stale metrics of queued/running experiments and the workspace (val 1.0) are left out
    assert sorted(table.loc[table.variant == "kaiming", "loss"]) == [2.50, 2.50, 2.55, 2.60]
    assert table.loc[table.variant == "out_scaled", "loss"].tolist() == [2.7]
    finished = [r for r in runs if r.state in sr.FINISHED]
    assert sr.swept_keys(finished) == ["variants.kaiming.gain"]


def test_changes_names_overrides_and_new_variants() -> None:
    base = sr.flatten(_params("tanh"))
    new = sr.flatten(_params(0.5, {"out_scaled": {"w1_init": "normal", "w2_scale": 0.01}}))
    assert sr.changes(base, new) == (
        "variants.kaiming.gain=0.5, +variants.out_scaled={w1_init: normal, w2_scale: 0.01}"
    )
    assert sr.numeric("variants.kaiming.gain", "tanh") == pytest.approx(5 / 3)
    assert sr.numeric("variants.kaiming.w1_init", "normal") is None


def test_render_is_self_contained(tmp_path: Path) -> None:
    out = tmp_path / "sweep.html"
    sr.sweep_report(synthetic_exp_show(), out)
    page = out.read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 1  # one swept key: the gain
    assert "<h2>variants.kaiming.gain</h2>" in page
    assert "+variants.out_scaled={w1_init: normal, w2_scale: 0.01}" in page
    assert "2.6000 ± 0.0100" in page  # exp-0
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched


def covarying_exp_show() -> list[dict]:
    """The synthetic document with tiny settings (a list among them) overridden together
    in every experiment, as in a gain sweep run with ``-S train.max_steps=...`` etc."""
    doc = synthetic_exp_show()
    base = doc[1]["data"]["params"]["params.yaml"]["data"]
    base["train"] = {"seeds": [1, 2], "max_steps": 5000}
    base["evaluate"] = {"n_novelty": 100}
    for exp in doc[1]["experiments"]:
        for state in exp["revs"]:
            if state["data"]:
                params = state["data"]["params"]["params.yaml"]["data"]
                params["train"] = {"seeds": [7], "max_steps": 200}
                params["evaluate"] = {"n_novelty": 0}
    return doc


def test_render_plots_only_parameters_swept_on_their_own(tmp_path: Path) -> None:
    runs = [r for r in sr.parse_exp_show(covarying_exp_show()) if r.state in sr.FINISHED]
    differing = sr.swept_keys(runs)
    assert differing == ["evaluate.n_novelty", "train.max_steps", "train.seeds",
                         "variants.kaiming.gain"]  # fmt: skip
    assert sr.solo_keys(runs, differing) == ["variants.kaiming.gain"]
    out = tmp_path / "sweep.html"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Tight layout not applied"
        sr.sweep_report(covarying_exp_show(), out)
    page = out.read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 1
    assert re.findall(r"<h2>([^<]*)</h2>", page) == ["variants.kaiming.gain", "Experiments"]
    assert "held fixed per group: <code>evaluate.n_novelty, train.max_steps, train.seeds" in page


# --- integration: dvc in repository copies ------------------------------------------------


def _env(names_path: Path) -> dict[str, str]:
    # An absolute path: queued experiments run in .dvc/tmp/exps/<tmp>, not in the repo.
    # One thread per process: two queue workers on two shared cores would oversubscribe.
    return {"NAMES_MIRROR": str(names_path.resolve()), "OMP_NUM_THREADS": "1", **GIT_ID}


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


def exp_show(cwd: Path, env: dict) -> list[sr.Run]:
    return sr.parse_exp_show(json.loads(dvc(["exp", "show", "--json"], cwd, env).stdout))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, names_path: Path) -> Path:
    """A repository copy with SMALL params and only kaiming, reproduced and committed."""
    repo = make_repo(tmp_path_factory.mktemp("baseline") / "repo")
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p = deep_update(p, SMALL)
    p["variants"] = {"kaiming": p["variants"]["kaiming"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = _env(names_path)
    dvc(["repro"], repo, env, timeout=300)
    run(["git", "add", "params.yaml", "dvc.lock", "reports"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    return repo


def copy_of(baseline: Path, dest: Path) -> Path:
    """An independent copy (git history, DVC cache, workspace) of the baseline."""
    shutil.copytree(baseline, dest, symlinks=True)
    return dest


@pytest.mark.integration
def test_queued_gain_sweep_and_sweep_report(
    baseline: Path, tmp_path: Path, names_path: Path
) -> None:
    repo, env = copy_of(baseline, tmp_path / "repo"), _env(names_path)
    try:
        # Hydra's range(start, stop, step) sweep, floats allowed: 0.5, 1.5, 2.5
        queued = dvc(
            ["exp", "run", "--queue", "-S", "variants.kaiming.gain=range(0.5,2.51,1.0)"], repo, env
        ).stdout
        assert queued.count("Queued experiment") == 3, queued
        dvc(["queue", "start", "-j", "2"], repo, env)
        status = wait_for_queue(repo, env, 3)
    finally:
        stop_queue(repo, env)
    assert status.count("Success") == 3, status
    runs = [r for r in exp_show(repo, env) if r.state == "success"]
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
    assert "3 finished experiment(s)" in out
    page = (repo / "reports" / "sweep.html").read_text(encoding="utf-8")
    assert "<h2>variants.kaiming.gain</h2>" in page and "data:image/png;base64," in page
    for r in runs:
        assert r.name in page and f"{r.metrics['kaiming']['val']:.4f}" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


@pytest.mark.integration
def test_new_variants_from_the_command_line(
    baseline: Path, tmp_path: Path, names_path: Path
) -> None:
    repo, env = copy_of(baseline, tmp_path / "repo"), _env(names_path)
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

    (lecture_rows,) = [r for r in exp_show(repo, env) if r.name == "lecture-rows"]
    for k in ("init_loss", "train", "val", "test"):  # (dvc drops the null std of one seed)
        assert lecture_rows.metrics["out_scaled"][k] == metrics["out_scaled"][k]
    run(
        ["python", "-m", "tools.sweep_report", "--out", "reports/sweep.html"],
        repo,
        env,
        timeout=STEP_LIMIT,
    )
    page = (repo / "reports" / "sweep.html").read_text(encoding="utf-8")
    assert "+variants.hidden_scaled={w1_init: normal, w1_scale: 0.2" in page


@pytest.mark.integration
def test_share_experiment_through_git_and_dvc_remotes(
    baseline: Path, tmp_path: Path, names_path: Path
) -> None:
    env = _env(names_path)
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
    (shared,) = [r for r in exp_show(two, env) if r.name == "gain-1"]
    assert shared.params["variants.kaiming.gain"] == 1.0
    assert shared.metrics["kaiming"]["val"] == val
    dvc(["exp", "apply", "gain-1"], two, env)
    dvc(["pull"], two, env)
    assert (two / "data" / "models" / "kaiming" / "model.pt").read_bytes() == model
    assert json.loads((two / "reports" / "metrics.json").read_text())["kaiming"]["val"] == val
    assert dvc(["status"], two, env).stdout.strip().endswith("up to date.")

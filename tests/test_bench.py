"""``make bench`` end to end on a few steps: every network's row has the lecture, the
engine and the ``torch.func`` ensemble, and the ensemble computes the lecture's losses;
the atlas row (``--only atlas``) runs its three methods on the same 32 models.

Run as a subprocess (benchmarks/ is not imported by tests, see test_imports.py); the
bench itself asserts that the ensemble's first 20 losses of each of its first seeds are
the lecture's loop run with that seed, within 1e-4, so a wrong ensemble fails the run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from support import ROOT, run

pytestmark = pytest.mark.slow  # the bench in a subprocess: every network, three ways

NETWORKS = ["naive", "kaiming", "batchnorm", "deep_bn", "deep_tanh"]
KEYS = ("loss", "params", "buffers")


def test_bench_rows_have_the_func_column_and_match_the_lecture(names_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.bench", "--steps", "20", "--deep-steps", "20",
           "--seeds", "2", "--repeats", "1", "--workers", "2", "--func-threads", "1",
           "--only", "networks"]  # fmt: skip
    out = run(cmd, ROOT, env={"NAMES_MIRROR": str(names_path)}, timeout=600)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["atlas"] is None
    rows = doc["rows"]
    assert [(r["variant"], r["seeds"]) for r in rows] == [(n, 2) for n in NETWORKS]
    for r in rows:
        for key in ("lecture_us_per_step", "engine_us_per_model_step", "speedup",
                    "func_us_per_model_step", "speedup_vs_func", "func_peak_rss_mb"):  # fmt: skip
            assert r[key] > 0, (r["variant"], key)
        # seeds 2147483647, 1 and 2 against the lecture's loop, 20 steps
        assert max(r[f"func_max_abs_{k}_diff_to_lecture"] for k in KEYS) <= 1e-4, r["variant"]
        deep = r["variant"].startswith("deep_")
        assert r["canonical_seed_bitwise_equal_to_lecture"] is not deep, r["variant"]
        assert r["canonical_seed_max_abs_loss_diff"] <= 1e-5, r["variant"]


def test_bench_atlas_row_trains_the_same_models_three_ways(names_path: Path) -> None:
    # depth 16 as in make bench, but 8 units and 3 steps: a smoke test, no timing asserted
    cmd = [sys.executable, "-m", "benchmarks.bench", "--only", "atlas", "--atlas-steps", "3",
           "--atlas-width", "8", "--atlas-rounds", "1"]  # fmt: skip
    out = run(cmd, ROOT, env={"NAMES_MIRROR": str(names_path)}, timeout=600)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["rows"] == []
    atlas = doc["atlas"]
    assert (atlas["depth"], atlas["width"], atlas["steps"]) == (16, 8, 3)
    assert len(set(atlas["gains"])) == 8 and len(atlas["seeds"]) == 4 and atlas["models"] == 32
    assert min(atlas["gains"]) < 5 / 3 < max(atlas["gains"])
    for m in ("batched", "lecture", "func"):
        assert atlas[f"{m}_seconds"] > 0 and atlas[f"{m}_peak_rss_mb"] > 0, m
        assert atlas[f"{m}_threads"] == 1, m
        # same init and minibatches: the bench asserts the first losses within 1e-4
        assert atlas[f"{m}_first_loss_max_abs_diff"] <= 1e-4, m
        assert atlas[f"{m}_non_finite"] == 0, m
        assert atlas[f"{m}_final_loss_abs_diff_median"] <= 1e-4, m
    assert "budget: batched >= 6x the lecture's loop" in out.stdout


def test_cells_bench_runs_the_atlas_cells_every_way(names_path: Path, tmp_path: Path) -> None:
    """``make bench-cells`` on the tiny atlas: every stage's cells directly, embedded (1 and
    2 worker threads) and on 2 local worker processes; the bench itself asserts that
    every way gives the direct way's bytes, so different results fail the run."""
    from ruamel.yaml import YAML
    from support import TINY_ATLAS

    from pipeline import params
    from pipeline.stages.split import split

    yaml = YAML()
    doc = yaml.load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    doc["atlas"] = TINY_ATLAS
    with (tmp_path / "params.yaml").open("w", encoding="utf-8") as f:
        yaml.dump(doc, f)
    cfg = params.load(ROOT / "params.yaml", ["split"])["split"]
    split(names_path, tmp_path / "processed", **cfg.model_dump())
    cmd = [sys.executable, "-m", "benchmarks.cells_bench", "--params",
           str(tmp_path / "params.yaml"), "--data", str(tmp_path / "processed")]  # fmt: skip
    out = run(cmd, ROOT, env={"NAMES_MIRROR": str(names_path)}, timeout=600)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    stages = ["atlas_init@2", "atlas_width", "atlas_train@2", "atlas_he"]
    assert list(figures["per_stage_wall_s"]) == stages and figures["stages"] == 4
    assert figures["cells"] == 4 + 2 + 2 + 2  # (tanh, relu) x BN; 2 widths; BN; He's 2 gains
    modes = {"direct", "embedded_1", f"embedded_{figures['cpus']}", f"processes_{figures['cpus']}"}
    assert set(figures["wall_s"]) == modes and all(w > 0 for w in figures["wall_s"].values())
    assert 0 < figures["import_distributed_s"] < 30

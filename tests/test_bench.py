"""``make bench`` end to end on a few steps: every network's row has the lecture, the
engine and the ``torch.func`` ensemble, and the ensemble computes the lecture's losses.

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
           "--seeds", "2", "--repeats", "1", "--workers", "2", "--func-threads", "1"]  # fmt: skip
    out = run(cmd, ROOT, env={"NAMES_MIRROR": str(names_path)}, timeout=600)
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
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

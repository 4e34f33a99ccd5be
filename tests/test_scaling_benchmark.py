"""The scaling benchmark runs end to end at a toy size and writes its JSON, table and plot (slow: a subprocess
that fits CART, hkmeans and KeyBERT). Its figures live in benchmarks/results, never in assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_scaling_benchmark_writes_results_table_and_plot(tmp_path):
    pytest.importorskip("usearch")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scaling" / "bench_scaling.py"), "--sizes", "600", "1200",
         "--queries", "8", "--batch", "4", "--keybert-max", "600", "--out", str(tmp_path)],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads((tmp_path / "scaling-cpu.json").read_text())
    assert (tmp_path / "scaling-cpu.png").stat().st_size > 0
    table = (tmp_path / "scaling-cpu.md").read_text()
    assert "600" in table and ("1,200" in table or "1200" in table)
    text = json.dumps(doc)
    assert "skipped" in text  # KeyBERT above --keybert-max is recorded as skipped, not estimated

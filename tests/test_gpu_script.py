"""benchmarks/gpu/run.sh --dry-run: the GPU run's steps, tiny, on the CPU (a real subprocess, real files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "GCR_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run", "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu-run-dry.json").read_text())
    assert summary["dry_run"] is True and summary["device"] == "cpu"
    status = {s["step"]: s["exit_status"] for s in summary["steps"]}
    assert status["decoding"] == 0 and status["decoding_static"] == 0 and status["fit_cart"] == 0, summary["steps"]
    assert status["fit_cart_ddp"] == "skipped"  # never in a dry run
    assert any(name.endswith("results.json") for name in summary["fit_results"])
    for name, vocab in (("decoding-dry.json", 32000), ("decoding-static-dry.json", 2051)):
        data = json.loads((tmp_path / name).read_text())
        assert data["settings"]["vocab_size"] == vocab and data["settings"]["device"] == "cpu"
        assert data["results"] and all("gcr_over_fill" in r["masking_vs_fill"] for r in data["results"])

"""A first run shows gcr's stages, its progress and the table, and nothing from the libraries underneath.

Real parts: the ``gcr`` console entry point in a subprocess, writing to pipes (not a terminal), so the
progress shows as periodic log lines, exactly what a CI log or ``nohup`` file receives.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

NOISE = ("GPU available", "TPU available", "Tip:", "litlogger", "weights_only", "Writing model shards",
         "Seed set to", "[transformers]", "Trainer(", "`Trainer.fit` stopped", "Loading `train_dataloader`",
         "Traceback", "Warning", "warn(")


def run_gcr(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``gcr ARGS`` in a real subprocess writing to pipes (as a CI log or ``nohup`` file), a progress line per batch."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "GCR_CONFIG_DIR")}
    env.update(GCR_PROGRESS_SECONDS="0", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "gcr.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)



def test_a_fit_prints_stages_periodic_progress_and_the_table_only(tmp_path):
    proc = run_gcr(
        tmp_path, "fit", f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}",
        "data.num_images=30", "trainer.max_epochs=2", "dense.max_epochs=1", "model.hidden_size=32",
        "model.num_layers=1", "decoding.num_beams=3", "scheme=hkmeans", "scheme.k=3",
    )
    assert proc.returncode == 0, proc.stderr
    for noise in NOISE:
        assert noise not in proc.stderr and noise not in proc.stdout, noise
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("gcr: ") for line in lines), lines
    stages = ["data: generating 30 shape images", "data: shapes, 30 items", "dense baseline: training (1 epoch)",
              "features: ", "identifiers: hkmeans", "training hkmeans/t2i", "evaluating hkmeans/t2i",
              "training hkmeans/i2t", "evaluating hkmeans/i2t"]
    positions = [next(i for i, line in enumerate(lines) if stage in line) for stage in stages]
    assert positions == sorted(positions)  # one direction of flow
    assert any("training hkmeans/t2i (2 epochs): " in line and "batches" in line and "loss" in line for line in lines)
    assert any("training hkmeans/t2i (2 epochs): done in" in line for line in lines)
    # stdout: the results table and nothing else
    assert "shapes-hkmeans-tiny" in proc.stdout and "hkmeans" in proc.stdout and "dense" in proc.stdout
    assert "Epoch" not in proc.stdout and "Testing" not in proc.stdout


def test_a_bench_is_as_quiet_as_a_fit(tmp_path):
    """The bench trains its dense baselines itself, before any member run: the libraries stay quiet there too."""
    bench = tmp_path / "quiet.yaml"
    bench.write_text("name: quiet\nseeds: [0]\ndense: true\nruns:\n  hkmeans: [scheme=hkmeans, scheme.k=3]\n")
    proc = run_gcr(
        tmp_path, "bench", str(bench), f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}",
        "data.num_images=30", "trainer.max_epochs=1", "dense.max_epochs=1", "model.hidden_size=32",
        "model.num_layers=1", "decoding.num_beams=3", "directions=[t2i]",
    )
    assert proc.returncode == 0, proc.stderr
    for noise in NOISE:
        assert noise not in proc.stderr and noise not in proc.stdout, noise
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("gcr: ") for line in lines), lines
    assert any("dense baseline: training" in line for line in lines)

"""A training run killed with SIGKILL mid-training resumes from its last checkpoint and ends with exactly the
metrics of an uninterrupted run with the same seed. Real subprocesses of ``gcr fit``, a real kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # real subprocesses / full fits: deselect with -m 'not integration'

ARGS = ["scheme=atomic", "data.num_images=48", "trainer.max_epochs=4", "trainer.batch_size=8", "dense.enabled=false",
        "model.hidden_size=32", "model.num_layers=1", "decoding.num_beams=3", "directions=[t2i]", "run_name=resume"]


def _command(tmp: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "gcr.cli", "fit", *ARGS, f"output_dir={tmp / out}", f"data.root={tmp / 'data'}"]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _metrics(results_dir: Path) -> dict:
    results = json.loads((results_dir / "resume" / "results.json").read_text())
    (row,) = [r for r in results["rows"] if r["kind"] == "generative"]
    return {k: v for k, v in row["metrics"].items() if k != "queries_per_s"}


@pytest.mark.timeout(900)
def test_sigkill_mid_training_then_rerun_ends_like_an_uninterrupted_run(tmp_path):
    done = subprocess.run(_command(tmp_path, "straight"), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _metrics(tmp_path / "straight")

    checkpoint = tmp_path / "killed" / "resume" / "t2i" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_command(tmp_path, "killed"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # the first epoch's checkpoint is written: we are in epoch 2 of 4
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "resume" / "results.json").exists()
    import torch

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # whole: a partial write never replaces it
    assert saved["epoch"] < 3, "killed after training had ended: nothing would be resumed"

    resumed = subprocess.run(_command(tmp_path, "killed"), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming atomic/t2i from {checkpoint}" in resumed.stderr
    assert _metrics(tmp_path / "killed") == expected

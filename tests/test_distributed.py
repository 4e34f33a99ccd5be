"""Multi-process runs: Lightning DDP on CPU (gloo) with 2 real processes, through the real `gcr` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # real subprocesses / full fits: deselect with -m 'not integration'

_SCRIPT = Path(sys.executable).parent / "gcr"  # the installed console script, as a user runs it
GCR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "gcr.cli"]
SMALL = [
    "data.num_images=110",  # 11 test images, 55 queries: 2 ranks need one padding query
    "trainer.max_epochs=2",
    "dense.max_epochs=1",
    "model.hidden_size=64",
    "model.num_layers=1",
    "decoding.num_beams=5",
    "scheme=atomic",
    "directions=[t2i]",
    "eval.batch_size=8",
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([*GCR, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    _run(["fit", f"output_dir={tmp / 'runs'}", f"data.root={tmp / 'data'}", *SMALL,
          "trainer.devices=2", "trainer.strategy=ddp"], tmp)
    return tmp / "runs" / "shapes-atomic-tiny"


def test_ddp_training_writes_one_set_of_results(ddp_run):
    results = json.loads((ddp_run / "results.json").read_text())
    assert results["corpus"]["test_images"] * 5 % 2 == 1  # odd query count: the shards need padding
    assert {r["method"] for r in results["rows"]} == {"dense", "atomic"}
    assert (ddp_run / "t2i" / "backbone" / "backbone.json").is_file()
    assert (ddp_run / "t2i" / "checkpoints" / "last.ckpt").is_file()


def test_two_process_evaluation_gives_the_metrics_of_one_process(ddp_run):
    def metrics(*extra: str) -> dict[str, float]:
        _run(["eval", f"ckpt={ddp_run}", *extra], ddp_run.parent)
        saved = json.loads((ddp_run / "eval" / "results.json").read_text())
        (row,) = [r for r in saved["rows"] if r["method"] == "atomic"]
        return {k: v for k, v in row["metrics"].items() if k != "queries_per_s"}, row["per_query"]

    single, single_queries = metrics()
    double, double_queries = metrics("trainer.devices=2", "trainer.strategy=ddp")
    assert single == double
    # both shards' per-query ranks gathered: every one of the 55 queries once (the padding query dropped)
    assert double_queries == single_queries and len(set(double_queries["ids"])) == 55
    assert set(single) == {"R@1", "R@5", "R@10", "MRR@10"}

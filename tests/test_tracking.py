"""W&B tracking: one offline W&B run per gcr run, grouped per bench, read back from the real ``.wandb`` files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gcr.cli import compose, config_dir, main

TINY = [
    "data.num_images=100",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.log_every_n_steps=1",  # so every optimizer step leaves a point on the curves
    "dense.max_epochs=1",
    "model.hidden_size=64",
    "model.num_layers=1",
    "decoding.num_beams=3",
    "directions=[t2i]",
]
BENCH = """\
name: wb
seeds: [0]
runs:
  atomic: [scheme=atomic]
  hk4: [scheme=hkmeans, scheme.k=4, scheme.leaf_size=4]
"""
TRAIN_STEPS = 2  # one epoch of two batches


def _all_runs(root: Path) -> list[dict]:
    """Every offline W&B run under ``root``, read back from its ``.wandb`` file."""
    from gcr.reporting.tracking import read_offline_run

    return [read_offline_run(p) for p in sorted(root.rglob("offline-run-*")) if p.is_dir()]


def _offline_runs(root: Path) -> dict[str, dict]:
    """The offline W&B runs under ``root`` by name (each name once)."""
    runs = _all_runs(root)
    by_name = {r["name"]: r for r in runs}
    assert len(by_name) == len(runs), f"two W&B runs share a name: {[r['name'] for r in runs]}"
    return by_name


def _keys(run: dict) -> set[str]:
    return set(run["summary"]) | {k for step in run["history"] for k in step}


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(tmp / var.lower()))  # nothing written outside the test's folder
        mp.delenv("WANDB_API_KEY", raising=False)
        yield tmp


@pytest.fixture(scope="module")
def bench(wandb_env):
    tmp = wandb_env
    (tmp / "wb.yaml").write_text(BENCH)
    args = ["bench", str(tmp / "wb.yaml"), f"output_dir={tmp / 'runs'}", f"data.root={tmp / 'data'}", *TINY,
            "wandb.enabled=true"]
    assert main(args) == 0
    bench_dir = tmp / "runs" / "bench-wb"
    return tmp, args, bench_dir, _offline_runs(bench_dir)


def test_every_member_of_a_bench_is_a_run_of_its_own(bench):
    _, _, bench_dir, runs = bench
    assert set(runs) == {"bench-wb/dense-s0", "bench-wb/atomic-s0/t2i", "bench-wb/hk4-s0/t2i", "bench-wb"}
    assert len({r["id"] for r in runs.values()}) == 4, "distinct W&B run ids"
    assert all(r["group"] == "bench-wb" for r in runs.values())
    assert all(r["exit_code"] == 0 for r in runs.values()), "each run was finished"
    jobs = {name: r["job_type"] for name, r in runs.items()}
    assert jobs == {"bench-wb/dense-s0": "train", "bench-wb/atomic-s0/t2i": "train", "bench-wb/hk4-s0/t2i": "train",
                    "bench-wb": "bench"}
    # each run's files sit in the folder it is named after
    for name, run in runs.items():
        folder = bench_dir.parent / name
        (offline,) = (folder / "wandb").glob("offline-run-*")
        assert offline.name.endswith(run["id"])
        assert json.loads((folder / "wandb-run.json").read_text())["id"] == run["id"]


def test_each_run_carries_its_config_tags_and_results_row(bench):
    _, _, _, runs = bench
    hk = runs["bench-wb/hk4-s0/t2i"]
    assert hk["config"]["scheme"]["name"] == "hkmeans" and hk["config"]["scheme"]["k"] == 4
    assert hk["config"]["run_name"] == "bench-wb/hk4-s0" and hk["config"]["wandb"]["group"] == "bench-wb"
    assert hk["config"]["gcr_run"]["name"] == "bench-wb/hk4-s0/t2i"
    assert {"trainer", "model", "data", "dense", "decoding", "eval", "seed"} <= set(hk["config"])
    assert set(hk["tags"]) == {"scheme:hkmeans", "backbone:tiny", "data:shapes", "direction:t2i", "seed:0"}
    (row,) = hk["summary"]["rows"]
    assert (row["method"], row["direction"], row["seed"]) == ("hkmeans", "t2i", 0)
    assert hk["summary"]["hkmeans/t2i/R@10"] == row["metrics"]["R@10"]
    assert hk["summary"]["results"]["_type"] == "table-file"
    dense = runs["bench-wb/dense-s0"]
    assert "scheme:dense" in dense["tags"] and "backbone:dense-clip" in dense["tags"]
    assert dense["config"]["dense"]["enabled"] is True and "scheme" not in dense["config"]
    assert dense["summary"]["dense/t2i/R@1"] == dense["summary"]["rows"][0]["metrics"]["R@1"]


def test_each_run_holds_only_its_own_metrics(bench):
    _, _, bench_dir, runs = bench
    atomic, hk, dense = runs["bench-wb/atomic-s0/t2i"], runs["bench-wb/hk4-s0/t2i"], runs["bench-wb/dense-s0"]
    for run, own in ((atomic, "atomic"), (hk, "hkmeans")):
        keys = _keys(run)
        assert f"{own}/t2i/R@1" in keys and "test/R@1" in keys
        assert not {k for k in keys if k.split("/")[0] in {"atomic", "hkmeans", "dense"} - {own}}
        # the curve of this run alone: one loss point per optimizer step, steps 0..TRAIN_STEPS-1
        losses = [s for s in run["history"] if "train/loss" in s]
        assert [s["trainer/global_step"] for s in losses] == list(range(TRAIN_STEPS))
    dense_keys = _keys(dense)
    assert "dense/loss" in dense_keys and "dense/t2i/R@1" in dense_keys
    assert not {k for k in dense_keys if k.startswith(("train/", "test/", "atomic/", "hkmeans/"))}
    results = json.loads((bench_dir / "results.json").read_text())
    by_method = {r["method"]: r for r in results["rows"]}
    assert hk["summary"]["hkmeans/t2i/R@1"] == by_method["hk4"]["metrics"]["R@1"]
    assert atomic["summary"]["atomic/t2i/R@1"] == by_method["atomic"]["metrics"]["R@1"]


def test_the_summary_run_references_its_members(bench):
    _, _, bench_dir, runs = bench
    summary = runs["bench-wb"]
    members = {m["name"]: m for m in summary["config"]["members"]}
    assert set(members) == set(runs) - {"bench-wb"}
    assert all(m["id"] == runs[name]["id"] for name, m in members.items())
    assert sorted(summary["summary"]["member_ids"]) == sorted(r["id"] for n, r in runs.items() if n != "bench-wb")
    assert summary["summary"]["results"]["_type"] == summary["summary"]["members"]["_type"] == "table-file"
    table = json.loads(next((bench_dir / "wandb").glob("offline-run-*/files/" + summary["summary"]["members"]["path"]))
                       .read_text())
    assert sorted(row[0] for row in table["data"]) == sorted(members)
    assert {"bench:wb", "scheme:atomic", "scheme:hkmeans", "seed:0"} <= set(summary["tags"])
    assert summary["summary"]["atomic/t2i/R@1"] >= 0  # the bench table's scalars
    assert summary["summary"]["plots/recall_at_k"]["_type"] == "image-file"
    (artifact,) = [a for a in summary["artifacts"] if a["type"] == "results"]  # (tables are artifacts too)
    assert artifact["name"] == "bench-wb-results" and sorted(artifact["files"]) == ["results.json", "results.md"]
    assert all(a["type"] == "run_table" for n, r in runs.items() if n != "bench-wb" for a in r["artifacts"])


def test_rerun_reuses_members_and_still_points_at_their_runs(bench):
    tmp, args, bench_dir, first = bench
    assert main(args) == 0
    again = [r for r in _all_runs(bench_dir) if r["id"] not in {f["id"] for f in first.values()}]
    # nothing retrained: a new summary and the dense baseline scored again from its cache (job_type eval)
    assert sorted((r["name"], r["job_type"]) for r in again) == [("bench-wb", "bench"), ("bench-wb/dense-s0", "eval")]
    new_summary = next(r for r in again if r["name"] == "bench-wb")
    members = {m["name"]: m for m in new_summary["config"]["members"]}
    assert members["bench-wb/atomic-s0/t2i"]["id"] == first["bench-wb/atomic-s0/t2i"]["id"]
    assert members["bench-wb/atomic-s0/t2i"]["reused"] is True


def test_eval_of_a_finished_run_is_a_run_of_its_own_in_the_group(bench):
    _, _, bench_dir, _ = bench
    run_dir = bench_dir / "atomic-s0"
    assert main(["eval", f"ckpt={run_dir}"]) == 0
    evals = [r for r in _offline_runs(run_dir).values() if r["job_type"] == "eval"]
    (run,) = evals
    assert run["name"] == "bench-wb/atomic-s0/eval" and run["group"] == "bench-wb" and run["exit_code"] == 0
    saved = json.loads((run_dir / "eval" / "results.json").read_text())
    assert run["summary"]["atomic/t2i/R@1"] == saved["rows"][0]["metrics"]["R@1"]


def test_a_plain_fit_is_its_own_group(tmp_path):
    from gcr.reporting.tracking import direction_run, run_group, run_tags

    cfg = compose([f"output_dir={tmp_path}", "scheme=atomic", "wandb.enabled=true"], config_dir())
    assert run_group(cfg) == cfg.run_name == "shapes-atomic-tiny"
    tracked = direction_run(cfg, "i2t", tmp_path / cfg.run_name)
    assert tracked.name == "shapes-atomic-tiny/i2t" and "direction:i2t" in tracked.tags
    assert run_tags(cfg) == ["scheme:atomic", "backbone:tiny", "data:shapes", "seed:0"]


def test_disabled_tracking_writes_nothing(tmp_path, monkeypatch):
    from gcr.reporting.tracking import TrackedRun

    cfg = compose([f"output_dir={tmp_path}", "wandb.enabled=true"], config_dir())
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with TrackedRun(cfg, "x", tmp_path / "x", job_type="train") as tracked:
        assert tracked.lightning_logger() is False
        tracked.log_rows([{"method": "m", "direction": "t2i", "metrics": {"R@1": 1.0}}])
    assert not (tmp_path / "x").exists()


def test_tracking_imports_without_wandb_or_lightning():
    code = "import sys, gcr.reporting.tracking; bad = {'wandb', 'lightning'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)

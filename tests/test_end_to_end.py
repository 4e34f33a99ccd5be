"""A tiny end-to-end fit + eval on generated data: the whole pipeline, real parts only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gcr.cli import compose, config_dir

pytestmark = pytest.mark.integration  # real subprocesses / full fits: deselect with -m 'not integration'

TINY = [
    "data.num_images=100",
    "trainer.max_epochs=2",
    "dense.max_epochs=1",
    "model.hidden_size=64",
    "model.num_layers=1",
    "decoding.num_beams=5",
]


def _overrides(tmp: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp / 'runs'}", f"data.root={tmp / 'data'}", *TINY, *extra]


@pytest.fixture(scope="module")
def hkmeans_run(tmp_path_factory):
    from gcr.train.pipeline import fit

    tmp = tmp_path_factory.mktemp("e2e")
    cfg = compose(_overrides(tmp, "scheme=hkmeans", "scheme.k=4", "scheme.leaf_size=4"), config_dir())
    results = fit(cfg)
    return tmp, Path(cfg.output_dir) / cfg.run_name, results


def test_fit_writes_versioned_results_for_both_directions(hkmeans_run):
    _, run_dir, results = hkmeans_run
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["gcr_results_version"] == 2
    assert saved["corpus"]["test_images"] == 10
    assert 0.0 <= saved["corpus"]["test_caption_ambiguity"]["ambiguous_share"] <= 1.0
    rows = {(r["method"], r["direction"]) for r in saved["rows"]}
    assert rows == {("dense", "t2i"), ("dense", "i2t"), ("hkmeans", "t2i"), ("hkmeans", "i2t")}
    for row in saved["rows"]:
        m = row["metrics"]
        assert 0.0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1.0
        assert 0.0 <= m["MRR@10"] <= 1.0 and m["queries_per_s"] > 0
    assert "| hkmeans |" in (run_dir / "results.md").read_text()


def test_every_artifact_is_in_place(hkmeans_run):
    _, run_dir, _ = hkmeans_run
    for direction in ("t2i", "i2t"):
        index = json.loads((run_dir / direction / "index.json").read_text())
        assert index["scheme"] == "hkmeans" and index["direction"] == direction
        assert len(set(index["identifiers"])) == len(index["identifiers"])
        eos = {ids[-1] for ids in index["token_ids"]}
        assert len(eos) == 1, "every identifier must end with the same EOS token"
        assert all(eos.isdisjoint(ids[:-1]) and len(ids) >= 2 for ids in index["token_ids"])
        assert (run_dir / direction / "checkpoints" / "last.ckpt").is_file()
        assert (run_dir / direction / "backbone" / "config.json").is_file()


def test_eval_from_checkpoint_reproduces_the_fit_metrics(hkmeans_run):
    tmp, run_dir, results = hkmeans_run
    ckpt = run_dir / "t2i" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "CI": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gcr.cli", "eval", f"ckpt={ckpt}"], capture_output=True, text=True, env=env, cwd=tmp
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((run_dir / "t2i" / "checkpoints" / "eval" / "results.json").read_text())
    fitted = next(r for r in results["rows"] if r["method"] == "hkmeans" and r["direction"] == "t2i")
    (row,) = evaluated["rows"]
    for k in ("R@1", "R@5", "R@10", "MRR@10"):
        assert row["metrics"][k] == pytest.approx(fitted["metrics"][k])
    assert "hkmeans" in proc.stdout


def test_eval_refuses_a_checkpoint_from_another_direction_or_scheme(hkmeans_run, tmp_path):
    """The image-to-text model's checkpoint put where the text-to-image one belongs is named, not evaluated."""
    import shutil

    _, run_dir, _ = hkmeans_run
    foreign = run_dir / "t2i" / "checkpoints" / "foreign.ckpt"
    shutil.copy(run_dir / "i2t" / "checkpoints" / "last.ckpt", foreign)
    try:
        proc = subprocess.run([sys.executable, "-m", "gcr.cli", "eval", f"ckpt={foreign}"], capture_output=True,
                              text=True, cwd=tmp_path)
    finally:
        foreign.unlink()
    assert proc.returncode == 2
    assert "direction 'i2t' (this run: 't2i')" in proc.stderr and "run folder it came from" in proc.stderr


def test_retriever_returns_only_indexed_test_targets(hkmeans_run):
    from omegaconf import OmegaConf

    from gcr.data.corpus import retrieval_task
    from gcr.data.sources import load_dataset
    from gcr.index import IdentifierIndex
    from gcr.models.tiny import TinyBackbone
    from gcr.retrieval import ConstrainedRetriever

    _, run_dir, _ = hkmeans_run
    cfg = OmegaConf.load(run_dir / "config.yaml")
    task = retrieval_task(load_dataset(cfg.data), "i2t")
    index = IdentifierIndex.load(run_dir / "i2t", scheme="hkmeans", direction="i2t")
    backbone = TinyBackbone.from_pretrained(run_dir / "i2t" / "backbone").eval()
    test_targets = {t.target_id for t in task.targets_of("test")}
    retriever = ConstrainedRetriever(backbone, index, test_targets, num_beams=8)
    out = retriever([q.content for q in task.queries_of("test")])
    assert len(out.targets) == len(task.queries_of("test"))
    for ranked, scores in zip(out.targets, out.scores):
        assert len(ranked) == 8 and len(set(ranked)) == 8  # distinct identifiers, one target each
        assert set(ranked) <= test_targets
        assert scores == sorted(scores, reverse=True)


def test_atomic_scheme_trains_and_logs_to_offline_wandb(tmp_path, monkeypatch):
    from gcr.train.pipeline import fit

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose(_overrides(tmp_path, "scheme=atomic", "directions=[t2i]", "dense.enabled=false",
                             "model.vision_init=random", "wandb.enabled=true"), config_dir())
    results = fit(cfg)
    (row,) = results["rows"]
    assert row["method"] == "atomic" and row["index"]["num_identifiers"] == 100
    assert row["index"]["mean_id_tokens"] == 1.0  # one new token per target
    offline_runs = list((Path(cfg.output_dir) / cfg.run_name / "t2i" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))


@pytest.mark.slow
def test_default_job_hkmeans_is_far_above_chance(tmp_path):
    """The README's main job: hkmeans on the default data must beat chance (R@10 = 10/N) by far."""
    from gcr.train.pipeline import fit

    cfg = compose([f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}"], config_dir())
    results = fit(cfg)
    for row in results["rows"]:
        chance = 10 / results["corpus"]["test_images"] if row["direction"] == "t2i" else 50 / (
            5 * results["corpus"]["test_images"])
        assert row["metrics"]["R@10"] > 3 * chance, row


def test_sweep_runs_every_scheme_and_writes_one_combined_table(tmp_path, capsys):
    from gcr.cli import main

    code = main(["fit", "-m", *_overrides(tmp_path, "scheme=atomic,hkmeans", "directions=[t2i]", "decoding.num_beams=3")])
    assert code == 0
    combined = json.loads((tmp_path / "runs" / "sweep" / "results.json").read_text())
    assert sorted(r["method"] for r in combined["rows"]) == ["atomic", "dense", "hkmeans"]
    table = (tmp_path / "runs" / "sweep" / "results.md").read_text()
    assert "| atomic |" in table and "| hkmeans |" in table and "| dense |" in table
    assert "sweep" in capsys.readouterr().out  # the combined table is printed too

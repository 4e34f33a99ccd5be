"""``gcr bench``: several runs x several seeds on the tiny shapes corpus, real parts only (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gcr.cli import config_dir, main
from gcr.errors import ConfigError
from gcr.reporting.bench import BenchSpec, load_bench, plan
from gcr.reporting.results import format_table

PNG = b"\x89PNG\r\n\x1a\n"
# The smallest budget that still runs every part: 100 images, one epoch of two batches, one direction.
TINY = [
    "data.num_images=100",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "dense.max_epochs=1",
    "model.hidden_size=64",
    "model.num_layers=1",
    "decoding.num_beams=3",
    "directions=[t2i]",
]
BENCH = """\
# a 2-run, 2-seed bench
name: tiny
seeds: [0, 1]
overrides: ["directions=[t2i]"]
runs:
  atomic: [scheme=atomic]
  hk4: [scheme=hkmeans, scheme.k=4, scheme.leaf_size=4]
"""


def _args(tmp: Path) -> list[str]:
    return [f"output_dir={tmp / 'runs'}", f"data.root={tmp / 'data'}", *TINY]


def _bench_file(tmp: Path, text: str = BENCH, name: str = "tiny.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _finished_files(bench_dir: Path) -> dict[str, int]:
    """mtime (ns) of each run's checkpoint and results: unchanged means the run was not retrained."""
    files = sorted(bench_dir.glob("*-s*/t2i/checkpoints/last.ckpt")) + sorted(bench_dir.glob("*-s*/results.json"))
    return {str(p.relative_to(bench_dir)): p.stat().st_mtime_ns for p in files}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    code = main(["bench", str(_bench_file(tmp)), *_args(tmp)])
    assert code == 0
    bench_dir = tmp / "runs" / "bench-tiny"
    return tmp, bench_dir, json.loads((bench_dir / "results.json").read_text())


# -- the bench itself ---------------------------------------------------------------------------
def test_bench_writes_one_document_with_every_label_and_seed(bench):
    _, bench_dir, results = bench
    got = sorted((r["method"], r["kind"], r["direction"], r["seed"]) for r in results["rows"])
    assert got == sorted(
        [(label, "generative", "t2i", s) for label in ("atomic", "hk4") for s in (0, 1)]
        + [("dense", "dense", "t2i", s) for s in (0, 1)]  # the dense baseline once per seed
    )
    for row in results["rows"]:
        m = row["metrics"]
        assert 0.0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 1.0 and m["queries_per_s"] > 0
    b = results["bench"]
    assert b["name"] == "tiny" and b["labels"] == ["atomic", "hk4"] and b["seeds"] == [0, 1]
    assert b["runs"]["hk4"]["scheme"] == "hkmeans"
    assert all(len(b["wall_seconds"][label]) == 2 and all(s > 0 for s in b["wall_seconds"][label]) for label in b["labels"])
    assert b["reused"] == {"atomic": [False, False], "hk4": [False, False]}
    for label in ("atomic", "hk4"):
        for seed in (0, 1):
            run = json.loads((bench_dir / f"{label}-s{seed}" / "results.json").read_text())
            assert run["config"]["seed"] == seed and run["config"]["dense"]["enabled"] is False
    # seeds change the runs: the two hkmeans seeds do not share their results
    atomic = [r for r in results["rows"] if r["method"] == "atomic"]
    assert {r["seed"] for r in atomic} == {0, 1}


def test_bench_table_reports_mean_and_std_and_the_plot_is_a_png(bench):
    _, bench_dir, results = bench
    table = (bench_dir / "results.md").read_text()
    lines = table.splitlines()
    assert "collision" in lines[0] and "seeds" in lines[0]
    for method in ("atomic", "hk4", "dense"):
        line = next(line for line in lines if line.startswith(f"| {method} |"))
        assert "±" in line and line.rstrip(" |").endswith("2")  # two seeds
    assert (bench_dir / "recall_at_k.png").read_bytes()[:8] == PNG


def test_every_row_keeps_per_query_ranks_that_reproduce_its_metrics_exactly(bench):
    """Dense and generative rows: each test query's id and first relevant rank, read back from results.json."""
    from omegaconf import OmegaConf

    from gcr.data.corpus import retrieval_task
    from gcr.data.sources import load_dataset
    from gcr.reporting.results import RESULTS_VERSION, row_metrics_from_ranks

    _, _, results = bench
    assert results["gcr_results_version"] == RESULTS_VERSION == 2
    corpus = load_dataset(OmegaConf.create(results["config"]["data"]))
    test_captions = sorted(q.query_id for q in retrieval_task(corpus, "t2i").queries_of("test"))
    for row in results["rows"]:
        pq = row["per_query"]
        assert pq["ids"] == test_captions  # every test caption once, by its caption id
        assert len(pq["ranks"]) == len(pq["ids"]) and all(0 <= r <= pq["depth"] for r in pq["ranks"])
        assert pq["depth"] == (10 if row["kind"] == "dense" else 3)  # dense: top 10; generative: 3 beams
        recomputed = row_metrics_from_ranks(row)
        assert set(recomputed) == {"R@1", "R@5", "R@10", "MRR@10"}
        assert recomputed == {k: row["metrics"][k] for k in recomputed}  # exactly, not approximately
    assert any(r > 0 for row in results["rows"] for r in row["per_query"]["ranks"])  # not all misses


def test_bench_reports_paired_intervals_against_its_reference(bench):
    _, bench_dir, results = bench
    section = results["intervals"]
    assert results["bench"]["reference"] == section["reference"] == "dense"  # no reference key: the dense row
    assert section["confidence"] == 0.95 and section["resamples"] == 2000 and section["missing"] == []
    entries = {(e["method"], e["direction"]): e for e in section["rows"]}
    assert set(entries) == {("dense", "t2i"), ("atomic", "t2i"), ("hk4", "t2i")}
    for (method, _), entry in entries.items():
        assert entry["seeds"] == [0, 1] and entry["queries"] == [50, 50]
        for name, m in entry["metrics"].items():
            rows = [r for r in results["rows"] if r["method"] == method]
            assert m["mean"] == pytest.approx(sum(r["metrics"][name] for r in rows) / 2)
            assert m["low"] <= m["mean"] <= m["high"]
            if method == "dense":
                assert "diff" not in m
                continue
            dense = [r for r in results["rows"] if r["method"] == "dense"]
            assert m["diff"] == pytest.approx(m["mean"] - sum(r["metrics"][name] for r in dense) / 2)
            assert m["diff_low"] <= m["diff"] <= m["diff_high"]
            assert m["significant"] == (not m["diff_low"] <= 0 <= m["diff_high"])
    table = (bench_dir / "results.md").read_text()
    assert "T2I ΔR@1" in table.splitlines()[0]
    assert "| dense | T2I |" in table and "Δ" in table and "ref" in table
    for method in ("atomic", "hk4"):
        m = entries[(method, "t2i")]["metrics"]["R@1"]
        cell = f"{100 * m['diff']:+.1f} [{100 * m['diff_low']:+.1f}, {100 * m['diff_high']:+.1f}]"
        line = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        assert cell + ("" if m["significant"] else " n.s.") + " |" in line


def test_gcr_table_recomputes_the_tables_from_results_json(bench, tmp_path, capsys):
    _, bench_dir, results = bench
    out = tmp_path / "again"
    assert main(["table", str(bench_dir), "--out", str(out)]) == 0  # the folder: its results.json
    assert (out / "results.md").read_text() == (bench_dir / "results.md").read_text()
    again = json.loads((out / "results.json").read_text())
    assert again == results  # the round trip: same rows, same intervals (the bootstrap is seeded)
    assert (out / "recall_at_k.png").read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "ΔR@1 vs dense" in printed and "hk4" in printed

    assert main(["table", str(bench_dir / "results.json"), "--reference", "hk4", "--out", str(out)]) == 0
    switched = json.loads((out / "results.json").read_text())["intervals"]
    assert switched["reference"] == "hk4"
    dense = next(e for e in switched["rows"] if e["method"] == "dense")["metrics"]["R@1"]
    hk4 = next(e for e in results["intervals"]["rows"] if e["method"] == "hk4")["metrics"]["R@1"]
    assert dense["diff"] == pytest.approx(-hk4["diff"])  # the same pairs, seen from the other side
    assert dense["diff_low"] == pytest.approx(-hk4["diff_high"]) and dense["diff_high"] == pytest.approx(-hk4["diff_low"])

    assert main(["table", str(bench_dir), "--reference", "nope"]) == 2
    assert "reference 'nope'" in capsys.readouterr().err


def _one_seed(results: dict, seed: int) -> dict:
    """The document a run of the same bench on ``seed`` alone would have written (rows, seeds, wall, reuse)."""
    doc = json.loads(json.dumps(results))
    i = doc["bench"]["seeds"].index(seed)
    doc["rows"] = [r for r in doc["rows"] if r["seed"] == seed]
    doc["bench"]["seeds"] = [seed]
    for field in ("wall_seconds", "reused"):
        doc["bench"][field] = {label: [values[i]] for label, values in doc["bench"][field].items()}
    doc.pop("intervals")
    return doc


def test_gcr_table_merges_one_bench_run_on_different_seeds(bench, tmp_path, capsys):
    _, bench_dir, results = bench
    for seed in (0, 1):
        doc = _one_seed(results, seed)
        if seed == 1:  # run elsewhere: where files went does not matter
            doc["bench"]["overrides"] = [*doc["bench"]["overrides"], "output_dir=/elsewhere", "wandb.mode=online"]
        (tmp_path / f"s{seed}.json").write_text(json.dumps(doc))
    out = tmp_path / "merged"
    assert main(["table", str(tmp_path / "s1.json"), str(tmp_path / "s0.json"), "--out", str(out)]) == 0
    merged = json.loads((out / "results.json").read_text())
    # the same table and the same paired intervals as the bench that ran both seeds at once
    assert (out / "results.md").read_text() == (bench_dir / "results.md").read_text()
    assert merged["intervals"] == results["intervals"]
    assert merged["bench"]["seeds"] == [0, 1] and merged["bench"]["wall_seconds"] == results["bench"]["wall_seconds"]
    assert [m["seeds"] for m in merged["merged_from"]] == [[0], [1]]
    assert "seeds 0, 1" in capsys.readouterr().out

    # a seed in two files, another bench, other data: refused, naming the problem
    assert main(["table", str(tmp_path / "s0.json"), str(tmp_path / "s0.json")]) == 2
    assert "seed 0 is in both" in capsys.readouterr().err
    other = _one_seed(results, 1)
    other["bench"]["runs"]["hk4"]["overrides"] = ["scheme=hkmeans"]
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["table", str(tmp_path / "s0.json"), str(tmp_path / "other.json")]) == 2
    assert "bench.runs differs" in capsys.readouterr().err
    moved = _one_seed(results, 1)
    moved["corpus"]["test_images"] += 1
    moved["corpus"]["fingerprint"] = "another machine"
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    assert main(["table", str(tmp_path / "s0.json"), str(tmp_path / "moved.json")]) == 2
    assert "different data (corpus test_images differ)" in capsys.readouterr().err


def test_gcr_table_reads_a_results_file_without_per_query_ranks(bench, tmp_path, capsys):
    """A version-1 document (no per-query ranks): the table as before, no intervals, and a note saying why."""
    _, _, results = bench
    old = json.loads(json.dumps(results))
    old["gcr_results_version"] = 1
    for key in ("intervals",):
        old.pop(key)
    old["bench"].pop("reference")
    for row in old["rows"]:
        row.pop("per_query")
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert main(["table", str(tmp_path / "results.json"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "no per-query ranks" in printed and "results version 1" in printed
    table = (tmp_path / "out" / "results.md").read_text()
    assert "Δ" not in table and table.splitlines()[0] == format_table(old).splitlines()[0]


def test_rerunning_a_bench_reuses_the_finished_runs(bench, capsys):
    tmp, bench_dir, first = bench
    before = _finished_files(bench_dir)
    assert len(before) == 8  # 4 runs: a checkpoint and a results.json each
    code = main(["bench", str(tmp / "tiny.yaml"), *_args(tmp)])
    assert code == 0
    again = json.loads((bench_dir / "results.json").read_text())
    assert again["bench"]["reused"] == {"atomic": [True, True], "hk4": [True, True]}
    assert again["bench"]["wall_seconds"] == first["bench"]["wall_seconds"]  # the runs' own timings are kept
    assert _finished_files(bench_dir) == before, "a finished run was retrained"
    key = lambda r: (r["method"], r["seed"])  # noqa: E731
    assert [r["metrics"]["R@10"] for r in sorted(again["rows"], key=key)] == [
        r["metrics"]["R@10"] for r in sorted(first["rows"], key=key)
    ]
    assert "bench tiny" in capsys.readouterr().out


def test_bench_logs_to_offline_wandb(bench, tmp_path, monkeypatch):
    from gcr.reporting.bench import run_bench

    tmp, bench_dir, _ = bench
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline comes from the config (wandb.mode)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    before = _finished_files(bench_dir)
    results = run_bench(load_bench(str(tmp / "tiny.yaml"), config_dir()), [*_args(tmp), "wandb.enabled=true"],
                        config_dir())
    assert all(all(v) for v in results["bench"]["reused"].values())  # wandb settings do not force a retrain
    assert _finished_files(bench_dir) == before
    (run,) = (bench_dir / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb"))
    media = {p.suffix for p in (run / "files" / "media").rglob("*")}
    assert ".png" in media and ".json" in media  # the plot and the table


# -- failing fast -------------------------------------------------------------------------------
def test_a_bad_key_fails_before_anything_is_trained(tmp_path, capsys):
    bench = _bench_file(tmp_path, BENCH.replace("scheme.leaf_size=4", "scheme.nope=4"))
    code = main(["bench", str(bench), *_args(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "hk4" in err and "scheme.nope" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()

    code = main(["bench", str(_bench_file(tmp_path)), *_args(tmp_path), "trainer.nope=1"])
    assert code == 2 and "trainer.nope" in capsys.readouterr().err
    # a new key the scheme does not take: caught by building the scheme, still before any run
    code = main(["bench", str(_bench_file(tmp_path, BENCH.replace("scheme.leaf_size=4", "+scheme.nope=4"))),
                 *_args(tmp_path)])
    assert code == 2 and "nope" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_folder_of_another_config_is_cleared_and_an_interrupted_one_kept(tmp_path):
    from omegaconf import OmegaConf

    from gcr.reporting.bench import clear_stale, finished_results

    spec = load_bench("baselines", config_dir())
    (run,) = plan(spec, _args(tmp_path), config_dir())[:1]
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(run.cfg, resolve=True))  # as fit writes it
    (run.run_dir / "t2i").mkdir()
    assert finished_results(run) is None  # no results.json: interrupted
    clear_stale(run)
    assert (run.run_dir / "t2i").is_dir()  # same config: kept, fit resumes it from last.ckpt
    (changed,) = plan(spec, [*_args(tmp_path), "trainer.max_epochs=3"], config_dir())[:1]
    clear_stale(changed)
    assert not run.run_dir.exists()  # another config: its checkpoints must not be resumed


def test_unknown_bench_lists_the_available_ones(tmp_path, capsys):
    assert main(["bench", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown bench 'nope'" in err and "baselines" in err


def test_bench_files_are_checked(tmp_path):
    cdir = config_dir()
    spec = load_bench("baselines", cdir)
    assert spec.name == "baselines" and list(spec.runs) == ["atomic", "hkmeans"] and spec.seeds == [0]
    with pytest.raises(ConfigError, match="unknown key"):
        load_bench(str(_bench_file(tmp_path, BENCH + "sedes: [1]\n", "a.yaml")), cdir)
    with pytest.raises(ConfigError, match="seeds"):
        BenchSpec.from_mapping({"name": "x", "seeds": ["a"], "runs": {"a": []}})
    with pytest.raises(ConfigError, match="label"):
        BenchSpec.from_mapping({"name": "x", "runs": {"a/b": []}})
    with pytest.raises(ConfigError, match="reference 'hk' is not a run"):
        BenchSpec.from_mapping({"name": "x", "reference": "hk", "runs": {"a": []}})
    with pytest.raises(ConfigError, match="reference 'dense'"):  # no dense row to compare with
        BenchSpec.from_mapping({"name": "x", "reference": "dense", "dense": False, "runs": {"a": []}})
    assert BenchSpec.from_mapping({"name": "x", "reference": "a+gsv", "runs": {"a": []}}).reference == "a+gsv"
    assert BenchSpec.from_mapping({"name": "x", "runs": {"a": []}}).reference is None  # dense, else the first run
    with pytest.raises(ConfigError, match="data"):  # a run may not change the data the others use
        plan(BenchSpec.from_mapping({"name": "x", "runs": {"a": ["scheme=atomic"], "b": ["data.num_images=200"]}}),
             _args(tmp_path), cdir)
    runs = plan(spec, _args(tmp_path), cdir)
    assert [(r.label, r.cfg.run_name, r.cfg.dense.enabled) for r in runs] == [
        ("atomic", "bench-baselines/atomic-s0", False), ("hkmeans", "bench-baselines/hkmeans-s0", False)]


# -- table and plots on synthetic rows ----------------------------------------------------------
def _row(method, direction, r1, seed=None, kind="generative", collision=0.0):
    metrics = {"R@1": r1, "R@5": min(1.0, r1 + 0.2), "R@10": min(1.0, r1 + 0.3), "MRR@10": r1, "queries_per_s": 100.0}
    index = {"mean_id_tokens": 2.0, "collision_rate": collision} if kind == "generative" else {}
    return {"method": method, "kind": kind, "direction": direction, "metrics": metrics, "train_seconds": 10.0,
            "index": index, "seed": seed}


def test_format_table_single_seed_keeps_its_format():
    results = {"rows": [_row("dense", "t2i", 0.3, kind="dense"), _row("hk", "t2i", 0.2, collision=0.05),
                        _row("hk", "i2t", 0.1)]}
    lines = format_table(results).splitlines()
    assert lines[0].endswith("| train s | ID tokens | collision |")
    assert "±" not in "\n".join(lines) and "seeds" not in lines[0]
    assert lines[2] == "| dense | 30.0 | 50.0 | 60.0 | 30.0 | 100 | - | - | - | - | - | 10 | - | - |"
    assert lines[3].endswith("| 20 | 2.0 / 2.0 | 5.0 / 0.0 |")


def test_format_table_averages_seeds_with_the_sample_std():
    results = {"rows": [_row("hk", "t2i", 0.4, seed=0), _row("hk", "t2i", 0.6, seed=1),
                        _row("dense", "t2i", 0.5, seed=0, kind="dense")]}
    lines = format_table(results).splitlines()
    assert lines[0].endswith("| collision | seeds |")
    # mean 50.0, sample std (ddof=1) of 40 and 60 = 14.1; train seconds: the mean per seed
    assert lines[2] == "| hk | 50.0 ± 14.1 | 70.0 ± 14.1 | 80.0 ± 14.1 | 50.0 ± 14.1 | 100 | 10 | 2.0 | 0.0 | 2 |"
    assert lines[3].startswith("| dense | 50.0 | ") and lines[3].endswith("| 1 |")


def test_recall_curves_and_throughput_plots_are_pngs(tmp_path):
    from gcr.reporting.plots import recall_curves, throughput_vs_size

    results = {"corpus": {"name": "synthetic"},
               "rows": [_row("hk", "t2i", 0.4, seed=0), _row("hk", "t2i", 0.6, seed=1), _row("hk", "i2t", 0.3)]}
    assert recall_curves(results, tmp_path / "r.png").read_bytes()[:8] == PNG
    points = [{"method": m, "size": n, "queries_per_s": q / n ** 0.5, "direction": "t2i"}
              for m, q in (("dense", 1e5), ("hk", 1e3)) for n in (100, 1_000, 10_000)]
    points += [("hk", "i2t", 1_000, 12.0), ("hk", "i2t", 1_000, 14.0)]  # tuples; repeats are averaged
    assert throughput_vs_size(points, tmp_path / "t.png").read_bytes()[:8] == PNG
    assert throughput_vs_size([("dense", 10, 5.0)], tmp_path / "one.png").stat().st_size > 0
    with pytest.raises(ValueError, match="positive"):
        throughput_vs_size([("dense", 0, 5.0)], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no throughput"):
        throughput_vs_size([], tmp_path / "empty.png")


def test_gcr_table_reads_a_committed_results_file_of_the_old_config_keys(tmp_path, capsys):
    """benchmarks/results/ keeps files written before every group selected its implementation with name."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "semcore-verify-cpu.json"
    before = path.read_bytes()
    stored = json.loads(before)
    assert stored["config"]["data"]["type"] == "shapes" and stored["config"]["features"]["encoder"] == "dense"
    assert main(["table", str(path), "--resamples", "200", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert all(r["method"] in printed for r in stored["rows"])
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["rows"] == stored["rows"] and written["intervals"]["rows"]  # per-query ranks: intervals
    config = written["config"]
    assert (config["data"]["name"], config["data"]["dataset"], config["features"]["name"]) == ("shapes", "shapes", "dense")
    assert "type" not in config["data"] and "source" not in config["description"] and "type" not in config["dense"]
    assert (config["description"]["name"], config["dense"]["name"]) == ("generated", "clip")
    assert path.read_bytes() == before  # the committed file is read, never rewritten

"""A run never damages another: configs are written only once checked, never over another config's run;
a run that fails before training leaves no folder behind.

Real parts: real fits of a tiny model on the shapes data, a real Karpathy JSON with a missing image, and
the real ``gcr`` command line as a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gcr.cli import compose, config_dir
from gcr.errors import DataError
from gcr.run_folder import choose_run_dir, differences

FAST = ["data.num_images=30", "trainer.max_epochs=1", "model.hidden_size=32", "model.num_layers=1",
        "decoding.num_beams=3", "directions=[t2i]", "scheme=atomic", "dense.enabled=false",
        "model.vision_init=random"]


def test_choose_run_dir_reuses_the_same_config_and_moves_aside_for_another(tmp_path):
    config = {"seed": 0, "trainer": {"max_epochs": 2}, "wandb": {"enabled": False}, "run_name": "r"}
    assert choose_run_dir(tmp_path, "r", config) == (tmp_path / "r", None)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("seed: 0\ntrainer:\n  max_epochs: 2\nwandb:\n  enabled: true\n")
    assert choose_run_dir(tmp_path, "r", config) == (tmp_path / "r", None)  # wandb does not count
    other = {**config, "trainer": {"max_epochs": 5}}
    run_dir, why = choose_run_dir(tmp_path, "r", other)
    assert run_dir == tmp_path / "r-1"
    assert "trainer.max_epochs: 2 -> 5" in why and str(tmp_path / "r-1") in why
    (tmp_path / "r-1").mkdir()
    (tmp_path / "r-1" / "config.yaml").write_text("seed: 0\ntrainer:\n  max_epochs: 5\nrun_name: r-1\n")
    assert choose_run_dir(tmp_path, "r", {**other, "wandb": None})[0] == tmp_path / "r-1"  # found again
    assert choose_run_dir(tmp_path, "r", {**config, "seed": 3})[0] == tmp_path / "r-2"
    assert differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c: <absent> -> 2"]


@pytest.mark.integration
def test_a_changed_config_never_touches_a_finished_run(tmp_path):
    from gcr.train.pipeline import fit

    base = [f"output_dir={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", "run_name=mine", *FAST]
    fit(compose(base, config_dir()))
    finished = tmp_path / "runs" / "mine"
    before = {p.name: p.read_bytes() for p in (finished / "config.yaml", finished / "results.json")}

    # a bad value with the finished run's name: refused before any file is written
    proc = subprocess.run([sys.executable, "-m", "gcr.cli", "fit", *base, "scheme.k=abc"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # a valid but different config with the same name: a new folder, and the user is told
    results = fit(compose([*base, "trainer.max_epochs=2"], config_dir()))
    assert results["config"]["run_name"] == "mine-1"
    assert (tmp_path / "runs" / "mine-1" / "results.json").is_file()
    assert {p.name: p.read_bytes() for p in (finished / "config.yaml", finished / "results.json")} == before


@pytest.mark.integration
def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path):
    from gcr.train.pipeline import fit

    data = tmp_path / "data"
    fit_args = [f"output_dir={tmp_path / 'runs'}", f"data.root={data}", *FAST]
    cfg = compose([*fit_args, "run_name=broken"], config_dir())
    from gcr.data.sources import load_dataset

    corpus = load_dataset(cfg.data)  # generate the data, then lose one image
    corpus.images[0].path.unlink()
    with pytest.raises(DataError, match="missing image file"):
        fit(compose([*fit_args, "run_name=broken"], config_dir()))
    assert not (tmp_path / "runs" / "broken").exists()
    assert not Path(tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_run_folder_written_before_the_key_rename_is_the_same_config(tmp_path):
    """config.yaml of an older gcr (data.type, features.encoder, ...) still matches today's config: it resumes."""
    from gcr.config import upgrade_config

    today = {"data": {"name": "shapes", "dataset": "shapes", "num_images": 40}, "features": {"name": "dense"},
             "dense": {"name": "clip", "enabled": True}, "description": {"name": "generated"},
             "scheme": {"name": "hkmeans"}, "seed": 0}
    before = {"data": {"type": "shapes", "name": "shapes", "num_images": 40}, "features": {"encoder": "dense"},
              "dense": {"type": "clip", "enabled": True}, "description": {"source": "generated"},
              "scheme": {"name": "hkmeans"}, "seed": 0}
    assert upgrade_config(before) == today and upgrade_config(today) == today
    assert before["data"] == {"type": "shapes", "name": "shapes", "num_images": 40}  # the input is left alone
    run = tmp_path / "shapes-hkmeans-tiny"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(before))
    assert choose_run_dir(tmp_path, "shapes-hkmeans-tiny", today) == (run, None)
    assert choose_run_dir(tmp_path, "shapes-hkmeans-tiny", {**today, "seed": 1})[0] == tmp_path / "shapes-hkmeans-tiny-1"

"""The example plugin package (plugins/gcr-tiger), installed for real with pip, seen by gcr without any change
to gcr: `gcr schemes` lists it, `gcr fit scheme=tiger` runs it, and its own test suite passes.

The package is installed with ``pip install --target`` into a temporary folder put on ``PYTHONPATH`` of the
subprocesses, so the test leaves the environment as it found it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # real subprocesses / full fits: deselect with -m 'not integration'

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins" / "gcr-tiger"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "gcr-tiger"  # pip builds in the source folder: keep the repo clean
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return target, env


def _gcr(args, env, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, "-m", "gcr.cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_gcr_schemes_lists_the_installed_plugin(installed):
    target, env = installed
    assert list(target.glob("gcr_tiger-0.1.0.dist-info/entry_points.txt"))
    out = _gcr(["schemes"], env)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if "tiger" in line)
    assert "gcr-tiger" in line or "TIGER" in line
    bare = _gcr(["schemes"], dict(env, PYTHONPATH=""))  # not installed: not listed
    assert "tiger" not in bare.stdout


def test_gcr_fit_runs_the_plugin_scheme(installed, tmp_path):
    _, env = installed
    out = _gcr(["fit", "scheme=tiger", "+scheme.levels=2", "+scheme.codebook_size=4", f"output_dir={tmp_path / 'runs'}",
                f"data.root={tmp_path / 'data'}", "data.num_images=40", "trainer.max_epochs=1", "dense.max_epochs=1",
                "model.hidden_size=32", "model.num_layers=1", "decoding.num_beams=3", "directions=[t2i]"], env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next((tmp_path / "runs").glob("*/results.json")).read_text())
    (row,) = [r for r in results["rows"] if r["kind"] == "generative"]
    assert row["method"] == "tiger" and row["index"]["num_targets"] == 40
    assert results["config"]["scheme"] == {"name": "tiger", "levels": 2, "codebook_size": 4}


def test_the_plugin_own_test_suite_passes(installed):
    _, env = installed
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PLUGIN / "tests")],
                         env=env, cwd=PLUGIN, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout

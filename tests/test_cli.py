"""Tests of the ``gcr`` command line, run as a real subprocess, and of the light core imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GCR_CONFIG_DIR"}  # use the repository's configs/
    env.update(CI="1", COLUMNS="200", **extra)
    return env


def gcr(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gcr.cli", *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_schemes_lists_builtins_with_descriptions(tmp_path):
    proc = gcr(tmp_path, "schemes")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    atomic = next(line for line in lines if " atomic " in line)
    hkmeans = next(line for line in lines if " hkmeans " in line)
    assert "builtin" in atomic and "one new token per target" in atomic
    assert "builtin" in hkmeans and "K-Means" in hkmeans


def test_fit_cfg_unknown_scheme_suggests_the_close_match(tmp_path):
    proc = gcr(tmp_path, "fit", "--cfg", "scheme=atomc")
    assert proc.returncode == 2
    assert "atomc" in proc.stderr and "Did you mean 'atomic'" in proc.stderr
    assert "hkmeans" in proc.stderr  # the available schemes are listed
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_fit_cfg_unknown_key_is_named(tmp_path):
    proc = gcr(tmp_path, "fit", "--cfg", "trainer.nope=1")
    assert proc.returncode == 2
    assert "trainer.nope is not a config key" in proc.stderr and "+trainer.nope=VALUE" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fit_cfg_unknown_group_option_lists_the_available_ones(tmp_path):
    proc = gcr(tmp_path, "fit", "--cfg", "data=nope")
    assert proc.returncode == 2
    assert "data/nope" in proc.stderr
    for option in ("shapes", "coco", "flickr30k"):
        assert option in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fit_cfg_prints_the_composed_config(tmp_path):
    proc = gcr(tmp_path, "fit", "--cfg", "scheme=atomic", "trainer.max_epochs=3")
    assert proc.returncode == 0, proc.stderr
    assert "scheme:\n  name: atomic\n" in proc.stdout
    assert "max_epochs: 3" in proc.stdout


def test_fit_cfg_multirun_prints_one_config_per_sweep_value(tmp_path):
    proc = gcr(tmp_path, "fit", "--cfg", "-m", "scheme=atomic,hkmeans")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("scheme:\n") == 2
    assert proc.stdout.index("name: atomic") < proc.stdout.index("name: hkmeans")
    assert "leaf_size: 10" in proc.stdout  # the hkmeans group file was composed too


def test_fit_cfg_multirun_validates_every_run_before_printing(tmp_path):
    proc = gcr(tmp_path, "fit", "--cfg", "-m", "scheme=atomic,atomc")
    assert proc.returncode == 2
    assert "Did you mean 'atomic'" in proc.stderr and proc.stdout == ""


def _write_plugin(root: Path) -> None:
    (root / "gcrcli_fakeplugin.py").write_text(
        textwrap.dedent(
            '''
            from gcr.schemes import IdentifierScheme


            class FakeScheme(IdentifierScheme):
                """Fake plugin scheme."""

                name = "fakescheme"

                def fit(self, targets, features=None):
                    return [str(i) for i in range(len(targets))]


            class PickyScheme(IdentifierScheme):
                """Fake plugin scheme with a checked option."""

                name = "pickyscheme"

                def __init__(self, seed=0, width=4):
                    if int(width) < 1:
                        raise ValueError(f"width must be at least 1, got {width}")
                    super().__init__(seed)

                def fit(self, targets, features=None):
                    return [str(i) for i in range(len(targets))]
            '''
        )
    )
    (root / "gcrcli_broken.py").write_text('raise ImportError("needs libnothere")\n')
    info = root / "gcrcli_fakeplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gcrcli-fakeplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[gcr.schemes]\nfakescheme = gcrcli_fakeplugin:FakeScheme\nbrokenscheme = gcrcli_broken:Scheme\n"
        "pickyscheme = gcrcli_fakeplugin:PickyScheme\n"
    )


def test_plugin_schemes_are_listed_and_selectable(tmp_path):
    plugin_dir = tmp_path / "site"
    plugin_dir.mkdir()
    _write_plugin(plugin_dir)
    pythonpath = os.pathsep.join(p for p in (str(plugin_dir), os.environ.get("PYTHONPATH", "")) if p)

    proc = gcr(tmp_path, "schemes", PYTHONPATH=pythonpath)
    assert proc.returncode == 0, proc.stderr
    fake = next(line for line in proc.stdout.splitlines() if " fakescheme " in line)
    assert "gcrcli-fakeplugin" in fake and "Fake plugin scheme." in fake
    broken = next(line for line in proc.stdout.splitlines() if " brokenscheme " in line)
    assert "broken plugin" in broken
    assert "atomic" in proc.stdout  # the built-ins are still there

    # a plugin scheme without its own YAML uses the generic plugin config
    proc = gcr(tmp_path, "fit", "--cfg", "scheme=fakescheme", PYTHONPATH=pythonpath)
    assert proc.returncode == 0, proc.stderr
    assert "scheme:\n  name: fakescheme\n" in proc.stdout

    proc = gcr(tmp_path, "fit", "--cfg", "scheme=brokenscheme", PYTHONPATH=pythonpath)
    assert proc.returncode == 2
    assert "brokenscheme" in proc.stderr and "Traceback" not in proc.stderr
    assert "installed but failed to import" in proc.stderr and "needs libnothere" in proc.stderr
    assert "unknown scheme" not in proc.stderr and "gcr: gcr:" not in proc.stderr
    assert "schemes 'brokenscheme'" not in proc.stderr  # one entry is a scheme, not "schemes"

    # a plugin's own option check (a ValueError) is a clean config error naming the scheme
    proc = gcr(tmp_path, "fit", "--cfg", "scheme=pickyscheme", "+scheme.width=0", PYTHONPATH=pythonpath)
    assert proc.returncode == 2, proc.stderr
    assert "scheme 'pickyscheme'" in proc.stderr and "width must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- light core imports

HEAVY = ("lightning", "pytorch_lightning", "wandb")
CORE = (
    "gcr.registry",
    "gcr.schemes",
    "gcr.schemes.atomic",
    "gcr.schemes.hkmeans",
    "gcr.index",
    "gcr.artifacts",
    "gcr.retrieval",
    "gcr.data.corpus",
    "gcr.cli",
)
PROBE = f"""
import importlib, json, sys
heavy = lambda: [m for m in {HEAVY!r} if m in sys.modules]
out = {{}}
for m in {CORE!r}:
    importlib.import_module(m)
out["core"] = heavy()
try:
    import gcr.decoding
except ImportError as exc:
    out["decoding_error"] = f"{{type(exc).__name__}}: {{exc}}"
else:
    out["decoding"] = heavy()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def imports() -> dict:
    """What a fresh interpreter pulls in when importing the core (one subprocess: torch loads once)."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_imports_without_lightning_or_wandb(imports):
    assert imports["core"] == []


BOUNDARY_PROBE = """
import importlib, json, pkgutil, sys
import gcr
TRAINING = ("gcr.train", "gcr.dense.setup", "gcr.dense.training")  # Lightning and W&B live here only
found = {}
names = sorted(m.name for m in pkgutil.walk_packages(gcr.__path__, "gcr."))
for name in names:
    if name.startswith(TRAINING):
        continue
    before = {m for m in ("lightning", "pytorch_lightning", "wandb") if m in sys.modules}
    importlib.import_module(name)
    after = {m for m in ("lightning", "pytorch_lightning", "wandb") if m in sys.modules}
    if after - before:
        found[name] = sorted(after - before)
print(json.dumps({"checked": [n for n in names if not n.startswith(TRAINING)], "heavy": found}))
"""


def test_every_module_outside_the_training_layer_imports_without_lightning_or_wandb():
    proc = subprocess.run([sys.executable, "-c", BOUNDARY_PROBE], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr  # a module that cannot even be imported fails too
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"gcr.decoding.trie", "gcr.schemes.semcore", "gcr.index", "gcr.config_checks"} <= set(report["checked"])
    assert report["heavy"] == {}


def test_flags_may_sit_between_overrides(capsys):
    from gcr.cli import main

    assert main(["fit", "trainer.max_epochs=3", "-m", "scheme=atomic,hkmeans", "--cfg"]) == 0
    out = capsys.readouterr().out
    assert out.count("max_epochs: 3") == 2 and "name: atomic" in out and "name: hkmeans" in out


EVAL_PROBE = """
import sys
from gcr.cli import main
code = main(sys.argv[1:])
heavy = [m for m in ("torch", "lightning", "transformers", "wandb") if m in sys.modules]
print("exit", code, "heavy", ",".join(heavy) or "-")
"""


@pytest.mark.parametrize("args, message", [
    ([], "gcr eval needs ckpt=PATH"),
    (["ckpt=runs/never-made"], "ckpt=runs/never-made does not exist"),
    (["runs/x"], "key=value arguments"),
    (["ckpt=."], "not inside a gcr run folder"),
])
def test_eval_argument_errors_come_back_before_heavy_imports(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-c", EVAL_PROBE, "eval", *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.strip() == "exit 2 heavy -"

"""Tests of the generic registry: lazy built-ins, duplicates, suggestions and real entry-point plugins."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gcr.errors import ConfigError, GcrError
from gcr.registry import SCHEMES, Registry, RegistryError
from gcr.schemes import IdentifierScheme, build_scheme


def _fresh(kind: str = "widgets") -> Registry:
    """A registry whose entry-point group no installed distribution provides."""
    return Registry(kind, entry_point_group="gcr.tests-no-such-group")


@pytest.fixture
def forget_modules():
    """Names of modules a test imports from tmp_path; they are dropped from sys.modules afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------- lazy built-ins


def test_lazy_entry_is_listed_without_import_and_resolved_on_first_get(tmp_path, monkeypatch, forget_modules):
    (tmp_path / "gcr_lazy_target_mod.py").write_text(
        'class Thing:\n    """Thing from a lazily imported module.\n\n    More text.\n    """\n'
    )
    monkeypatch.syspath_prepend(tmp_path)
    forget_modules.append("gcr_lazy_target_mod")
    reg = _fresh()
    reg.register_lazy("thing", "gcr_lazy_target_mod:Thing")

    assert reg.names() == ["thing"]
    assert "thing" in reg and list(reg) == ["thing"]
    assert reg.describe() == [("thing", "builtin", "")]
    assert "gcr_lazy_target_mod" not in sys.modules  # listing imported nothing

    thing = reg.get("thing")
    assert "gcr_lazy_target_mod" in sys.modules
    assert thing is sys.modules["gcr_lazy_target_mod"].Thing
    assert reg.get("thing") is thing  # resolved once, then cached
    # the docstring's first line fills in a missing description once the target is imported
    assert reg.describe() == [("thing", "builtin", "Thing from a lazily imported module.")]


def test_builtin_schemes_are_described_without_importing_their_modules():
    code = textwrap.dedent(
        """
        import sys
        from gcr.registry import SCHEMES
        rows = {name: (origin, desc) for name, origin, desc in SCHEMES.describe()}
        assert {"atomic", "hkmeans"} <= set(rows), rows
        assert rows["atomic"][0] == "builtin" and "atomic" in rows["atomic"][1].lower(), rows
        assert "k-means" in rows["hkmeans"][1].lower(), rows
        heavy = [m for m in ("gcr.schemes.atomic", "gcr.schemes.hkmeans", "sklearn") if m in sys.modules]
        assert not heavy, heavy
        cls = SCHEMES.get("hkmeans")
        assert cls.__module__ == "gcr.schemes.hkmeans" and "gcr.schemes.hkmeans" in sys.modules
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_register_lazy_rejects_a_target_without_attribute():
    with pytest.raises(ValueError, match="module:attr"):
        _fresh().register_lazy("x", "just.a.module")


# --------------------------------------------------------------------------- registration


def test_register_as_decorator_returns_the_class_and_uses_its_docstring():
    reg = _fresh()

    @reg.register("widget")
    class Widget:
        """A widget.

        Details that are not part of the description.
        """

    assert reg.get("widget") is Widget
    assert reg.describe() == [("widget", "builtin", "A widget.")]


def test_duplicate_name_by_another_object_names_both_origins():
    reg = _fresh()

    class A:
        pass

    class B:
        pass

    reg.register("same", A, origin="builtin")
    reg.register("same", A, origin="builtin")  # the same object again is harmless
    with pytest.raises(RegistryError) as info:
        reg.register("same", B, origin="plugin otherdist")
    message = str(info.value)
    assert "'same'" in message and "builtin" in message and "plugin otherdist" in message
    assert reg.get("same") is A  # the first registration is kept


def test_duplicate_lazy_target_against_a_different_string_is_rejected():
    reg = _fresh()
    reg.register_lazy("x", "mod_a:X", origin="builtin")
    reg.register_lazy("x", "mod_a:X", origin="builtin")
    with pytest.raises(RegistryError, match="already registered by builtin"):
        reg.register_lazy("x", "mod_b:X", origin="plugin p")


def test_unknown_name_suggests_close_matches_and_lists_available():
    with pytest.raises(RegistryError) as info:
        SCHEMES.get("atomc")
    message = str(info.value)
    assert "Did you mean 'atomic'" in message
    assert "Available:" in message and "atomic" in message and "hkmeans" in message
    assert not message.startswith("'")  # not quoted like a plain KeyError
    assert isinstance(info.value, KeyError) and isinstance(info.value, GcrError)


def test_unknown_name_without_close_match_still_lists_available():
    reg = _fresh()
    reg.register_lazy("atomic", "nowhere:X")
    reg.register_lazy("hkmeans", "nowhere:Y")
    with pytest.raises(RegistryError) as info:
        reg.get("zzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "Available: atomic, hkmeans." in str(info.value)
    with pytest.raises(RegistryError, match=r"Available: \(none\)"):
        _fresh().get("anything")


def test_build_turns_bad_arguments_into_config_error():
    reg = _fresh()
    reg.register("pair", lambda a, b=1: (a, b))
    assert reg.build("pair", 3, b=4) == (3, 4)
    with pytest.raises(ConfigError, match=r"cannot build widgets 'pair' with \['c'\]"):
        reg.build("pair", 3, c=4)


# --------------------------------------------------------------------------- build_scheme


@pytest.mark.parametrize(
    ("name", "valid"), [("atomic", ["prefix", "seed"]), ("hkmeans", ["k", "leaf_size", "minibatch_above", "seed"])]
)
def test_build_scheme_unknown_option_lists_valid_options(name, valid):
    with pytest.raises(ConfigError) as info:
        build_scheme(name, colour="red")
    message = str(info.value)
    assert "colour" in message and repr(name) in message
    assert f"valid: {valid}" in message


def test_build_scheme_with_valid_options_and_unknown_name():
    scheme = build_scheme("hkmeans", k=3, leaf_size=5, seed=7)
    assert scheme.config() == {"seed": 7, "k": 3, "leaf_size": 5, "minibatch_above": 20000}
    with pytest.raises(RegistryError, match="Did you mean 'hkmeans'"):
        build_scheme("hkmean")


def test_scheme_subclass_setting_options_after_super_init_still_gets_a_clear_error():
    class Late(IdentifierScheme):
        name = "late"

        def __init__(self, seed: int = 0, width: int = 3, **options):
            super().__init__(seed=seed, **options)
            self.width = width

        def config(self):
            return {"seed": self.seed, "width": self.width}

        def fit(self, targets, features=None):
            return []

    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['bogus'\].*valid: \['seed', 'width'\]"):
        Late(bogus=1)


# --------------------------------------------------------------------------- entry-point plugins


def _write_dist(root: Path, dist: str, entry_points: str) -> None:
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


OK_PLUGIN = '''
from gcr.schemes import IdentifierScheme


class FakeScheme(IdentifierScheme):
    """Fake scheme shipped by a plugin."""

    name = "fakescheme"

    def fit(self, targets, features=None):
        return [f"fake-{i}" for i in range(len(targets))]
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch, forget_modules):
    """A folder on sys.path with one working and one broken plugin distribution."""
    (tmp_path / "fakeplugin_ok.py").write_text(OK_PLUGIN)
    (tmp_path / "fakeplugin_broken.py").write_text(
        'raise ImportError("fakeplugin_broken needs libnothere, which is not installed")\n'
    )
    _write_dist(tmp_path, "fakeplugin", "[gcr.schemes]\nfakescheme = fakeplugin_ok:FakeScheme\n")
    _write_dist(tmp_path, "brokenplugin", "[gcr.schemes]\nbrokenscheme = fakeplugin_broken:Scheme\n")
    forget_modules += ["fakeplugin_ok", "fakeplugin_broken"]
    monkeypatch.syspath_prepend(tmp_path)
    return tmp_path


def test_entry_point_plugin_is_discovered_listed_and_built(plugins):
    reg = Registry("schemes")  # fresh: the global SCHEMES is not touched
    reg.register_lazy("atomic", "gcr.schemes.atomic:AtomicScheme", "GRACE atomic ID")
    assert reg.group == "gcr.schemes"

    assert "fakescheme" in reg.names() and "atomic" in reg.names()
    rows = {name: (origin, desc) for name, origin, desc in reg.describe()}
    origin, description = rows["fakescheme"]
    assert "fakeplugin" in origin and origin.startswith("plugin")
    assert description == "Fake scheme shipped by a plugin."

    cls = reg.get("fakescheme")
    assert cls is sys.modules["fakeplugin_ok"].FakeScheme
    assert issubclass(cls, IdentifierScheme)
    assert reg.build("fakescheme").fit([None, None]) == ["fake-0", "fake-1"]
    # entries belong to their registry: another one (no plugins in its group) does not see this one's
    assert "fakescheme" not in Registry("widgets").names() and "atomic" not in Registry("widgets").names()


def test_broken_plugin_is_reported_and_never_breaks_the_others(plugins, caplog):
    reg = Registry("schemes")
    reg.register_lazy("atomic", "gcr.schemes.atomic:AtomicScheme", "GRACE atomic ID")

    with caplog.at_level("WARNING", logger="gcr.registry"):
        names = reg.names()
    assert "brokenscheme" not in names
    assert {"atomic", "fakescheme"} <= set(names)
    assert any("brokenscheme" in r.getMessage() for r in caplog.records)

    broken = reg.broken()
    assert set(broken) == {"brokenscheme"}
    assert "brokenplugin" in broken["brokenscheme"]
    assert "ImportError" in broken["brokenscheme"] and "libnothere" in broken["brokenscheme"]

    with pytest.raises(RegistryError) as info:
        reg.get("brokenscheme")
    message = str(info.value)
    assert "'brokenscheme'" in message and "failed to import" in message and "libnothere" in message

    # the other entries keep working
    assert reg.get("fakescheme").__name__ == "FakeScheme"
    assert reg.get("atomic").__name__ == "AtomicScheme"
    assert "brokenscheme" not in reg


def test_plugin_reusing_a_builtin_name_is_reported_and_the_builtin_kept(
    tmp_path, monkeypatch, forget_modules
):
    (tmp_path / "fakeplugin_clash.py").write_text(OK_PLUGIN)
    _write_dist(tmp_path, "clashplugin", "[gcr.schemes]\natomic = fakeplugin_clash:FakeScheme\n")
    forget_modules.append("fakeplugin_clash")
    monkeypatch.syspath_prepend(tmp_path)

    reg = Registry("schemes")
    reg.register_lazy("atomic", "gcr.schemes.atomic:AtomicScheme", "GRACE atomic ID")
    broken = reg.broken()
    assert "atomic" in broken
    assert (
        "duplicate" in broken["atomic"]
        and "clashplugin" in broken["atomic"]
        and "builtin" in broken["atomic"]
    )
    assert reg.get("atomic").__module__ == "gcr.schemes.atomic"


def test_unregister_removes_an_entry_and_ignores_an_absent_one():
    reg = Registry("widgets")
    reg.register("w", object(), description="a widget")
    assert "w" in reg
    reg.unregister("w")
    reg.unregister("never-there")
    assert "w" not in reg and reg.names() == []
    with pytest.raises(RegistryError, match="unknown widget 'w'"):
        reg.get("w")

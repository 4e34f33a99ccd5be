"""Merge the results documents of one bench run on different seeds into one (``gcr table A B ...``).

A seed added later (another machine, another day) joins the seeds already measured without re-running them.
The documents must come from the same bench (name, runs and their overrides, shared overrides other than where
files go: ``output_dir``, ``cache_dir``, ``data.root``, ``wandb.*``) on the same data (the corpus description:
name, split sizes, source, generator parameters), with no seed in two of them. Each row keeps its seed and
per-query ranks, so the mean ± std and the paired intervals of the merged table are computed over every seed, as
if one bench had run them all.
"""

from __future__ import annotations

from typing import Any

from gcr.errors import ConfigError

#: bench fields that must agree for two documents to be seeds of one bench
_SAME_BENCH = ("name", "labels", "runs", "overrides", "dense")
#: override keys that say where files go, not what is measured
_LOCATION_KEYS = ("output_dir", "cache_dir", "data.root")


def _measured(bench: dict[str, Any], key: str) -> Any:
    value = bench.get(key)
    if key == "overrides" and isinstance(value, list):
        return [o for o in value if str(o).split("=", 1)[0].lstrip("+~") not in _LOCATION_KEYS
                and not str(o).startswith("wandb.")]
    return value


def _seeds(doc: dict[str, Any]) -> list[int]:
    return sorted({int(row["seed"]) for row in doc["rows"] if row.get("seed") is not None})


def _data_description(doc: dict[str, Any]) -> dict[str, Any]:
    """The corpus as results describe it, without its file fingerprint: that one covers file paths and mtimes
    (cache keys), so the same data generated again on another machine differs in it."""
    return {k: v for k, v in (doc.get("corpus") or {}).items() if k != "fingerprint"}


def merge_seed_runs(documents: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One results document from ``(path, document)`` pairs of one bench on disjoint seeds.

    The merged document is the one with the lowest seed, with every document's rows, the seeds, per-seed wall
    times and reuse flags of all of them, and ``merged_from`` (path, commit, creation time and seeds of each).
    Its ``intervals`` are stale: recompute them (:func:`gcr.reporting.results.compute_intervals`).
    """
    if len(documents) < 2:
        raise ConfigError("merging needs at least two results files")
    for path, doc in documents:
        if not isinstance(doc.get("bench"), dict):
            raise ConfigError(f"{path} is not a bench results file: only benches on different seeds can be merged")
        if not _seeds(doc):
            raise ConfigError(f"{path} has no seeded rows to merge")
    documents = sorted(documents, key=lambda item: _seeds(item[1])[0])
    first_path, first = documents[0]
    seen: dict[int, str] = {}
    for path, doc in documents:
        for key in _SAME_BENCH:
            if _measured(doc["bench"], key) != _measured(first["bench"], key):
                raise ConfigError(
                    f"{path} and {first_path} are not seeds of one bench: bench.{key} differs "
                    f"({_measured(doc['bench'], key)!r} vs {_measured(first['bench'], key)!r}); merge only runs of "
                    "the same bench file"
                )
        corpus, first_corpus = _data_description(doc), _data_description(first)
        if corpus != first_corpus:
            differs = sorted(k for k in set(corpus) | set(first_corpus) if corpus.get(k) != first_corpus.get(k))
            raise ConfigError(f"{path} and {first_path} were measured on different data (corpus {', '.join(differs)} differ)")
        for seed in _seeds(doc):
            if seed in seen:
                raise ConfigError(f"seed {seed} is in both {seen[seed]} and {path}; merge files with different seeds")
            seen[seed] = path

    merged = dict(first)
    merged["rows"] = [row for _, doc in documents for row in doc["rows"]]
    seeds = sorted(seen)
    bench = dict(first["bench"])
    bench["seeds"] = seeds
    for field in ("wall_seconds", "reused"):
        per_seed = {}
        for label in bench["labels"]:
            by_seed = {}
            for _, doc in documents:
                values = (doc["bench"].get(field) or {}).get(label) or []
                by_seed.update(zip(doc["bench"]["seeds"], values))
            per_seed[label] = [by_seed.get(seed) for seed in seeds]
        bench[field] = per_seed
    merged["bench"] = bench
    merged["merged_from"] = [
        {"path": path, "git_commit": doc.get("git_commit"), "created": doc.get("created"), "seeds": _seeds(doc)}
        for path, doc in documents
    ]
    merged.pop("intervals", None)
    return merged

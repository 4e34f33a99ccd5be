"""A resumable cache of the answers an identifier writer gave (``ssi`` with ``generator=llm``).

Writing identifiers with a language model costs minutes to hours, so its raw answers are kept on disk, in
``<cache_dir>/ssi-answers-<targets fingerprint>-<key>.json``, like the caption cache
(:mod:`gcr.descriptions.cache`):

* **keyed** by what the answers came from: the targets (:func:`targets_fingerprint`: ids, descriptions and,
  when the writer reads images, each image file's path, size and mtime) and :func:`answers_key` (the writer's
  :meth:`~gcr.schemes.helpers.llm_writer.FieldWriter.signature`, every prompt it is given, the fields);
* **validated** on load (kind, format version, fingerprint, key, the shape of the table): a corrupt, stale or
  foreign file is ignored with a warning and rebuilt;
* **written atomically** after every chunk of answers, so an interrupted run keeps what it generated and the
  next run asks only for the rest.

Raw answers are stored, not parsed fields: validation depends on the run's tokenizer (which words it can
spell), so it is redone on every load and a retry prompt is only asked where the cached first answer fails.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gcr.artifacts import check_header, read_json, write_json
from gcr.data.corpus import file_signature
from gcr.errors import ArtifactError
from gcr.progress import Progress

ANSWERS_KIND = "gcr-ssi-answers"
FORMAT_VERSION = 1


def _digest(payload: Any, size: int = 16) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:size]


def targets_fingerprint(target_ids: Sequence[str], descriptions: Sequence[str],
                        images: Sequence[str | None] = ()) -> str:
    """A short hash of the targets as the writer sees them: ids, descriptions, image files (stat) if read."""
    h = hashlib.sha256()
    images = list(images) or [None] * len(target_ids)
    for target_id, text, image in zip(target_ids, descriptions, images, strict=True):
        h.update(f"{target_id}\t{text}\t{file_signature(image) if image else '-'}\n".encode())
    return h.hexdigest()[:16]


def answers_key(spec: dict[str, Any]) -> str:
    """The cache key of a writer spec (its signature, prompts and fields): a short hash."""
    return _digest(spec, 12)


class AnswerCache:
    """Answers by target id and attempt, in one JSON file; ``None`` path: kept in memory only."""

    def __init__(self, cache_dir: str | Path | None, fingerprint: str, key: str, spec: dict[str, Any]):
        self.fingerprint, self.key, self.spec = fingerprint, key, spec
        self.path = Path(cache_dir) / f"ssi-answers-{fingerprint}-{key}.json" if cache_dir else None
        self.answers: dict[str, dict[str, str]] = self._load()
        self.generated = 0
        self.reused = 0

    def _load(self) -> dict[str, dict[str, str]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            meta = read_json(self.path, what="ssi answer cache")
            if not isinstance(meta, dict):
                raise ArtifactError(f"{self.path} does not hold a JSON object")
            check_header(meta, kind=ANSWERS_KIND, version=FORMAT_VERSION, path=self.path,
                         targets_fingerprint=self.fingerprint, key=self.key)
            answers = meta.get("answers")
            ok = isinstance(answers, dict) and all(
                isinstance(by_attempt, dict) and all(k.isdigit() and isinstance(v, str) for k, v in by_attempt.items())
                for by_attempt in answers.values())
            if not ok:
                raise ArtifactError(f"{self.path} has a malformed 'answers' table")
        except ArtifactError as exc:
            warnings.warn(f"ignoring the ssi answer cache and regenerating it: {exc}", stacklevel=3)
            return {}
        return {t: dict(a) for t, a in answers.items()}

    def get(self, target_id: str, attempt: int) -> str | None:
        """The cached answer of ``target_id`` to prompt ``attempt``, or ``None``."""
        return self.answers.get(target_id, {}).get(str(attempt))

    def put(self, items: Sequence[tuple[str, int, str]]) -> None:
        """Add ``(target id, attempt, answer)`` items and rewrite the file atomically."""
        for target_id, attempt, answer in items:
            self.answers.setdefault(target_id, {})[str(attempt)] = answer
        if self.path is not None:
            write_json(self.path, {"kind": ANSWERS_KIND, "format_version": FORMAT_VERSION,
                                   "targets_fingerprint": self.fingerprint, "key": self.key, "spec": self.spec,
                                   "answers": self.answers})

    def ask(self, answerer: Callable[[Sequence[Any], Sequence[Any]], list[str]], attempt: int,
            target_ids: Sequence[str], targets: Sequence[Any], prompts: Sequence[Any], *,
            chunk_size: int = 64) -> list[str]:
        """Answers of ``attempt`` for every target: cached ones as they are, the rest from ``answerer``,
        ``chunk_size`` at a time, each chunk saved before the next (a progress bar counts them)."""
        missing = [i for i, t in enumerate(target_ids) if self.get(t, attempt) is None]
        self.reused += len(target_ids) - len(missing)
        if missing:
            what = "first prompt" if attempt == 0 else f"retry {attempt}"
            with Progress(f"ssi: writing identifiers ({what})", len(missing), unit="targets") as bar:
                for start in range(0, len(missing), chunk_size):
                    chunk = missing[start:start + chunk_size]
                    answers = answerer([targets[i] for i in chunk], [prompts[i] for i in chunk])
                    if len(answers) != len(chunk):
                        raise ValueError(f"the identifier writer gave {len(answers)} answers for {len(chunk)} prompts")
                    self.put([(target_ids[i], attempt, str(a)) for i, a in zip(chunk, answers)])
                    self.generated += len(chunk)
                    bar.update(len(chunk))
        return [self.get(t, attempt) or "" for t in target_ids]

"""The identifier index: identifier <-> targets, and token ids under a tokenizer.

Built from a scheme's assignments, it checks uniqueness (unless the scheme
declares shared identifiers), tokenizes every identifier (plus EOS) and checks
that distinct identifiers stay distinct as token sequences. It is saved as one
JSON artifact with a format version, the scheme's name and config, the corpus
fingerprint and the tokenizer's fingerprint, and validated on load. The prefix
trie of the token ids is saved next to it (``trie.pt``), keyed by a digest of
the token ids, so a large index does not rebuild it on every load.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gcr.artifacts import check_header, load_tensors, read_json, save_tensors, write_json
from gcr.errors import ArtifactError, IdentifierError

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TRIE_FILE = "trie.pt"
log = logging.getLogger(__name__)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id), to catch a foreign tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256("\n".join(f"{t}\t{i}" for t, i in vocab).encode()).hexdigest()[:16]


@dataclass
class IdentifierIndex:
    """Unique identifiers, the targets each names, and (after :meth:`tokenize`) their token ids."""

    scheme: str
    scheme_config: dict[str, Any]
    direction: str
    corpus_fingerprint: str
    identifiers: list[str]
    targets: list[list[str]]  # target ids named by each identifier
    scheme_state: dict[str, Any] = field(default_factory=dict)
    token_ids: list[list[int]] | None = None
    tokenizer_fingerprint: str | None = None
    vocab_size: int | None = None  # of the tokenizer the token ids come from
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        self._by_target = {t: i for i, ts in enumerate(self.targets) for t in ts}
        self._trie: Any = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        scheme: Any,
        target_ids: Sequence[str],
        assignments: Sequence[str],
        *,
        direction: str,
        corpus_fingerprint: str,
    ) -> IdentifierIndex:
        """Group ``target_ids`` by their assigned identifier; enforce uniqueness unless allowed."""
        if len(target_ids) != len(assignments):
            raise IdentifierError(f"{len(assignments)} identifiers for {len(target_ids)} targets")
        if not target_ids:
            raise IdentifierError("no targets to index: the corpus split is empty")
        dup_targets = [t for t, n in Counter(target_ids).items() if n > 1]
        if dup_targets:
            raise IdentifierError(f"duplicate target ids {dup_targets[:5]}; every target needs a unique id")
        empty = [t for t, a in zip(target_ids, assignments) if not a or not a.strip()]
        if empty:
            raise IdentifierError(f"scheme {scheme.name!r} gave an empty identifier to targets {empty[:5]}")
        groups: dict[str, list[str]] = {}
        for t, a in zip(target_ids, assignments):
            groups.setdefault(a, []).append(t)
        shared = {a: ts for a, ts in groups.items() if len(ts) > 1}
        if shared and not scheme.shares_identifiers:
            example = next(iter(shared.items()))
            raise IdentifierError(
                f"scheme {scheme.name!r} gave the same identifier to several targets "
                f"({len(shared)} collisions, e.g. {example[0]!r} -> {example[1][:5]}); "
                "the scheme must make identifiers unique (add a suffix) or declare shares_identifiers"
            )
        return cls(
            scheme=scheme.name,
            scheme_config=scheme.config(),
            direction=direction,
            corpus_fingerprint=corpus_fingerprint,
            identifiers=list(groups),
            targets=list(groups.values()),
            scheme_state=_json_state(scheme),
        )

    def tokenize(self, tokenizer: Any, *, end_token_id: int | None = None) -> IdentifierIndex:
        """Compute every identifier's token ids (+ the end token); distinct identifiers must stay distinct.

        Identifiers end with EOS, or with ``end_token_id`` (Rationale-Guided Supervision ends them with its
        separator, after which the model writes a rationale that retrieval never decodes).
        """
        if tokenizer.eos_token_id is None:
            raise IdentifierError("the tokenizer has no EOS token; identifiers need one to end")
        end = tokenizer.eos_token_id if end_token_id is None else int(end_token_id)
        encoded = tokenizer(self.identifiers, add_special_tokens=False)["input_ids"]
        unk = tokenizer.unk_token_id
        token_ids = []
        for ident, ids in zip(self.identifiers, encoded):
            if not ids:
                raise IdentifierError(f"identifier {ident!r} tokenizes to nothing")
            if unk is not None and unk in ids:
                raise IdentifierError(
                    f"identifier {ident!r} contains tokens unknown to the tokenizer; "
                    "add the scheme's new_tokens() to the tokenizer before tokenizing"
                )
            if end in ids:
                raise IdentifierError(f"identifier {ident!r} contains its own end token {end}; it could never be decoded")
            token_ids.append([*ids, end])
        seen: dict[tuple[int, ...], str] = {}
        for ident, ids in zip(self.identifiers, token_ids):
            other = seen.setdefault(tuple(ids), ident)
            if other != ident:
                raise IdentifierError(
                    f"identifiers {other!r} and {ident!r} have the same token ids under this tokenizer"
                )
        self.token_ids = token_ids
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self.vocab_size = len(tokenizer)
        self.eos_token_id = end
        self._trie = None
        return self

    @property
    def has_trie(self) -> bool:
        """Whether the full trie is at hand (loaded from a matching ``trie.pt`` or built already).

        False after loading an index whose saved trie is missing, stale or unusable: :meth:`trie` then
        builds it on first use.
        """
        return self._trie is not None

    def trie(self, positions: Sequence[int] | None = None):
        """The prefix trie of the token ids (built once and cached), or of the identifiers at ``positions``.

        Trie identifier ``i`` is index identifier ``i``, or ``positions[i]`` for a subset.
        """
        from gcr.decoding import TokenTrie

        if self.token_ids is None or self.vocab_size is None or self.eos_token_id is None:
            raise IdentifierError("the index is not tokenized; call index.tokenize(tokenizer) first")
        if positions is not None and len(positions) < len(self.token_ids):
            return TokenTrie.build([self.token_ids[p] for p in positions], self.vocab_size, self.eos_token_id)
        if self._trie is None:
            self._trie = TokenTrie.build(self.token_ids, self.vocab_size, self.eos_token_id)
        return self._trie

    def token_ids_digest(self) -> str:
        """A hash of every identifier's token ids, in order (what a saved trie must match)."""
        assert self.token_ids is not None
        lengths = np.fromiter(map(len, self.token_ids), dtype=np.int64, count=len(self.token_ids))
        flat = np.fromiter((t for ids in self.token_ids for t in ids), dtype=np.int64, count=int(lengths.sum()))
        return hashlib.sha256(lengths.tobytes() + flat.tobytes()).hexdigest()[:16]

    # -- lookup -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.identifiers)

    def identifier_of(self, target_id: str) -> int:
        """Position of the identifier that names ``target_id``."""
        try:
            return self._by_target[target_id]
        except KeyError:
            raise IdentifierError(f"target {target_id!r} is not in the index") from None

    def subset(self, target_ids: Iterable[str]) -> list[int]:
        """Sorted positions of the identifiers naming any of ``target_ids`` (e.g. the test targets)."""
        return sorted({self.identifier_of(t) for t in target_ids})

    def stats(self) -> dict[str, float]:
        """Size, identifier length in tokens, and the share of targets that share an identifier."""
        n_targets = sum(len(t) for t in self.targets)
        lengths = [len(t) - 1 for t in self.token_ids] if self.token_ids else []
        shared = sum(len(t) for t in self.targets if len(t) > 1)
        return {
            "num_identifiers": len(self.identifiers),
            "num_targets": n_targets,
            "mean_id_tokens": sum(lengths) / len(lengths) if lengths else float("nan"),
            "max_id_tokens": max(lengths, default=0),
            "collision_rate": shared / n_targets if n_targets else 0.0,
        }

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``index.json`` (and ``trie.pt`` once tokenized) atomically into ``directory``."""
        if self.token_ids is not None and self.vocab_size is not None:
            save_tensors(
                Path(directory) / TRIE_FILE,
                {"token_ids_digest": self.token_ids_digest(), "trie": self.trie().state_dict()},
            )
        return write_json(
            Path(directory) / INDEX_FILE,
            {
                "kind": "identifier_index",
                "format_version": FORMAT_VERSION,
                "scheme": self.scheme,
                "scheme_config": self.scheme_config,
                "direction": self.direction,
                "corpus_fingerprint": self.corpus_fingerprint,
                "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "scheme_state": self.scheme_state,
                "identifiers": self.identifiers,
                "targets": self.targets,
                "token_ids": self.token_ids,
                "vocab_size": self.vocab_size,
                "eos_token_id": self.eos_token_id,
            },
        )

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        scheme: str | None = None,
        corpus_fingerprint: str | None = None,
        direction: str | None = None,
    ) -> IdentifierIndex:
        """Load and validate an index; a foreign scheme, corpus or direction is an error."""
        path = Path(directory) / INDEX_FILE
        meta = read_json(path, what="identifier index")
        check_header(
            meta,
            kind="identifier_index",
            version=FORMAT_VERSION,
            path=path,
            scheme=scheme,
            corpus_fingerprint=corpus_fingerprint,
            direction=direction,
        )
        index = cls(
            scheme=meta["scheme"],
            scheme_config=meta["scheme_config"],
            direction=meta["direction"],
            corpus_fingerprint=meta["corpus_fingerprint"],
            identifiers=meta["identifiers"],
            targets=meta["targets"],
            scheme_state=meta.get("scheme_state", {}),
            token_ids=meta.get("token_ids"),
            tokenizer_fingerprint=meta.get("tokenizer_fingerprint"),
            vocab_size=meta.get("vocab_size"),
            eos_token_id=meta.get("eos_token_id"),
        )
        index._load_trie(Path(directory) / TRIE_FILE)
        return index

    def _load_trie(self, path: Path) -> None:
        """Use the saved trie if it matches the token ids; otherwise it is rebuilt when first needed."""
        if not path.exists() or self.token_ids is None:
            return
        from gcr.decoding import TokenTrie

        saved = load_tensors(path, what="identifier trie")
        if saved.get("token_ids_digest") != self.token_ids_digest():
            log.warning("%s does not match %s (stale); the trie will be rebuilt", path, INDEX_FILE)
            return
        try:
            self._trie = TokenTrie.from_state_dict(saved["trie"])
        except (ArtifactError, KeyError) as exc:
            log.warning("%s is unusable (%s); the trie will be rebuilt", path, exc)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise if ``tokenizer`` is not the one the token ids were computed with."""
        fp = tokenizer_fingerprint(tokenizer)
        if self.tokenizer_fingerprint != fp:
            raise IdentifierError(
                f"this index was tokenized with tokenizer {self.tokenizer_fingerprint}, "
                f"but the model's tokenizer is {fp}; re-tokenize the index for this model"
            )


def _json_state(scheme: Any) -> dict[str, Any]:
    """``scheme.state_dict()``, refused unless it is plain JSON (it is saved inside ``index.json``)."""
    import json

    state = scheme.state_dict()
    try:
        json.dumps(state)
    except (TypeError, ValueError) as exc:
        raise IdentifierError(
            f"scheme {scheme.name!r}: state_dict() must hold plain JSON values (dicts, lists, str, numbers, "
            f"bools, None), it saves inside index.json; {exc}. Convert arrays with .tolist()"
        ) from None
    return state

"""``gcr explain``: retrieve for one query with a trained run, and let the model say why (RGS rationales).

Retrieval decodes identifiers only (the trie ends them at the RGS separator); the rationale of each
retrieved identifier is generated afterwards, on demand, by continuing after ``identifier + separator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from gcr.artifacts import find_run_dir
from gcr.data.corpus import Content
from gcr.errors import ConfigError, DataError
from gcr.heads.rationales import explain
from gcr.index import IdentifierIndex
from gcr.models.loading import load_backbone
from gcr.retrieval import ConstrainedRetriever


@dataclass
class Explanation:
    rank: int
    identifier: str
    targets: list[str]
    score: float
    rationale: str


def explain_query(run: str | Path, query: Content, *, direction: str | None = None, top: int = 3) -> list[Explanation]:
    """The ``top`` identifiers retrieved for ``query`` by the run's model, each with its generated rationale."""
    run_dir = find_run_dir(run)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    direction = direction or ("t2i" if query.modality == "text" else "i2t")
    out_dir = run_dir / direction
    if not (out_dir / "backbone").is_dir():
        raise ConfigError(f"{out_dir} holds no trained backbone; was direction {direction!r} trained in this run?")
    if not cfg.get("rgs", {}).get("enabled", False):
        raise ConfigError(f"run {run_dir} was trained without rationales (rgs.enabled=false); retrain with "
                          "rgs.enabled=true to explain its retrievals")
    index = IdentifierIndex.load(out_dir, scheme=cfg.scheme.name, direction=direction)
    backbone = load_backbone(out_dir / "backbone")
    backbone.eval()
    retriever = ConstrainedRetriever(backbone, index, num_beams=max(top, int(cfg.decoding.num_beams)))
    found = retriever([query])
    rows, seen = [], set()
    for target, score in zip(found.targets[0], found.scores[0]):
        position = index.identifier_of(target)
        if position in seen:
            continue
        seen.add(position)
        rows.append((position, score))
        if len(rows) == top:
            break
    rationales = explain(backbone, [query] * len(rows), [index.token_ids[p] for p, _ in rows])
    return [Explanation(rank + 1, index.identifiers[p], list(index.targets[p]), float(s), r)
            for rank, ((p, s), r) in enumerate(zip(rows, rationales))]


def query_content(text: str | None, image: str | None) -> Content:
    """The query of ``gcr explain``: a caption, or an image file."""
    if bool(text) == bool(image):
        raise ConfigError("gcr explain needs exactly one query: a caption (--text) or an image file (--image)")
    if text is not None:
        if not text.strip():
            raise DataError("the query caption is empty; pass some words with --text")
        return Content.text(text)
    from PIL import Image, UnidentifiedImageError

    path = Path(image)
    if not path.is_file():
        raise DataError(f"query image {path} does not exist; check the path")
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"query image {path} cannot be read ({exc}); pass a PNG or JPEG file") from exc
    return Content.image(path)

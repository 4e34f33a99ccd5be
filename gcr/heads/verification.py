"""Generative Semantic Verification (GSV): the MLLM re-checks its top candidates.

After constrained beam search returns a query's candidates, every (image, text) pair -- the candidate
image and the text query (text-to-image), or the image query and the candidate caption (image-to-text)
-- is scored by the backbone's *likelihood of the text given the image*: the mean log-probability of
``marker + text`` after the image prompt. The marker (``":"`` by default) tells this captioning task
apart from identifier generation, which never starts with it. The final score of a candidate is
``generation score + weight * verification score``; only the top ``top_k`` candidates are re-ordered,
so verification changes the order within the candidate set and never its membership.

Training adds, on positives and hard negatives of the train split, the captioning loss of the positive
text plus a logistic ranking loss that pushes the positive's mean log-probability above the negative's.
Hard negatives need no features: a pair's negative is the nearest train pair (of another image) in the
lexicographic order of target identifiers, i.e. the one sharing the longest identifier prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from gcr.data.corpus import Content, RetrievalTask
from gcr.models.base import IGNORE_INDEX


@dataclass(frozen=True)
class VerificationPair:
    """A training triple: an image, a caption that describes it, and a hard negative caption."""

    image: Content
    positive: str
    negative: str


class GenerativeVerifier:
    """Scores (image, text) pairs with a backbone, re-ranks candidates, and gives the GSV training loss."""

    def __init__(
        self,
        backbone,
        target_contents: Mapping[str, Content] | None = None,
        *,
        weight: float = 1.0,
        top_k: int = 10,
        marker: str = ":",
        max_text_tokens: int = 48,
        batch_size: int = 64,
    ):
        self.backbone = backbone
        self.target_contents = dict(target_contents or {})  # target id -> its image or caption
        self.weight, self.top_k, self.batch_size = float(weight), int(top_k), int(batch_size)
        self.marker = marker
        self.max_text_tokens = int(max_text_tokens)

    # -- inputs -------------------------------------------------------------------------------
    def _marker_ids(self) -> list[int]:
        tok = self.backbone.tokenizer
        ids = tok(self.marker, add_special_tokens=False)["input_ids"] if self.marker else []
        if tok.unk_token_id is not None and tok.unk_token_id in ids:
            from gcr.errors import ConfigError

            raise ConfigError(f"the model's tokenizer cannot spell gsv.marker={self.marker!r}; choose another marker")
        return ids

    def batch(self, images: Sequence[Content], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs whose labels are the text tokens (+EOS) after the image prompt and the marker."""
        tok = self.backbone.tokenizer
        marker = self._marker_ids()
        encoded = tok(list(texts), add_special_tokens=False)["input_ids"]
        targets = [[*marker, *ids[: self.max_text_tokens], tok.eos_token_id] for ids in encoded]
        out = self.backbone.batch(list(images), targets)
        width = out["labels"].shape[1]
        for i, target in enumerate(targets):  # the marker is given, not scored
            start = width - len(target)
            out["labels"][i, start : start + len(marker)] = IGNORE_INDEX
        return out

    def mean_log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) mean log-probability of each row's labelled tokens."""
        labels = batch["labels"][:, 1:]
        logits = self.backbone.logits(batch)[:, :-1].float()
        mask = labels != IGNORE_INDEX
        picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(1) / mask.sum(1).clamp(min=1)

    # -- training -----------------------------------------------------------------------------
    def loss(self, positive: dict[str, torch.Tensor], negative: dict[str, torch.Tensor]) -> torch.Tensor:
        """Captioning NLL of the positives + logistic ranking loss (positive above its hard negative)."""
        pos = self.mean_log_probs(positive)
        neg = self.mean_log_probs(negative)
        return -pos.mean() + F.softplus(neg - pos).mean()

    # -- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, images: Sequence[Content], texts: Sequence[str]) -> torch.Tensor:
        """(N,) verification scores of N (image, text) pairs, in batches of ``batch_size``."""
        device = next(self.backbone.parameters()).device
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = self.batch(images[start : start + self.batch_size], texts[start : start + self.batch_size])
            out.append(self.mean_log_probs({k: v.to(device) for k, v in batch.items()}).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def rerank(
        self,
        queries: Sequence[Content],
        targets: Sequence[Sequence[str]],
        scores: Sequence[Sequence[float]],
    ) -> tuple[list[list[str]], list[list[float]]]:
        """Re-order each query's first ``top_k`` candidates by generation + weight * verification score."""
        images, texts, where = [], [], []
        for q, (query, candidates) in enumerate(zip(queries, targets)):
            for c, target_id in enumerate(candidates[: self.top_k]):
                image, text = _pair(query, self.target_contents[target_id])
                images.append(image)
                texts.append(text)
                where.append((q, c))
        verified = self.score(images, texts).tolist()
        combined = [list(s) for s in scores]
        for (q, c), v in zip(where, verified):
            combined[q][c] = scores[q][c] + self.weight * v
        out_targets, out_scores = [], []
        for q, candidates in enumerate(targets):
            head = min(self.top_k, len(candidates))
            order = sorted(range(head), key=lambda c: -combined[q][c])  # stable: ties keep beam order
            out_targets.append([candidates[c] for c in order] + list(candidates[head:]))
            out_scores.append([combined[q][c] for c in order] + list(combined[q][head:]))
        return out_targets, out_scores


def _pair(query: Content, candidate: Content) -> tuple[Content, str]:
    """(image, text) of a query/candidate pair, whichever side the image is on."""
    if query.modality == "text" and candidate.modality == "image":
        return candidate, query.value
    if query.modality == "image" and candidate.modality == "text":
        return query, candidate.value
    raise ValueError(f"verification needs one image and one text, got {query.modality} and {candidate.modality}")


def hard_negative_pairs(task: RetrievalTask, token_ids_of: Mapping[str, Sequence[int]]) -> list[VerificationPair]:
    """Train (image, caption) pairs, each with the caption of the pair nearest in identifier order.

    ``token_ids_of`` maps a target id to its identifier's token ids. Sorting the pairs by their target's
    identifier puts pairs that share long identifier prefixes side by side; the negative is the nearest
    neighbour (before or after) that belongs to another image and shares the longer prefix.
    """
    pairs: list[tuple[tuple[int, ...], str, Content, str]] = []  # (key, image id, image, caption)
    if task.direction == "t2i":
        images = {t.target_id: t.content for t in task.targets if t.split == "train"}
        for q in task.queries_of("train"):
            image_target = q.relevant[0]
            image = images[image_target]
            pairs.append((tuple(token_ids_of[image_target]), image_target, image, q.content.value))
    else:
        captions = {t.target_id: t for t in task.targets if t.split == "train"}
        for q in task.queries_of("train"):
            for caption_id in q.relevant:
                pairs.append((tuple(token_ids_of[caption_id]), q.query_id, q.content, captions[caption_id].text))
    pairs.sort(key=lambda p: (p[0], p[1]))
    out = []
    for i, (key, image_id, image, caption) in enumerate(pairs):
        best, best_shared = None, -1
        for step in (-1, 1):
            j = i + step
            while 0 <= j < len(pairs) and pairs[j][1] == image_id:
                j += step
            if 0 <= j < len(pairs):
                shared = _common_prefix(key, pairs[j][0])
                if shared > best_shared:
                    best, best_shared = j, shared
        if best is not None:
            out.append(VerificationPair(image, caption, pairs[best][3]))
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

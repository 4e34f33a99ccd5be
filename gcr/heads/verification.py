"""Generative Semantic Verification (GSV): the MLLM re-checks its top candidates.

After constrained beam search returns a query's candidates, every (image, text) pair -- the candidate
image and the text query (text-to-image), or the image query and the candidate caption (image-to-text)
-- is scored by the backbone itself, in one of two modes (``gsv.mode``):

* ``likelihood``: the *likelihood of the text given the image*, the mean log-probability of
  ``marker + text`` after the image prompt. The marker (``":"`` by default) tells this captioning task
  apart from identifier generation, which never starts with it.
* ``prompt``: the model is *asked* whether they match -- after the image prompt, the question
  ``gsv.prompt`` with the text filled in (default ``"does the image show {text} ? answer yes or no :"``)
  -- and the pair scores ``log p(yes)``, the log-softmax of the next-token logits over {yes, no}.

**One scale.** Both scores are made per-query log-probabilities before they are added: the generation
scores (summed identifier log-probs) of the verified candidates are normalised by a log-softmax over
those candidates, i.e. ``log p(candidate | query, candidate set)``; the likelihood-mode scores (mean text
log-probs) are normalised the same way, ``log p(pair | candidate set)``; the prompt-mode score is already
a probability, ``log p(yes)``. The final score is ``log p_gen + weight * log p_verify``
(:meth:`GenerativeVerifier.describe` records it in the results).

**Only inside the candidate set.** Only the first ``top_k`` candidates are re-ordered -- widened to take
in every candidate tied with the ``top_k``-th, so the targets of one shared identifier (``semcore
collisions=verify``) are never split -- and membership never changes. Targets sharing an identifier have
the same generation score, so the verification score alone orders them.

Training adds, on positives and hard negatives of the train split: in likelihood mode the captioning
loss of the positive text plus a logistic ranking loss that pushes the positive's mean log-probability
above the negative's; in prompt mode the cross-entropy of answering "yes" to the positive and "no" to
the hard negative. Hard negatives need no features: a pair's negative is the nearest train pair (of
another image) in the lexicographic order of target identifiers, i.e. the one sharing the longest
identifier prefix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from gcr.data.corpus import Content, RetrievalTask
from gcr.models.base import IGNORE_INDEX

#: ``gsv.mode`` values (gcr.config_checks refuses any other at compose time).
MODES = ("likelihood", "prompt")
#: The prompt-mode question; ``{text}`` is the query or candidate caption.
DEFAULT_PROMPT = "does the image show {text} ? answer yes or no :"
#: The prompt-mode answers: log p(yes) over {yes, no} is the verification score.
ANSWERS = ("yes", "no")


def reserved_words(mode: str = "likelihood", prompt: str = DEFAULT_PROMPT) -> list[str]:
    """Words a corpus-built tokenizer must hold for verification: the prompt's words and the answers.

    Passed to the backbone's tokenizer with the scheme's reserved words (``build_backbone``); a
    pretrained tokenizer spells them anyway. Likelihood mode needs only its marker (always reserved).
    """
    if mode != "prompt":
        return []
    return list(dict.fromkeys([*re.findall(r"\w+|[^\w\s]", prompt.replace("{text}", " ")), *ANSWERS]))


def describe(mode: str, prompt: str, weight: float, top_k: int) -> dict:
    """The verification mode and how its score is combined with the generation score, for the results."""
    verify = (f"log p(yes) over {{yes, no}} after the prompt {prompt!r}" if mode == "prompt"
              else "log softmax over the verified candidates of the mean log p(marker + text | image)")
    return {
        "mode": mode, "weight": float(weight), "top_k": int(top_k),
        "combination": "log softmax over the verified candidates of the generation score "
                       f"+ weight * [{verify}]; targets tied with the top_k-th are verified too",
    }


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
        mode: str = "likelihood",
        prompt: str = DEFAULT_PROMPT,
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
        if mode not in MODES:
            from gcr.errors import ConfigError

            raise ConfigError(f"gsv.mode={mode!r} is not a verification mode; use one of {', '.join(MODES)}")
        if mode == "prompt" and prompt.count("{text}") != 1:
            from gcr.errors import ConfigError

            raise ConfigError(f"gsv.prompt={prompt!r} must contain {{text}} exactly once (where the caption goes)")
        self.mode, self.prompt = mode, prompt

    def describe(self) -> dict:
        """How the +gsv scores were made (recorded in the results' index stats)."""
        return describe(self.mode, self.prompt, self.weight, self.top_k)

    # -- inputs -------------------------------------------------------------------------------
    def _marker_ids(self) -> list[int]:
        tok = self.backbone.tokenizer
        ids = tok(self.marker, add_special_tokens=False)["input_ids"] if self.marker else []
        if tok.unk_token_id is not None and tok.unk_token_id in ids:
            from gcr.errors import ConfigError

            raise ConfigError(f"the model's tokenizer cannot spell gsv.marker={self.marker!r}; choose another marker")
        return ids

    def answer_ids(self) -> tuple[int, int]:
        """Token ids of "yes" and "no" (prompt mode); each must be one token the tokenizer knows."""
        tok = self.backbone.tokenizer
        out = []
        for word in ANSWERS:
            for spelling in (" " + word, word):  # BPE tokenizers spell the answer after ":" with a space
                ids = tok(spelling, add_special_tokens=False)["input_ids"]
                if len(ids) == 1 and ids[0] != tok.unk_token_id:
                    out.append(ids[0])
                    break
            else:
                from gcr.errors import ConfigError

                raise ConfigError(f"gsv.mode=prompt: the model's tokenizer has no single token for {word!r}; "
                                  "a corpus tokenizer must be built with gcr.heads.verification.reserved_words()")
        return out[0], out[1]

    def _question_ids(self, text: str) -> list[int]:
        tok = self.backbone.tokenizer
        before, after = self.prompt.split("{text}")
        fixed = [tok(part, add_special_tokens=False)["input_ids"] if part.strip() else [] for part in (before, after)]
        if tok.unk_token_id is not None and any(tok.unk_token_id in ids for ids in fixed):
            from gcr.errors import ConfigError

            raise ConfigError(f"the model's tokenizer cannot spell every word of gsv.prompt={self.prompt!r}; "
                              "a corpus tokenizer must be built with gcr.heads.verification.reserved_words()")
        body = tok(text, add_special_tokens=False)["input_ids"][: self.max_text_tokens]
        return [*fixed[0], *body, *fixed[1]]

    def batch(self, images: Sequence[Content], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs after the image prompt.

        Likelihood mode: ``marker + text + EOS``, labelled on the text and EOS. Prompt mode: the question,
        unlabelled; the answer is read from the logits at the last position (every row ends there).
        """
        tok = self.backbone.tokenizer
        if self.mode == "prompt":
            self.answer_ids()  # fail early, before any forward pass
            out = self.backbone.batch(list(images), [self._question_ids(t) for t in texts])
            out["labels"].fill_(IGNORE_INDEX)
            return out
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

    def answer_log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2) log-probabilities of answering (yes, no) after each row's question (prompt mode)."""
        logits = self.backbone.logits(batch)[:, -1].float()
        return logits[:, list(self.answer_ids())].log_softmax(-1)

    def pair_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) raw verification score of each row: log p(yes), or the mean text log-probability."""
        return self.answer_log_probs(batch)[:, 0] if self.mode == "prompt" else self.mean_log_probs(batch)

    # -- training -----------------------------------------------------------------------------
    def loss(self, positive: dict[str, torch.Tensor], negative: dict[str, torch.Tensor]) -> torch.Tensor:
        """Prompt mode: cross-entropy of "yes" for the positives and "no" for their hard negatives.

        Likelihood mode: captioning NLL of the positives + logistic ranking loss (positive above its hard
        negative).
        """
        if self.mode == "prompt":
            return -(self.answer_log_probs(positive)[:, 0].mean() + self.answer_log_probs(negative)[:, 1].mean()) / 2
        pos = self.mean_log_probs(positive)
        neg = self.mean_log_probs(negative)
        return -pos.mean() + F.softplus(neg - pos).mean()

    # -- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, images: Sequence[Content], texts: Sequence[str]) -> torch.Tensor:
        """(N,) raw verification scores of N (image, text) pairs (:meth:`pair_scores`), in batches."""
        device = next(self.backbone.parameters()).device
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = self.batch(images[start : start + self.batch_size], texts[start : start + self.batch_size])
            out.append(self.pair_scores({k: v.to(device) for k, v in batch.items()}).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def window(self, scores: Sequence[float]) -> int:
        """How many leading candidates are verified: ``top_k``, plus any tied with the ``top_k``-th.

        Ties are the targets of one shared identifier (same beam, same score): they are never split.
        """
        head = min(self.top_k, len(scores))
        while 0 < head < len(scores) and scores[head] == scores[head - 1]:
            head += 1
        return head

    def rerank(
        self,
        queries: Sequence[Content],
        targets: Sequence[Sequence[str]],
        scores: Sequence[Sequence[float]],
    ) -> tuple[list[list[str]], list[list[float]]]:
        """Re-order each query's verified window by ``log p_gen + weight * log p_verify`` (module docstring).

        Candidates past the window keep their order and their generation scores.
        """
        images, texts = [], []
        heads = [self.window(s) for s in scores]
        for q, (query, candidates) in enumerate(zip(queries, targets)):
            for target_id in candidates[: heads[q]]:
                image, text = _pair(query, self.target_contents[target_id])
                images.append(image)
                texts.append(text)
        verified = self.score(images, texts)
        out_targets, out_scores, start = [], [], 0
        for q, candidates in enumerate(targets):
            head = heads[q]
            raw = verified[start : start + head].double()
            start += head
            verify = raw if self.mode == "prompt" else raw.log_softmax(0)
            generation = torch.tensor(list(scores[q][:head]), dtype=torch.float64).log_softmax(0)
            combined = (generation + self.weight * verify).tolist()
            order = sorted(range(head), key=lambda c: -combined[c])  # stable: ties keep beam order
            out_targets.append([candidates[c] for c in order] + list(candidates[head:]))
            out_scores.append([combined[c] for c in order] + list(scores[q][head:]))
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

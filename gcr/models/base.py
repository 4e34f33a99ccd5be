"""The backbone protocol: an HF generative model plus its tokenizer.

A backbone reads :class:`~gcr.data.corpus.Content` (a text or an image file)
and writes identifier tokens. Every backbone goes through the same two calls:
:meth:`GenerativeBackbone.batch` builds model inputs (prompt, and labels when
targets are given) and :meth:`GenerativeBackbone.generate` runs HF ``generate()``
with the trie's logits processor. Prompts and targets are left-padded, with
``position_ids`` from the attention mask exactly as ``generate()`` computes them,
so training and decoding see the same positions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcr.data.corpus import Content
from gcr.errors import ConfigError, DataError

IGNORE_INDEX = -100
BACKBONE_FILE = "backbone.json"


def _end_token(logits_processor: Any, default: int) -> int:
    """The token that ends an identifier: the trie processor's (EOS, or the RGS separator), else ``default``."""
    processors = logits_processor if isinstance(logits_processor, Sequence) else [logits_processor]
    for p in processors:
        if hasattr(p, "trie") and hasattr(p, "eos_token_id"):
            return int(p.eos_token_id)
    return default


def unreadable_modality(backbone: str, content: Content) -> ConfigError:
    """The error for a content a backbone cannot read (precomputed audio/video features, or unknown)."""
    if content.modality == "feature":
        return ConfigError(
            f"backbone {backbone!r} reads text and image pixels, not precomputed feature vectors (e.g. {content.value}); "
            "fix: model=cart for audio/video items given as embeddings (data=feature_items), "
            "or run the dense baseline alone (dense=pretrained)"
        )
    return ConfigError(f"backbone {backbone!r}: unknown content modality {content.modality!r}")


class GenerativeBackbone(nn.Module):
    """Base class: subclasses build ``model``/``tokenizer`` and may override how prompts look."""

    name = ""
    #: False for identifier-only decoders (``cart``): the description captioner then uses a ``tiny`` model.
    writes_text = True
    #: What the backbone reads (query and target modalities): checked against the data before any work.
    reads: tuple[str, ...] = ("text", "image")
    #: True when its tokenizer spells natural-language words (identifier schemes that write words need it).
    spells_words = True
    #: True when ``model.vision_init=dense`` can start its vision tower from the dense baseline's CLIP tower.
    starts_vision_from_dense = False
    #: True when ``create(corpus, reserved_words=...)`` builds the tokenizer from the corpus (it must then
    #: hold the words a scheme reserves); pretrained tokenizers spell any word and are not given them.
    builds_vocabulary = False

    @staticmethod
    def needs_dense(options: dict[str, Any]) -> bool:
        """True when ``create(corpus, dense=...)`` needs the trained dense baseline for these ``model`` options
        (e.g. its towers as the query encoder)."""
        return False

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        image_transform: Any = None,
        num_image_tokens: int = 0,
        max_text_tokens: int = 64,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.num_image_tokens = int(num_image_tokens)
        self.max_text_tokens = int(max_text_tokens)
        self.tokenizer.padding_side = "left"

    # -- vocabulary ---------------------------------------------------------------------------
    def add_identifier_tokens(self, tokens: Sequence[str]) -> int:
        """Add a scheme's new tokens; the embedding matrix grows to match. Returns how many were new."""
        added = self.tokenizer.add_tokens(list(tokens), special_tokens=False)
        if added:
            self.model.resize_token_embeddings(len(self.tokenizer))
        return added

    def init_token_embeddings(self, vectors: dict[str, Any]) -> int:
        """Set the input-embedding rows of ``vectors``' tokens from vectors of any width; returns how many.

        The vectors (one group, one width) go through a fixed seeded random projection to the embedding
        width and are rescaled to the existing rows' scale, so their geometry (which codes are close) is
        kept. Backbones whose embeddings are wrapped (PEFT trainable tokens) keep the mean initialisation.
        """
        from gcr.models.token_init import project_vectors

        embeddings = self.model.get_input_embeddings()
        if not isinstance(embeddings, nn.Embedding) or not vectors:
            return 0
        ids = self.tokenizer.convert_tokens_to_ids(list(vectors))
        weight = embeddings.weight
        with torch.no_grad():
            rows = project_vectors(list(vectors.values()), weight.shape[1], reference=weight)
            weight[torch.tensor(ids)] = rows.to(weight.dtype)
        return len(ids)

    # -- inputs -------------------------------------------------------------------------------
    def prompt_ids(self, content: Content) -> list[int]:
        """Token ids of the prompt for one query/target content, ending in the separator."""
        tok = self.tokenizer
        if content.modality == "image":
            if not self.num_image_tokens:
                raise ConfigError(f"backbone {self.name!r} cannot read images")
            body = [tok.convert_tokens_to_ids(tok.image_token)] * self.num_image_tokens
        elif content.modality == "text":
            if not content.value.strip():
                raise DataError("empty text input: every caption and query must contain words; fix or drop it")
            body = tok(content.value, add_special_tokens=False)["input_ids"][: self.max_text_tokens]
        else:
            raise unreadable_modality(self.name, content)
        return [tok.bos_token_id, *body, tok.sep_token_id]

    def batch(
        self, contents: Sequence[Content], targets: Sequence[Sequence[int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Left-padded model inputs; with ``targets`` (token ids incl. EOS) also ``labels``."""
        prompts = [self.prompt_ids(c) for c in contents]
        rows = [p + list(t) for p, t in zip(prompts, targets)] if targets is not None else prompts
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row)
            attention[i, width - len(row) :] = 1
            if targets is not None:
                n = len(targets[i])
                labels[i, width - n :] = torch.tensor(targets[i])
        out = {"input_ids": input_ids, "attention_mask": attention}
        out["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0)
        if targets is not None:
            out["labels"] = labels
        images = [c.value for c in contents if c.modality == "image"]
        if images:
            out["pixel_values"] = self.image_transform(images)
        return out

    # -- model calls --------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the identifier tokens."""
        return self.model(**batch).loss

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full (B, L, V) next-token logits of a batch (labels, if any, are not used)."""
        return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    @torch.no_grad()
    def search(
        self,
        batch: dict[str, torch.Tensor],
        trie: Any,
        *,
        num_beams: int,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        synced_gpus: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``num_beams`` best identifiers of each query under ``trie``: ``(ids (B, K), scores (B, K))``.

        ``ids`` are trie identifier positions, best first (``-1`` where fewer identifiers exist than beams or a
        row is not an identifier); scores are summed log-probabilities. This is the one retrieval call of every
        backbone: HF-based ones run ``generate()`` under a :class:`~gcr.decoding.TrieLogitsProcessor` (here),
        compact ones override it with :func:`~gcr.decoding.constrained_beam_search`.
        """
        from transformers import LogitsProcessorList

        from gcr.decoding import TrieLogitsProcessor

        eos = self.tokenizer.eos_token_id if eos_token_id is None else int(eos_token_id)
        processor = TrieLogitsProcessor(trie, prompt_length=batch["input_ids"].shape[1], eos_token_id=eos,
                                        pad_token_id=self.tokenizer.pad_token_id, num_beams=num_beams)
        tokens, scores = self.generate(batch, logits_processor=LogitsProcessorList([processor]), num_beams=num_beams,
                                       max_new_tokens=max_new_tokens, synced_gpus=synced_gpus)
        processor.check()
        is_end = tokens == eos
        after_end = (torch.cumsum(is_end, 1) - is_end.long()) > 0  # generate() pads finished rows
        ids = trie.identifier_of(trie.walk(tokens.masked_fill(after_end, -1), pad=-1))
        rows = batch["input_ids"].shape[0]
        return ids.view(rows, num_beams), scores.view(rows, num_beams)

    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, torch.Tensor],
        *,
        logits_processor: Any,
        num_beams: int,
        max_new_tokens: int,
        synced_gpus: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search under the processor: ``(new tokens (B*K, T), sequence scores (B*K,))``.

        Scores are summed log-probabilities (``length_penalty=0``), so rankings are comparable
        across identifier lengths. ``synced_gpus`` keeps ranks of a sharded model stepping together.
        """
        out = self.model.generate(
            **self.generation_inputs(batch),
            logits_processor=logits_processor,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            length_penalty=0.0,
            early_stopping=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=_end_token(logits_processor, self.tokenizer.eos_token_id),
            bos_token_id=self.tokenizer.bos_token_id,
            return_dict_in_generate=True,
            output_scores=True,
            synced_gpus=synced_gpus,
        )
        prompt_len = batch["input_ids"].shape[1]
        new_tokens = out.sequences[:, prompt_len:]
        scores = getattr(out, "sequences_scores", None)
        if scores is None:  # num_beams=1 (one searchable identifier): greedy search returns no sequence scores
            # its scores are the processed logits: the log-probability under the constraint (0 for the one path)
            logits = torch.stack(out.scores, 1).float()  # (B, T, V)
            chosen = new_tokens[:, : logits.shape[1]]
            steps = logits.log_softmax(-1).gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
            end = _end_token(logits_processor, self.tokenizer.eos_token_id)
            is_end = chosen == end
            after_end = (torch.cumsum(is_end, 1) - is_end.long()) > 0
            scores = steps.masked_fill(after_end | ~torch.isfinite(steps), 0.0).sum(-1)
        return new_tokens, scores

    @torch.no_grad()
    def generate_text(
        self, batch: dict[str, torch.Tensor], *, num_beams: int = 3, max_new_tokens: int = 32,
        num_return_sequences: int = 1,
    ) -> list[str]:
        """Unconstrained beam search (no trie), decoded without special tokens.

        Returns the best ``num_return_sequences`` beams of each row, row after row (so ``n * rows`` texts).
        Used to describe inputs in free text (e.g. image captions); the prompt comes from :meth:`batch`.
        """
        out = self.model.generate(
            **self.generation_inputs(batch),
            num_beams=max(num_beams, num_return_sequences),
            num_return_sequences=num_return_sequences,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            return_dict_in_generate=True,
        )
        prompt_len = batch["input_ids"].shape[1]
        texts = self.tokenizer.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def generation_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What ``generate()`` is given for a batch: the model inputs without training-only entries."""
        return {k: v for k, v in batch.items() if k not in ("labels", "position_ids")}

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Save config, tokenizer and weights in HF format (``save_pretrained``)."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (directory / BACKBONE_FILE).write_text(json.dumps({"name": self.name, **self.options()}, indent=2))
        return directory

    def options(self) -> dict[str, Any]:
        """Constructor options recorded in ``backbone.json``."""
        return {"num_image_tokens": self.num_image_tokens, "max_text_tokens": self.max_text_tokens}

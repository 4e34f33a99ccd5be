"""Training and evaluating the dense dual-encoder baseline."""

from __future__ import annotations

import time

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from gcr.data.corpus import Content, Corpus, RetrievalTask
from gcr.dense.models import DualEncoder
from gcr.features import encode_contents
from gcr.progress import progress
from gcr.train.metrics import RetrievalScorer
from gcr.train.schedules import lightning_optimizers


class DenseModule(L.LightningModule):
    """Contrastive training of a :class:`DualEncoder` on (caption, image) pairs."""

    def __init__(self, encoder: DualEncoder, *, lr: float = 2e-3, weight_decay: float = 0.1):
        super().__init__()
        self.encoder, self.lr, self.weight_decay = encoder, lr, weight_decay

    def training_step(self, batch, batch_idx):
        texts, paths = batch
        loss = self.encoder(texts, paths)
        self.log("dense/loss", loss, prog_bar=True, batch_size=len(texts))
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        # 10% linear warm-up, then cosine to zero (what OneCycleLR did, without its failure at small budgets)
        return lightning_optimizers(optimizer, self.trainer, warmup_ratio=0.1, final_ratio=0.0)


def pair_loader(corpus: Corpus, batch_size: int, seed: int = 0) -> DataLoader:
    """(caption, image path) pairs of the train split, shuffled."""
    items = [im for im in corpus.split("train") if im.modality != "image"]
    if items:
        from gcr.errors import ConfigError

        raise ConfigError(
            f"the CLIP-style dense baseline (dense=clip_tiny) reads image pixels, but {corpus.name!r} holds "
            f"precomputed {items[0].modality} items; fix: dense=pretrained (frozen MiniLM + the stored vectors), "
            "or dense.enabled=false"
        )
    pairs = [(c.text, str(im.path)) for im in corpus.split("train") for c in im.captions]

    def collate(batch):
        return [t for t, _ in batch], [p for _, p in batch]

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(pairs, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator)


def evaluate_dense(
    encoder: DualEncoder, task: RetrievalTask, split: str = "test", ks=(1, 5, 10), batch_size: int = 256
) -> dict[str, float]:
    """Exact search of ``split``'s queries among ``split``'s targets; Recall@K, MRR@10, queries/s."""
    return score_dense(encoder, task, split, ks, batch_size)[0]


@torch.no_grad()
def score_dense(
    encoder: DualEncoder, task: RetrievalTask, split: str = "test", ks=(1, 5, 10), batch_size: int = 256
) -> tuple[dict[str, float], dict]:
    """:func:`evaluate_dense`'s metrics and its per-query record (``RetrievalScorer.per_query``)."""
    encoder.eval()
    targets, queries = task.targets_of(split), task.queries_of(split)
    target_emb = torch.from_numpy(encode_contents(encoder, [t.content for t in targets], batch_size))
    scorer = RetrievalScorer(ks)
    k = min(max(max(ks), 10), len(targets))
    seconds = 0.0
    for start in range(0, len(queries), batch_size):
        chunk = queries[start : start + batch_size]
        t0 = time.perf_counter()
        query_emb = torch.from_numpy(encode_contents(encoder, [q.content for q in chunk], batch_size))
        top = (query_emb @ target_emb.T).topk(k, dim=1).indices
        seconds += time.perf_counter() - t0
        scorer.update([[targets[j].target_id for j in row] for row in top.tolist()], [q.relevant for q in chunk],
                      [q.query_id for q in chunk])
    metrics = scorer.compute()
    metrics["queries_per_s"] = len(queries) / seconds if seconds else float("nan")
    return metrics, scorer.per_query()


def train_frozen_dense(
    encoder,
    corpus: Corpus,
    *,
    cache_dir: str,
    max_epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Train the projections of a :class:`~gcr.dense.frozen.FrozenTowerDualEncoder` on the train pairs.

    The frozen towers' features of every train caption and image are computed once (and cached), so each
    epoch is only the projections. Items given as precomputed embeddings are read as stored (cached under
    their files' identity), and the item projection's input width is set to their D. Returns the mean loss
    of each epoch.
    """
    from gcr.features import cached_features

    images = corpus.split("train")
    captions = [c for im in images for c in im.captions]
    fingerprint = corpus.fingerprint()
    text = cached_features(
        encoder.towers, "pretrained", [c.caption_id for c in captions], [Content("text", c.text) for c in captions],
        corpus_fingerprint=fingerprint, cache_dir=cache_dir, tag="train",
    )
    pixels = cached_features(
        encoder.towers, "pretrained", [im.image_id for im in images], [im.content() for im in images],
        corpus_fingerprint=fingerprint, cache_dir=cache_dir, tag="train",
    )
    if images[0].modality != "image":  # precomputed items: the item projection reads their width
        encoder.set_item_dim(pixels.shape[1])
    text, pixels = torch.from_numpy(text), torch.from_numpy(pixels)
    image_of_caption = torch.tensor([i for i, im in enumerate(images) for _ in im.captions])
    optimizer = torch.optim.AdamW(
        [p for n, p in encoder.named_parameters() if not n.startswith("towers.")], lr=lr, weight_decay=weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    history = []
    encoder.train()
    for _ in progress(range(max_epochs), "dense projections"):
        losses = []
        for batch in torch.randperm(len(captions), generator=generator).split(batch_size):
            # one caption per image in a batch, so no in-batch negative is a true match
            _, first = np.unique(image_of_caption[batch].numpy(), return_index=True)
            batch = batch[torch.from_numpy(first)]
            loss = encoder.contrastive_loss(text[batch], pixels[image_of_caption[batch]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
    encoder.eval()
    return history

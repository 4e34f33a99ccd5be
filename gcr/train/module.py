"""The one LightningModule shared by every scheme and backbone.

Dependencies are injected: the backbone (model + tokenizer) and, through the
:class:`~gcr.train.callbacks.ConstrainedDecoding` callback, one retriever per
evaluation split. Training minimises the identifier tokens' cross-entropy;
validation and test steps retrieve under the trie and hand the ranked targets
to :class:`~gcr.train.callbacks.RetrievalEvaluation`.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from gcr.data.corpus import Query
from gcr.heads.rationales import rgs_loss
from gcr.retrieval import Retrieved
from gcr.train.schedules import lightning_optimizers


class GenerativeRetrievalModule(L.LightningModule):
    """Trains a backbone to emit identifiers; evaluates by constrained beam search."""

    def __init__(
        self,
        backbone,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.05,
        verifier=None,
        gsv_loss_weight: float = 1.0,
        rationale_weight: float = 1.0,
        identity: dict | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        # GSV (gcr.heads.verification.GenerativeVerifier): trained on the batches' "gsv_pos"/"gsv_neg" pairs, and
        # re-ranks each evaluation query's candidates; it shares the backbone's weights (no parameters of its own).
        self.verifier = verifier
        self.gsv_loss_weight = float(gsv_loss_weight)
        self.rationale_weight = float(rationale_weight)  # RGS: loss = identifier + weight * rationale
        self.identity = identity  # scheme, direction, tokenizer fingerprint: saved in checkpoints, checked on eval
        self.verification_seconds = 0.0
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.retrievers: dict[str, object] = {}  # split -> ConstrainedRetriever, set by a callback
        self.retrieval_seconds = 0.0
        self.retrieval_queries = 0
        self.strict_loading = False  # checkpoints hold the trained weights only (see on_save_checkpoint)

    def frozen_keys(self) -> set[str]:
        """State-dict keys of parameters that never train (a frozen pretrained LLM or vision tower)."""
        return {name for name, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A frozen 135M-parameter LLM would otherwise be written into every checkpoint; it is rebuilt from the
        # pretrained weights on load, so only what trains (and buffers) is kept.
        frozen = self.frozen_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
        checkpoint["gcr_frozen_keys"] = sorted(frozen)
        if self.identity is not None:
            checkpoint["gcr_identity"] = dict(self.identity)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_keys(set(checkpoint["state_dict"]), set(self.state_dict()), self.frozen_keys())

    def _identifier_loss(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of the identifier tokens; with RGS, plus the weighted rationale tokens' own mean."""
        if "rationale_mask" not in batch:
            return self.backbone(batch)
        inputs = {k: v for k, v in batch.items() if k != "rationale_mask"}
        loss, id_loss, rationale_loss = rgs_loss(
            self.backbone.logits(inputs), batch["labels"], batch["rationale_mask"], self.rationale_weight
        )
        size = batch["input_ids"].shape[0]
        self.log("train/rgs_id_loss", id_loss, batch_size=size)
        self.log("train/rationale_loss", rationale_loss, prog_bar=True, batch_size=size)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if "ids" not in batch:
            loss = self._identifier_loss(batch)
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
            return loss
        size = batch["ids"]["input_ids"].shape[0]
        id_loss = self._identifier_loss(batch["ids"])
        gsv_loss = self.verifier.loss(batch["gsv_pos"], batch["gsv_neg"])
        loss = id_loss + self.gsv_loss_weight * gsv_loss
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/id_loss", id_loss, batch_size=size)
        self.log("train/gsv_loss", gsv_loss, prog_bar=True, batch_size=size)
        return loss

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if isinstance(batch, list):  # evaluation: queries; the retriever moves its own inputs
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _retrieve(self, queries: list[Query], split: str):
        retriever = self.retrievers.get(split)
        if retriever is None:
            raise RuntimeError(f"no retriever for split {split!r}: add the ConstrainedDecoding callback")
        contents = [q.content for q in queries]
        result = retriever(contents)
        self.retrieval_seconds += result.seconds
        self.retrieval_queries += len(queries)
        if self.verifier is not None:
            start = time.perf_counter()
            targets, scores = self.verifier.rerank(contents, result.targets, result.scores)
            seconds = time.perf_counter() - start
            self.verification_seconds += seconds
            result.verified = Retrieved(targets, scores, result.seconds + seconds)
        return result

    def validation_step(self, batch: list[Query], batch_idx: int):
        return self._retrieve(batch, "val")

    def test_step(self, batch: list[Query], batch_idx: int):
        return self._retrieve(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        # linear warm-up, then cosine down to 5% of the base LR (GSV and the captioner train through here too)
        return lightning_optimizers(optimizer, self.trainer, warmup_ratio=self.warmup_ratio, final_ratio=0.05)


def check_checkpoint_identity(saved: dict | None, expected: dict, path) -> None:
    """A checkpoint trained for another scheme, direction or tokenizer is refused, naming both."""
    from gcr.errors import ArtifactError

    if saved is None:
        return  # written before gcr recorded identities: the key and shape checks still apply
    differing = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if differing:
        what = ", ".join(f"{k} {a!r} (this run: {b!r})" for k, (a, b) in differing.items())
        raise ArtifactError(
            f"checkpoint {path} was trained with {what}; evaluate it with the run folder it came from"
        )


def check_checkpoint_keys(saved: set[str], expected: set[str], frozen: set[str]) -> None:
    """Raise ArtifactError unless ``saved`` is ``expected`` minus (some of) the frozen parameters."""
    from gcr.errors import ArtifactError

    unexpected = sorted(saved - expected)
    missing = sorted(expected - saved - frozen)
    if unexpected or missing:
        raise ArtifactError(
            "this checkpoint does not fit the run's backbone (another scheme, model or vocabulary?): "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}), {len(missing)} missing trained keys "
            f"(e.g. {missing[:3]}); evaluate it with the run folder it was written in"
        )


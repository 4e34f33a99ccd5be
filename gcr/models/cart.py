"""Backbone ``cart``: CART's compact encoder-decoder with coarse-to-fine fusion (Fang et al., CART).

A query (or, for indexing, a target) is read by a frozen pretrained tower, and a small transformer decoder
writes the identifier, attending to *every* layer of that tower:

* **Encoder** (frozen by default): text -> MiniLM (all-MiniLM-L6-v2, :mod:`gcr.encoders.minilm`), the token
  states of all 7 hidden states (embeddings + 6 layers); image -> EfficientNet-Lite0
  (:mod:`gcr.encoders.efficientnet`), the outputs of its last 6 stages plus the 1280-wide head, each average-pooled
  to ``image_grid x image_grid`` cells plus one globally pooled token. Every tower layer is projected to
  ``d_model`` (``LayerNorm -> Linear``, one per layer and modality), giving a memory ``(B, L=7, T, d_model)`` with
  a key padding mask; text and image rows of one batch are encoded separately and padded to one length.
  Image features are computed once per file and kept in memory (``(cells + 1, 2048)`` float16 per image, e.g.
  17 x 2048 x 2 bytes = 70 kB at ``image_grid=4``). ``train_encoder=true`` fine-tunes MiniLM; the image tower is
  always frozen.
* **Fusion** (:class:`~gcr.models.cart_network.CoarseFineFusion`, one per decoder layer, between self-attention and the FFN):
  ``coarse`` = all L layers concatenated along features -> Linear -> cross-attention, scaled by a sigmoid gate
  computed from the decoder state; ``fine`` = one cross-attention per encoder layer, mixed with learned softmax
  weights; ``coarse_fine`` adds both. ``last`` is plain cross-attention to the last layer (no fusion: the
  ablation). The L fine attentions run as one batched attention (``L * heads`` heads), not a loop.
  ``candidate`` is the fusion with the candidate: ``coarse_fine`` whose coarse branch attends with the K-Means
  centroid of the decoded prefix and whose fine branch attends with the sum of its RQ-VAE codebook entries
  (the scheme's :meth:`~gcr.schemes.cart.CartScheme.code_vectors`, given by :meth:`CartBackbone.set_code_vectors`).
* **Decoder**: pre-norm transformer (causal self-attention, fusion, GELU FFN; dropout), learned positions, its own
  token embeddings and output head over the identifier vocabulary. The vocabulary is a word-level
  ``PreTrainedTokenizerFast`` holding only ``<pad> <unk> <s> </s>``; a scheme's identifier tokens are added by
  :meth:`CartBackbone.add_identifier_tokens` (identifiers must be made of added tokens, like ``hkmeans``' and
  ``cart``'s; natural-language identifiers cannot be spelled).
* **Loss**: cross-entropy of the identifier tokens (EOS included) + ``rdrop_weight`` x the symmetric KL between
  two dropout passes (R-Drop), in training mode; the decoder runs once on the batch doubled.
* **Decoding** (:meth:`CartBackbone.search`): :func:`gcr.decoding.beam_search.constrained_beam_search`
  straight over the trie it is given, scoring only the allowed tokens. The memory is encoded once per query and its keys and
  values computed once per decoder layer; the K beams of a query attend to it as K query positions (no copy per
  beam); self-attention keeps a KV cache. Scores are summed log-probabilities, like every other backbone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gcr.data.corpus import Content, Corpus
from gcr.errors import ArtifactError, ConfigError, DataError
from gcr.models.base import BACKBONE_FILE, IGNORE_INDEX, GenerativeBackbone
from gcr.models.cart_network import FUSIONS, CartNetwork
from gcr.models.sibling_smoothing import sibling_smoothed_cross_entropy

WEIGHTS_FILE = "model.safetensors"
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
TEXT_WIDTH = 384  # MiniLM hidden size
_FILLER = -1e9  # score of an empty beam slot (fewer identifiers than beams); the retriever skips it
DEFAULTS: dict[str, Any] = {
    "d_model": 256,
    "num_layers": 3,
    "num_heads": 4,
    "ffn_dim": 1024,
    "dropout": 0.1,
    "fusion": "coarse_fine",
    "rdrop_weight": 1.0,
    "train_encoder": False,
    "max_text_tokens": 48,
    "max_id_tokens": 32,
    "image_size": 224,
    "image_grid": 4,
    "feature_dim": 0,  # width of precomputed item features (audio/video); set from the corpus by create()
    "seed": 0,
}


# -- the identifier tokenizer ---------------------------------------------------------------------
def identifier_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` with only ``<pad> <unk> <s> </s>`` (ids 0-3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        padding_side="left",
    )

# -- the image tower's stages ---------------------------------------------------------------------
def efficientnet_stages(net: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every stage's output of the package's EfficientNet, then the head activations (what
    ``extract_features`` computes, with the intermediate stages kept). A stage ends where the block width changes.
    """
    x = net._swish(net._bn0(net._conv_stem(pixels)))
    blocks = net._blocks
    rate = net._global_params.drop_connect_rate
    outs = []
    for idx, block in enumerate(blocks):
        x = block(x, drop_connect_rate=rate * idx / len(blocks) if rate else rate)
        if idx + 1 == len(blocks) or blocks[idx + 1]._block_args.output_filters != block._block_args.output_filters:
            outs.append(x)
    outs.append(net._swish(net._bn1(net._conv_head(x))))
    return outs


# -- the backbone ---------------------------------------------------------------------------------
def check_decoder_options(o: dict[str, Any]) -> None:
    """The options of a compact identifier decoder (``cart``, ``compact``): fusion, sizes, dropout, R-Drop."""
    if o["fusion"] not in FUSIONS:
        raise ConfigError(f"unknown model.fusion {o['fusion']!r}; choose one of {', '.join(FUSIONS)}")
    for key in ("d_model", "num_layers", "num_heads", "ffn_dim", "max_text_tokens", "max_id_tokens",
                "image_size", "image_grid"):
        if int(o[key]) < 1:
            raise ConfigError(f"model.{key} must be a positive integer, got {o[key]}")
    if int(o["d_model"]) % int(o["num_heads"]):
        raise ConfigError(f"model.d_model ({o['d_model']}) must be divisible by model.num_heads ({o['num_heads']})")
    if not 0.0 <= float(o["dropout"]) < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {o['dropout']}")
    if float(o["rdrop_weight"]) < 0:
        raise ConfigError(f"model.rdrop_weight must be >= 0 (0 disables R-Drop), got {o['rdrop_weight']}")
    if not 1 <= int(o["image_grid"]) <= 7:
        raise ConfigError(f"model.image_grid must be 1..7 (cells per side of the 7x7 map), got {o['image_grid']}")


class CartBackbone(GenerativeBackbone):
    """CART: frozen MiniLM / EfficientNet-Lite0 layers -> coarse-to-fine fusion -> compact identifier decoder."""

    name = "cart"
    writes_text = False
    reads = ("text", "image", "feature")
    spells_words = False  # its tokenizer holds special tokens only: identifiers must be new code tokens
    #: prefix-aware label smoothing (``model=compact``'s ``sibling_smoothing``); needs :meth:`set_identifier_trie`
    sibling_smoothing = 0.0
    identifier_trie = None

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, text_tokenizer: Any, vision: nn.Module,
                 **options: Any):
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for model 'cart'; known: {', '.join(DEFAULTS)}")
        opts = {**DEFAULTS, **options}
        self._check_options(opts)
        # the text tower's layers (embeddings + each transformer layer) and the image tower's last as many stages
        text_layers = int(text_encoder.config.num_hidden_layers) + 1
        with torch.no_grad():
            probe = efficientnet_stages(vision.net, torch.zeros(1, 3, 64, 64, device=vision.device))
        if len(probe) < text_layers:
            raise ConfigError(f"the image tower has {len(probe)} stages, fewer than the text tower's {text_layers}")
        image_widths = [int(x.shape[1]) for x in probe[-text_layers:]]
        with _seeded(int(opts["seed"])):
            network = CartNetwork(
                len(tokenizer),
                text_widths=[int(text_encoder.config.hidden_size)] * text_layers,
                image_widths=image_widths,
                image_tokens=int(opts["image_grid"]) ** 2 + 1,
                d_model=int(opts["d_model"]), num_layers=int(opts["num_layers"]), num_heads=int(opts["num_heads"]),
                ffn_dim=int(opts["ffn_dim"]), dropout=float(opts["dropout"]), fusion=str(opts["fusion"]),
                max_id_tokens=int(opts["max_id_tokens"]), feature_dim=int(opts["feature_dim"]),
            )
        super().__init__(network, tokenizer, max_text_tokens=int(opts["max_text_tokens"]))
        self.opts = opts
        self.text_encoder = text_encoder
        self.text_tokenizer = text_tokenizer
        self.vision = vision
        self.vision.requires_grad_(False)
        self.train_encoder = bool(opts["train_encoder"])
        self.text_encoder.requires_grad_(self.train_encoder)
        self.num_memory_layers = text_layers
        self.rdrop_weight = float(opts["rdrop_weight"])
        self.seed = int(opts["seed"])
        self._features: dict[str, torch.Tensor] = {}  # image path -> (cells + 1, sum widths) float16, CPU

    @staticmethod
    def _check_options(o: dict[str, Any]) -> None:
        check_decoder_options(o)

    @staticmethod
    def needs_code_vectors(options: dict[str, Any]) -> bool:
        """True when these ``model`` options fuse with the candidate (``fusion=candidate``): the run must give
        :meth:`set_code_vectors` the scheme's code vectors, so the scheme must offer them
        (``requirements.code_vectors``; checked before any work)."""
        return options.get("fusion") == "candidate"

    def set_code_vectors(self, code_vectors: Mapping[str, Sequence[Mapping[str, np.ndarray]]]) -> int:
        """Give ``fusion=candidate`` what each code token means: ``{"coarse": [levels], "fine": [levels]}``, each
        level ``{token: vector}`` (:meth:`gcr.schemes.cart.CartScheme.code_vectors`). The tokens must be in the
        vocabulary (:meth:`add_identifier_tokens` first). The fusion's code projections start afresh (seeded by
        ``seed``). Returns how many tokens got a vector."""
        vocab = self.tokenizer.get_vocab()
        groups: dict[str, dict[int, np.ndarray]] = {}
        for group, levels in code_vectors.items():
            merged: dict[int, np.ndarray] = {}
            for level in levels:
                missing = [t for t in level if t not in vocab]
                if missing:
                    raise ConfigError(f"set_code_vectors: tokens {missing[:5]} are not in the vocabulary; add them first")
                merged.update({vocab[t]: np.asarray(v, dtype=np.float32) for t, v in level.items()})
            widths = {v.shape for v in merged.values()}
            if len(widths) > 1 or any(len(w) != 1 for w in widths):
                raise ConfigError(f"set_code_vectors: the {group!r} vectors must be 1-D and of one width, got {sorted(widths)}")
            groups[group] = merged
        self.model.set_code_vectors(groups, seed=self.seed)
        return sum(len(g) for g in groups.values())

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(cls, corpus: Corpus | None = None, **options: Any) -> CartBackbone:
        """A fresh CART model over the packaged MiniLM and EfficientNet-Lite0 (options: see ``DEFAULTS``)."""
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for model 'cart'; known: {', '.join(DEFAULTS)}")
        cls._check_options({**DEFAULTS, **options})
        if corpus is not None and corpus.meta.get("feature_dim") and not options.get("feature_dim"):
            options = {**options, "feature_dim": int(corpus.meta["feature_dim"])}
        text_encoder, text_tokenizer = load_text_tower()
        vision = load_image_tower(int(options.get("image_size", DEFAULTS["image_size"])))
        return cls(identifier_tokenizer(), text_encoder, text_tokenizer, vision, **options)

    def options(self) -> dict[str, Any]:
        return dict(self.opts)

    def load_vision_tower(self, vision_state: dict) -> None:
        raise ConfigError("model 'cart' uses the pretrained EfficientNet-Lite0, frozen; set model.vision_init=none")

    def train(self, mode: bool = True) -> CartBackbone:
        """Frozen towers stay in eval mode (no dropout, fixed BatchNorm statistics)."""
        super().train(mode)
        if not getattr(self, "train_encoder", True):
            self.text_encoder.eval()
        return self

    # -- vocabulary ---------------------------------------------------------------------------
    def add_identifier_tokens(self, tokens: Sequence[str]) -> int:
        """Add a scheme's tokens; embeddings and head grow (new rows: mean of the old rows + seeded noise)."""
        before = len(self.tokenizer)
        added = self.tokenizer.add_tokens(list(tokens), special_tokens=False)
        if added:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + before)
            self.model.resize_vocab(len(self.tokenizer), generator)
        return added

    @torch.no_grad()
    def init_token_embeddings(self, vectors: Mapping[str, np.ndarray]) -> int:
        """Set the embedding rows of the given tokens from vectors of any dimension (e.g. codebook vectors).

        Vectors are grouped by dimension; each group goes through :func:`gcr.models.token_init.project_vectors`
        (the helper every backbone uses: centred, a fixed Gaussian projection seeded by ``seed`` and the
        dimension, rescaled to the embedding rows' std around their mean row). Returns how many rows were set.
        """
        from gcr.models.token_init import project_vectors

        vocab = self.tokenizer.get_vocab()
        missing = [t for t in vectors if t not in vocab]
        if missing:
            raise ConfigError(f"init_token_embeddings: tokens {missing[:5]} are not in the vocabulary; add them first")
        groups: dict[int, list[str]] = {}
        for token, vector in vectors.items():
            array = np.asarray(vector)
            if array.ndim != 1 or not array.size or not np.isfinite(array).all():
                raise ConfigError(f"init_token_embeddings: the vector of {token!r} must be a finite 1-D array")
            groups.setdefault(array.size, []).append(token)
        weight = self.model.embed.weight
        for _, tokens in sorted(groups.items()):
            rows = project_vectors([vectors[t] for t in tokens], weight.shape[1], reference=weight, seed=self.seed)
            weight[torch.tensor([vocab[t] for t in tokens], device=weight.device)] = rows.to(weight.device, weight.dtype)
        return sum(len(t) for t in groups.values())

    # -- inputs -------------------------------------------------------------------------------
    def batch(self, contents: Sequence[Content], targets: Sequence[Sequence[int]] | None = None
              ) -> dict[str, torch.Tensor]:
        """Model inputs. ``input_ids``/``attention_mask``: MiniLM ids of the text rows (image rows are padding);
        ``is_text`` (B,) when the batch mixes modalities; ``image_features`` (N_images, cells + 1, widths), cached;
        with ``targets`` (ids incl. EOS): ``decoder_input_ids`` (BOS + target[:-1]) and ``labels``, right-padded.
        """
        modalities = [c.modality for c in contents]
        if not contents:
            raise DataError("an empty batch: there is nothing to encode")
        bad = sorted(set(modalities) - {"text", "image", "feature"})
        if bad:
            raise ConfigError(f"model 'cart' reads text, images and precomputed features, not {bad}")
        if {"image", "feature"} <= set(modalities):
            raise DataError("a batch mixes images and precomputed features; a corpus holds one item modality")
        texts = [c.value if m == "text" else "" for c, m in zip(contents, modalities)]
        if any(m == "text" and not t.strip() for m, t in zip(modalities, texts)):
            raise DataError("empty text input: every caption and query must contain words; fix or drop it")
        encoded = self.text_tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_text_tokens + 2, return_tensors="pt",
        )
        out: dict[str, torch.Tensor] = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        items = [c.value for c, m in zip(contents, modalities) if m != "text"]
        if items:
            is_text = torch.tensor([m == "text" for m in modalities])
            out["input_ids"] = out["input_ids"].masked_fill(~is_text[:, None], self.text_tokenizer.pad_token_id)
            out["attention_mask"] = out["attention_mask"].masked_fill(~is_text[:, None], 0)
            out["is_text"] = is_text
            if "feature" in modalities:
                from gcr.features import read_precomputed

                out["item_features"] = read_precomputed(items, normalize=True)
            else:
                out["image_features"] = self.image_features(items)
        if targets is not None:
            out.update(self._decoder_inputs(targets))
        return out

    def _decoder_inputs(self, targets: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(t) for t in targets])
        if not len(lengths) or int(lengths.min()) < 1:
            raise DataError("every target needs at least one identifier token (its EOS)")
        width = int(lengths.max())
        if width > int(self.opts["max_id_tokens"]):
            raise DataError(
                f"an identifier has {width} tokens (EOS included), more than model.max_id_tokens="
                f"{self.opts['max_id_tokens']}; raise it"
            )
        flat = torch.tensor(list(chain.from_iterable(targets)), dtype=torch.long)
        filled = torch.arange(width)[None, :] < lengths[:, None]
        labels = torch.full((len(targets), width), IGNORE_INDEX, dtype=torch.long)
        labels[filled] = flat
        # BOS, then the target shifted right; positions past the target's end (EOS included) are padding
        decoder_inputs = torch.cat(
            [torch.full((len(targets), 1), self.tokenizer.bos_token_id), labels[:, :-1]], dim=1
        ).masked_fill_(~filled, self.tokenizer.pad_token_id)
        return {"decoder_input_ids": decoder_inputs, "labels": labels}

    @torch.no_grad()
    def image_features(self, paths: Sequence[str]) -> torch.Tensor:
        """(len(paths), cells + 1, sum of widths) float16 stage features, computed once per path."""
        from gcr.data.karpathy import load_image

        grid = int(self.opts["image_grid"])
        missing = list(dict.fromkeys(str(p) for p in paths if str(p) not in self._features))
        step = max(1, int(getattr(self.vision, "batch_size", 32)))
        for start in range(0, len(missing), step):
            chunk = missing[start : start + step]
            pixels = self.vision.preprocess([load_image(p) for p in chunk]).to(self.vision.device)
            stages = efficientnet_stages(self.vision.net, pixels.contiguous(memory_format=torch.channels_last))
            tokens = []
            for x in stages[-self.num_memory_layers :]:
                x = x.float()
                cells = F.adaptive_avg_pool2d(x, grid).flatten(2)  # (N, C, grid^2)
                tokens.append(torch.cat([cells, x.mean(dim=(2, 3))[..., None]], dim=2).transpose(1, 2))
            rows = torch.cat(tokens, dim=2).to("cpu", torch.float16)  # (N, grid^2 + 1, sum widths)
            for path, row in zip(chunk, rows):
                self._features[path] = row.clone()
        return torch.stack([self._features[str(p)] for p in paths])

    # -- model calls --------------------------------------------------------------------------
    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory (B, L, T, d) and its key padding mask (B, T), True = a real token."""
        ids, attention = batch["input_ids"], batch["attention_mask"]
        features = batch.get("image_features")
        vectors = batch.get("item_features")
        B = ids.shape[0]
        n_images = 0 if features is None and vectors is None else (features if vectors is None else vectors).shape[0]
        if n_images == 0:
            return self._text_memory(ids, attention), attention.bool()
        image = self.model.image_memory(features) if vectors is None else self.model.feature_memory(vectors)
        if n_images == B:
            return image, torch.ones(B, image.shape[2], dtype=torch.bool, device=image.device)
        is_text = batch["is_text"]
        text = self._text_memory(ids[is_text], attention[is_text])
        T = max(text.shape[2], image.shape[2])
        memory = text.new_zeros(B, self.num_memory_layers, T, text.shape[-1])
        memory[is_text, :, : text.shape[2]] = text
        memory[~is_text, :, : image.shape[2]] = image.to(memory.dtype)
        mask = torch.zeros(B, T, dtype=torch.bool, device=memory.device)
        mask[is_text, : text.shape[2]] = attention[is_text].bool()
        mask[~is_text, : image.shape[2]] = True
        return memory, mask

    def _text_memory(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        grad = self.train_encoder and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            hidden = self.text_encoder(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        return self.model.text_memory(hidden)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced next-token logits (B, T, V) of ``decoder_input_ids`` (batches built with targets)."""
        memory, mask = self.encode(batch)
        return self.model.decode(batch["decoder_input_ids"], self.model.memory_cache(memory), mask)[0]

    def sequence_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) summed log-probabilities of each row's target (what beam search scores an identifier with)."""
        log_probs = self.logits(batch).float().log_softmax(-1)
        labels = batch["labels"]
        picked = log_probs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return picked.masked_fill(labels == IGNORE_INDEX, 0.0).sum(-1)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``ce``: mean cross-entropy of the identifier tokens; ``kl``: R-Drop's symmetric KL (0 when off)."""
        labels = batch["labels"]
        valid = labels != IGNORE_INDEX
        if not bool(valid.any()):
            raise DataError("the batch has no identifier tokens to learn (all labels are ignored)")
        memory, mask = self.encode(batch)
        caches = self.model.memory_cache(memory)
        ids = batch["decoder_input_ids"]
        rdrop = self.training and self.rdrop_weight > 0
        group = 2 if rdrop else 1
        # R-Drop: every row twice (item-major, rows 2b and 2b + 1); dropout differs between the copies
        logits = self.model.decode(ids.repeat_interleave(group, 0), caches, mask, group=group)[0].float()
        targets = labels.repeat_interleave(group, 0)
        if self.training and self.sibling_smoothing > 0:
            if self.identifier_trie is None:
                raise ConfigError("model.sibling_smoothing needs the trie of the training identifiers: call "
                                  "set_identifier_trie(index.trie()) first (gcr fit does)")
            if self.identifier_trie.device != targets.device:
                self.identifier_trie = self.identifier_trie.to(targets.device)
            ce = sibling_smoothed_cross_entropy(logits, targets, self.identifier_trie, self.sibling_smoothing,
                                                IGNORE_INDEX)
        else:
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        if not rdrop:
            return {"ce": ce, "kl": ce.new_zeros(())}
        log_probs = logits.log_softmax(-1).view(labels.shape[0], 2, *logits.shape[1:])
        first, second = log_probs[:, 0][valid], log_probs[:, 1][valid]
        kl = 0.5 * (F.kl_div(second, first, reduction="none", log_target=True)
                    + F.kl_div(first, second, reduction="none", log_target=True)).sum(-1).mean()
        return {"ce": ce, "kl": kl}

    def set_identifier_trie(self, trie: Any) -> None:
        """The trie of every training identifier: sibling smoothing shares its mass among a prefix's children."""
        self.identifier_trie = trie

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy + ``rdrop_weight`` x symmetric KL of two dropout passes (in training mode)."""
        terms = self.loss_terms(batch)
        return terms["ce"] + self.rdrop_weight * terms["kl"] if self.training else terms["ce"]

    # -- decoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def search(self, batch: dict[str, torch.Tensor], trie: Any, *, num_beams: int, max_new_tokens: int,
               eos_token_id: int | None = None, synced_gpus: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained beam search straight over ``trie``: ``(identifier ids (B, K), scores (B, K))``, best first.

        Slots beyond the identifiers that exist hold ``-1`` and score -1e9; scores are summed log-probs.
        """
        from gcr.decoding import constrained_beam_search

        if synced_gpus:
            raise ConfigError("model 'cart' does not support sharded strategies (FSDP/DeepSpeed); use ddp")
        self._check_search(trie, eos_token_id)
        B, K = batch["input_ids"].shape[0], int(num_beams)
        memory, mask = self.encode(batch)
        caches = self.model.memory_cache(memory)
        bos = self.tokenizer.bos_token_id

        # The search applies the head itself, only where the trie allows (exact full-vocabulary log-probs).
        def step(tokens: torch.Tensor, past):
            t = tokens.shape[1]
            if t == 0:  # every beam of a query starts from BOS: decode one row per query, then copy it K times
                hidden, present = self.model.decode(tokens.new_full((B, 1), bos), caches, mask, project=False)
                present = [(k.repeat_interleave(K, 0), v.repeat_interleave(K, 0)) for k, v in present]
                return hidden[:, -1].repeat_interleave(K, 0), present
            hidden, present = self.model.decode(tokens[:, -1:], caches, mask, group=K, start=t, past=past,
                                                project=False, history=tokens[:, :-1])
            return hidden[:, -1], present

        def reorder(past, beam_idx):
            return [(k[beam_idx], v[beam_idx]) for k, v in past]

        found = constrained_beam_search(step, trie, B, K, max_new_tokens, reorder_fn=reorder,
                                        output_embedding=self.model.head.weight, normalize="full")
        missing = found.identifiers < 0
        return found.identifiers, found.scores.masked_fill(missing, _FILLER)

    def _check_search(self, trie: Any, eos_token_id: int | None) -> None:
        """A compact decoder ends identifiers with EOS and has positions for ``max_id_tokens`` of them."""
        eos = self.tokenizer.eos_token_id if eos_token_id is None else int(eos_token_id)
        if eos != self.tokenizer.eos_token_id:
            raise ConfigError(f"the trie's end token ({eos}) is not the tokenizer's EOS ({self.tokenizer.eos_token_id}); "
                              f"model {self.name!r} cannot write rationales: set rgs.enabled=false")
        if trie.max_length > int(self.opts["max_id_tokens"]):
            raise ConfigError(f"identifiers of {trie.max_length} tokens exceed model.max_id_tokens; raise it")

    def generate_text(self, batch, *, num_beams: int = 3, max_new_tokens: int = 32,
                      num_return_sequences: int = 1) -> list[str]:
        raise ConfigError(
            "model 'cart' only writes identifiers; it cannot caption (gcr captions with a tiny model instead)"
        )

    # -- persistence --------------------------------------------------------------------------
    def _frozen_prefixes(self) -> tuple[str, ...]:
        return ("vision.",) if self.train_encoder else ("vision.", "text_encoder.")

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What :meth:`save` writes: every tensor but the frozen pretrained towers (rebuilt from the packages)."""
        skip = self._frozen_prefixes()
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith(skip)}

    def save(self, directory: str | Path) -> Path:
        """``model.safetensors`` (trained weights), the tokenizer, ``backbone.json`` (name and options)."""
        from safetensors.torch import save

        from gcr.artifacts import atomic_write, write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_write(directory / WEIGHTS_FILE) as fh:
            fh.write(save(self.trained_state(), metadata={"format": "pt", "backbone": self.name}))
        self.tokenizer.save_pretrained(directory)
        write_json(directory / BACKBONE_FILE, {"name": self.name, **self.options()})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, text_tower: tuple[nn.Module, Any] | None = None,
                        vision: nn.Module | None = None) -> CartBackbone:
        """Rebuild what :meth:`save` wrote; the frozen towers come from the packages (or are passed in)."""
        from safetensors.torch import load_file
        from transformers import PreTrainedTokenizerFast

        from gcr.artifacts import read_json

        directory = Path(directory)
        meta = dict(read_json(directory / BACKBONE_FILE, what="backbone description"))
        if meta.pop("name", cls.name) != cls.name:
            raise ArtifactError(f"{directory} does not hold a 'cart' backbone")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
        text_encoder, text_tokenizer = text_tower if text_tower is not None else load_text_tower()
        if meta.get("train_encoder") and text_tower is not None:
            text_encoder = _copy_module(text_encoder)  # its weights are about to be replaced by the trained ones
        if vision is None:
            vision = load_image_tower(int(meta.get("image_size", DEFAULTS["image_size"])))
        backbone = cls(tokenizer, text_encoder, text_tokenizer, vision, **meta)
        try:
            state = load_file(str(directory / WEIGHTS_FILE))
        except Exception as exc:
            raise ArtifactError(f"{directory / WEIGHTS_FILE} could not be read ({exc})") from exc
        expected = set(backbone.trained_state())
        if set(state) != expected:
            raise ArtifactError(
                f"{directory} does not fit a 'cart' backbone with its options: missing "
                f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}"
            )
        backbone.load_state_dict(state, strict=False)
        return backbone.eval()


# -- the packaged towers --------------------------------------------------------------------------
def load_text_tower() -> tuple[nn.Module, Any]:
    """MiniLM's HF ``BertModel`` (under the SentenceTransformer) and its tokenizer, from the installed package."""
    from gcr.encoders import MiniLMTextEncoder

    model = MiniLMTextEncoder().model
    first = model[0]
    return first.auto_model, model.tokenizer


def load_image_tower(image_size: int = 224) -> nn.Module:
    from gcr.encoders import EfficientNetImageEncoder

    return EfficientNetImageEncoder(image_size=int(image_size))


def _copy_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


@contextlib.contextmanager
def _seeded(seed: int):
    """Deterministic initialisation that leaves the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield

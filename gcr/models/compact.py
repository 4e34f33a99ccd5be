"""Backbone ``compact``: one frozen query encoder, cached, and a small identifier decoder every scheme runs on.

* **Encoder** (``encoder``, frozen; :mod:`gcr.models.query_encoders`): ``aligned`` = the dense baseline's
  towers (text and images in one aligned space), ``pretrained`` = CART's per-layer MiniLM / EfficientNet-Lite0
  memory, ``features`` = one pooled pretrained vector (stored vectors for audio/video items). Each content is
  encoded once per process and cached, so an epoch only trains the decoder. Each encoder layer is projected
  to ``d_model`` (``LayerNorm -> Linear``; one projection per layer and modality, or one for all modalities when
  the encoder is aligned, so an image and its caption give the decoder the same kind of memory).
* **Decoder** (``decoder``): ``transformer`` = CART's decoder layers (:class:`gcr.models.cart.DecoderLayer`:
  causal self-attention, the memory fusion, FFN); ``gru`` = a GRU whose initial state is the pooled memory,
  with the same fusion after it. ``fusion`` (coarse_fine | coarse | fine | last) and ``rdrop_weight`` (R-Drop)
  are CART's, off by default (``last``, 0) and on by config for any scheme.
* **Vocabulary**: the corpus word tokenizer of the train captions (``vocab_size`` words, plus the words a
  scheme reserves) so natural-language identifiers (semcore, ssi) are spelled word by word; code tokens
  (atomic, hkmeans, cart, plugins) are added by :meth:`add_identifier_tokens`.
* **Loss and decoding** are CART's (:class:`gcr.models.cart.CartBackbone`): cross-entropy (+ R-Drop KL), and
  :func:`gcr.decoding.beam_search.constrained_beam_search` under the trie. It writes identifiers only
  (``writes_text = False``): captions for semcore/ssi descriptions come from a ``tiny`` captioner; GSV and RGS
  need a text-writing backbone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcr.data.corpus import Content, Corpus
from gcr.errors import ArtifactError, ConfigError, DataError
from gcr.models.base import BACKBONE_FILE, GenerativeBackbone
from gcr.models.cart import WEIGHTS_FILE, CartBackbone, check_decoder_options
from gcr.models.cart_network import (
    INIT_STD,
    CartNetwork,
    CoarseFineFusion,
    CodeTables,
    DecoderLayer,
    _grouped,
    candidate_codes,
)
from gcr.models.query_encoders import ENCODERS, ENCODINGS, EncodingCache, QueryEncoder, build_query_encoder

DECODERS = ("transformer", "gru")
MODALITIES = ("text", "image", "feature")
DENSE_DIR = "dense"
_FILLER = -1e9  # score of an empty beam slot (fewer identifiers than beams); the retriever skips it
DEFAULTS: dict[str, Any] = {
    "encoder": "aligned",
    "decoder": "transformer",
    "d_model": 256,
    "num_layers": 2,
    "num_heads": 4,
    "ffn_dim": 512,
    "dropout": 0.1,
    "fusion": "last",
    "rdrop_weight": 0.0,
    "center_modalities": False,
    "sibling_smoothing": 0.0,
    "interpolation": 0.0,
    "vocab_size": 1000,
    "max_text_tokens": 48,
    "max_id_tokens": 64,
    "image_size": 224,
    "image_grid": 4,
    "feature_dim": 0,
    "seed": 0,
}


# -- the network ------------------------------------------------------------------------------------
class GRUDecoder(nn.Module):
    """A GRU started from the pooled memory, then the memory fusion on its outputs (one residual branch)."""

    def __init__(self, d_model: int, num_layers: int, num_heads: int, num_memory_layers: int, fusion: str,
                 dropout: float):
        super().__init__()
        self.num_layers = num_layers
        self.pool_norm = nn.LayerNorm(d_model)
        self.init = nn.Linear(d_model, num_layers * d_model)
        self.gru = nn.GRU(d_model, d_model, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
        self.norm = nn.LayerNorm(d_model)
        self.fusion = CoarseFineFusion(d_model, num_heads, num_memory_layers, fusion, dropout)
        self.drop = nn.Dropout(dropout)

    def memory(self, memory: torch.Tensor) -> dict:
        """Fusion keys/values and the initial state ``(B, layers, d)``; padded memory rows are zero, and the
        LayerNorm makes the pooled sum a mean over the real tokens."""
        B, d = memory.shape[0], memory.shape[-1]
        h0 = torch.tanh(self.init(self.pool_norm(memory.sum(dim=(1, 2))))).view(B, self.num_layers, d)
        return {"fusion": self.fusion.memory(memory), "h0": h0}

    def forward(self, h: torch.Tensor, cache: dict, mask: torch.Tensor, group: int, past=None, candidate=None):
        N, t, d = h.shape
        state = cache["h0"].repeat_interleave(group, 0) if past is None else past
        out, last = self.gru(h, state.transpose(0, 1).contiguous())
        fused = self.fusion(self.norm(out).reshape(N // group, group * t, d), cache["fusion"], mask,
                            **_grouped(candidate, group))
        return out + self.drop(fused.reshape(N, t, d)), last.transpose(0, 1)


class CompactNetwork(nn.Module):
    """Everything that trains: per-layer memory projections, the decoder, token embeddings and output head."""

    def __init__(self, vocab_size: int, *, widths: dict[str, list[int]], num_memory_layers: int, shared: bool,
                 positions: dict[str, int], decoder: str, d_model: int, num_layers: int, num_heads: int,
                 ffn_dim: int, dropout: float, fusion: str, max_id_tokens: int, center_modalities: bool = False):
        super().__init__()
        self.num_memory_layers, self.shared, self.decoder = num_memory_layers, shared, decoder
        self.widths = {m: [int(w) for w in ws] for m, ws in widths.items()}
        # center_modalities: each modality's train-split mean encoding, subtracted before the projection (saved
        # with the weights; set by CompactBackbone.center_modalities)
        self.centered = bool(center_modalities)
        if self.centered:
            for m, ws in self.widths.items():  # a row is its layers' vectors side by side (one width: one vector)
                self.register_buffer(f"mean_{m}", torch.zeros(sum(ws)))
        groups = {"shared": next(iter(self.widths.values()))} if shared else self.widths
        self.proj = nn.ModuleDict({
            m: nn.ModuleList(nn.Sequential(nn.LayerNorm(w), nn.Linear(w, d_model)) for w in ws) for m, ws in groups.items()
        })
        self.pos_memory = nn.ParameterDict({m: nn.Parameter(torch.zeros(n, d_model)) for m, n in positions.items()})
        self.memory_drop = nn.Dropout(dropout)
        self.embed = nn.Embedding(vocab_size, d_model)
        if decoder == "transformer":
            self.pos = nn.Embedding(max_id_tokens + 1, d_model)  # BOS + up to max_id_tokens
            self.layers = nn.ModuleList(
                DecoderLayer(d_model, num_heads, ffn_dim, num_memory_layers, fusion, dropout) for _ in range(num_layers)
            )
        else:
            self.gru = GRUDecoder(d_model, num_layers, num_heads, num_memory_layers, fusion, dropout)
            self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.codes = CodeTables() if fusion == "candidate" else None
        self.apply(CartNetwork._init)
        for p in self.pos_memory.values():
            nn.init.normal_(p, std=INIT_STD)

    resize_vocab = CartNetwork.resize_vocab  # grows `embed` and `head` (mean of old rows + seeded noise)
    set_code_vectors = CartNetwork.set_code_vectors  # fusion=candidate: the scheme's code vectors

    def project(self, modality: str, rows: torch.Tensor) -> torch.Tensor:
        """(N, T, W) cached encodings of one modality -> (N, L, T, d_model)."""
        widths = self.widths.get(modality)
        if widths is None:
            raise ConfigError(f"this compact model was built without a {modality!r} projection")
        projections = self.proj["shared" if self.shared else modality]
        rows = rows.float()
        if self.centered:
            rows = rows - getattr(self, f"mean_{modality}")
        parts = rows.split(widths, dim=-1) if len(widths) > 1 else [rows] * len(projections)
        out = torch.stack([proj(x) for proj, x in zip(projections, parts)], dim=1)
        if modality in self.pos_memory:
            out = out + self.pos_memory[modality][: out.shape[2]]
        return out

    def memory_cache(self, memory: torch.Tensor):
        """What decoding reads of the memory, computed once per query (per layer for the transformer)."""
        memory = self.memory_drop(memory)
        if self.decoder == "gru":
            return self.gru.memory(memory)
        return [layer.fusion.memory(memory) for layer in self.layers]

    def decode(self, ids: torch.Tensor, caches, mask: torch.Tensor, *, group: int = 1, start: int = 0, past=None,
               history: torch.Tensor | None = None):
        """Logits (N, t, V) of decoder inputs ``ids`` (N, t); N = B * group, item-major; returns the new ``past``.
        ``history``: identifier tokens decoded before ``ids`` (``fusion=candidate``, as CART's)."""
        if self.decoder == "transformer":
            return CartNetwork.decode(self, ids, caches, mask, group=group, start=start, past=past, history=history)
        candidate = candidate_codes(self, ids, history)
        out, state = self.gru(self.drop(self.embed(ids)), caches, mask, group, past, candidate)
        return self.head(self.norm(out)), state


def _map_past(past, fn):
    """Apply ``fn`` to every tensor of a decoder state (a tensor, or lists/tuples of them)."""
    if isinstance(past, torch.Tensor):
        return fn(past)
    return type(past)(_map_past(p, fn) for p in past)


# -- the backbone -----------------------------------------------------------------------------------
class CompactBackbone(CartBackbone):
    """A frozen, cached query encoder -> a small identifier decoder; the shared backbone of scheme comparisons.

    Training and scoring (``forward``, ``loss_terms``, R-Drop, ``sequence_scores``) and the vocabulary
    (``add_identifier_tokens``, ``init_token_embeddings``) are CART's, inherited.
    """

    name = "compact"
    writes_text = False
    #: the pipeline passes ``reserved_words=`` (a scheme's structure words) to :meth:`create`
    builds_vocabulary = True
    spells_words = True  # unlike CART's identifier-only tokenizer: words from the train captions + reserved words

    @staticmethod
    def needs_dense(options: dict[str, Any]) -> bool:
        """The pipeline passes ``dense=`` (the trained dense baseline) to :meth:`create` when this is True."""
        return options.get("encoder", DEFAULTS["encoder"]) == "aligned"

    def __init__(self, tokenizer: Any, query_encoder: QueryEncoder, *, cache: EncodingCache | None = None, **options: Any):
        opts = {**DEFAULTS, **options}
        self._check_options(opts)
        encoder = query_encoder
        modalities = [m for m in MODALITIES if m != "feature" or int(opts["feature_dim"]) or encoder.aligned]
        widths = {m: encoder.widths(m) for m in modalities}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(opts["seed"]))
            network = CompactNetwork(
                len(tokenizer), widths=widths, num_memory_layers=encoder.layers, shared=encoder.aligned,
                positions=dict(encoder.positions), decoder=str(opts["decoder"]), d_model=int(opts["d_model"]),
                num_layers=int(opts["num_layers"]), num_heads=int(opts["num_heads"]), ffn_dim=int(opts["ffn_dim"]),
                dropout=float(opts["dropout"]), fusion=str(opts["fusion"]), max_id_tokens=int(opts["max_id_tokens"]),
                center_modalities=bool(opts["center_modalities"]),
            )
        GenerativeBackbone.__init__(self, network, tokenizer, max_text_tokens=int(opts["max_text_tokens"]))
        self.opts = opts
        self.query_encoder = encoder  # a plain object: its (frozen) weights are no part of this module's state
        self.cache = ENCODINGS if cache is None else cache
        self.num_memory_layers = encoder.layers
        self.rdrop_weight = float(opts["rdrop_weight"])
        self.sibling_smoothing = float(opts["sibling_smoothing"])
        self.interpolation = float(opts["interpolation"])
        self._mixing = torch.Generator().manual_seed(int(opts["seed"]))
        self.seed = int(opts["seed"])
        self.train_encoder = False

    @staticmethod
    def _check_options(o: dict[str, Any]) -> None:
        unknown = sorted(set(o) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for model 'compact'; known: {', '.join(DEFAULTS)}")
        if o["encoder"] not in ENCODERS:
            raise ConfigError(f"unknown model.encoder {o['encoder']!r}; choose one of {', '.join(ENCODERS)}")
        if o["decoder"] not in DECODERS:
            raise ConfigError(f"unknown model.decoder {o['decoder']!r}; choose one of {', '.join(DECODERS)}")
        check_decoder_options(o)
        if not 0.0 <= float(o["sibling_smoothing"]) < 1.0:
            raise ConfigError(f"model.sibling_smoothing must be in [0, 1) (the mass moved to sibling codes), "
                              f"got {o['sibling_smoothing']}")
        if not 0.0 <= float(o["interpolation"]) <= 1.0:
            raise ConfigError(f"model.interpolation is the share of query examples mixed with their target, in "
                              f"[0, 1]; got {o['interpolation']}")
        if float(o["interpolation"]) > 0 and o["encoder"] != "aligned":
            raise ConfigError("model.interpolation mixes a query's vector with its target's, which needs one vector "
                              "per content in one space: set model.encoder=aligned, or model.interpolation=0")
        if int(o["vocab_size"]) < 0:
            raise ConfigError(f"model.vocab_size must be >= 0 (corpus words in the vocabulary), got {o['vocab_size']}")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(cls, corpus: Corpus | None = None, *, dense: Any = None, reserved_words: Iterable[str] = (),
               tokenizer: Any = None, cache: EncodingCache | None = None, **options: Any) -> CompactBackbone:
        """A fresh decoder over the frozen ``encoder``; the word tokenizer is built from the train captions.

        ``dense``: the trained dense baseline (``encoder=aligned``); ``reserved_words``: words the scheme's
        identifiers use as structure, always in the vocabulary.
        """
        cls._check_options({**DEFAULTS, **options})
        if corpus is not None and corpus.meta.get("feature_dim") and not options.get("feature_dim"):
            options = {**options, "feature_dim": int(corpus.meta["feature_dim"])}
        if tokenizer is None:
            from gcr.models.tokenizer import train_corpus_tokenizer

            texts = (c.text for c in corpus.captions("train")) if corpus is not None else ()
            size = int(options.get("vocab_size", DEFAULTS["vocab_size"]))
            tokenizer = train_corpus_tokenizer(texts, size, reserved_words=reserved_words)
        opts = {**DEFAULTS, **options}
        encoder = build_query_encoder(
            str(opts["encoder"]), dense=dense, image_size=int(opts["image_size"]), image_grid=int(opts["image_grid"]),
            max_text_tokens=int(opts["max_text_tokens"]), feature_dim=int(opts["feature_dim"]),
        )
        backbone = cls(tokenizer, encoder, cache=cache, **options)
        if bool(opts["center_modalities"]) and corpus is not None:
            backbone.center_modalities(corpus)
        return backbone

    @torch.no_grad()
    def center_modalities(self, corpus: Corpus) -> None:
        """Set each modality's mean encoding over the train split (``model.center_modalities=true``).

        A contrastive space keeps its text and image embeddings in two separate cones (the *modality gap*), so a
        decoder that learned a test image's identifier from the image alone reads its captions from elsewhere.
        Subtracting each modality's mean moves both cones onto one centre (Liang et al., 2022).
        """
        if not self.model.centered:
            raise ConfigError("this compact model was built without model.center_modalities=true")
        train = corpus.split("train")
        contents = {"text": [Content.text(c.text) for c in corpus.captions("train")],
                    "image": [im.content() for im in train if im.modality == "image"],
                    "feature": [im.content() for im in train if im.modality != "image"]}
        for modality, items in contents.items():
            if items and modality in self.model.widths:
                rows = torch.stack([r.float().mean(0) for r in self.cache.get(self.query_encoder, items)])
                getattr(self.model, f"mean_{modality}").copy_(rows.mean(0))

    def options(self) -> dict[str, Any]:
        return dict(self.opts)

    def load_vision_tower(self, vision_state: dict) -> None:
        raise ConfigError("model 'compact' reads images with its frozen query encoder; remove model.vision_init")

    def train(self, mode: bool = True) -> CompactBackbone:
        nn.Module.train(self, mode)  # the query encoder is outside this module and always in eval mode
        return self

    # -- inputs -------------------------------------------------------------------------------
    def batch(self, contents: Sequence[Content], targets: Sequence[Sequence[int]] | None = None,
              anchors: Sequence[Content | None] | None = None) -> dict[str, torch.Tensor]:
        """Model inputs from the cached encodings. Per modality ``m`` present: ``m_rows`` (N_m,) row positions,
        ``m_memory`` (N_m, T_m, W_m) and ``m_mask`` (N_m, T_m). ``input_ids`` (B, 1) is a BOS placeholder (the
        protocol's batch size); with ``targets``: ``decoder_input_ids`` and ``labels`` (CART's).

        ``anchors`` (training, ``model.interpolation`` > 0): each query example's target content; that share of
        the rows with an anchor reads ``lam * query + (1 - lam) * target``, ``lam ~ U(0, 1)`` (GENIUS's
        query-target interpolation), so the decoder sees the path between a caption and its image."""
        if not contents:
            raise DataError("an empty batch: there is nothing to encode")
        modalities = [c.modality for c in contents]
        bad = sorted(set(modalities) - set(MODALITIES))
        if bad:
            raise ConfigError(f"model 'compact' reads text, images and stored feature vectors, not {bad}")
        if any(m == "text" and not c.value.strip() for c, m in zip(contents, modalities)):
            raise DataError("empty text input: every caption and query must contain words; fix or drop it")
        encodings = self.cache.get(self.query_encoder, contents)
        if anchors is not None and self.interpolation > 0:
            encodings = self._interpolated(encodings, anchors)
        out: dict[str, torch.Tensor] = {
            "input_ids": torch.full((len(contents), 1), self.tokenizer.bos_token_id, dtype=torch.long),
            "attention_mask": torch.ones(len(contents), 1, dtype=torch.long),
        }
        for m in MODALITIES:
            rows = [i for i, x in enumerate(modalities) if x == m]
            if not rows:
                continue
            width = max(encodings[i].shape[0] for i in rows)
            memory = encodings[rows[0]].new_zeros(len(rows), width, encodings[rows[0]].shape[1])
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for j, i in enumerate(rows):
                memory[j, : encodings[i].shape[0]] = encodings[i]
                mask[j, : encodings[i].shape[0]] = True
            out[f"{m}_rows"], out[f"{m}_memory"], out[f"{m}_mask"] = torch.tensor(rows), memory, mask
        if targets is not None:
            out.update(self._decoder_inputs(targets))
        return out

    def _interpolated(self, encodings: list[torch.Tensor], anchors: Sequence[Content | None]) -> list[torch.Tensor]:
        if len(anchors) != len(encodings):
            raise DataError(f"{len(anchors)} anchors for {len(encodings)} contents: give one (or None) per content")
        rows = [i for i, a in enumerate(anchors) if a is not None]
        if not rows:
            return encodings
        mixed = torch.rand(len(rows), generator=self._mixing) < self.interpolation
        lam = torch.rand(len(rows), generator=self._mixing)
        targets = self.cache.get(self.query_encoder, [anchors[i] for i in rows])
        out = list(encodings)
        for j, i in enumerate(rows):
            if mixed[j]:
                out[i] = lam[j] * encodings[i].float() + (1 - lam[j]) * targets[j].float()
        return out

    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory (B, L, T, d) from the cached encodings, padded rows zero, and its mask (B, T), True = real."""
        B = batch["input_ids"].shape[0]
        parts = [(batch[f"{m}_rows"], self.model.project(m, batch[f"{m}_memory"]), batch[f"{m}_mask"])
                 for m in MODALITIES if f"{m}_rows" in batch]
        if len(parts) == 1 and parts[0][1].shape[0] == B:
            _, memory, mask = parts[0]
            return memory * mask[:, None, :, None], mask
        T = max(p[1].shape[2] for p in parts)
        first = parts[0][1]
        memory = first.new_zeros(B, first.shape[1], T, first.shape[-1])
        mask = torch.zeros(B, T, dtype=torch.bool, device=first.device)
        for rows, part, part_mask in parts:
            memory[rows, :, : part.shape[2]] = part * part_mask[:, None, :, None]
            mask[rows, : part.shape[2]] = part_mask
        return memory, mask

    # -- decoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def search(self, batch: dict[str, torch.Tensor], trie: Any, *, num_beams: int, max_new_tokens: int,
               eos_token_id: int | None = None, synced_gpus: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained beam search straight over ``trie``: ``(identifier ids (B, K), scores (B, K))``, as CART's."""
        from gcr.decoding import constrained_beam_search

        if synced_gpus:
            raise ConfigError("model 'compact' does not support sharded strategies (FSDP/DeepSpeed); use ddp")
        self._check_search(trie, eos_token_id)
        B, K = batch["input_ids"].shape[0], int(num_beams)
        memory, mask = self.encode(batch)
        caches = self.model.memory_cache(memory)
        bos = self.tokenizer.bos_token_id

        def step(tokens: torch.Tensor, past):
            t = tokens.shape[1]
            if t == 0:  # every beam of a query starts from BOS: decode one row per query, then copy it K times
                logits, present = self.model.decode(tokens.new_full((B, 1), bos), caches, mask)
                present = _map_past(present, lambda x: x.repeat_interleave(K, 0))
                return logits[:, -1].float().log_softmax(-1).repeat_interleave(K, 0), present
            logits, present = self.model.decode(tokens[:, -1:], caches, mask, group=K, start=t, past=past,
                                                history=tokens[:, :-1])
            return logits[:, -1].float().log_softmax(-1), present

        found = constrained_beam_search(step, trie, B, K, max_new_tokens,
                                        reorder_fn=lambda past, idx: _map_past(past, lambda x: x[idx]))
        return found.identifiers, found.scores.masked_fill(found.identifiers < 0, _FILLER)

    def generate_text(self, batch, *, num_beams: int = 3, max_new_tokens: int = 32,
                      num_return_sequences: int = 1) -> list[str]:
        raise ConfigError(
            "model 'compact' only writes identifiers; it cannot caption (gcr captions with a tiny model instead)"
        )

    # -- persistence --------------------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

    def save(self, directory: str | Path) -> Path:
        """``model.safetensors`` (the decoder), the tokenizer, ``backbone.json``; ``dense/`` for ``aligned``."""
        directory = Path(directory)
        super().save(directory)
        dense = getattr(self.query_encoder, "dense", None)
        if dense is not None:
            dense.save(directory / DENSE_DIR)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, cache: EncodingCache | None = None) -> CompactBackbone:
        """Rebuild what :meth:`save` wrote (the pretrained towers come from the packages)."""
        from safetensors.torch import load_file
        from transformers import PreTrainedTokenizerFast

        from gcr.artifacts import read_json

        directory = Path(directory)
        meta = dict(read_json(directory / BACKBONE_FILE, what="backbone description"))
        if meta.pop("name", cls.name) != cls.name:
            raise ArtifactError(f"{directory} does not hold a 'compact' backbone")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
        dense = _load_dense(directory / DENSE_DIR) if meta.get("encoder") == "aligned" else None
        backbone = cls.create(None, dense=dense, tokenizer=tokenizer, cache=cache, **meta)
        try:
            state = load_file(str(directory / WEIGHTS_FILE))
        except Exception as exc:
            raise ArtifactError(f"{directory / WEIGHTS_FILE} could not be read ({exc})") from exc
        expected = set(backbone.trained_state())
        if set(state) != expected:
            raise ArtifactError(
                f"{directory} does not fit a 'compact' backbone with its options: missing "
                f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}"
            )
        backbone.load_state_dict(state)
        return backbone.eval()


def _load_dense(directory: Path):
    """The dense baseline saved beside an ``aligned`` backbone (CLIP-style or frozen-tower)."""
    from gcr.dense.frozen import FROZEN_DENSE_FILE, FrozenTowerDualEncoder
    from gcr.dense.models import DENSE_FILE, DualEncoder

    if (directory / DENSE_FILE).is_file():
        return DualEncoder.from_pretrained(directory)
    if (directory / FROZEN_DENSE_FILE).is_file():
        return FrozenTowerDualEncoder.from_pretrained(directory)
    raise ArtifactError(f"{directory} holds no dense baseline; the 'aligned' encoder needs it (re-run the fit)")

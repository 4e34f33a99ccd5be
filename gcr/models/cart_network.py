"""CART's compact identifier decoder as a network: attention blocks, coarse-to-fine fusion, decoder layers.

:class:`CartNetwork` projects every layer of a frozen encoder into one memory and decodes identifier tokens
from it; :class:`CoarseFineFusion` is CART's two-branch fusion (``coarse``, ``fine``, ``coarse_fine``, or
``last``: plain cross-attention, or ``candidate``). The backbone adapters that feed it (:mod:`gcr.models.cart`,
``cart``; :mod:`gcr.models.compact`, ``compact``) own tokenizers, encoders, losses and search.

``candidate`` is CART's fusion *with the candidate*: both branches, and at every decoding step each branch's
attention query also carries what the identifier decoded so far means (:class:`CodeTables`): the coarse branch the
K-Means centroid of the prefix's coarse token, the fine branch the sum of the RQ-VAE codebook entries of the
prefix's fine tokens, each through its own learned projection to ``d_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gcr.errors import ConfigError

LAYER_FUSIONS = ("coarse_fine", "coarse", "fine", "last")  # fuse the query encoder's layers only
FUSIONS = (*LAYER_FUSIONS, "candidate")  # candidate: + the decoded prefix's code vectors (CodeTables)
INIT_STD = 0.02  # weights ~ N(0, 0.02), biases 0 (GPT/BART-style init)
NEW_ROW_NOISE = 0.1  # new token rows: mean of the old rows + N(0, (0.1 * std of the old rows)^2)


# -- building blocks ------------------------------------------------------------------------------
def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, d) -> (B, heads, T, d / heads)."""
    B, T, d = x.shape
    return x.view(B, T, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, dh) -> (B, T, heads * dh)."""
    B, H, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * dh)


class CrossAttention(nn.Module):
    """Multi-head attention of decoder states (queries) to one memory; keys/values computed once per memory."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = num_heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d) -> keys, values (B, heads, T, dh)."""
        return _heads(self.k(memory), self.heads), _heads(self.v(memory), self.heads)

    def forward(self, h: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``h`` (B, Q, d): any number of query positions per memory row; ``mask`` (B, T), True = attend."""
        q = _heads(self.q(h), self.heads)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, *kv, attn_mask=mask[:, None, None, :], dropout_p=p)
        return self.o(_merge(out))


class LayerwiseCrossAttention(nn.Module):
    """One cross-attention per encoder layer, mixed by learned softmax weights: the *fine* branch.

    The L attentions have their own projections but run as one ``scaled_dot_product_attention`` with
    ``L * heads`` heads; the weighted sum of their outputs is one matmul with the stacked output projections.
    """

    def __init__(self, d_model: int, num_heads: int, num_memory_layers: int, dropout: float):
        super().__init__()
        L, d = num_memory_layers, d_model
        self.layers, self.heads, self.dropout = L, num_heads, dropout
        self.q = nn.Linear(d, L * d)  # the L query projections side by side
        self.k_weight = nn.Parameter(torch.empty(L, d, d))
        self.k_bias = nn.Parameter(torch.zeros(L, d))
        self.v_weight = nn.Parameter(torch.empty(L, d, d))
        self.v_bias = nn.Parameter(torch.zeros(L, d))
        self.o_weight = nn.Parameter(torch.empty(d, L * d))  # the L output projections side by side
        self.o_bias = nn.Parameter(torch.zeros(L, d))
        self.layer_logits = nn.Parameter(torch.zeros(L))  # softmax -> the layers' mixing weights
        for weight in (self.k_weight, self.v_weight, self.o_weight):
            nn.init.normal_(weight, std=INIT_STD)

    def layer_weights(self) -> torch.Tensor:
        return self.layer_logits.softmax(0)

    def memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, T, d) -> keys, values (B, L * heads, T, dh)."""
        B, L, T, d = memory.shape
        k = torch.einsum("bltd,lde->blte", memory, self.k_weight) + self.k_bias[:, None]
        v = torch.einsum("bltd,lde->blte", memory, self.v_weight) + self.v_bias[:, None]
        split = (B, L, T, self.heads, d // self.heads)
        return (
            k.view(split).transpose(2, 3).reshape(B, L * self.heads, T, -1),
            v.view(split).transpose(2, 3).reshape(B, L * self.heads, T, -1),
        )

    def forward(self, h: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        B, Q, d = h.shape
        L, H = self.layers, self.heads
        q = self.q(h).view(B, Q, L * H, d // H).transpose(1, 2)  # (B, L*H, Q, dh)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, *kv, attn_mask=mask[:, None, None, :], dropout_p=p)
        w = self.layer_weights()
        out = out.view(B, L, H, Q, d // H).permute(0, 3, 1, 2, 4) * w[:, None, None]  # (B, Q, L, H, dh)
        return F.linear(out.reshape(B, Q, L * d), self.o_weight, w @ self.o_bias)


class _Resizable(nn.Module):
    """A module whose parameters/buffers take the shapes of a loaded state (their sizes are known only once a
    scheme is fitted, so a freshly built model holds empty ones until :meth:`load_state_dict` or a reset)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, tensor in chain(self._parameters.items(), self._buffers.items()):
            incoming = state_dict.get(prefix + name)
            if tensor is not None and incoming is not None and incoming.shape != tensor.shape:
                empty = tensor.new_empty(incoming.shape)
                if name in self._parameters:
                    self._parameters[name] = nn.Parameter(empty, requires_grad=tensor.requires_grad)
                else:
                    self._buffers[name] = empty
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _lookup(table: torch.Tensor, row: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``table`` rows of token ``ids``; tokens beyond ``row`` (added after the tables were set) get row 0 (zeros)."""
    if not row.numel():
        return table[torch.zeros_like(ids)]
    return table[torch.where(ids < row.numel(), row[ids.clamp(0, row.numel() - 1)], 0)]


class CodeProjection(_Resizable):
    """A learned ``Linear(width -> d_model)`` of code vectors; ``width`` is set by :meth:`reset` (0 until then)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_model, 0))
        self.bias = nn.Parameter(torch.zeros(d_model))

    @torch.no_grad()
    def reset(self, width: int, rms: float, generator: torch.Generator) -> None:
        """Weights ~ N(0, 1 / (width * rms^2)): code vectors of RMS ``rms`` map to unit-scale outputs."""
        std = 1.0 / (max(width, 1) ** 0.5 * max(rms, 1e-8))
        weight = torch.randn(self.weight.shape[0], width, generator=generator) * std
        self.weight = nn.Parameter(weight.to(self.bias.device, self.bias.dtype))
        self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class CodeTables(_Resizable):
    """What each identifier token means, for ``fusion=candidate``: a scheme's code vectors by token id.

    Two groups, each a table of vectors (row 0: zeros, for tokens outside the group) and a token -> row map:
    ``coarse`` (cart: the K-Means centroids of ``<a_c>``) and ``fine`` (cart: RQ-VAE codebook entries of
    ``<b{l}_k>``). :meth:`forward` gives, for every decoder input position, the sum of each group's vectors
    over the identifier tokens decoded up to it: the coarse token's centroid, and the partial RQ-VAE
    quantisation (the sum of the codebook entries of the levels decoded so far).
    """

    GROUPS = ("coarse", "fine")

    def __init__(self):
        super().__init__()
        for group in self.GROUPS:
            self.register_buffer(f"{group}_vectors", torch.zeros(1, 0))
            self.register_buffer(f"{group}_row", torch.zeros(0, dtype=torch.long))

    @property
    def ready(self) -> bool:
        return any(getattr(self, f"{g}_row").numel() for g in self.GROUPS)

    def widths(self) -> dict[str, int]:
        return {g: int(getattr(self, f"{g}_vectors").shape[1]) for g in self.GROUPS}

    @torch.no_grad()
    def set(self, vocab_size: int, groups: dict[str, dict[int, Sequence[float]]]) -> dict[str, float]:
        """Fill the tables from ``{group: {token id: vector}}`` (a group may be empty); returns each group's RMS."""
        rms = {}
        for group in self.GROUPS:
            vectors = groups.get(group) or {}
            ids = sorted(vectors)
            width = len(next(iter(vectors.values()))) if vectors else 0
            table = torch.zeros(len(ids) + 1, width)
            row = torch.zeros(vocab_size, dtype=torch.long)
            for i, token in enumerate(ids):
                table[i + 1] = torch.as_tensor(np.asarray(vectors[token], dtype=np.float32))
                row[token] = i + 1
            device = getattr(self, f"{group}_row").device
            setattr(self, f"{group}_vectors", table.to(device))
            setattr(self, f"{group}_row", row.to(device))
            rms[group] = float(table[1:].pow(2).mean().sqrt()) if ids and width else 1.0
        return rms

    def forward(self, ids: torch.Tensor, history: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` (N, t) decoder inputs; ``history`` (N, h): identifier tokens decoded before ``ids[:, 0]``.

        Returns ``(coarse (N, t, Dc), fine (N, t, Df))``: at position ``j`` the sums over ``history`` and
        ``ids[:, :j + 1]`` (BOS, padding and tokens outside a group add zeros).
        """
        out = []
        for group in self.GROUPS:
            table, row = getattr(self, f"{group}_vectors"), getattr(self, f"{group}_row")
            summed = _lookup(table, row, ids).cumsum(1)
            if history is not None and history.shape[1]:
                summed = summed + _lookup(table, row, history).sum(1, keepdim=True)
            out.append(summed)
        return out[0], out[1]


class CoarseFineFusion(nn.Module):
    """CART's fusion of the encoder layers into a decoder layer: coarse branch + fine branch (or one, or none).

    ``memory(m)`` takes the stacked layer memories ``(B, L, T, d)`` and precomputes what attention needs
    (once per query); ``forward(h, cache, mask)`` maps decoder states ``(B, Q, d)`` to ``(B, Q, d)``.
    ``mode="candidate"`` also takes ``candidate=(coarse (B, Q, Dc), fine (B, Q, Df))``, the code vectors of
    each position's decoded prefix (:class:`CodeTables`): each branch attends with the decoder state plus its
    group's projected vector, so what the partial identifier means asks the query memory.
    """

    def __init__(self, d_model: int, num_heads: int, num_memory_layers: int, mode: str = "coarse_fine",
                 dropout: float = 0.1):
        super().__init__()
        if mode not in FUSIONS:
            raise ConfigError(f"unknown model.fusion {mode!r}; choose one of {', '.join(FUSIONS)}")
        self.mode = mode
        self.num_memory_layers = num_memory_layers
        if mode in ("coarse_fine", "coarse", "candidate"):
            self.coarse_in = nn.Linear(num_memory_layers * d_model, d_model)
            self.coarse_attn = CrossAttention(d_model, num_heads, dropout)
            self.gate = nn.Linear(d_model, d_model)
        if mode in ("coarse_fine", "fine", "candidate"):
            self.fine = LayerwiseCrossAttention(d_model, num_heads, num_memory_layers, dropout)
        if mode == "candidate":
            self.coarse_code = CodeProjection(d_model)
            self.fine_code = CodeProjection(d_model)
        if mode == "last":
            self.last_attn = CrossAttention(d_model, num_heads, dropout)

    def memory(self, memory: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        B, L, T, d = memory.shape
        if L != self.num_memory_layers:
            raise ConfigError(f"the fusion expects {self.num_memory_layers} encoder layers, got {L}")
        cache = {}
        if hasattr(self, "coarse_attn"):
            stacked = memory.permute(0, 2, 1, 3).reshape(B, T, L * d)  # layers concatenated along features
            cache["coarse"] = self.coarse_attn.memory(self.coarse_in(stacked))
        if hasattr(self, "fine"):
            cache["fine"] = self.fine.memory(memory)
        if self.mode == "last":
            cache["last"] = self.last_attn.memory(memory[:, -1])
        return cache

    def forward(self, h: torch.Tensor, cache: dict, mask: torch.Tensor,
                candidate: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.mode == "last":
            return self.last_attn(h, cache["last"], mask)
        coarse_q = fine_q = h
        if self.mode == "candidate":
            if candidate is None:
                raise ConfigError("model.fusion=candidate needs the code vectors of the decoded prefix; give the "
                                  "backbone the scheme's code vectors first (set_code_vectors(scheme.code_vectors()))")
            coarse_q = h + self.coarse_code(candidate[0])
            fine_q = h + self.fine_code(candidate[1])
        out = 0
        if "coarse" in cache:
            out = torch.sigmoid(self.gate(coarse_q)) * self.coarse_attn(coarse_q, cache["coarse"], mask)
        if "fine" in cache:
            out = out + self.fine(fine_q, cache["fine"], mask)
        return out

    def reset_codes(self, widths: dict[str, int], rms: dict[str, float], generator: torch.Generator) -> None:
        """``candidate``: fresh projections of code vectors of these widths (called when the tables are set)."""
        self.coarse_code.reset(widths["coarse"], rms["coarse"], generator)
        self.fine_code.reset(widths["fine"], rms["fine"], generator)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with an optional KV cache (one new position per decoding step)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, h: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        q, k, v = (_heads(x, self.heads) for x in self.qkv(h).chunk(3, dim=-1))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        # with a cache the new positions are the last ones: causal within them, everything before is visible
        causal = h.shape[1] > 1
        if causal and past is not None:
            raise ValueError("the KV-cached path decodes one position at a time")
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
        return self.o(_merge(out)), (k, v)


def _grouped(candidate, group: int) -> dict:
    """The fusion's ``candidate`` argument with rows laid out like the states: ``(N, t, D) -> (N / group, group * t, D)``."""
    if candidate is None:
        return {}
    return {"candidate": tuple(x.reshape(x.shape[0] // group, group * x.shape[1], x.shape[2]) for x in candidate)}


class DecoderLayer(nn.Module):
    """Pre-norm: causal self-attention, coarse-to-fine fusion, GELU FFN; each a residual branch with dropout."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, num_memory_layers: int, fusion: str,
                 dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn = SelfAttention(d_model, num_heads, dropout)
        self.fusion = CoarseFineFusion(d_model, num_heads, num_memory_layers, fusion, dropout)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, h, cache, mask, group: int, past=None, candidate=None):
        """``h`` (N, t, d) with N = B * group rows, item-major (row ``b * group + g``); ``cache``/``mask`` per item;
        ``candidate``: the rows' prefix code vectors ``((N, t, Dc), (N, t, Df))`` (``fusion=candidate``)."""
        attended, present = self.self_attn(self.norm1(h), past)
        h = h + self.drop(attended)
        N, t, d = h.shape
        # the `group` rows of an item are query positions of its memory: no copy of the memory per beam
        fused = self.fusion(self.norm2(h).reshape(N // group, group * t, d), cache, mask,
                            **_grouped(candidate, group)).reshape(N, t, d)
        h = h + self.drop(fused)
        h = h + self.drop(self.ffn(self.norm3(h)))
        return h, present


class CartNetwork(nn.Module):
    """Everything that trains: the per-layer memory projections, the fusion decoder, embeddings and head."""

    def __init__(self, vocab_size: int, *, text_widths: Sequence[int], image_widths: Sequence[int],
                 image_tokens: int, d_model: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float,
                 fusion: str, max_id_tokens: int, feature_dim: int = 0):
        super().__init__()
        if len(text_widths) != len(image_widths):
            raise ConfigError("the text and image towers must give the same number of layers")
        self.num_memory_layers = len(text_widths)
        self.text_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(w), nn.Linear(w, d_model)) for w in text_widths)
        self.image_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(w), nn.Linear(w, d_model)) for w in image_widths)
        self.image_widths = [int(w) for w in image_widths]
        self.image_pos = nn.Parameter(torch.zeros(image_tokens, d_model))  # cells + the pooled token
        # precomputed item features (audio/video embeddings): one memory token per layer, its own projection each
        self.feature_proj = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, d_model)) for _ in text_widths
        ) if feature_dim else None
        self.memory_drop = nn.Dropout(dropout)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_id_tokens + 1, d_model)  # BOS + up to max_id_tokens
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, num_heads, ffn_dim, self.num_memory_layers, fusion, dropout)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.codes = CodeTables() if fusion == "candidate" else None
        self.apply(self._init)
        nn.init.normal_(self.image_pos, std=INIT_STD)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # -- memory --------------------------------------------------------------------------------
    def text_memory(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """L tensors (N, T, 384) -> (N, L, T, d)."""
        return torch.stack([proj(h) for proj, h in zip(self.text_proj, hidden_states)], dim=1)

    def image_memory(self, features: torch.Tensor) -> torch.Tensor:
        """(N, cells + 1, sum of stage widths) cached features -> (N, L, cells + 1, d)."""
        parts = features.float().split(self.image_widths, dim=-1)
        return torch.stack([proj(x) + self.image_pos for proj, x in zip(self.image_proj, parts)], dim=1)

    def feature_memory(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, D) precomputed item features -> (N, L, 1, d)."""
        if self.feature_proj is None:
            raise ConfigError("this cart model was built without feature_dim; build it with create(corpus) of feature items")
        return torch.stack([proj(vectors.float()) for proj in self.feature_proj], dim=1)[:, :, None]

    def memory_cache(self, memory: torch.Tensor) -> list[dict]:
        """Per decoder layer, the fusion's keys/values of the memory (computed once per query)."""
        memory = self.memory_drop(memory)
        return [layer.fusion.memory(memory) for layer in self.layers]

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, ids: torch.Tensor, caches: list[dict], mask: torch.Tensor, *, group: int = 1, start: int = 0,
               past: list | None = None, project: bool = True, history: torch.Tensor | None = None):
        """Logits (N, t, V) of decoder inputs ``ids`` (N, t) at positions ``start..``; N = B * group, item-major.

        ``past`` (one (k, v) per layer) continues a KV cache; the updated cache is returned with the logits.
        ``project=False`` returns the final hidden states (N, t, d) instead, before the output head.
        ``history`` (N, h): the identifier tokens decoded before ``ids`` (``fusion=candidate`` fuses their codes).
        """
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.pos(positions)
        candidate = candidate_codes(self, ids, history)
        present = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, caches[i], mask, group, None if past is None else past[i], candidate)
            present.append(kv)
        h = self.norm(h)
        return (self.head(h) if project else h), present

    # -- the candidate's code vectors (fusion=candidate) --------------------------------------------
    def set_code_vectors(self, groups: dict[str, dict[int, Sequence[float]]], seed: int = 0) -> None:
        """Give ``fusion=candidate`` its code vectors ``{"coarse"|"fine": {token id: vector}}`` and fresh, seeded
        projections of their widths in every fusion module."""
        set_code_vectors(self, groups, seed)

    # -- vocabulary ----------------------------------------------------------------------------
    @torch.no_grad()
    def resize_vocab(self, size: int, generator: torch.Generator) -> None:
        """Grow embeddings and head to ``size`` rows: the mean of the old rows + small seeded noise."""
        old = self.embed.weight.shape[0]
        if size <= old:
            return
        for name in ("embed", "head"):
            layer = getattr(self, name)
            weight = layer.weight
            mean, std = weight.mean(0, keepdim=True), weight.std()
            noise = torch.randn(size - old, weight.shape[1], generator=generator) * (NEW_ROW_NOISE * std.item())
            grown = torch.cat([weight, mean + noise.to(weight.device, weight.dtype)])
            if name == "embed":
                new = nn.Embedding(size, weight.shape[1], device=weight.device, dtype=weight.dtype)
            else:
                new = nn.Linear(weight.shape[1], size, bias=False, device=weight.device, dtype=weight.dtype)
            new.weight.copy_(grown)
            new.weight.requires_grad_(weight.requires_grad)
            setattr(self, name, new)


# -- fusion=candidate, shared by every network that has ``codes`` and fusion modules ----------------------------
def candidate_codes(network: nn.Module, ids: torch.Tensor, history: torch.Tensor | None):
    """The prefix code vectors of every position of ``ids`` (None unless the network fuses with the candidate)."""
    codes = getattr(network, "codes", None)
    if codes is None:
        return None
    if not codes.ready:
        raise ConfigError("model.fusion=candidate needs the scheme's code vectors before training or search: "
                          "call backbone.set_code_vectors(scheme.code_vectors()) (gcr fit does); schemes "
                          "without code vectors cannot use it, choose model.fusion=coarse_fine")
    return codes(ids, history)


def set_code_vectors(network: nn.Module, groups: dict[str, dict[int, Sequence[float]]], seed: int) -> None:
    if getattr(network, "codes", None) is None:
        raise ConfigError("this model does not fuse with the candidate (model.fusion is not 'candidate')")
    bad = sorted(set(groups) - set(CodeTables.GROUPS))
    if bad:
        raise ConfigError(f"unknown code vector group(s) {bad}; expected {', '.join(CodeTables.GROUPS)}")
    rms = network.codes.set(network.embed.weight.shape[0], groups)
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + 17)
    for module in network.modules():
        if isinstance(module, CoarseFineFusion) and module.mode == "candidate":
            module.reset_codes(network.codes.widths(), rms, generator)

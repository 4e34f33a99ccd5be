"""CART's compact identifier decoder as a network: attention blocks, coarse-to-fine fusion, decoder layers.

:class:`CartNetwork` projects every layer of a frozen encoder into one memory and decodes identifier tokens
from it; :class:`CoarseFineFusion` is CART's two-branch fusion (``coarse``, ``fine``, ``coarse_fine``, or
``last``: plain cross-attention). The backbone adapters that feed it (:mod:`gcr.models.cart`, ``cart``;
:mod:`gcr.models.compact`, ``compact``) own tokenizers, encoders, losses and search.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from gcr.errors import ConfigError

FUSIONS = ("coarse_fine", "coarse", "fine", "last")
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


class CoarseFineFusion(nn.Module):
    """CART's fusion of the encoder layers into a decoder layer: coarse branch + fine branch (or one, or none).

    ``memory(m)`` takes the stacked layer memories ``(B, L, T, d)`` and precomputes what attention needs
    (once per query); ``forward(h, cache, mask)`` maps decoder states ``(B, Q, d)`` to ``(B, Q, d)``.
    """

    def __init__(self, d_model: int, num_heads: int, num_memory_layers: int, mode: str = "coarse_fine",
                 dropout: float = 0.1):
        super().__init__()
        if mode not in FUSIONS:
            raise ConfigError(f"unknown model.fusion {mode!r}; choose one of {', '.join(FUSIONS)}")
        self.mode = mode
        self.num_memory_layers = num_memory_layers
        if mode in ("coarse_fine", "coarse"):
            self.coarse_in = nn.Linear(num_memory_layers * d_model, d_model)
            self.coarse_attn = CrossAttention(d_model, num_heads, dropout)
            self.gate = nn.Linear(d_model, d_model)
        if mode in ("coarse_fine", "fine"):
            self.fine = LayerwiseCrossAttention(d_model, num_heads, num_memory_layers, dropout)
        if mode == "last":
            self.last_attn = CrossAttention(d_model, num_heads, dropout)

    def memory(self, memory: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        B, L, T, d = memory.shape
        if L != self.num_memory_layers:
            raise ConfigError(f"the fusion expects {self.num_memory_layers} encoder layers, got {L}")
        cache = {}
        if self.mode in ("coarse_fine", "coarse"):
            stacked = memory.permute(0, 2, 1, 3).reshape(B, T, L * d)  # layers concatenated along features
            cache["coarse"] = self.coarse_attn.memory(self.coarse_in(stacked))
        if self.mode in ("coarse_fine", "fine"):
            cache["fine"] = self.fine.memory(memory)
        if self.mode == "last":
            cache["last"] = self.last_attn.memory(memory[:, -1])
        return cache

    def forward(self, h: torch.Tensor, cache: dict, mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "last":
            return self.last_attn(h, cache["last"], mask)
        out = 0
        if "coarse" in cache:
            out = torch.sigmoid(self.gate(h)) * self.coarse_attn(h, cache["coarse"], mask)
        if "fine" in cache:
            out = out + self.fine(h, cache["fine"], mask)
        return out


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

    def forward(self, h, cache, mask, group: int, past=None):
        """``h`` (N, t, d) with N = B * group rows, item-major (row ``b * group + g``); ``cache``/``mask`` per item."""
        attended, present = self.self_attn(self.norm1(h), past)
        h = h + self.drop(attended)
        N, t, d = h.shape
        # the `group` rows of an item are query positions of its memory: no copy of the memory per beam
        fused = self.fusion(self.norm2(h).reshape(N // group, group * t, d), cache, mask).reshape(N, t, d)
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
               past: list | None = None, project: bool = True):
        """Logits (N, t, V) of decoder inputs ``ids`` (N, t) at positions ``start..``; N = B * group, item-major.

        ``past`` (one (k, v) per layer) continues a KV cache; the updated cache is returned with the logits.
        ``project=False`` returns the final hidden states (N, t, d) instead, before the output head.
        """
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.pos(positions)
        present = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, caches[i], mask, group, None if past is None else past[i])
            present.append(kv)
        h = self.norm(h)
        return (self.head(h) if project else h), present

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

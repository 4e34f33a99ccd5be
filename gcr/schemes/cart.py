"""CART coarse-to-fine identifiers: a K-Means coarse token, RQ-VAE fine tokens and a unique token.

CART (Fang et al., "A Generative Cross-Modal Retrieval Framework with Coarse-To-Fine Semantic
Modeling") discretises each target's feature vector in two stages:

1. **Coarse.** K-Means clusters the features into ``coarse_k`` groups; the cluster is the first token
   (``<a_3>``). Above ``minibatch_above`` targets, MiniBatchKMeans is used (as in ``hkmeans``).
2. **Fine.** The residual (feature minus its coarse centroid) is scaled to unit RMS per coordinate and
   quantised by an RQ-VAE: an MLP encoder (dim -> hidden_dim -> latent_dim), a
   ``vector_quantize_pytorch.ResidualVQ`` with ``levels`` codebooks of ``codebook_size`` codes
   (K-Means-initialised, EMA-updated, dead codes replaced) and an MLP decoder back to ``dim``. Trained
   with Adam on MSE reconstruction + the RVQ commitment loss. Level ``l`` code ``k`` is ``<b{l}_{k}>``.
3. **Unique.** ``<u_i>`` numbers the targets that share the same coarse + fine prefix (0, 1, ...), so
   every identifier is unique.

An identifier looks like ``<a_3><b0_17><b1_5><b2_25><u_0>``. Every token is new to the tokenizer.
Ablations: ``coarse=False`` ("without K-Means": residual = feature - global mean, no coarse token) and
``fine=False`` ("without RQ-VAE": coarse token + unique token only).

Training is seeded and runs inside :func:`torch.random.fork_rng`, so the global RNG state of the caller
is untouched, and the same seed gives the same identifiers on the same machine.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import ResidualVQ

from gcr.data.corpus import Target
from gcr.errors import ConfigError
from gcr.schemes.base import IdentifierScheme
from gcr.schemes.helpers.clustering import kmeans, nearest_centroid
from gcr.schemes.helpers.options import SchemeOptions, SchemeRequirements, option
from gcr.schemes.helpers.suffixes import PrefixCounter

log = logging.getLogger(__name__)
Prefix = tuple[int, ...]
STATE_VERSION = 1
#: options that fix the shape of the fitted state; a state fitted under other values cannot be loaded
_STRUCTURAL = ("coarse", "fine", "levels", "codebook_size", "latent_dim", "hidden_dim")
#: a level that uses fewer than this share of its codes is reported as collapsed
COLLAPSE_SHARE = 0.10
_CHUNK = 8192  # rows per forward pass when encoding after training
_SMALL_WORK = 1 << 20  # rows x width below which torch runs on one CPU thread


class CartScheme(IdentifierScheme):
    """CART coarse-to-fine ID: K-Means coarse token + RQ-VAE fine tokens + unique token."""

    name = "cart"
    requires = SchemeRequirements(features=True, code_vectors=True)

    @dataclass
    class Options(SchemeOptions):
        coarse_k: int = option(16, ge=2, doc="clusters for the coarse token")
        levels: int = option(3, ge=1, doc="RQ-VAE levels (fine tokens per identifier)")
        codebook_size: int = option(32, ge=2, doc="codes per RQ-VAE level")
        latent_dim: int = option(32, ge=1, doc="RQ-VAE latent dimensions")
        hidden_dim: int = option(128, ge=1, doc="RQ-VAE hidden units")
        steps: int = option(1500, ge=1, doc="RQ-VAE training steps")
        batch_size: int = option(256, ge=1, doc="RQ-VAE minibatch size")
        lr: float = option(1e-3, gt=0, doc="Adam learning rate")
        commitment_weight: float = option(0.25, ge=0, doc="RVQ commitment loss weight")
        minibatch_above: int = option(20000, ge=1, doc="MiniBatchKMeans above this many targets")
        coarse: bool = True
        fine: bool = True
        device: str = "cpu"

        def check(self) -> None:
            if not self.coarse and not self.fine:
                raise ConfigError(
                    "cart with coarse=false and fine=false leaves only the unique counter; "
                    "keep one of them true (or use scheme=atomic for one token per target)"
                )
            self.device = _device(self.device)

    def __init__(self, seed: int = 0, **options: Any):
        super().__init__(seed=seed, **options)
        self._centroids: np.ndarray | None = None  # (num_coarse, dim); the global mean when coarse=False
        self._scale = 1.0  # residuals are divided by this before the RQ-VAE
        self._model: RQVAE | None = None  # once fitted (fine=True)
        self._counts = PrefixCounter()  # next free unique number per prefix
        self._stats: dict[str, float] = {}

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        x = self._check_features(targets, features)
        if not len(x):
            raise ConfigError("cart got no targets to fit; the corpus split is empty")
        self._counts, self._model = PrefixCounter(), None
        if self.coarse:
            coarse, self._centroids = self._cluster(x)
        else:
            coarse, self._centroids = np.zeros(len(x), dtype=np.int64), x.mean(0, keepdims=True)
        residual = x - self._centroids[coarse]
        rms = float(np.sqrt(np.mean(residual.astype(np.float64) ** 2)))
        spread = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        # residuals at float rounding level (duplicate features) are not scaled up into noise
        self._scale = rms if rms > 1e-5 * spread and rms > 1e-12 else 1.0
        codes = np.zeros((len(x), 0), dtype=np.int64)
        recon_mse = 0.0
        if self.fine:
            self._model = self._train(residual / self._scale)
            codes, recon_mse = self._encode(residual / self._scale)
        prefixes = self._prefixes(coarse, codes)
        ids = [self._identifier(p, self._next_unique(p)) for p in prefixes]
        self._stats = self._compute_stats(coarse, codes, prefixes, recon_mse)
        log.info("cart: %s", ", ".join(f"{k}={v:.3g}" for k, v in self._stats.items()))
        return ids

    def _cluster(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return kmeans(x, self.coarse_k, self.seed, self.minibatch_above)

    def _train(self, r: np.ndarray) -> RQVAE:
        with (
            _seeded(self.seed, self.device),
            _torch_threads(self.device, self.batch_size * max(r.shape[1], self.hidden_dim)),
        ):
            model = self._new_model(r.shape[1]).to(self.device)
            data = torch.as_tensor(r, dtype=torch.float32, device=self.device)
            gen = torch.Generator().manual_seed(self.seed)
            batch = min(self.batch_size, len(r))
            # K-Means-initialise every level's codebook on a large sample before the first step
            init = torch.randperm(len(r), generator=gen)[: max(batch, 4096)].to(self.device)
            model.train()
            with torch.no_grad():
                model(data[init])
            opt = torch.optim.Adam(model.parameters(), lr=self.lr)
            order, pos = torch.randperm(len(r), generator=gen), 0
            for _ in range(self.steps):
                if pos + batch > len(r):
                    order, pos = torch.randperm(len(r), generator=gen), 0
                xb = data[order[pos : pos + batch].to(self.device)]
                pos += batch
                recon, _, commit = model(xb)
                loss = F.mse_loss(recon, xb) + commit
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
        return model

    def _new_model(self, dim: int) -> RQVAE:
        return RQVAE(
            dim, self.hidden_dim, self.latent_dim, self.levels, self.codebook_size, self.commitment_weight
        )

    def _encode(self, r: np.ndarray) -> tuple[np.ndarray, float]:
        """RQ-VAE codes ``(n, levels)`` of normalised residuals, and their reconstruction MSE."""
        model = self._model
        model.eval()
        codes, sq = [], 0.0
        with (
            torch.no_grad(),
            _torch_threads(self.device, min(len(r), _CHUNK) * max(r.shape[1], self.hidden_dim)),
        ):
            for start in range(0, len(r), _CHUNK):
                xb = torch.as_tensor(r[start : start + _CHUNK], dtype=torch.float32, device=self.device)
                recon, idx, _ = model(xb)
                codes.append(idx.cpu().numpy().astype(np.int64))
                sq += float(((recon - xb) ** 2).sum())
        mse = sq / max(1, r.size)
        return np.concatenate(codes) if codes else np.zeros((0, self.levels), dtype=np.int64), mse

    # -- incremental --------------------------------------------------------------------------
    def assign(self, targets: Sequence[Target], features: np.ndarray | None = None) -> list[str]:
        if self._centroids is None or (self.fine and self._model is None):
            raise ConfigError(
                "cart.assign needs a fitted scheme; call fit (or load_state_dict from the index) first"
            )
        x = self._check_features(targets, features)
        if x.shape[1] != self._centroids.shape[1]:
            raise ConfigError(
                f"cart was fitted on {self._centroids.shape[1]}-d features but got {x.shape[1]}-d ones; "
                "use the same features.name as when the index was built"
            )
        coarse = nearest_centroid(x, self._centroids)
        codes = np.zeros((len(x), 0), dtype=np.int64)
        if self.fine:
            codes, _ = self._encode((x - self._centroids[coarse]) / self._scale)
        return [self._identifier(p, self._next_unique(p)) for p in self._prefixes(coarse, codes)]

    # -- identifiers --------------------------------------------------------------------------
    def _prefixes(self, coarse: np.ndarray, codes: np.ndarray) -> list[Prefix]:
        cols = ([coarse[:, None]] if self.coarse else []) + ([codes] if self.fine else [])
        return [tuple(int(v) for v in row) for row in np.concatenate(cols, axis=1)]

    def _next_unique(self, prefix: Prefix) -> int:
        return self._counts.next(prefix)

    def _identifier(self, prefix: Prefix, unique: int) -> str:
        parts = list(prefix)
        head = f"<a_{parts.pop(0)}>" if self.coarse else ""
        return head + "".join(f"<b{lvl}_{c}>" for lvl, c in enumerate(parts)) + f"<u_{unique}>"

    def max_unique(self) -> int:
        """The most targets that share one coarse + fine prefix (= the number of unique tokens)."""
        return self._counts.most()

    def _num_coarse(self) -> int:
        if not self.coarse:
            return 0
        return len(self._centroids) if self._centroids is not None else self.coarse_k

    def new_tokens(self) -> list[str]:
        coarse = [f"<a_{c}>" for c in range(self._num_coarse())]
        fine = (
            [f"<b{lvl}_{k}>" for lvl in range(self.levels) for k in range(self.codebook_size)]
            if self.fine
            else []
        )
        return coarse + fine + [f"<u_{i}>" for i in range(self.max_unique())]

    def token_vectors(self) -> dict[str, dict[str, np.ndarray]]:
        """An initial vector for every token of :meth:`new_tokens`, grouped by the space it lives in.

        - ``"coarse"``: ``<a_c>`` -> K-Means centroid ``c``, in the target **feature space** (``dim``).
        - ``"fine"``: ``<b{l}_{k}>`` -> code ``k`` of RQ-VAE level ``l``, in the RQ-VAE **latent space**
          (``latent_dim``; the space of residuals scaled to unit RMS and encoded).
        - ``"unique"``: ``<u_i>`` -> a tiny deterministic vector (N(0, 1e-3), seeded by ``seed`` and ``i``)
          of ``latent_dim`` values: the counter carries no semantics, so it starts near zero.

        Each group has its own dimension; a backbone maps each group with its own projection. Groups
        of an ablation that has no such tokens are empty dicts.
        """
        if self._centroids is None:
            raise ConfigError("cart.token_vectors needs a fitted scheme; call fit (or load_state_dict) first")
        coarse = {f"<a_{c}>": self._centroids[c].copy() for c in range(self._num_coarse())}
        fine: dict[str, np.ndarray] = {}
        if self.fine:
            books = self.codebooks()
            fine = {
                f"<b{lvl}_{k}>": books[lvl, k]
                for lvl in range(self.levels)
                for k in range(self.codebook_size)
            }
        unique = {
            f"<u_{i}>": (
                np.random.default_rng([self.seed, i]).standard_normal(self.latent_dim) * 1e-3
            ).astype(np.float32)
            for i in range(self.max_unique())
        }
        return {"coarse": coarse, "fine": fine, "unique": unique}

    def code_vectors(self) -> dict[str, list[dict[str, np.ndarray]]]:
        """What each code token means, by level, for a decoder that fuses with the candidate (``model.fusion=candidate``).

        - ``"coarse"``: one level, ``<a_c>`` -> K-Means centroid ``c`` (feature space); empty when coarse=false;
        - ``"fine"``: one level per RQ-VAE level ``l``, ``<b{l}_k>`` -> codebook entry ``k`` of level ``l`` (the
          latent space; summed along a prefix they are the prefix's RQ-VAE quantisation); empty when fine=false.

        The unique tokens carry no meaning and have no vector. Same values as :meth:`token_vectors`' groups.
        """
        if self._centroids is None:
            raise ConfigError("cart.code_vectors needs a fitted scheme; call fit (or load_state_dict) first")
        coarse = [{f"<a_{c}>": self._centroids[c].astype(np.float32) for c in range(self._num_coarse())}]
        fine: list[dict[str, np.ndarray]] = []
        if self.fine:
            books = self.codebooks()
            fine = [{f"<b{lvl}_{k}>": books[lvl, k] for k in range(self.codebook_size)} for lvl in range(self.levels)]
        return {"coarse": coarse if self.coarse else [], "fine": fine}

    def codebooks(self) -> np.ndarray:
        """The RQ-VAE codebooks, ``(levels, codebook_size, latent_dim)`` float32 (fitted, fine=True)."""
        if self._model is None:
            raise ConfigError("cart has no RQ-VAE codebooks: fit it first (and keep fine=true)")
        return self._model.rvq.codebooks.detach().cpu().numpy().astype(np.float32).copy()

    # -- statistics ---------------------------------------------------------------------------
    def _compute_stats(
        self, coarse: np.ndarray, codes: np.ndarray, prefixes: list[Prefix], mse: float
    ) -> dict[str, float]:
        n = len(prefixes)
        stats: dict[str, float] = {"num_targets": float(n)}
        levels: list[tuple[str, np.ndarray, int]] = []
        if self.coarse:
            levels.append(("coarse", coarse, len(self._centroids)))
        if self.fine:
            levels += [(f"fine{lvl}", codes[:, lvl], self.codebook_size) for lvl in range(self.levels)]
        collapsed = []
        for name, col, size in levels:
            used, perplexity = _usage(col, size)
            stats[f"{name}_used_share"], stats[f"{name}_perplexity"] = used, perplexity
            # a level cannot use more codes than there are targets
            if used < COLLAPSE_SHARE and used * size < min(n, size):
                collapsed.append(f"{name} uses {used:.1%} of {size} codes")
        if collapsed:
            log.warning(
                "cart: codebook collapse (%s); identifiers then rely on the unique token. Try more steps, "
                "a smaller codebook_size or fewer levels",
                "; ".join(collapsed),
            )
        counts = Counter(prefixes)
        stats["collision_rate_before_unique"] = sum(c for c in counts.values() if c > 1) / n if n else 0.0
        if self.fine:
            stats["reconstruction_mse"] = mse
        stats["residual_scale"] = self._scale
        return stats

    def stats(self) -> dict[str, float]:
        """Codebook statistics of the last fit, and the current ``max_unique``.

        Keys: ``coarse_used_share`` / ``coarse_perplexity`` (absent when coarse=false) and ``fine{l}_used_share`` /
        ``fine{l}_perplexity`` per level (share of the level's codes used by the fitted targets, and
        exp of the entropy of code usage); ``collision_rate_before_unique`` (share of targets whose
        coarse + fine prefix is shared with another target); ``reconstruction_mse`` (RQ-VAE, on the
        residuals scaled to unit RMS, so 1.0 is no better than predicting zero; absent when fine=false);
        ``residual_scale``; ``num_targets``; ``max_unique``.
        """
        if not self._stats:
            raise ConfigError("cart.stats needs a fitted scheme; call fit first")
        return {**self._stats, "max_unique": float(self.max_unique())}

    # -- config and state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable fitted state: centroids, residual scale, RQ-VAE weights, unique counters."""
        weights = None
        if self._model is not None:
            weights = {
                k: {
                    "shape": list(v.shape),
                    "dtype": str(v.dtype).removeprefix("torch."),
                    "values": v.detach().cpu().flatten().tolist(),
                }
                for k, v in self._model.state_dict().items()
            }
        return {
            "version": STATE_VERSION,
            "structure": {k: self.config()[k] for k in _STRUCTURAL},
            "centroids": None if self._centroids is None else self._centroids.tolist(),
            "residual_scale": self._scale,
            "rqvae": weights,
            "unique_counts": self._counts.int_state(),
            "stats": dict(self._stats),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or state.get("centroids") is None:
            raise ConfigError("cart state is empty: the scheme was never fitted; rebuild the index")
        saved = state.get("structure", {})
        mine = {k: self.config()[k] for k in _STRUCTURAL}
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ConfigError(
                "cart state was fitted with other options: "
                + ", ".join(f"{k}={a!r} (this scheme: {b!r})" for k, (a, b) in diff.items())
                + "; build the scheme with the index's scheme_config"
            )
        self._centroids = np.asarray(state["centroids"], dtype=np.float32)
        self._scale = float(state["residual_scale"])
        self._counts = PrefixCounter.from_int_state(state.get("unique_counts", {}))
        self._stats = {k: float(v) for k, v in state.get("stats", {}).items()}
        self._model = None
        if self.fine:
            weights = state.get("rqvae")
            if not weights:
                raise ConfigError("cart state has no RQ-VAE weights although fine=true; rebuild the index")
            with _seeded(self.seed, "cpu"):  # building the modules draws random init: keep the global RNG
                model = self._new_model(self._centroids.shape[1])
            tensors = {
                k: torch.tensor(w["values"], dtype=getattr(torch, w["dtype"])).reshape(w["shape"])
                for k, w in weights.items()
            }
            model.load_state_dict(tensors)
            self._model = model.to(self.device).eval()

    # -- validation ---------------------------------------------------------------------------
    def _check_features(self, targets: Sequence[Target], features: np.ndarray | None) -> np.ndarray:
        x = self._require_features(targets, features)
        if not np.isfinite(x).all():
            raise ConfigError(
                "cart got NaN or infinite target features; check the feature encoder (features.name)"
            )
        return x


# ----------------------------------------------------------------------------- helpers


def _device(device: Any) -> str:
    try:
        dev = torch.device(str(device))
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"cart device {device!r} is not a torch device ({exc}); use scheme.device=cpu or cuda"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"cart device {device!r} asks for CUDA, which is not available; use scheme.device=cpu"
        )
    return str(dev)


def _usage(codes: np.ndarray, size: int) -> tuple[float, float]:
    """Share of the ``size`` codes used, and exp(entropy) of the usage distribution."""
    if not len(codes):
        return 0.0, 0.0
    counts = np.bincount(codes, minlength=size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float((counts > 0).sum() / size), float(np.exp(-(p * np.log(p)).sum()))


@contextmanager
def _torch_threads(device: str, work: int):
    """One torch thread for small CPU passes (``work`` ~ rows x width): thread start-up and contention on a
    shared CPU dominate them (measured: 18 ms/step with one thread, 500 ms with two on a busy 2-core box)."""
    if torch.device(device).type != "cpu" or work >= _SMALL_WORK:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _seeded(seed: int, device: str):
    """Seed torch inside a forked RNG: the caller's global RNG state is restored afterwards."""
    dev = torch.device(device)
    devices = [torch.cuda.current_device() if dev.index is None else dev.index] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class RQVAE(nn.Module):
    """RQ-VAE: MLP encoder (dim -> hidden -> latent) -> ResidualVQ -> MLP decoder (latent -> hidden -> dim)."""

    def __init__(
        self, dim: int, hidden: int, latent: int, levels: int, codebook_size: int, commitment_weight: float
    ):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, latent))
        self.rvq = ResidualVQ(
            dim=latent,
            num_quantizers=levels,
            codebook_size=codebook_size,
            kmeans_init=True,
            kmeans_iters=10,
            threshold_ema_dead_code=2,
            commitment_weight=commitment_weight,
        )
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction, codes ``(batch, levels)`` and the summed commitment loss."""
        quantized, indices, commit = self.rvq(self.encoder(x))
        return self.decoder(quantized), indices, commit.sum()

"""An optional fused CPU kernel for trie masking and advancing, built at first use with the system C compiler.

Why a kernel: on a CPU, masking ``(rows, vocab)`` scores costs at least one streaming write of the matrix (a
``fill_(-inf)``). Eager torch reaches that floor only when a step makes no other pass over the matrix, and its
per-element indexing ops (``gather``/``scatter_``/``masked_fill_``) cost 5-20 ns an element here, so a step whose
beams sit at wide nodes costs several fills. The kernel handles one row at a time while it is in cache: it reads
the row's few allowed scores, fills the row with ``-inf`` and writes them back (or, at a node that allows more than
half the vocabulary, writes ``-inf`` only at the forbidden tokens). One call per step instead of dozens of ops,
which also keeps a step cheap on a busy machine.

The C source is plain C99 (no torch headers), so building it takes well under a second; the shared library is
cached under ``$GCR_CACHE_DIR`` (default ``~/.cache/gcr``) keyed by the source's hash, written atomically. When
no compiler is found, or ``GCR_NO_KERNEL=1``, :func:`library` returns ``None`` and the trie uses its eager torch
path (same results, slower). Nothing here runs on accelerators.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["library", "available", "mask_rows", "advance"]

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <pthread.h>

static inline int64_t load(const void* p, int bytes, int64_t i) {
    return bytes == 2 ? (int64_t)((const int16_t*)p)[i]
         : bytes == 4 ? (int64_t)((const int32_t*)p)[i] : ((const int64_t*)p)[i];
}

typedef struct {
    float* scores; int64_t row_stride, cols, vocab;
    const int64_t* start; const int64_t* length; const uint8_t* mode;
    const void* keep_tokens; const void* forbid_tokens; int tok_bytes;
    const uint8_t* dense_rows; int64_t dense_stride;
    int64_t r0, r1;
} mask_job;

/* Row r, by mode[r]:
   0 -> keeps only keep_tokens[start : start + length] (read them, fill the row with -inf, write them back);
   1 -> forbids forbid_tokens[start : start + length] (written -inf, nothing else read);
   2 -> forbids where dense_rows[start * dense_stride + c] is set (one vectorised select over the row).
   Columns >= vocab are always forbidden. */
static void fill_neg(float* restrict p, int64_t n) {
    const float neg = -INFINITY;
    for (int64_t c = 0; c < n; ++c) p[c] = neg;
}

/* restrict: the row never aliases the mask or the kept values, so the loops vectorise. */
static void select_row(float* restrict row, const uint8_t* restrict forbidden, int64_t n) {
    const float neg = -INFINITY;
    for (int64_t c = 0; c < n; ++c) row[c] = forbidden[c] ? neg : row[c];
}

static void* mask_range(void* arg) {
    const mask_job* j = (const mask_job*)arg;
    const int64_t cols = j->cols, vocab = j->vocab, stride = j->row_stride, tok_bytes = j->tok_bytes;
    const void* keep = j->keep_tokens;
    const void* forbid = j->forbid_tokens;
    float* restrict kept = (float*)malloc(sizeof(float) * (size_t)(vocab > 0 ? vocab : 1));
    for (int64_t r = j->r0; r < j->r1; ++r) {
        float* restrict row = j->scores + r * stride;
        const int64_t s = j->start[r], n = j->length[r];
        const uint8_t mode = j->mode[r];
        if (mode == 2) {
            select_row(row, j->dense_rows + s * j->dense_stride, vocab);
            fill_neg(row + vocab, cols - vocab);
        } else if (mode == 1) {
            for (int64_t i = 0; i < n; ++i) row[load(forbid, tok_bytes, s + i)] = -INFINITY;
            fill_neg(row + vocab, cols - vocab);
        } else {
            for (int64_t i = 0; i < n; ++i) kept[i] = row[load(keep, tok_bytes, s + i)];
            fill_neg(row, cols);
            for (int64_t i = 0; i < n; ++i) row[load(keep, tok_bytes, s + i)] = kept[i];
        }
    }
    free(kept);
    return 0;
}

void gcr_mask_rows(float* scores, int64_t rows, int64_t row_stride, int64_t cols, int64_t vocab,
                   const int64_t* start, const int64_t* length, const uint8_t* mode,
                   const void* keep_tokens, const void* forbid_tokens, int tok_bytes,
                   const uint8_t* dense_rows, int64_t dense_stride, int threads) {
    if (threads < 1) threads = 1;
    if (threads > 16) threads = 16;
    if (rows < 64 * threads) threads = 1;
    mask_job jobs[16];
    pthread_t ids[16];
    int started[16] = {0};
    for (int t = 0; t < threads; ++t) {
        mask_job j = {scores, row_stride, cols, vocab, start, length, mode, keep_tokens, forbid_tokens,
                      tok_bytes, dense_rows, dense_stride, rows * t / threads, rows * (t + 1) / threads};
        jobs[t] = j;
    }
    for (int t = 1; t < threads; ++t) started[t] = pthread_create(&ids[t], 0, mask_range, &jobs[t]) == 0;
    mask_range(&jobs[0]);
    for (int t = 1; t < threads; ++t) {
        if (started[t]) pthread_join(ids[t], 0); else mask_range(&jobs[t]);
    }
}

/* State after appending tokens[i] to states[i]: lower-bound binary search in the node's sorted edge slots. */
void gcr_advance(const int64_t* states, const int64_t* tokens, int64_t* out, int64_t n,
                 const void* edge_start, const void* degree, const void* child_node, int idx_bytes,
                 const void* child_token, int tok_bytes) {
    for (int64_t i = 0; i < n; ++i) {
        int64_t s = states[i], tok = tokens[i], result = -1;
        if (s >= 0) {
            int64_t lo = load(edge_start, idx_bytes, s), end = lo + load(degree, idx_bytes, s), hi = end;
            while (lo < hi) {
                int64_t mid = (lo + hi) >> 1;
                if (load(child_token, tok_bytes, mid) < tok) lo = mid + 1; else hi = mid;
            }
            if (lo < end && load(child_token, tok_bytes, lo) == tok) result = load(child_node, idx_bytes, lo);
        }
        out[i] = result;
    }
}
"""

_lock = threading.Lock()
_loaded: list = []  # [library or None] once tried


def _cache_dir() -> Path:
    root = os.environ.get("GCR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gcr"
    )
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> ctypes.CDLL | None:
    compiler = _compiler()
    if compiler is None or sys.platform == "win32":
        return None
    key = hashlib.sha256((_SOURCE + compiler + sys.platform).encode()).hexdigest()[:16]
    target = _cache_dir() / f"gcr_trie_{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            build_dir = target.parent
        except OSError:
            build_dir = Path(tempfile.gettempdir())
            target = build_dir / target.name
        with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
            source, built = Path(tmp) / "gcr_trie.c", Path(tmp) / "gcr_trie.so"
            source.write_text(_SOURCE)
            command = [compiler, "-O3", "-std=c99", "-shared", "-fPIC", "-o", str(built), str(source), "-lpthread", "-lm"]
            try:
                subprocess.run(command, check=True, capture_output=True, timeout=120)
            except (OSError, subprocess.SubprocessError):
                return None
            os.replace(built, target)  # atomic: a concurrent build leaves one complete file
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gcr_mask_rows.argtypes = [
        ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int, ptr, i64, ctypes.c_int
    ]
    lib.gcr_mask_rows.restype = None
    lib.gcr_advance.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, ptr, ctypes.c_int, ptr, ctypes.c_int]
    lib.gcr_advance.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or ``None`` (no C compiler, a failed build, or ``GCR_NO_KERNEL=1``)."""
    if os.environ.get("GCR_NO_KERNEL", "") not in ("", "0"):
        return None
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.append(_build())
    return _loaded[0]


def available() -> bool:
    return library() is not None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def mask_rows(
    scores: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
    mode: torch.Tensor,
    keep_tokens: torch.Tensor,
    forbid_tokens: torch.Tensor,
    dense_rows: torch.Tensor,
    vocab: int,
) -> None:
    """In place, row ``r`` by ``mode[r]``: 0 keeps only its listed tokens, 1 loses its listed tokens, 2 loses the
    tokens set in ``dense_rows[start[r]]``; columns >= ``vocab`` are always lost.

    ``scores`` is a float32 CPU tensor with unit column stride; ``start``/``length`` int64 and ``mode`` uint8, one
    per row; the token pools share one integer dtype; ``dense_rows`` is a contiguous bool matrix. The caller
    guarantees every listed token < ``vocab``.
    """
    lib = library()
    assert lib is not None
    keep_tokens = keep_tokens if keep_tokens.numel() else forbid_tokens
    lib.gcr_mask_rows(
        _ptr(scores),
        scores.shape[0],
        scores.stride(0),
        scores.shape[1],
        vocab,
        _ptr(start),
        _ptr(length),
        _ptr(mode),
        _ptr(keep_tokens),
        _ptr(forbid_tokens),
        keep_tokens.element_size(),
        _ptr(dense_rows),
        dense_rows.stride(0),
        torch.get_num_threads(),
    )


def advance(
    states: torch.Tensor,
    tokens: torch.Tensor,
    edge_start: torch.Tensor,
    degree: torch.Tensor,
    child_node: torch.Tensor,
    child_token: torch.Tensor,
) -> torch.Tensor:
    """The kernel's :meth:`TokenTrie.advance` (int64 CPU ``states``/``tokens`` of one shape)."""
    lib = library()
    assert lib is not None
    states, tokens = states.contiguous(), tokens.contiguous()
    out = torch.empty_like(states)
    lib.gcr_advance(
        _ptr(states),
        _ptr(tokens),
        _ptr(out),
        states.numel(),
        _ptr(edge_start),
        _ptr(degree),
        _ptr(child_node),
        edge_start.element_size(),
        _ptr(child_token),
        child_token.element_size(),
    )
    return out

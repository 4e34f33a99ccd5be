"""Scaling benchmark: what identifiers, the trie, generative retrieval and the dense baseline cost as the
corpus grows (see README.md).

At each corpus size N (synthetic shapes-like targets) it measures

1. identifier construction: CART codes (K-Means + RQ-VAE), hierarchical K-Means, KeyBERT keywords;
2. the identifier index and its prefix trie (build time, memory) for N CART and N hkmeans identifiers;
3. generative retrieval throughput under the trie of the N CART identifiers (tiny random backbone);
4. the dense baseline's search over N embeddings: exact (matmul + top-k) and HNSW (usearch), with the
   HNSW recall@10 against the exact top 10.

python benchmarks/scaling/bench_scaling.py --sizes 10000 100000 1000000 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import gcr
from gcr.artifacts import atomic_write, write_json
from gcr.data.corpus import Content, Corpus, Target
from gcr.data.shapes import BACKGROUNDS, COLORS, KINDS, SIZES, TEXTURES
from gcr.index import IdentifierIndex
from gcr.models.tiny import TinyBackbone
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.progress import progress
from gcr.reporting.plots import throughput_vs_size
from gcr.retrieval import ConstrainedRetriever
from gcr.schemes.cart import CartScheme
from gcr.schemes.hkmeans import HierarchicalKMeansScheme

FORMAT_VERSION = 1
ROOT = Path(__file__).resolve().parents[2]
TOP_N = 9  # keywords per target: SemCORE's default 2 global + 3 lexical + 4 spare
KEYBERT_CHUNK = 8192  # documents per KeyBERT call (one progress step each)
TOKENIZER_SAMPLE = 10_000  # captions the backbone's word-level tokenizer is trained on
K = 10  # the dense searches return the top K
DENSE_REPEATS = 5  # timed passes of the (fast) dense searches over the queries; queries/s from the median
HNSW = {"connectivity": 16, "expansion_add": 128, "expansion_search": 64}  # usearch's defaults
console = Console(stderr=True)


# ---------------------------------------------------------------------------------------------- utilities


class Clock:
    """``with Clock(device) as c: ...`` then ``c.seconds``; waits for the GPU at both ends."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Clock:
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = round(time.perf_counter() - self.start, 4)


def log(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True)


def done(step: dict, key: str, unit: str) -> str:
    """What a log line says about a step: its main figure, or why it was skipped."""
    return f"skipped ({step['skipped']})" if "skipped" in step else f"{step[key]:.1f} {unit}"


def git_commit() -> dict[str, Any]:
    """The checkout's commit, and whether it has uncommitted changes (what was measured)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    try:
        return {
            "git_commit": git("rev-parse", "HEAD").strip(),
            "git_dirty": bool(git("status", "--porcelain")),
        }
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "git_dirty": None}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def peak_memory(device: str) -> dict[str, int]:
    """Peak RSS of the process so far (never decreases), and the GPU peak since the last reset."""
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device == "cuda":
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Synthetic:
    """N shapes-like targets: a feature vector and a caption each, both derived from one random scene."""

    features: np.ndarray  # (n, dim) float32
    captions: list[str]

    def targets(self) -> list[Target]:
        return [
            Target(str(i), "test", Content.feature("synthetic", i), text)
            for i, text in enumerate(self.captions)
        ]


def synthetic(n: int, dim: int, seed: int) -> Synthetic:
    """Scenes of 1-3 shapes (kind, colour, size) on a background (colour, texture), as in ``data=shapes``.

    Features are a fixed random projection of the scene's 64-d attribute vector (one-hot per shape slot and
    for the background) plus Gaussian noise, so similar scenes get nearby, but distinct, vectors.
    """
    rng = np.random.default_rng(seed)
    vocab = [list(KINDS), list(COLORS), list(SIZES), list(BACKGROUNDS), list(TEXTURES)]
    count = rng.choice([1, 2, 3], size=n, p=[0.2, 0.4, 0.4])
    shapes = [rng.integers(len(words), size=(n, 3)) for words in vocab[:3]]  # kind, colour, size per slot
    background = [rng.integers(len(words), size=n) for words in vocab[3:]]
    attributes = np.zeros((n, 64), dtype=np.float32)  # 3 slots x (7 + 8 + 3) + 4 + 6
    rows = np.arange(n)
    for slot in range(3):
        present = count > slot
        offset = 18 * slot
        for values, width in zip(shapes, (7, 8, 3)):
            attributes[rows[present], offset + values[present, slot]] = 1
            offset += width
    attributes[rows, 54 + background[0]] = 1
    attributes[rows, 58 + background[1]] = 1
    projection = rng.standard_normal((64, dim)).astype(np.float32) / 8
    features = attributes @ projection + 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
    kind, color, size = (v.tolist() for v in shapes)
    bg, texture = (v.tolist() for v in background)
    captions = [
        ", ".join(
            f"a {vocab[2][size[i][s]]} {vocab[1][color[i][s]]} {vocab[0][kind[i][s]]}" for s in range(c)
        )
        + f" on a {vocab[3][bg[i]]} {vocab[4][texture[i]]} background"
        for i, c in enumerate(count.tolist())
    ]
    return Synthetic(features, captions)


# ---------------------------------------------------------------------------------------------- steps


def fit_scheme(scheme: Any, data: Synthetic, targets: list[Target], device: str) -> tuple[list[str], dict]:
    """Fit an identifier scheme on the targets' features; its identifiers and the fit time."""
    with console.status(f"{scheme.name} fit"), Clock(device) as clock:
        ids = scheme.fit(targets, data.features)
    return ids, {"fit_s": clock.seconds, "config": scheme.config(), "stats": scheme.stats()}


def keybert(captions: list[str], args: argparse.Namespace) -> dict:
    """KeyBERT keywords (MMR, packaged MiniLM) of every caption, in chunks: embedding + extraction time."""
    if len(captions) > args.keybert_max:
        return {
            "skipped": f"more targets than --keybert-max {args.keybert_max:,} "
            "(KeyBERT over MiniLM is slow on a CPU; raise --keybert-max to run it)"
        }
    from gcr.encoders import MiniLMTextEncoder
    from gcr.schemes.helpers.keywords import KeywordExtractor

    encoder = MiniLMTextEncoder(device=args.device)
    with Clock(args.device) as load:
        extractor = KeywordExtractor(encoder.model, method="mmr")
    embed_s = extract_s = 0.0
    found = 0
    for start in progress(
        range(0, len(captions), KEYBERT_CHUNK), "KeyBERT", -(-len(captions) // KEYBERT_CHUNK)
    ):
        chunk = captions[start : start + KEYBERT_CHUNK]
        with Clock(args.device) as embed:
            embeddings = encoder.encode_text(chunk).numpy()
        with Clock(args.device) as extract:
            keywords = extractor.extract(chunk, TOP_N, document_embeddings=embeddings)
        embed_s, extract_s = embed_s + embed.seconds, extract_s + extract.seconds
        found += sum(map(len, keywords))
    return {
        "total_s": round(embed_s + extract_s, 4),
        "embed_s": round(embed_s, 4),
        "extract_s": round(extract_s, 4),
        "model_load_s": load.seconds,
        "top_n": TOP_N,
        "method": "mmr",
        "chunk": KEYBERT_CHUNK,
        "mean_keywords": round(found / len(captions), 3),
    }


def tiny_backbone(captions: list[str], new_tokens: list[str], args: argparse.Namespace) -> TinyBackbone:
    """``model=tiny`` with its default sizes and random weights; a word tokenizer of the captions."""
    tokenizer = train_corpus_tokenizer(captions[:TOKENIZER_SAMPLE])
    torch.manual_seed(args.seed)
    backbone = TinyBackbone.create(Corpus("synthetic", []), tokenizer=tokenizer).eval()
    backbone.add_identifier_tokens(new_tokens)
    return backbone.to(args.device)


def build_index(scheme: Any, ids: list[str], tokenizer: Any) -> tuple[IdentifierIndex, dict]:
    """The identifier index, its token ids and its trie (built on the CPU, as the retriever does)."""
    target_ids = [str(i) for i in range(len(ids))]
    with console.status(f"{scheme.name} index + trie"):
        with Clock("cpu") as build:
            index = IdentifierIndex.build(
                scheme, target_ids, ids, direction="t2i", corpus_fingerprint="synthetic"
            )
        with Clock("cpu") as tokenize:
            index.tokenize(tokenizer)
        with Clock("cpu") as trie_clock:
            trie = index.trie()
    tokens = sum(map(len, index.token_ids))
    return index, {
        "index_build_s": build.seconds,
        "tokenize_s": tokenize.seconds,
        "trie_build_s": trie_clock.seconds,
        "trie_bytes": trie.nbytes(),
        "token_ids_int64_bytes": 8 * tokens,
        "trie_over_int64_ids": round(trie.nbytes() / (8 * tokens), 4),
        "num_nodes": trie.num_nodes,
        "num_edges": trie.num_edges,
        "tokens_with_eos": tokens,
        "mean_id_tokens": round(index.stats()["mean_id_tokens"], 3),
        "max_id_tokens": index.stats()["max_id_tokens"],
    }


def generative(backbone: TinyBackbone, index: IdentifierIndex, queries: list[Content], args) -> dict:
    """Constrained beam search of every query under the trie of all N identifiers (one warm-up batch first)."""
    retriever = ConstrainedRetriever(backbone, index, num_beams=args.beams)
    with Clock(args.device) as move:
        retriever.to(args.device)
    retriever(queries[: args.batch])
    returned = 0
    with Clock(args.device) as clock:
        for start in progress(
            range(0, len(queries), args.batch), "generative", -(-len(queries) // args.batch)
        ):
            returned += sum(map(len, retriever(queries[start : start + args.batch]).targets))
    return {
        "queries_per_s": round(len(queries) / clock.seconds, 3),
        "seconds": clock.seconds,
        "trie_to_device_s": move.seconds,
        "mean_targets_returned": round(returned / len(queries), 3),
        "vocab_size": len(backbone.tokenizer),
        "parameters": sum(p.numel() for p in backbone.parameters()),
    }


def throughput(queries: int, seconds: list[float]) -> dict:
    """Queries/s from the median of repeated passes over the same queries (the fast methods are noisy)."""
    return {
        "queries_per_s": round(queries / statistics.median(seconds), 3),
        "seconds": seconds,
        "repeats": len(seconds),
    }


def dense_exact(targets: torch.Tensor, queries: torch.Tensor, args) -> tuple[dict, np.ndarray]:
    """Exact inner-product search (normalised vectors: cosine): matmul + top-k per query batch."""

    def search(batch: torch.Tensor) -> torch.Tensor:
        return (batch @ targets.T).topk(K, dim=1).indices

    search(queries[: args.batch])
    seconds = []
    for _ in range(DENSE_REPEATS):
        with Clock(args.device) as clock:
            found = [search(batch) for batch in queries.split(args.batch)]
        seconds.append(clock.seconds)
    return throughput(len(queries), seconds), torch.cat(found).cpu().numpy()


def dense_hnsw(targets: np.ndarray, queries: np.ndarray, exact: np.ndarray, args) -> dict:
    """usearch HNSW (inner product, float32, on the CPU): build time, throughput, recall@K vs exact."""
    try:
        from usearch.index import Index
    except ImportError:
        return {"skipped": "usearch is not installed (pip install 'gcr[bench]')"}
    threads = torch.get_num_threads()
    index = Index(ndim=targets.shape[1], metric="ip", dtype="f32", **HNSW)
    with Clock("cpu") as build:
        index.add(
            np.arange(len(targets)),
            targets,
            threads=threads,
            log="HNSW build" if sys.stderr.isatty() else False,
        )
    index.search(queries[: args.batch], K, threads=threads)
    splits = list(range(args.batch, len(queries), args.batch))
    seconds = []
    for _ in range(DENSE_REPEATS):
        with Clock("cpu") as clock:
            found = [index.search(batch, K, threads=threads).keys for batch in np.split(queries, splits)]
        seconds.append(clock.seconds)
    found = np.concatenate(found)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(found.tolist(), exact.tolist())])
    return {
        "build_s": build.seconds,
        **throughput(len(queries), seconds),
        f"recall_at_{K}_vs_exact": round(float(recall), 4),
        "memory_bytes": int(index.memory_usage),
        "threads": threads,
        "device": "cpu",
        **HNSW,
    }


# ---------------------------------------------------------------------------------------------- one size


def run_size(n: int, args: argparse.Namespace, save: Callable[[], None], result: dict) -> None:
    """Every measurement at corpus size ``n``, into ``result``; ``save()`` after each step."""
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with Clock("cpu") as clock:
        data = synthetic(n, args.dim, args.seed)
    result["data_s"] = clock.seconds
    log(f"[{n:,}] synthetic data: {clock.seconds:.1f} s")
    schemes, ids = identifier_steps(n, data, args, result, save)
    picked = np.random.default_rng(args.seed + 1).choice(n, size=args.queries, replace=n < args.queries)
    generative_steps(n, data, schemes, ids, picked, args, result, save)
    dense_steps(n, data, picked, args, result, save)
    result["memory"] = peak_memory(args.device)


def identifier_steps(n: int, data: Synthetic, args, result: dict, save) -> tuple[dict, dict]:
    """CART and hkmeans fits, then KeyBERT (or its reason to skip); the fitted schemes and identifiers."""
    targets = data.targets()
    schemes = {
        "cart": CartScheme(seed=args.seed, device=args.device),
        "hkmeans": HierarchicalKMeansScheme(args.seed),
    }
    ids = {}
    for name, scheme in schemes.items():
        ids[name], result[name] = fit_scheme(scheme, data, targets, args.device)
        log(f"[{n:,}] {name} fit: {result[name]['fit_s']:.1f} s")
        save()
    result["keybert"] = keybert(data.captions, args)
    log(f"[{n:,}] KeyBERT: {done(result['keybert'], 'total_s', 's')}")
    save()
    return schemes, ids


def generative_steps(
    n: int, data: Synthetic, schemes: dict, ids: dict, picked, args, result: dict, save
) -> None:
    """Both schemes' index and trie under one backbone's tokenizer, then retrieval under the CART trie."""
    new_tokens = [t for scheme in schemes.values() for t in scheme.new_tokens()]
    backbone = tiny_backbone(data.captions, new_tokens, args)
    indexes, result["trie"] = {}, {}
    for name, scheme in schemes.items():
        indexes[name], result["trie"][name] = build_index(scheme, ids[name], backbone.tokenizer)
        log(f"[{n:,}] {name} trie: {result['trie'][name]['trie_build_s']:.2f} s")
    save()
    queries = [Content.text(data.captions[i]) for i in picked]
    result["generative"] = {"scheme": "cart", **generative(backbone, indexes["cart"], queries, args)}
    log(f"[{n:,}] generative: {result['generative']['queries_per_s']:.1f} q/s")
    save()


def dense_steps(n: int, data: Synthetic, picked, args, result: dict, save) -> None:
    """Exact and HNSW search over the normalised features; queries are picked targets plus noise."""
    rng = np.random.default_rng(args.seed + 2)
    targets = data.features / np.linalg.norm(data.features, axis=1, keepdims=True)
    noisy = data.features[picked] + 0.1 * rng.standard_normal((len(picked), args.dim)).astype(np.float32)
    queries = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    on_device = (torch.from_numpy(x).to(args.device) for x in (targets, queries))
    result["dense_exact"], exact = dense_exact(*on_device, args)
    log(f"[{n:,}] dense exact: {result['dense_exact']['queries_per_s']:.1f} q/s")
    save()
    result["dense_hnsw"] = dense_hnsw(targets, queries, exact, args)
    log(f"[{n:,}] dense HNSW: {done(result['dense_hnsw'], 'queries_per_s', 'q/s')}")


# ---------------------------------------------------------------------------------------------- outputs

COLUMNS = [  # header, path in a size's result, format
    ("targets", ("n",), "{:,}"),
    ("CART fit s", ("cart", "fit_s"), "{:.1f}"),
    ("hkmeans fit s", ("hkmeans", "fit_s"), "{:.1f}"),
    ("KeyBERT s", ("keybert", "total_s"), "{:.1f}"),
    ("CART trie s", ("trie", "cart", "trie_build_s"), "{:.2f}"),
    ("CART trie MB", ("trie", "cart", "trie_bytes"), "{:.2f}"),
    ("hkmeans trie s", ("trie", "hkmeans", "trie_build_s"), "{:.2f}"),
    ("hkmeans trie MB", ("trie", "hkmeans", "trie_bytes"), "{:.2f}"),
    ("generative q/s", ("generative", "queries_per_s"), "{:.1f}"),
    ("dense exact q/s", ("dense_exact", "queries_per_s"), "{:.0f}"),
    ("HNSW build s", ("dense_hnsw", "build_s"), "{:.1f}"),
    ("HNSW q/s", ("dense_hnsw", "queries_per_s"), "{:.0f}"),
    (f"HNSW R@{K}", ("dense_hnsw", f"recall_at_{K}_vs_exact"), "{:.3f}"),
]
PLOTTED = {
    "generative": "generative (CART IDs, tiny)",
    "dense_exact": "dense exact",
    "dense_hnsw": "dense HNSW",
}


def cell(result: dict, path: tuple[str, ...], fmt: str) -> str:
    """One table cell: the value, "skipped" for a skipped step, "-" when not measured (yet)."""
    value: Any = result
    for key in path:
        if isinstance(value, dict) and "skipped" in value:
            return "skipped"
        if not isinstance(value, dict) or key not in value:
            return "-"
        value = value[key]
    return fmt.format(value / 2**20 if path[-1].endswith("bytes") else value)


def table_rows(doc: dict) -> list[list[str]]:
    return [[cell(r, path, fmt) for _, path, fmt in COLUMNS] for r in doc["results"]]


def skipped(doc: dict) -> list[str]:
    return [
        f"{r['n']:,} targets, {step}: {value['skipped']}"
        for r in doc["results"]
        for step, value in r.items()
        if isinstance(value, dict) and "skipped" in value
    ]


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [
        f"# Scaling: {doc['device']} ({s['device']}, {doc['torch_threads']} torch threads)",
        "",
        f"gcr {doc['gcr_version']}, commit {doc['git_commit']}{' (uncommitted changes)' if doc['git_dirty'] else ''}, "
        f"{doc['created']}. {s['queries']} queries in batches of {s['batch']}; generative: {s['beams']} beams, "
        f"`model=tiny` with random weights; dense: {s['dim']}-d, top {K}.",
        "",
        "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in table_rows(doc)),
    ]
    notes = skipped(doc)
    if notes:
        lines += ["", "Skipped:", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, out: Path, stem: str) -> None:
    """The JSON, the Markdown table and the throughput plot (every file written atomically)."""
    write_json(out / f"{stem}.json", doc)
    with atomic_write(out / f"{stem}.md", "w") as fh:
        fh.write(markdown(doc))
    points = [
        {"method": label, "size": r["n"], "queries_per_s": r[key]["queries_per_s"]}
        for r in doc["results"]
        for key, label in PLOTTED.items()
        if "queries_per_s" in r.get(key, {})
    ]
    if points:
        throughput_vs_size(points, out / f"{stem}.png")


def print_table(doc: dict) -> None:
    table = Table(title=f"gcr scaling benchmark ({doc['device']})")
    for header, _, _ in COLUMNS:
        table.add_column(header, justify="right")
    for row in table_rows(doc):
        table.add_row(*row)
    Console(width=max(200, 15 * len(COLUMNS))).print(table)
    for note in skipped(doc):
        print(f"skipped: {note}")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="corpus sizes N"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output folder")
    p.add_argument("--queries", type=int, default=256, help="queries timed per method and size")
    p.add_argument("--batch", type=int, default=16, help="queries per batch, for every method")
    p.add_argument("--beams", type=int, default=10, help="beams of the generative search")
    p.add_argument("--dim", type=int, default=64, help="width of the target features and dense embeddings")
    p.add_argument(
        "--keybert-max", type=int, default=100_000, help="larger corpora skip KeyBERT (recorded as skipped)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stem = f"scaling-{args.device}"
    doc: dict[str, Any] = {
        "benchmark": "gcr scaling",
        "format_version": FORMAT_VERSION,
        "gcr_version": gcr.__version__,
        **git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": device_name(args.device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "settings": {**vars(args), "out": str(args.out), "keybert_top_n": TOP_N, "hnsw": HNSW, "k": K},
        "sizes": args.sizes,
        "results": [],
    }
    log(f"gcr {gcr.__version__} on {doc['device']}, {doc['torch_threads']} torch threads; sizes {args.sizes}")
    wall = time.perf_counter()
    for n in args.sizes:
        result: dict[str, Any] = {"n": n}
        doc["results"].append(result)
        with Clock("cpu") as clock:
            run_size(n, args, lambda: write_json(args.out / f"{stem}.json", doc), result)
        result["wall_s"] = clock.seconds
        doc["wall_s"] = round(time.perf_counter() - wall, 1)
        doc["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_outputs(doc, args.out, stem)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print_table(doc)
    print(f"wrote {args.out / stem}.json, .md, .png")


if __name__ == "__main__":
    main()

"""Measure the ``compact`` backbone's query encoders on the default data (issue 15, items 1 and 4).

Runs ``gcr fit`` in this process once per variant (so the pretrained encodings are computed once and shared),
and writes ``benchmarks/results/compact-<name>.json``: every row of the run (the dense baseline of the same run
included), the overrides, wall seconds and the load average before and after.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/compact_encoders.py NAME [override ...]

e.g. ``... compact_encoders.py aligned-hkmeans model.encoder=aligned scheme=hkmeans trainer.max_epochs=30``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
BASE = ["model=compact", "output_dir=/tmp/gcr-compact-bench/runs", "data.root=/tmp/gcr-compact-bench/data/shapes-1000-s0",
        "cache_dir=/tmp/gcr-compact-bench/cache"]


def main(argv: list[str]) -> int:
    from gcr.cli import compose, config_dir
    from gcr.train.pipeline import fit

    torch.set_num_threads(1)
    name, overrides = argv[0], [*BASE, f"run_name=compact-{argv[0]}", *argv[1:]]
    cfg = compose(overrides, config_dir())
    load_before = os.getloadavg()
    start = time.perf_counter()
    results = fit(cfg)
    seconds = time.perf_counter() - start
    table = {
        "name": name, "overrides": overrides, "wall_seconds": round(seconds, 1), "torch_threads": 1,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "rows": [{k: r[k] for k in ("method", "direction", "metrics", "train_seconds") if k in r} for r in results["rows"]],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"compact-{name}.json").write_text(json.dumps(table, indent=2) + "\n")
    for r in table["rows"]:
        m = r["metrics"]
        print(f"{name:28s} {r['method']:10s} {r['direction']} R@1 {m['R@1']:.3f} R@5 {m['R@5']:.3f} R@10 {m['R@10']:.3f}")
    print(f"{name}: {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

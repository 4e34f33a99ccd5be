"""Write SSI identifiers for every text-to-image target once with ``scheme.generator=llm`` (answers cached), and
report the time, the outcome counts and examples: the measurement behind docs/schemes/ssi.md.

    python benchmarks/ssi_generate.py [key=value overrides ...] > log

The targets are described and the tokenizer built as ``gcr fit model=compact scheme=ssi`` does (generated
descriptions, the compact backbone's corpus tokenizer), without training anything else.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from gcr.config import compose, config_dir
from gcr.config_checks import build_checked_scheme
from gcr.data.sources import load_dataset
from gcr.descriptions import scored_task
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.train.pipeline import _described


def main(overrides: list[str]) -> dict:
    cfg = compose(["model=compact", "scheme=ssi", "scheme.generator=llm", "directions=[t2i]", *overrides], config_dir())
    corpus = load_dataset(cfg.data)
    task = _described(cfg, corpus, scored_task(cfg, corpus, "t2i"), None)
    scheme = build_checked_scheme(cfg)
    texts = [c.text for c in corpus.captions("train")]
    scheme.bind_tokenizer(train_corpus_tokenizer(texts, int(cfg.model.vocab_size), reserved_words=scheme.reserved_words()))
    start = time.perf_counter()
    ids = scheme.fit(task.targets)
    seconds = time.perf_counter() - start
    stats = scheme.stats()
    rationales = scheme.rationales()
    step = max(1, len(ids) // 10)
    examples = [{"target": t.target_id, "description": t.text, "identifier": i, "rationale": r}
                for t, i, r in list(zip(task.targets, ids, rationales))[::step][:10]]
    return {"targets": len(ids), "fit_seconds": round(seconds, 1), "unique": len(set(ids)), "stats": stats,
            "examples": examples}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    print(json.dumps(main(sys.argv[1:]), indent=2))

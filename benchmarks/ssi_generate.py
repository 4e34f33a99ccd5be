"""Write SSI identifiers for every text-to-image target once with ``scheme.generator=llm`` (answers cached), and
report the time, the outcome counts and examples: the measurement behind docs/schemes/ssi.md.

    python benchmarks/ssi_generate.py [key=value overrides ...] > out.json
    python benchmarks/ssi_generate.py --summary [the same overrides]  # what the cache holds so far

The targets are described and the tokenizer built as ``gcr fit model=compact scheme=ssi`` does (generated
descriptions, the compact backbone's corpus tokenizer), without training anything else.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from gcr.config import compose, config_dir
from gcr.config_checks import build_checked_scheme
from gcr.data.sources import load_dataset
from gcr.descriptions.sources import scored_task
from gcr.models.tokenizer import train_corpus_tokenizer
from gcr.schemes.base import SchemeContext
from gcr.train.pipeline import _described


def main(overrides: list[str]) -> dict:
    cfg = compose(["model=compact", "scheme=ssi", "scheme.generator=llm", "directions=[t2i]", *overrides], config_dir())
    corpus = load_dataset(cfg.data)
    task = _described(cfg, corpus, scored_task(cfg, corpus, "t2i"), None)
    scheme = build_checked_scheme(cfg)
    texts = [c.text for c in corpus.captions("train")]
    tokenizer = train_corpus_tokenizer(texts, int(cfg.model.vocab_size), reserved_words=scheme.reserved_words())
    scheme.prepare(SchemeContext(tokenizer=tokenizer, cache_dir=str(cfg.cache_dir)))  # as the pipeline does
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


def summarize_cache(overrides: list[str], examples: int = 10) -> dict:
    """What an unfinished (or finished) run has written so far: the targets with a cached first answer get their
    identifiers exactly as ``fit`` builds them from those answers (one attempt, so an unusable first answer falls
    back to the parser), beside the parser's identifiers for the same targets, with examples."""
    from gcr.schemes import build_scheme

    cfg = compose(["model=compact", "scheme=ssi", "scheme.generator=llm", "directions=[t2i]", *overrides], config_dir())
    corpus = load_dataset(cfg.data)
    task = _described(cfg, corpus, scored_task(cfg, corpus, "t2i"), None)
    (path,) = Path(cfg.cache_dir).glob("ssi-answers-*.json")
    answers = json.loads(path.read_text())["answers"]
    targets = [t for t in task.targets if "0" in answers.get(t.target_id, {})]
    texts = [c.text for c in corpus.captions("train")]
    out: dict = {"cache": str(path), "targets": len(task.targets), "answered": len(targets)}
    built = {}
    for generator in ("llm", "parser"):
        scheme = build_scheme("ssi", generator=generator, parser=cfg.scheme.parser, llm_attempts=1)
        scheme.bind_tokenizer(train_corpus_tokenizer(texts, int(cfg.model.vocab_size),
                                                     reserved_words=scheme.reserved_words()))
        scheme.answerer = lambda batch, prompts: [answers[t.target_id]["0"] for t in batch]
        ids = scheme.fit(targets)
        stats = {k: v for k, v in scheme.stats().items() if k != "llm_seconds"}
        tokens = [len(i.split()) for i in ids]
        out[generator] = {"unique": len(set(ids)), "mean_words": round(sum(tokens) / max(1, len(tokens)), 1),
                          "stats": stats}
        built[generator] = (ids, scheme.rationales())
    step = max(1, len(targets) // examples)
    out["examples"] = [
        {"target": t.target_id, "description": t.text, "answer": answers[t.target_id]["0"],
         "llm_identifier": built["llm"][0][n], "llm_rationale": built["llm"][1][n],
         "parser_identifier": built["parser"][0][n], "parser_rationale": built["parser"][1][n]}
        for n, t in list(enumerate(targets))[::step][:examples]
    ]
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = sys.argv[1:]
    if args[:1] == ["--summary"]:
        print(json.dumps(summarize_cache(args[1:]), indent=2))
    else:
        print(json.dumps(main(args), indent=2))

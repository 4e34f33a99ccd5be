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


def summarize_cache(overrides: list[str], examples: int = 10) -> dict:
    """What an unfinished (or finished) run has written so far: every cached answer validated as ``fit``
    validates it, counted per prompt, with examples beside the parser's fields for the same description."""
    from gcr.schemes.helpers.concepts import build_extractor
    from gcr.schemes.helpers.llm_fields import validate_answer
    from gcr.schemes.helpers.words import tokenizer_spelling

    cfg = compose(["model=compact", "scheme=ssi", "scheme.generator=llm", "directions=[t2i]", *overrides], config_dir())
    corpus = load_dataset(cfg.data)
    task = _described(cfg, corpus, scored_task(cfg, corpus, "t2i"), None)
    scheme = build_checked_scheme(cfg)
    texts = [c.text for c in corpus.captions("train")]
    spellable = tokenizer_spelling(train_corpus_tokenizer(texts, int(cfg.model.vocab_size),
                                                          reserved_words=scheme.reserved_words()))
    (path,) = Path(cfg.cache_dir).glob("ssi-answers-*.json")
    answers = json.loads(path.read_text())["answers"]
    description = {t.target_id: t.text for t in task.targets}
    parser = build_extractor(scheme.parser, list(description.values()))
    counts: dict[str, int] = {}
    shown = []
    ids = [t for t in description if t in answers]
    for n, target in enumerate(ids):
        for attempt, answer in sorted(answers[target].items()):
            got = validate_answer(answer, scheme.fields, spellable, description[target])
            outcome = "unusable" if got is None else "complete" if got.complete else "fields_only"
            counts[f"prompt{attempt}_{outcome}"] = counts.get(f"prompt{attempt}_{outcome}", 0) + 1
            counts[f"prompt{attempt}_ungrounded_concepts"] = (counts.get(f"prompt{attempt}_ungrounded_concepts", 0)
                                                               + (got.ungrounded if got else 0))
            if attempt == "0" and n % max(1, len(ids) // examples) == 0 and len(shown) < examples:
                shown.append({"target": target, "description": description[target], "answer": answer,
                              "validated": None if got is None else {"fields": got.fields, "rationale": got.rationale},
                              "parser": parser.extract([description[target]])[0]})
    return {"cache": str(path), "targets": len(description), "answered": len(ids), "counts": counts,
            "examples": shown}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = sys.argv[1:]
    if args[:1] == ["--summary"]:
        print(json.dumps(summarize_cache(args[1:]), indent=2))
    else:
        print(json.dumps(main(args), indent=2))

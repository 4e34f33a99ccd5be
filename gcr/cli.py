"""The ``gcr`` command line.

    gcr fit [key=value ...]            train + evaluate (config groups: scheme= data= model= trainer= ...)
    gcr fit -m scheme=atomic,hkmeans   a sweep: one run per combination, one table at the end
    gcr eval ckpt=PATH                 re-evaluate a run folder, direction folder or .ckpt
    gcr bench NAME [key=value ...]     every run of configs/bench/NAME.yaml (or a YAML path), every seed:
                                       one table (mean ± std over seeds), results.json, recall_at_k.png
    gcr table PATH [--reference M]     the table + bootstrap intervals of a stored results.json, no retraining
    gcr table A B --out DIR            one bench run on different seeds (A, B) merged into one table
    gcr explain RUN --text "a red star" retrieve with an RGS-trained run and generate why each result matches
    gcr schemes                        registered identifier schemes (built-in and plugins)
    gcr data shapes --out DIR -n N     generate the shapes corpus in Karpathy format

Configs come from ``configs/`` (or ``--config-dir``), composed with Hydra; an
unknown key, group option or scheme fails before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gcr.config import compose, config_dir, sweep, upgrade_config
from gcr.errors import ConfigError, GcrError

__all__ = ["build_parser", "compose", "config_dir", "main"]


# -- commands -----------------------------------------------------------------------------------
def cmd_fit(args) -> int:
    from omegaconf import OmegaConf

    cdir = config_dir(args.config_dir)
    runs = sweep(args.overrides) if args.multirun else [args.overrides]
    cfgs = [compose(o, cdir) for o in runs]  # validate every run before starting any
    if args.cfg:
        for cfg in cfgs:
            print(OmegaConf.to_yaml(cfg))
        return 0
    from gcr.reporting.results import print_table
    from gcr.train.pipeline import fit

    combined = None
    for cfg in cfgs:
        results = fit(cfg)
        print_table(results, title=cfg.run_name)
        if combined is None:
            combined = results
        else:
            combined["rows"] += [r for r in results["rows"] if r["kind"] != "dense"]
    if len(cfgs) > 1:
        from gcr.reporting.results import save_results

        out = Path(cfgs[0].output_dir) / "sweep"
        save_results(combined, out)
        print_table(combined, title=f"sweep ({len(cfgs)} runs) -> {out}")
    return 0


def cmd_eval(args) -> int:
    # Argument errors come back before any heavy library (torch, Lightning) is imported.
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"gcr eval takes key=value arguments, got {bad}; e.g. gcr eval ckpt=runs/NAME")
    values = dict(o.split("=", 1) for o in args.overrides)
    path = values.pop("ckpt", None) or values.pop("run", None)
    if not path:
        raise ConfigError("gcr eval needs ckpt=PATH (a run folder, a direction folder, or a .ckpt file), "
                          "e.g. gcr eval ckpt=runs/shapes-hkmeans-tiny")
    if not Path(path).exists():
        raise ConfigError(f"ckpt={path} does not exist; pass a run folder (under output_dir, runs/ by default), "
                          "a direction folder in it, or a .ckpt file")
    from gcr.artifacts import find_run_dir

    find_run_dir(path)  # a path outside any run folder is refused here too
    from omegaconf import OmegaConf

    from gcr.reporting.results import print_table, save_results
    from gcr.train.pipeline import evaluate

    results = evaluate(path, OmegaConf.from_dotlist([f"{k}={v}" for k, v in values.items()]) if values else None)
    out = Path(path) if Path(path).is_dir() else Path(path).parent
    save_results(results, out / "eval")
    print_table(results, title=f"eval {path}")
    return 0


def cmd_bench(args) -> int:
    from gcr.reporting.bench import load_bench, run_bench

    cdir = config_dir(args.config_dir)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"gcr bench takes one bench name, then key=value overrides; got {bad}")
    run_bench(load_bench(args.name, cdir), args.overrides, cdir)
    return 0


def cmd_table(args) -> int:
    from gcr.artifacts import read_json
    from gcr.reporting.results import compute_intervals, print_table, save_results

    if args.resamples < 1:
        raise ConfigError(f"--resamples must be at least 1, got {args.resamples}")
    documents = []
    for given in args.path:
        path = Path(given)
        path = path / "results.json" if path.is_dir() else path
        results = read_json(path, what="results file")
        if not isinstance(results, dict) or not isinstance(results.get("rows"), list) or not results["rows"]:
            raise ConfigError(f"{path} is not a gcr results file (no rows); pass the results.json of a fit or bench")
        if isinstance(results.get("config"), dict):  # a file written before the key rename reads with today's keys
            results["config"] = upgrade_config(results["config"])
        documents.append((str(path), results))
    if len(documents) > 1:
        from gcr.reporting.merge import merge_seed_runs

        results = merge_seed_runs(documents)
        path = f"{len(documents)} files, seeds {', '.join(map(str, results['bench']['seeds']))}"
    reference = args.reference or (results.get("bench") or {}).get("reference") or \
        (results.get("intervals") or {}).get("reference")
    results["intervals"] = compute_intervals(results, reference, resamples=args.resamples)
    if args.out:
        from gcr.reporting.plots import recall_curves

        save_results(results, args.out)
        recall_curves(results, Path(args.out) / "recall_at_k.png")
    print_table(results, title=f"table {path}")
    if not results["intervals"]["rows"]:
        print(f"no per-query ranks in {path} (results version {results.get('gcr_results_version')}): no intervals; "
              "re-evaluate the runs with `gcr eval ckpt=RUN` to get them")
    return 0


def cmd_explain(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from gcr.explain import explain_query, query_content

    found = explain_query(args.run, query_content(args.text, args.image), direction=args.direction, top=args.top)
    table = Table(title=f"gcr explain: {args.text or args.image}")
    for column in ("rank", "identifier", "targets", "score", "rationale"):
        table.add_column(column, overflow="fold")
    for e in found:
        table.add_row(str(e.rank), e.identifier, ", ".join(e.targets[:3]), f"{e.score:.2f}", e.rationale)
    Console().print(table)
    return 0


def cmd_schemes(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from gcr.registry import SCHEMES

    table = Table(title="identifier schemes")
    for col in ("name", "from", "description"):
        table.add_column(col)
    for name, origin, description in SCHEMES.describe():
        table.add_row(name, origin, description)
    for name, reason in SCHEMES.broken().items():
        table.add_row(name, "[red]broken plugin[/red]", reason)
    Console(width=120).print(table)
    return 0


def cmd_data(args) -> int:
    from gcr.data.shapes import caption_ambiguity, generate_shapes

    path = generate_shapes(Path(args.out), args.num_images, seed=args.seed, image_size=args.image_size,
                           workers=args.workers)
    report = caption_ambiguity(path, split="test")
    print(f"wrote {path}")
    print("test captions matching more than one test image: " + ", ".join(f"{k}={v}" for k, v in report.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gcr", description="generative cross-modal retrieval")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train and evaluate")
    fit.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. scheme=atomic trainer.max_epochs=5")
    fit.add_argument("-m", "--multirun", action="store_true", help="sweep: key=a,b runs once per value")
    fit.add_argument("--cfg", action="store_true", help="print the composed config(s) and exit")
    fit.add_argument("--config-dir", help="folder holding config.yaml and the config groups")
    fit.set_defaults(func=cmd_fit)
    ev = sub.add_parser("eval", help="re-evaluate a checkpoint or run folder: gcr eval ckpt=PATH")
    ev.add_argument("overrides", nargs="*")
    ev.set_defaults(func=cmd_eval)
    bench = sub.add_parser("bench", help="compare the runs of a bench file: gcr bench baselines [key=value ...]")
    bench.add_argument("name", help="a file in configs/bench/ (without .yaml) or the path of a bench YAML file")
    bench.add_argument("overrides", nargs="*", help="key=value overrides applied to every run of the bench")
    bench.add_argument("--config-dir", help="folder holding config.yaml, the config groups and bench/")
    bench.set_defaults(func=cmd_bench)
    tb = sub.add_parser("table", help="recompute the table and intervals of a results.json: gcr table PATH")
    tb.add_argument("path", nargs="+", help="a results.json, or a folder holding one (a run or bench folder); "
                                            "several: one bench run on different seeds, merged into one table")
    tb.add_argument("--reference", help="the method every row is compared with (default: the bench's reference, "
                                        "else the dense baseline, else the first method)")
    tb.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    tb.add_argument("--out", help="also write results.json, results.md and recall_at_k.png into this folder")
    tb.set_defaults(func=cmd_table)
    ex = sub.add_parser("explain", help="retrieve for one query and generate each result's rationale (runs with rgs)")
    ex.add_argument("run", help="a run folder trained with rgs.enabled=true")
    ex.add_argument("--text", help="a caption query (text-to-image)")
    ex.add_argument("--image", help="an image file query (image-to-text)")
    ex.add_argument("--direction", choices=["t2i", "i2t"], help="default: t2i for --text, i2t for --image")
    ex.add_argument("--top", type=int, default=3, help="results to explain")
    ex.set_defaults(func=cmd_explain)
    sc = sub.add_parser("schemes", help="list identifier schemes (built-in and plugins)")
    sc.set_defaults(func=cmd_schemes)
    data = sub.add_parser("data", help="generate a dataset")
    data.add_argument("name", choices=["shapes"])
    data.add_argument("--out", required=True)
    data.add_argument("-n", "--num-images", type=int, default=1000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--image-size", type=int, default=64)
    data.add_argument("--workers", type=int, default=1)
    data.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # flags may sit between key=value overrides (`gcr fit a=1 -m b=2,3`): argparse leaves the later ones over
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logger = logging.getLogger("gcr")
    if not any(getattr(h, "_gcr", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("gcr: %(message)s"))
        handler._gcr = True  # one handler however often main() runs in a process
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except GcrError as exc:
        print(f"gcr: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""What a run leaves for people to read: results files and tables, intervals, plots, W&B, benches.

- :mod:`gcr.reporting.results` -- the versioned ``results.json`` (rows, config, per-query ranks), its
  Markdown and terminal tables, mean +- std over seeds; ``gcr table`` reads it back;
- :mod:`gcr.reporting.intervals` -- per-query metrics and the (paired) bootstrap intervals (plain numpy);
- :mod:`gcr.reporting.plots` -- Recall@K curves and throughput plots (matplotlib, imported when drawn);
- :mod:`gcr.reporting.tracking` -- the W&B mirror of a run and a bench (wandb imported only when enabled);
- :mod:`gcr.reporting.bench` -- ``gcr bench``: several runs on the same data, backbone and budget, reported
  as one table with paired intervals (it starts the training pipeline lazily, when a bench runs).

Nothing here imports Lightning or W&B when imported; this ``__init__`` imports nothing.
"""

"""Plot a decoding-benchmark JSON: per-step cost vs number of identifiers, one panel per identifier kind.

python benchmarks/decoding/plot_decoding.py benchmarks/results/decoding-cpu.json [--out decoding-cpu.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

METHODS = [  # key in result["step"], label, style
    ("gcr", "gcr TrieLogitsProcessor", dict(color="C0", marker="o", linewidth=2)),
    (
        "gcr_beam_search",
        "gcr constrained_beam_search (whole step)",
        dict(color="C0", marker="s", linestyle="--"),
    ),
    ("gcr_eager", "gcr TrieLogitsProcessor, no C kernel (eager torch)", dict(color="C2", marker="D", linestyle="-.")),
    (
        "fill_reference",
        "one scores.fill_(-inf) (the floor; target: gcr <= 1.5x)",
        dict(color="black", marker="", linestyle="--", linewidth=1),
    ),
    ("dict_trie", "HF prefix_allowed_tokens_fn + dict trie (GENRE)", dict(color="C3", marker="^")),
    ("marisa_trie", "HF prefix_allowed_tokens_fn + marisa trie", dict(color="C1", marker="v")),
    (
        "unconstrained_step",
        "unconstrained beam step (log_softmax + top-2K)",
        dict(color="gray", marker="x", linestyle=":"),
    ),
]


def plot(data: dict, out: Path) -> None:
    results = data["results"]
    kinds = list(dict.fromkeys(r["kind"] for r in results))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.6), squeeze=False, sharey=True)
    for ax, kind in zip(axes[0], kinds):
        rows = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["n"])
        sizes = [r["n"] for r in rows]
        for key, label, style in METHODS:
            if all(key in r["step"] for r in rows):
                ax.plot(sizes, [r["step"][key]["ms_per_step"] for r in rows], label=label, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{n:,}" for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("identifiers")
        worst = [r["masking_vs_fill"]["gcr_over_fill_worst_step"] for r in rows if "masking_vs_fill" in r]
        met = (data.get("summary", {}).get(kind, {}).get("targets_met") or {})
        marks = "\n".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in met.items() if "fill" in k or "flat" in k)
        ax.set_title(f"{kind}" + (f" - worst step {max(worst):.2f}x fill\n{marks}" if worst else ""), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms per decoding step (median)")
    settings, env = data["settings"], data["environment"]
    fig.suptitle(
        f"Constrained decoding, per-step cost: {settings['batch']} x {settings['beams']} beams, vocab "
        f"{settings['vocab_size']:,}, random logits - {env['device']}, torch {env['torch']}",
        fontsize=10,
    )
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: the JSON's path with .png)")
    args = p.parse_args()
    out = args.out or args.json.with_suffix(".png")
    plot(json.loads(args.json.read_text()), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

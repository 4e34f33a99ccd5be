"""End-to-end cost of gcr's own beam search with the compact (cart) decoder: constrained vs unconstrained.

The network is ``gcr.models.cart.CartNetwork`` (random init, d_model 256, 3 layers, coarse-to-fine fusion) over
a random memory, so only the decoder and the search are timed (no text/image tower). Identifiers are fixed-length
codes (``identifiers.fixed_codes``) over a cart-sized vocabulary (3 specials + 8 x 256 code slots). Methods,
all over the same number of steps (code length + EOS):

* ``unconstrained`` - decode, output head over the vocabulary, log_softmax, + beam scores, top-2K: the step a
  search without a trie makes (its reorder of the KV cache included);
* ``full_vocab_masked`` - ``constrained_beam_search`` on full-vocabulary log-probs (the path before issue 18);
* ``allowed_children_full`` - ``output_embedding=head.weight, normalize="full"`` (exact; what cart uses);
* ``allowed_children_renormalised`` - ``normalize="allowed"`` (the approximation, for reference).

python benchmarks/decoding/bench_beam_search.py [--sizes 10000 100000 1000000] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from identifiers import CODEBOOK, EOS, MAX_LEVELS, fixed_codes  # noqa: E402

from gcr.decoding import TokenTrie, constrained_beam_search  # noqa: E402
from gcr.models.cart_network import CartNetwork  # noqa: E402

VOCAB = 3 + MAX_LEVELS * CODEBOOK  # pad, BOS, EOS + the code slots
BOS = 1


def network(seed: int, d_model: int, layers: int) -> CartNetwork:
    torch.manual_seed(seed)
    return CartNetwork(
        VOCAB,
        text_widths=[384] * 7,
        image_widths=[384] * 7,
        image_tokens=17,
        d_model=d_model,
        num_layers=layers,
        num_heads=4,
        ffn_dim=4 * d_model,
        dropout=0.0,
        fusion="coarse_fine",
        max_id_tokens=16,
    ).eval()


def searches(net: CartNetwork, trie: TokenTrie, batch: int, beams: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch, net.num_memory_layers, 16, net.head.in_features, generator=g)
    mask = torch.ones(batch, 16, dtype=torch.bool)
    caches = net.memory_cache(memory)
    steps = trie.max_length

    def step_fn(project: bool):
        def step(tokens: torch.Tensor, past):
            t = tokens.shape[1]
            if t == 0:
                out, present = net.decode(tokens.new_full((batch, 1), BOS), caches, mask, project=project)
                present = [(k.repeat_interleave(beams, 0), v.repeat_interleave(beams, 0)) for k, v in present]
                out = out[:, -1].repeat_interleave(beams, 0)
            else:
                out, present = net.decode(tokens[:, -1:], caches, mask, group=beams, start=t, past=past, project=project)
                out = out[:, -1]
            return (out.float().log_softmax(-1) if project else out), present

        return step

    def reorder(past, beam_idx):
        return [(k[beam_idx], v[beam_idx]) for k, v in past]

    def unconstrained():
        step, past = step_fn(True), None
        tokens = torch.empty(batch * beams, 0, dtype=torch.long)
        running = torch.zeros(batch, beams)
        offset = torch.arange(batch)[:, None] * beams
        for _ in range(steps):
            log_probs, past = step(tokens, past)
            scores, index = (running[..., None] + log_probs.view(batch, beams, -1)).view(batch, -1).topk(2 * beams, 1)
            running, index = scores[:, :beams], index[:, :beams]
            beam_idx = (index // VOCAB + offset).view(-1)
            tokens = torch.cat([tokens[beam_idx], (index % VOCAB).view(-1, 1)], 1)
            past = reorder(past, beam_idx)
        return None

    def constrained(**options):
        project = "output_embedding" not in options
        return constrained_beam_search(step_fn(project), trie, batch, beams, reorder_fn=reorder, **options)

    return {
        "unconstrained": unconstrained,
        "full_vocab_masked": lambda: constrained(),
        "allowed_children_full": lambda: constrained(output_embedding=net.head.weight, normalize="full"),
        "allowed_children_renormalised": lambda: constrained(output_embedding=net.head.weight, normalize="allowed"),
    }


def run_config(net, code_length: int, n: int, args) -> dict:
    ids = fixed_codes(n, code_length, VOCAB, args.seed)
    trie = TokenTrie.from_flat(ids.flat, ids.offsets, VOCAB, EOS)
    methods = searches(net, trie, args.batch, args.beams, args.seed)
    outputs: dict[str, Any] = {}
    with torch.no_grad():
        for name, method in methods.items():  # warm-up (kernel build, allocator)
            outputs[name] = method()
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, method in methods.items():
                start = time.perf_counter()
                method()
                times[name].append(time.perf_counter() - start)
    steps = trie.max_length
    result: dict[str, Any] = {"kind": f"fixed-L{code_length}", "n": n, "steps": steps, "trie": repr(trie)}
    for name, values in times.items():
        result[name] = {
            "s_per_search": round(statistics.median(values), 5),
            "ms_per_step": round(statistics.median(values) / steps * 1e3, 4),
            "ms_per_step_min": round(min(values) / steps * 1e3, 4),
        }
    base = result["unconstrained"]["s_per_search"]
    result["ratio_vs_unconstrained"] = {
        name: round(result[name]["s_per_search"] / base, 4) for name in methods if name != "unconstrained"
    }
    full, exact = outputs["full_vocab_masked"], outputs["allowed_children_full"]
    result["allowed_children_full_same_as_full_vocab"] = full.sequences == exact.sequences
    result["max_abs_score_difference"] = float((full.scores - exact.scores).abs().max())
    valid = {tuple(s) for s in trie.sequences()} if n <= 100_000 else None
    if valid is not None:
        result["every_output_valid"] = all(
            tuple(s) in valid for out in outputs.values() if out is not None for item in out.sequences for s in item
        )
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--code-lengths", type=int, nargs="+", default=[4, 8])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "decoding-beam-search-cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net = network(args.seed, args.d_model, args.layers)
    data: dict[str, Any] = {
        "benchmark": "gcr constrained_beam_search with the cart decoder, end to end",
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "vocab_size": VOCAB},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average_at_start": os.getloadavg(),
        },
        "results": [],
    }
    for code_length in args.code_lengths:
        for n in args.sizes:
            result = run_config(net, code_length, n, args)
            result["load_average"] = os.getloadavg()
            data["results"].append(result)
            print(json.dumps({k: result[k] for k in ("kind", "n", "ratio_vs_unconstrained")}), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

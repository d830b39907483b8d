#!/usr/bin/env bash
# Everything that needs a GPU, for one `device` call per phase (each well inside 10 minutes):
#
#   bash benchmarks/gpu_session.sh tests train      # phases run in the order given
#
# phases: tests (pytest -m gpu: native kernels = oracle, bf16 vs fp32, static decode + CUDA
# graph replays), patterns (tests/gpu/test_gpu_patterns.py: every zoo model's pattern kernels
# compiled natively: fp32 step = oracle, bf16 close, triton static decode replays), train
# (benchmarks/train_bench.py: lmc, eager, torch.compile; train:lmc and train:ref split it in
# two when the first step's compilation and autotuning, 238 Triton compiles for llama bf16,
# leave too little of a 10-minute call; train:prologue is train:lmc with
# LMC_PROLOGUE_RECOMPUTE=1, the loss backward's dlogits computed in its two matmuls' loads,
# to compare with train:lmc), decode (benchmarks/decode_bench.py),
# attention (benchmarks/attention_bench.py), linear (benchmarks/linear_attention_bench.py),
# moe (benchmarks/moe_bench.py), moe:deepseek (the same with DeepSeek-V3's routing), bench (lmc bench zoo/llama.yaml), bench:MODEL (lmc bench
# zoo/MODEL.yaml: bench:blues01, bench:minimax, bench:yoco, bench:optimus_prime,
# bench:medit_one). Results and logs go to $OUT (default runs/gpu), flat, so the device tool
# brings them back; each log starts with the device, torch and triton.
#
# BUDGET_S=540 bounds the phases (counted from the first; the setup before it takes seconds):
# each runs under `timeout` with what is left, plus up to 15 s for a process that ignores
# TERM (a phase cut short keeps what it wrote: the JSONs are rewritten as results come in),
# and one with under 60 s left is skipped; both are noted in phases.txt. Unknown phases are
# refused before anything runs.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export LMC_CACHE=${LMC_CACHE:-/tmp/lmc-cache}
PY=${PY:-python3}
$PY - <<'PYEOF' | tee "$OUT/machine.txt"
import datetime, torch, triton
print(f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; "
      f"torch {torch.__version__}; triton {triton.__version__}; "
      f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
PYEOF
# wheels carried from the dev machine (`make gpu-wheels`, carry [".whl"]): installed into a
# private target, never over the image's torch/triton
if compgen -G ".whl/*.whl" >/dev/null; then
  if $PY -m pip install -q --no-deps --no-index --target /tmp/lmc-whl .whl/*.whl \
      >"$OUT/wheels.log" 2>&1; then
    export PYTHONPATH=$PYTHONPATH:/tmp/lmc-whl
    echo "wheels: $(cd .whl && ls *.whl | tr '\n' ' ')" | tee -a "$OUT/machine.txt"
  else
    echo "wheels: install failed (see wheels.log)" | tee -a "$OUT/machine.txt"
  fi
fi
known() {
  case $1 in
    tests|patterns|train|train:lmc|train:ref|train:prologue|decode|attention|linear|moe|moe:deepseek|bench) return 0 ;;
    bench:?*) return 0 ;;
    *) return 1 ;;
  esac
}
for phase in "$@"; do
  if ! known "$phase"; then echo "unknown phase $phase" >&2; exit 2; fi
done
BUDGET_S=${BUDGET_S:-0}
case $BUDGET_S in ''|*[!0-9]*) echo "BUDGET_S=$BUDGET_S: expected whole seconds" >&2; exit 2 ;; esac
t0=$(date +%s)
status=0
for phase in "$@"; do
  echo "== $phase" | tee -a "$OUT/phases.txt"
  start=$(date +%s)
  LIMIT=()
  if [ "$BUDGET_S" -gt 0 ]; then
    left=$(( BUDGET_S - (start - t0) ))
    if [ "$left" -lt 60 ]; then
      echo "   $phase: skipped, ${left} s of BUDGET_S=$BUDGET_S left" | tee -a "$OUT/phases.txt"
      continue
    fi
    LIMIT=(timeout -k 15 "$left")
  fi
  case $phase in
    tests)     ${LIMIT[@]+"${LIMIT[@]}"} $PY -m pytest -q -m gpu -p no:cacheprovider tests \
                 --deselect tests/gpu/test_gpu_patterns.py 2>&1 | tee "$OUT/gpu_tests.log" ;;
    patterns)  ${LIMIT[@]+"${LIMIT[@]}"} $PY -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_gpu_patterns.py \
                 --durations=10 2>&1 | tee "$OUT/gpu_patterns.log" ;;
    train)     ${LIMIT[@]+"${LIMIT[@]}"} $PY benchmarks/train_bench.py --out "$OUT/train_bench.json" 2>&1 \
                 | tee "$OUT/train_bench.log" ;;
    train:lmc) ${LIMIT[@]+"${LIMIT[@]}"} $PY benchmarks/train_bench.py --skip eager compile \
                 --out "$OUT/train_bench_lmc.json" 2>&1 | tee "$OUT/train_bench_lmc.log" ;;
    train:ref) ${LIMIT[@]+"${LIMIT[@]}"} $PY benchmarks/train_bench.py --skip lmc --out "$OUT/train_bench_ref.json" \
                 2>&1 | tee "$OUT/train_bench_ref.log" ;;
    train:prologue) LMC_PROLOGUE_RECOMPUTE=1 ${LIMIT[@]+"${LIMIT[@]}"} $PY benchmarks/train_bench.py \
                 --skip eager compile --out "$OUT/train_bench_prologue.json" 2>&1 \
                 | tee "$OUT/train_bench_prologue.log" ;;
    decode)    ${LIMIT[@]+"${LIMIT[@]}"} $PY benchmarks/decode_bench.py --out "$OUT/decode_bench.json" 2>&1 \
                 | tee "$OUT/decode_bench.log" ;;
    attention) ${LIMIT[@]+"${LIMIT[@]}"} $PY benchmarks/attention_bench.py --out "$OUT/attention_bench.json" 2>&1 \
                 | tee "$OUT/attention_bench.log" ;;
    linear)    ${LIMIT[@]+"${LIMIT[@]}"} $PY benchmarks/linear_attention_bench.py --out "$OUT/linear_bench.json" 2>&1 \
                 | tee "$OUT/linear_bench.log" ;;
    moe)       ${LIMIT[@]+"${LIMIT[@]}"} $PY benchmarks/moe_bench.py --out "$OUT/moe_bench.json" 2>&1 \
                 | tee "$OUT/moe_bench.log" ;;
    moe:deepseek) ${LIMIT[@]+"${LIMIT[@]}"} $PY benchmarks/moe_bench.py --router deepseek \
                 --out "$OUT/moe_bench_deepseek.json" 2>&1 | tee "$OUT/moe_bench_deepseek.log" ;;
    bench)     ${LIMIT[@]+"${LIMIT[@]}"} $PY -m lmc.cli bench zoo/llama.yaml --overwrite --out "$OUT/bench_llama" 2>&1 \
                 | tee "$OUT/bench_llama.log" ;;
    bench:*)   m=${phase#bench:}
               ${LIMIT[@]+"${LIMIT[@]}"} $PY -m lmc.cli bench "zoo/$m.yaml" --overwrite --out "$OUT/bench_$m" 2>&1 \
                 | tee "$OUT/bench_$m.log" ;;
    *)         echo "unknown phase $phase" >&2; exit 2 ;;
  esac
  rc=$?
  [ $rc -ne 0 ] && status=$rc
  note=""
  [ ${#LIMIT[@]} -gt 0 ] && { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && note=" (cut at the budget)"
  echo "   $phase: exit $rc after $(( $(date +%s) - start )) s$note" | tee -a "$OUT/phases.txt"
done
exit $status

#!/usr/bin/env bash
# The Qwen2.5-Coder-1.5B runs on the GPU machine, one stage per device call, after the GGUF
# was joined there (benchmarks/device_model.py; benchmarks/README.md gives the 22 calls).
#
#   bash benchmarks/qwen_device.sh search     # 128K and 32K searches (scores kept in reports)
#   bash benchmarks/qwen_device.sh choose B1,B2,...   # configs at these budgets from the 128K scores
#
# Work files live under /root/runs (kept while the machine stays warm); each stage copies what
# it made to $OUT as one tarball plus its log.
set -uo pipefail
export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
RUNS=/root/runs
OUT=${OUT:-/tmp/out}
mkdir -p "$RUNS" "$OUT"
cd "$(dirname "$0")/.."

SEARCH_ARGS=(--model qwen2.5-coder-1.5b --device cuda --allocate global --objective output
             --early-weight 1 --no-progress)

stage=${1:-}
case "$stage" in
  search)
    for n in 131072 32768; do
      python3 -m mi_compile search "${SEARCH_ARGS[@]}" --length "$n" --budget 0.08 \
        --out "$RUNS/qwen_${n}.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/search_${n}.log"
    done
    tar czf "$OUT/search.tgz" -C "$RUNS" .
    ;;
  choose)
    for b in ${2//,/ }; do
      for n in 131072 32768; do
        python3 -m mi_compile search --from-report "$RUNS/qwen_${n}.report.json" --budget "$b" \
          --allocate global --objective output --early-weight 1 --out "$RUNS/qwen_${n}_b${b}.json" \
          | sed -n 1,12p
      done
    done
    ;;
  first)
    # everything one short lease allows, in one call, each step under the call's deadline
    # ($2 seconds, default 450): the 128K search (its first model load converts the GGUF),
    # then eager vs the searched config end to end at 128K
    deadline=$(( $(date +%s) + ${2:-450} ))
    left() { echo $(( deadline - $(date +%s) )); }
    timeout "$(left)" python3 -m mi_compile search "${SEARCH_ARGS[@]}" --length 131072 --budget 0.08 \
      --out "$RUNS/qwen_131072.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/search_131072.log"
    tar czf "$OUT/search.tgz" -C "$RUNS" .
    if [ -f "$RUNS/qwen_131072.json" ] && [ "$(left)" -gt 60 ]; then
      timeout "$(left)" python3 benchmarks/e2e.py --model qwen2.5-coder-1.5b --config "$RUNS/qwen_131072.json" \
        --modes eager,searched --lengths 131072 --no-inductor --reps 2 --budget-s "$(( $(left) - 15 ))" \
        --out "$OUT" 2>&1 | grep -v "it/s\]" | tee "$OUT/e2e_131072.log"
    fi
    ;;
  *)
    echo "usage: $0 {search|choose B1,B2,...|first [SECONDS]}" >&2
    exit 2
    ;;
esac

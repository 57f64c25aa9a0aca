#!/usr/bin/env bash
# The Qwen2.5-Coder-1.5B runs on the GPU machine, one stage per device call, after the GGUF
# was joined there (benchmarks/device_model.py; benchmarks/README.md gives the 22 calls).
#
#   bash benchmarks/qwen_device.sh search     # 128K and 32K searches (scores kept in reports)
#   bash benchmarks/qwen_device.sh choose B1,B2,...   # configs at these budgets from the 128K scores
#   bash benchmarks/qwen_device.sh prep|e2e|acc128 [SECONDS]   # one measured lease, three calls
#   bash benchmarks/qwen_device.sh adaptive|adaptive_acc|adaptive_sweep [SECONDS]   # the no-config patterns
#   bash benchmarks/qwen_device.sh policy|policy_acc [SECONDS]   # the default policy against FlexPrefill 0.9
#   bash benchmarks/qwen_device.sh adaptive2|adaptive2_acc [SECONDS]   # the next adaptive candidates
#   bash benchmarks/qwen_device.sh adaptive3|adaptive3_acc [SECONDS]   # TriangleMix with FlexPrefill shallow layers
#   bash benchmarks/qwen_device.sh searched|searched_acc [SECONDS]   # a search over every pattern at 128K
#   bash benchmarks/qwen_device.sh yard|yard_acc|yard_search [SECONDS]   # the shipped 128K config against the all-pattern one
#   bash benchmarks/qwen_device.sh turn|chunked|chunked_acc [SECONDS]   # prefills continuing a cache
#   bash benchmarks/qwen_device.sh native32|native32_acc [SECONDS]   # the 32K config at 16K-32K, native RoPE
#   bash benchmarks/qwen_device.sh yard64|yard64_acc [SECONDS]   # a config searched at 64K against the 128K one there
#   bash benchmarks/qwen_device.sh yard06|yard06_acc [SECONDS]   # the 128K search at budget 0.06 against the shipped one
#   bash benchmarks/qwen_device.sh last512|last512_acc [SECONDS]   # the shipped config with 512 dense last rows
#   bash benchmarks/qwen_device.sh family [SECONDS]   # the shipped config family (32K + 128K) at 32K-128K
#   bash benchmarks/qwen_device.sh floor [SECONDS]   # top-1's rounding floor at 128K (exact attention by the op's kernel)
#   bash benchmarks/qwen_device.sh yard_gluon [SECONDS]   # the shipped config, Triton vs Gluon kernels
#   bash benchmarks/qwen_device.sh checks|kernels|hopper|host|chunk_work [SECONDS]   # no model: gpu_checks, the kernel benchmark,
#                                                  # the Gluon kernel, the op's host time (a 2K chunk at 128K)
#   bash benchmarks/qwen_device.sh queue STAGE:SECONDS ...   # those stages in turn, outliving the call
#   bash benchmarks/qwen_device.sh collect   # what the queue has made so far, to $OUT
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
# the two 128K configs measured side by side: the shipped one (budget 0.08, recall floor 0.6) and
# one at budget 0.16 with the same floor, made here from the 128K search's scores by
# `search --from-report qwen_131072.report.json --budget 0.16 --min-recall 0.6 ...` into lease/
CFG_FAST=${CFG_FAST:-mi_compile/configs/qwen2.5-coder-1.5b-128k.json}
CFG_ACCURATE=${CFG_ACCURATE:-lease/qwen_128k_b0.16_floor0.6.json}
# the input-adaptive patterns and TriangleMix, as every head's pattern (no searched config)
ADAPTIVE=("xa=xattention:900:8:2048" "flex=flex_prefill:900:100:1024"
          "trimix=benchmarks/configs/adaptive/qwen_triangle_mix.json")
# the same patterns at other thresholds, for the density/accuracy plot
ADAPTIVE_SWEEP=("xa80=xattention:800:8:2048" "xa95=xattention:950:8:2048"
                "flex80=flex_prefill:800:100:1024" "flex95=flex_prefill:950:100:1024")
# the next candidates: XAttention 0.9 / 0.95, FlexPrefill 0.8, TriangleMix with 512 dense rows
ADAPTIVE2=("${ADAPTIVE[0]}" "${ADAPTIVE_SWEEP[1]}" "${ADAPTIVE_SWEEP[2]}"
           "trimix512=benchmarks/configs/adaptive/qwen_triangle_mix_last512.json")
# fixed every-head vertical-slash budgets between the default policy (1000 / 6096: 0.65x eager at
# 128K, top-1 0.984) and 100 / 800 (0.32x, top-1 0.91), the last 64 queries dense: no config, no
# estimate beyond vertical-slash's own (the no-config goal: <= 0.40x with the answers, top-1 0.96)
UNIFORM=("u1k2k=vertical_slash:1000:2048:64" "u500w4k=vertical_slash:500:4096:64"
         "u300w2k=vertical_slash:300:2048:64" "d64=vertical_slash:1000:6096:64")
# TriangleMix with FlexPrefill (gamma 0.9 / 0.8) in the eight shallow layers instead of dense ones
# (local window 2048), and with an 8192-token window
ADAPTIVE3=("flextri=benchmarks/configs/adaptive/qwen_flex_triangle.json"
           "flex80tri=benchmarks/configs/adaptive/qwen_flex80_triangle.json"
           "flextri8k=benchmarks/configs/adaptive/qwen_flex_triangle8k.json")
ACC_ARGS=(--model qwen2.5-coder-1.5b --device cuda --order example --docs 1 --no-inductor
          --tasks passkey,multikey,kv,vartrack --modes dense,searched --searched "$CFG_FAST")

# run_until NAME ARGS...: python3 -m ARGS... with --budget-s and --out $RUNS/NAME, stopped at
# $deadline (the stage's), its progress bars dropped from $RUNS/NAME.log; then the log's tail
run_until() {
  local name=$1 margin=$2; shift 2
  timeout "$(( deadline - $(date +%s) ))" python3 -m "$@" --budget-s "$(( deadline - $(date +%s) - margin ))" \
    --out "$RUNS/$name" 2>&1 | grep -v "it/s\]" > "$RUNS/$name.log"
  tail -60 "$RUNS/$name.log"
}

# e2e_vs_c128 NAME CONFIG LENGTHS: CONFIG (`searched`) against eager and the shipped 128K config
# (`c128`) at LENGTHS, with a profile; acc_vs_c128 STEM CONFIG LENGTH: their accuracy against
# dense, to $RUNS/STEM.json and $OUT/STEM.tgz
e2e_vs_c128() {
  run_until "$1" 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config "$2" --configs "c128=$CFG_FAST" \
    --modes eager,searched,c128 --lengths "$3" --reps 3 --profile searched
}
acc_vs_c128() {
  run_until "$1.json" 30 benchmarks.accuracy "${ACC_ARGS[@]}" --lengths "$3" \
    --modes dense,searched,c128 --searched "$2" --configs "c128=$CFG_FAST" --examples 20
  tar czf "$OUT/$1.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d "$1".json*)
}

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
  freeze)
    # here, before a lease: a frozen copy of the code (tracked and untracked files, no results)
    # in lease/src (ignored via .git/info/exclude: `echo /lease/ >> .git/info/exclude`), with
    # the configs in lease/*.json beside it; device calls carry "lease" and run from lease/src,
    # so edits made here during the lease do not travel
    rm -rf lease/src && mkdir -p lease/src/lease
    git ls-files -co --exclude-standard | grep -v '^benchmarks/results/\|^benchmarks/logs/\|\.png$' \
      | tar cf - -T - | tar xf - -C lease/src
    cp lease/*.json lease/src/lease/
    du -sh lease
    ;;
  prep)
    # one call (deadline $2 s, default 470): gpu_checks.py in the background; the 32K search
    # (the machine's first model load converts the GGUF); accuracy at 32K and 64K
    deadline=$(( $(date +%s) + ${2:-470} ))
    left() { echo $(( deadline - $(date +%s) )); }
    mkdir -p "$RUNS/checks"
    ( OUT="$RUNS/checks" timeout "$(left)" python3 -m benchmarks.gpu_checks --timeout-s "$(( $(left) - 20 ))" \
      > "$RUNS/gpu_checks.log" 2>&1 ) &
    checks=$!
    timeout "$(left)" python3 -m mi_compile search "${SEARCH_ARGS[@]}" --length 32768 --budget 0.2 --min-recall 0.6 \
      --also-budgets 0.12,0.3 --out "$RUNS/qwen_32768.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/search_32768.log"
    S32="$RUNS/qwen_32768.json"; [ -f "$S32" ] || S32=vertical_slash:100:800
    # YaRN factor 4 at both lengths, as in e2e (one compiled graph per mode serves both)
    timeout "$(left)" python3 -m benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 32768,65536 --yarn 4 --examples 20 \
      --configs "s16f=$CFG_ACCURATE" "s32=$S32" --budget-s "$(( $(left) - 25 ))" --out "$RUNS/acc_32k_64k.json" 2>&1 \
      | grep -v "it/s\]" > "$RUNS/acc_32k_64k.log"
    wait $checks
    tail -40 "$RUNS/gpu_checks.log"
    tail -30 "$RUNS/acc_32k_64k.log"
    tar czf "$OUT/prep.tgz" -C "$RUNS" .
    ;;
  e2e)
    # one call: eager and the two 128K configs at 32K-128K with Inductor, and one profile at 128K
    # (deadline $2 s, default 430). Each compiled mode compiles at the first length: 80-90 s for
    # the first with cold caches, 25-65 s for each further one, so keep the modes few.
    deadline=$(( $(date +%s) + ${2:-430} ))
    run_until e2e 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config "$CFG_FAST" --configs "s16f=$CFG_ACCURATE" \
      --modes eager,searched,s16f --lengths 32768,65536,131072 --reps 2 --profile searched,eager
    tar czf "$OUT/e2e.tgz" -C "$RUNS" e2e e2e.log
    ;;
  acc128)
    # one call: accuracy at 128K, dense and the fast 128K config (deadline $2 s, default 470;
    # one example of the four tasks costs ~19 s of dense and sparse prefills)
    deadline=$(( $(date +%s) + ${2:-470} ))
    timeout "$(( deadline - $(date +%s) ))" python3 -m benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 131072 \
      --examples 20 --budget-s "$(( deadline - $(date +%s) - 30 ))" --out "$RUNS/acc_128k.json" 2>&1 \
      | grep -v "it/s\]" > "$RUNS/acc_128k.log"
    tail -30 "$RUNS/acc_128k.log"
    tar czf "$OUT/acc128.tgz" -C "$RUNS" acc_128k.json acc_128k.rows.jsonl acc_128k.log $(cd "$RUNS" && ls acc_128k*.png 2>/dev/null)
    ;;
  adaptive)
    # one call: eager, the default policy and the three no-config modes at 32K and 128K, with
    # Inductor (deadline $2 s, default 560; five compiled modes: ~5 minutes of compiles)
    deadline=$(( $(date +%s) + ${2:-560} ))
    run_until adaptive 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config "$CFG_FAST" --configs "${ADAPTIVE[@]}" \
      --modes eager,minference,xa,flex,trimix --lengths 16384,32768,131072 --reps 2 --profile xa,flex
    tar czf "$OUT/adaptive.tgz" -C "$RUNS" adaptive adaptive.log
    ;;
  adaptive_acc)
    # one call: accuracy at 128K, dense against the three no-config modes
    deadline=$(( $(date +%s) + ${2:-560} ))
    run_until acc_adaptive.json 30 benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 131072 \
      --modes dense,xa,flex,trimix --configs "${ADAPTIVE[@]}" --examples 20
    tar czf "$OUT/acc_adaptive.tgz" -C "$RUNS" acc_adaptive.json acc_adaptive.json.log
    ;;
  policy|policy_acc)
    # the no-config choice: the default policy (every head vertical_slash 1000/6096, `minference`)
    # against FlexPrefill 0.9 on every head (`flex`, the adaptive candidate that kept the answers)
    # at 32K, 64K and 128K (sparse from 32K: the data for `min_seq_len`): TTFT against eager with
    # Inductor (two compiles), then accuracy against dense at 128K on the same prompts (`default`
    # is the harness's name for the default policy)
    deadline=$(( $(date +%s) + ${2:-480} ))
    if [ "$stage" = policy ]; then
      run_until policy 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config "$CFG_FAST" --configs "${ADAPTIVE[1]}" \
        --modes eager,minference,flex --lengths 32768,65536,131072 --reps 2 --profile minference,flex
      tar czf "$OUT/policy.tgz" -C "$RUNS" policy policy.log
    else
      run_until acc_policy.json 30 benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 131072 \
        --modes dense,default,flex --configs "${ADAPTIVE[1]}" --examples 20
      tar czf "$OUT/acc_policy.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d acc_policy.json*)
    fi
    ;;
  uniform|uniform_acc)
    # the fixed every-head candidates (UNIFORM) at 128K: TTFT against eager with Inductor (four
    # compiles, ~6 minutes on the H100), then accuracy against dense at 128K
    deadline=$(( $(date +%s) + ${2:-560} ))
    if [ "$stage" = uniform ]; then
      run_until uniform 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config "$CFG_FAST" --configs "${UNIFORM[@]}" \
        --modes eager,u1k2k,u500w4k,u300w2k,d64 --lengths 131072 --reps 2
      tar czf "$OUT/uniform.tgz" -C "$RUNS" uniform uniform.log
    else
      run_until acc_uniform.json 30 benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 131072 \
        --modes dense,u1k2k,u500w4k,u300w2k,d64 --configs "${UNIFORM[@]}" --examples 20
      tar czf "$OUT/acc_uniform.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d acc_uniform.json*)
    fi
    ;;
  adaptive_sweep)
    # one call: accuracy and density at 128K of the adaptive patterns at other thresholds
    deadline=$(( $(date +%s) + ${2:-560} ))
    run_until acc_sweep.json 30 benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 131072 \
      --modes dense,xa80,xa95,flex80,flex95 --configs "${ADAPTIVE_SWEEP[@]}" --examples 20
    tar czf "$OUT/acc_sweep.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d acc_sweep.json*)
    ;;
  adaptive2|adaptive2_acc)
    # one call each: the candidates the first measured lease pointed at (XAttention 0.9 / 0.95 with
    # the rewritten estimate, TriangleMix with 512 dense last rows, FlexPrefill 0.8) and the shipped
    # config against eager at 32K and 128K with Inductor and profiles; then their accuracy
    # against dense at 128K
    deadline=$(( $(date +%s) + ${2:-560} ))
    if [ "$stage" = adaptive2 ]; then
      run_until adaptive2 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config "$CFG_FAST" --configs "${ADAPTIVE2[@]}" \
        --modes eager,searched,xa95,xa,trimix512,flex80 --lengths 32768,131072 --reps 2 --profile searched,xa95
      tar czf "$OUT/adaptive2.tgz" -C "$RUNS" adaptive2 adaptive2.log
    else
      run_until acc_adaptive2.json 30 benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 131072 \
        --modes dense,xa95,flex80,trimix512 --configs "${ADAPTIVE2[@]}" --examples 20
      tar czf "$OUT/acc_adaptive2.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d acc_adaptive2.json*)
    fi
    ;;
  adaptive3|adaptive3_acc)
    # one call each: TriangleMix with FlexPrefill in its shallow layers (no searched config)
    # against eager at 32K and 128K with Inductor, TriangleMix with 512 dense rows beside them;
    # then their accuracy against dense at 128K
    deadline=$(( $(date +%s) + ${2:-560} ))
    if [ "$stage" = adaptive3 ]; then
      run_until adaptive3 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config "$CFG_FAST" \
        --configs "${ADAPTIVE3[@]}" "${ADAPTIVE2[3]}" --modes eager,flextri,flex80tri,flextri8k,trimix512 \
        --lengths 32768,131072 --reps 2 --profile flextri
      tar czf "$OUT/adaptive3.tgz" -C "$RUNS" adaptive3 adaptive3.log
    else
      run_until acc_adaptive3.json 30 benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 131072 \
        --modes dense,flextri,flex80tri,flextri8k,trimix512 --configs "${ADAPTIVE3[@]}" "${ADAPTIVE2[3]}" --examples 20
      tar czf "$OUT/acc_adaptive3.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d acc_adaptive3.json*)
    fi
    ;;
  native32|native32_acc)
    # at 16K and 32K with native RoPE: the config searched at 32K (the shipped
    # qwen2.5-coder-1.5b-32k) against eager, the 128K config beside it (`c128`); then their
    # accuracy at 32K against dense
    deadline=$(( $(date +%s) + ${2:-420} ))
    CFG_32K=mi_compile/configs/qwen2.5-coder-1.5b-32k.json
    if [ "$stage" = native32 ]; then
      e2e_vs_c128 native32 "$CFG_32K" 16384,32768
      tar czf "$OUT/native32.tgz" -C "$RUNS" native32 native32.log
    else
      acc_vs_c128 acc_native32 "$CFG_32K" 32768
    fi
    ;;
  yard64|yard64_acc)
    # a config searched at 64K (YaRN 4, budget 0.08, recall floor 0.6, the last 64 queries dense;
    # ~2-3 minutes) against the shipped 128K config at 64K: yard64 searches and times both against
    # eager (two compiles); yard64_acc scores them against dense at 64K (after yard64, which
    # leaves the config in $RUNS/cfg)
    deadline=$(( $(date +%s) + ${2:-480} ))
    CFG_64K=$RUNS/cfg/qwen_65536_b0.08_last64.json
    if [ "$stage" = yard64 ]; then
      mkdir -p "$RUNS/cfg"
      timeout "$(( deadline - $(date +%s) ))" python3 -m mi_compile search "${SEARCH_ARGS[@]}" --length 65536 \
        --budget 0.08 --min-recall 0.6 --also-budgets 0.06,0.12 --dense-last 64 \
        --out "$CFG_64K" 2>&1 | grep -v "it/s\]" > "$RUNS/search_64k.log"
      tail -15 "$RUNS/search_64k.log"
      e2e_vs_c128 yard64 "$CFG_64K" 65536
      tar czf "$OUT/yard64.tgz" -C "$RUNS" yard64 yard64.log search_64k.log cfg
    else
      acc_vs_c128 acc_yard64 "$CFG_64K" 65536
    fi
    ;;
  yard06|yard06_acc)
    # the 128K search's config at budget 0.06 (every pattern, estimates charged, the last 64
    # queries dense: yard_search's `_b0.06` output, searched first when absent, ~3 minutes)
    # against the shipped 128K config at 128K: TTFT against eager with Inductor (two compiles),
    # then accuracy against dense; the candidate for the 0.30x goal (the shipped one: 0.33x)
    deadline=$(( $(date +%s) + ${2:-480} ))
    CFG_06=$RUNS/cfg/all_b0.08_last64_b0.06.json
    if [ "$stage" = yard06 ]; then
      # the search leaves the e2e its ~5 minutes (two compiles, eager and the timed calls at 128K)
      [ -f "$CFG_06" ] || OUT="$OUT" bash "$0" yard_search "$(( deadline - $(date +%s) - 300 ))"
      e2e_vs_c128 yard06 "$CFG_06" 131072
      tar czf "$OUT/yard06.tgz" -C "$RUNS" yard06 yard06.log cfg
    else
      acc_vs_c128 acc_yard06 "$CFG_06" 131072
    fi
    ;;
  last512|last512_acc)
    # the shipped config against the same with every head's last 512 queries dense (accuracy
    # against speed: the harness's top-1 reads the last 512 positions): TTFT at 128K with
    # Inductor, then accuracy at 128K against dense
    deadline=$(( $(date +%s) + ${2:-480} ))
    L512=benchmarks/configs/qwen/qwen_128k_b0.08_last512.json
    if [ "$stage" = last512 ]; then
      run_until last512 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config "$CFG_FAST" \
        --configs "last512=$L512" --modes eager,searched,last512 --lengths 131072 --reps 2
      tar czf "$OUT/last512.tgz" -C "$RUNS" last512 last512.log
    else
      run_until acc_last512.json 30 benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 131072 \
        --modes dense,searched,last512 --configs "last512=$L512" --examples 20
      tar czf "$OUT/acc_last512.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d acc_last512.json*)
    fi
    ;;
  yard|yard_acc|yard_search)
    # the shipped 128K config (budget 0.08 from the vertical-slash / block-sparse search, the
    # prompt's last 64 queries dense) against `allp`, chosen at the same budget from the search
    # over every pattern with the estimates charged (benchmarks/configs/qwen/; yard_search
    # remakes it on the device). yard: TTFT against eager at 32K-128K with Inductor (two
    # compiles: ~3 minutes on the H100, where the first took 118 s); yard_acc: accuracy at 128K
    # against dense (modes from YARD_ACC_MODES, default dense,searched); yard_search: the 128K
    # search (budgets 0.06 / 0.08 / 0.12; ~3 minutes)
    deadline=$(( $(date +%s) + ${2:-480} ))
    ALLP=benchmarks/configs/qwen/qwen_128k_all_b0.08_last64.json
    case $stage in
      yard)
        run_until yard 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config "$CFG_FAST" \
          --configs "allp=$ALLP" --modes eager,searched,allp --lengths 32768,65536,131072 --reps 2 --profile allp
        tar czf "$OUT/yard.tgz" -C "$RUNS" yard yard.log ;;
      yard_acc)
        run_until acc_yard.json 30 benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 131072 \
          --modes "${YARD_ACC_MODES:-dense,searched}" --configs "allp=$ALLP" --examples 20
        tar czf "$OUT/acc_yard.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d acc_yard.json*) ;;
      yard_search)
        mkdir -p "$RUNS/cfg"
        timeout "$(( deadline - $(date +%s) ))" python3 -m mi_compile search "${SEARCH_ARGS[@]}" --length 131072 \
          --budget 0.08 --min-recall 0.6 --also-budgets 0.06,0.12 --dense-last 64 \
          --out "$RUNS/cfg/all_b0.08_last64.json" 2>&1 | grep -v "it/s\]" > "$RUNS/search_yard.log"
        tail -15 "$RUNS/search_yard.log"
        tar czf "$OUT/yard_search.tgz" -C "$RUNS" search_yard.log cfg ;;
    esac
    ;;
  family)
    # the shipped config family (qwen2.5-coder-1.5b: the 32K config up to 32768 keys, the 128K
    # one above) against eager at 32K, 64K and 128K with Inductor (YaRN 4 at all three): one
    # compiled graph for every length, each call running its member (FAMILY_LENGTHS to change
    # the lengths; ~4 minutes after the model's first load)
    deadline=$(( $(date +%s) + ${2:-300} ))
    run_until family 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config qwen2.5-coder-1.5b \
      --modes eager,searched --lengths "${FAMILY_LENGTHS:-32768,65536,131072}" --reps 2
    tar czf "$OUT/family.tgz" -C "$RUNS" family family.log
    ;;
  yard_gluon)
    # the shipped 128K config with the Triton kernels against the same compiled model with every
    # layer in Gluon (searched@gluon_all: MI_COMPILE_HOPPER=ws_sparse around each call; its layers
    # all mix vertical-slash and block-sparse heads, so =1 / =ws would change nothing), eager
    # beside them, at 32K and 128K; one compile (~1-2 minutes); profiles at 128K. GLUON_WS=1 adds
    # searched@gluon_sparse_ws (the warp-specialised kernel for any index: only once its checks
    # passed on a GPU, `hopper`)
    deadline=$(( $(date +%s) + ${2:-420} ))
    ws_mode=$([ "${GLUON_WS:-0}" = 1 ] && echo ,searched@gluon_sparse_ws)
    run_until yard_gluon 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config "$CFG_FAST" \
      --modes "eager,searched,searched@gluon_all$ws_mode" --lengths 32768,131072 --reps 2 \
      --profile "searched,searched@gluon_all$ws_mode"
    tar czf "$OUT/yard_gluon.tgz" -C "$RUNS" yard_gluon yard_gluon.log
    ;;
  turn|chunked|chunked_acc)
    # prefills that continue a cache, with the shipped 128K config: turn: a 2K-token turn after
    # 126K cached tokens (128K in all: YaRN factor 4) against eager, with profiles (one compile of
    # the cached graph, ~110 s; ~330 s in all); chunked: that context in 16K chunks against eager
    # and the unchunked prefill, also as `absolute` (the config without its "length": every
    # chunk keeps the full vertical counts), each compiled mode's whole and chunked prefill
    # profiled, per-chunk times (four compiles of 55-170 s: give it ~600 s; ABSOLUTE=0 leaves out
    # `absolute`: two compiles, ~330 s); both also as `<mode>@top_select` (the Triton top-k
    # select kernel, no compile; COMPARE_TOPK=0 leaves them out); CUDAGRAPHS=1 adds each compiled
    # mode as `<mode>_cg` with mode="reduce-overhead" (two more compiles: more than 600 s; the
    # compiles alone took 445 s on the H100 before the first `_cg` chunks), CUDAGRAPHS=only
    # runs the compiled modes as `<mode>_cg` only (~400 s);
    # CHUNK_CACHE=static (chunked only) continues a StaticCache instead of a DynamicCache; chunked_acc:
    # SCBench-style conversations (one shared context, a turn per task) and the tasks' prompts
    # in 16K chunks (CHUNKS=8192,16384,32768 for more sizes) at 128K, dense against the shipped config
    # (CHUNK_MODES=searched leaves out dense's chunks, the rounding floor: more examples in the time)
    deadline=$(( $(date +%s) + ${2:-480} ))
    if [ "$stage" != chunked_acc ]; then
      phase=$([ "$stage" = turn ] && echo turn || echo chunked)
      extra=$([ "$stage" = chunked ] && [ "${ABSOLUTE:-1}" = 1 ] && echo --absolute-chunks)
      timeout "$(( deadline - $(date +%s) ))" python3 -m benchmarks.chunked --model qwen2.5-coder-1.5b \
        --config "$CFG_FAST" --context 129024 --turn 2048 --chunk 16384 --reps 2 --profile --phases "$phase" $extra \
        $([ "${COMPARE_TOPK:-1}" = 1 ] && echo --compare-topk) $(case ${CUDAGRAPHS:-0} in 1) echo --cudagraphs;; only) echo --cudagraphs-only;; esac) \
        --cache "${CHUNK_CACHE:-dynamic}" --out "$RUNS/$stage" 2>&1 | grep -v "it/s\]" > "$RUNS/$stage.log"
      tail -30 "$RUNS/$stage.log"
      tar czf "$OUT/$stage.tgz" -C "$RUNS" "$stage" "$stage.log"
    else
      run_until acc_chunked.json 30 benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 131072 \
        --modes dense,searched --examples 20 --conversations 20 --chunks "${CHUNKS:-16384}" --turn-tokens 2048 \
        --chunk-modes "${CHUNK_MODES:-dense,searched}"
      tar czf "$OUT/acc_chunked.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d acc_chunked.json*)
    fi
    ;;
  floor)
    # top-1 / KL's rounding floor at 128K: exact attention computed by the op's own wide kernel
    # (`floor`: A-shape with a window past every key, the causal square in another order than
    # SDPA's) against dense, beside the shipped config, on three Python documents (no tasks;
    # ~2 minutes after the model's first load): how far below 1 top-1 sits without any sparsity
    deadline=$(( $(date +%s) + ${2:-240} ))
    run_until acc_floor.json 20 benchmarks.accuracy --model qwen2.5-coder-1.5b --device cuda --no-inductor \
      --tasks "" --lengths 131072 --modes dense,searched --searched "$CFG_FAST" \
      --configs floor=a_shape:0:1048576 --docs 3
    tar czf "$OUT/acc_floor.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d acc_floor.json*)
    ;;
  searched)
    # one call: the 128K search over every registered pattern's candidates (the adaptive ones and
    # the tiled diagonals included), configs at budgets 0.08 / 0.12 / 0.16 (recall floor 0.6),
    # then their TTFT against eager with Inductor
    deadline=$(( $(date +%s) + ${2:-580} ))
    timeout "$(( deadline - $(date +%s) ))" python3 -m mi_compile search "${SEARCH_ARGS[@]}" --length 131072 \
      --budget 0.12 --min-recall 0.6 --also-budgets 0.08,0.16 --out "$RUNS/qwen_131072_all.json" 2>&1 \
      | grep -v "it/s\]" > "$RUNS/search_all.log"
    tail -15 "$RUNS/search_all.log"
    run_until searched 40 benchmarks.e2e --model qwen2.5-coder-1.5b --config "$RUNS/qwen_131072_all.json" \
      --configs "s08=$RUNS/qwen_131072_all_b0.08.json" "s16=$RUNS/qwen_131072_all_b0.16.json" \
      --modes eager,searched,s08,s16 --lengths 32768,131072 --reps 2 --profile searched
    tar czf "$OUT/searched.tgz" -C "$RUNS" searched searched.log search_all.log $(cd "$RUNS" && ls qwen_131072_all*)
    ;;
  searched_acc)
    # one call: accuracy at 128K of the three searched configs against dense
    deadline=$(( $(date +%s) + ${2:-560} ))
    run_until acc_searched.json 30 benchmarks.accuracy "${ACC_ARGS[@]}" --lengths 131072 \
      --modes dense,searched,s08,s16 --searched "$RUNS/qwen_131072_all.json" \
      --configs "s08=$RUNS/qwen_131072_all_b0.08.json" "s16=$RUNS/qwen_131072_all_b0.16.json" --examples 20
    tar czf "$OUT/acc_searched.tgz" -C "$RUNS" $(cd "$RUNS" && ls -d acc_searched.json*)
    ;;
  checks)
    # the correctness matrix (every head dim, fp16 / bf16, every pattern); no model needed
    # a pair's process still running 20 s before the deadline is killed (a hung kernel must not
    # hold the GPU into the next stage); its finished checks are kept
    timeout "${2:-300}" python3 -m benchmarks.gpu_checks --timeout-s "$(( ${2:-300} - 20 ))" > "$OUT/gpu_checks.log" 2>&1
    tail -40 "$OUT/gpu_checks.log"
    ;;
  hopper)
    # the Gluon Hopper kernels (opt-in MI_COMPILE_HOPPER): their correctness checks (and the chunk
    # checks: a chunk's split dense-rows blocks), and their rows in the kernel benchmark next to
    # the Triton kernels and cuDNN (128K first); no model needed
    deadline=$(( $(date +%s) + ${2:-300} ))
    timeout "$(( ${2:-300} / 2 ))" python3 -m benchmarks.gpu_checks --head-dims 64,128 --checks hopper,chunk \
      --timeout-s "$(( ${2:-300} / 2 - 15 ))" \
      > "$OUT/gpu_checks_hopper.log" 2>&1
    grep -i "hopper\|chunk\|passed" "$OUT/gpu_checks_hopper.log" | tail -24
    # the rows of the warp-specialised kernel for any index and of the persistent one only after
    # their four checks (2 head dims x 2 dtypes) passed: a deadlock would hang the rest
    ws_ok=$(grep -c "hopper_sparse_ws *yes" "$OUT/gpu_checks_hopper.log")
    persist_ok=$(grep -c "hopper_ws_persist *yes" "$OUT/gpu_checks_hopper.log")
    HOPPER_SPARSE_WS=$([ "$ws_ok" -ge 4 ] && echo 1 || echo 0) \
    HOPPER_WS_PERSIST=$([ "$persist_ok" -ge 4 ] && echo 1 || echo 0) \
    NS=${NS:-131072,32768} SWEEP=0 FLEX=0 timeout "$(( deadline - $(date +%s) ))" python3 -m benchmarks.kernels \
      > "$OUT/kernels_hopper.log" 2>&1
    grep -i "wide\|hopper\|cudnn" "$OUT/kernels_hopper.log" | tail -24
    ;;
  host)
    # the op's host time for a 2K chunk against 128K keys and for whole prompts (cProfile of
    # the chunk's call); no model needed
    timeout "$(( ${2:-240} / 2 ))" python3 -m benchmarks.host_overhead --lengths 131072,32768 --query-len 2048 --profile \
      --no-model --out "$OUT/host_chunk.json" > "$OUT/host_chunk.log" 2>&1
    timeout "$(( ${2:-240} / 2 ))" python3 -m benchmarks.host_overhead --lengths 131072 --no-model \
      --out "$OUT/host_whole.json" > "$OUT/host_whole.log" 2>&1
    grep -v "^  " "$OUT/host_chunk.log" | tail -30; tail -5 "$OUT/host_whole.log"
    ;;
  chunk_work)
    # attention alone, every layer of the shipped 128K config on random inputs: the prompt in 16K
    # chunks against its whole prefill, and the chunks again with their dense last rows split
    # into parts of SPLIT_TILES key tiles, both again with the Triton top-k select kernel
    # instead of torch.topk and a sort, and both profiled (device time per kernel, the chunks against the
    # whole: chunk_work_profile.txt; ~150-200 s on an H100); no model needed
    timeout "${2:-240}" python3 -m benchmarks.chunk_work --split-tiles "${SPLIT_TILES:-16,64}" --compare-topk --profile \
      --out "$OUT/chunk_work.json" > "$OUT/chunk_work.log" 2>&1
    tail -8 "$OUT/chunk_work.log"
    ;;
  kernels)
    # the kernel benchmark at 32K and 128K without the launch sweep; no model needed
    NS=${NS:-32768,131072} SWEEP=0 FLEX=${FLEX:-0} timeout "${2:-240}" python3 -m benchmarks.kernels > "$OUT/kernels.log" 2>&1
    tail -40 "$OUT/kernels.log"
    ;;
  queue)
    # started in the lease's first call: the stages named (STAGE:SECONDS ...) run one after
    # another in a new process session, so they outlive the call and the GPU does not wait for
    # the calls that carry the model; a stage that loads the model waits until the join has
    # published it and gguf is installed. Each stage writes to $RUNS/out/STAGE; `collect`
    # brings it back. The code runs from a copy in /root/src (the calls replace the tree).
    shift
    rm -rf /root/src && cp -r . /root/src && cd /root/src
    setsid nohup bash -c '
      for s in "$@"; do
        name=${s%%:*}; secs=${s#*:}
        case $name in
          checks|kernels|hopper|host|chunk_work) ;;
          *) until [ -d /root/site/gguf ] && python3 -m benchmarks.device_model status | grep -q "published$"; do
               sleep 3; done ;;
        esac
        echo "== $name $secs s, start $(date +%T)"
        mkdir -p '"$RUNS"'/out/$name
        OUT='"$RUNS"'/out/$name bash benchmarks/qwen_device.sh "$name" "$secs"
        echo "== $name rc=$? end $(date +%T)"
      done
      echo "== queue done $(date +%T)"' queue "$@" > "$RUNS/queue.log" 2>&1 < /dev/null &
    echo "queued: $*"
    ;;
  collect)
    cat "$RUNS/queue.log" 2>/dev/null
    tar czf "$OUT/runs.tgz" -C "$RUNS" --exclude='*.safetensors' .
    ;;
  *)
    echo "usage: $0 {search|choose B1,B2,...|prep|e2e|acc128|adaptive|adaptive_acc|adaptive_sweep|policy|policy_acc|adaptive2|adaptive2_acc|adaptive3|adaptive3_acc|searched|searched_acc|yard|yard_acc|yard_search|yard64|yard64_acc|yard06|yard06_acc|yard_gluon|native32|native32_acc|last512|last512_acc|floor|turn|chunked|chunked_acc|checks|kernels|hopper|host|chunk_work [SECONDS]|queue STAGE:SECONDS ...|collect}" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# One lent-H200 session's runs for issue 5, in parts that each fit one device call (600 s), after
# FA4 arrived (experiments/fa4_env.sh: calls 1-4 carry .fa4a, .fa4b, .fa4d, .whl; call 5 .fa4c):
#
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh record   # ~4.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh graphs   # <9.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh long     # ~4 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh checks   # ~6 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh first_checks # ~7 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh batch    # <9.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh batch_more # ~8 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh host     # ~2 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh tiles    # ~2 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh lanes    # ~5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh parts    # ~5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh settle "0 3" # ~4 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh small    # ~2 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh fill     # ~2 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh pack     # ~3 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh group    # ~6 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh group_bwd # ~8 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh verify   # ~6 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh capture  # ~4 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh boundary # ~5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh traced_first # ~6 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh zeros    # ~8 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh causal_group # ~7 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh persistent # ~8 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh persistent_long # ~7 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh persistent_again # ~3 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh unit_order # ~6 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh bwd_tiles # ~1.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh bwd_ab   # ~2.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh fuzz     # ~7.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh scripts  # ~5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh options  # ~4 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh replays  # ~2 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh graph_modes # <10 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh add_dq   # ~9 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh dpsum    # <9.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh grads    # <9.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh threads  # <9.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh typing   # <9.5 min
#   source experiments/fa4_env.sh || exit 1; OLD_TREE=old bash experiments/gpu_session.sh determinism # <9.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh dtypes   # <9 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh stop80   # <9.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh ops      # <9.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh flex_groups # <9 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh merge_cost # ~2 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh spanning # ~5 min, x2
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh weak     # x2
#   source experiments/fa4_env.sh || exit 1; OLD_TREE=old bash experiments/gpu_session.sh trees # ~5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh switches # <9.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh switches_b2 # ~2 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh wide     # <8.5 min
#
# record: the bench's record at 32K/131K and 1M (docs/benchmarks/h200_perf.md's first two
#   commands), plotted as fractions of dense SDPA (experiments.plot_record); graphs: the 32K /
#   131K record with every row also replayed from CUDA graphs (bench --graphs), plotted so; long: its 2M/4M command; checks: every local strategy against the oracle on the GPU,
#   the fused FA4 kernels' probes (merge, add, zero), and the forward and forward+backward kernel
#   timelines at 131K; host: where the host's time goes at 32K (host-bound): the host profile of a
#   head_groups forward and forward+backward, and single / back-to-back times with the host's own
#   time per call; tiles: both mixings' forward with FA4's causal forward tiles at the step-20
#   sweep's best causal configuration against FA4's default (fa4_probe --part config); lanes:
#   head_groups at 32K and 131K with its configs on concurrent streams in eager forwards, or
#   forwards and backwards, against one stream (ringattn.lanes.MODE never, forward, always, two
#   turns each; step 29, after step 27's runs of the heavier lanes), then replayed from CUDA graphs
#   with lanes or not (capture vs never); parts: both mixings with FA4's placed backward in parts
#   twice the plan's against the plan's (overheads --bwd-merge 2 1, two turns); settle: the bench at
#   131K once per --settle value given (seconds of each call back to back before each of its
#   timings; default "0 3"); small: 32K forward and forward+backward kernel timelines of both
#   mixings (is the GPU idle between the kernels, or busy with few CTAs?), and head_groups'
#   forward+backward one at 131K; fill: the backward's gradient fill kernel over its rows per
#   program and warps (fa4_probe --part fill) at 131K and 32K, and head_groups' 32K forward+backward
#   timeline with the host's launch calls (kernel_timeline --host); pack: head_groups' backward with
#   its LSE gathered once per call (ringattn.core.PACK_LSE) or copied per launch, two turns, at 32K
#   and 131K, causal or not, and the 32K host timeline again; group: head_groups' configs in one
#   FA4 forward (ringattn.kernels.fa4_group) against one per config: the kernel's probe
#   (fa4_probe --part group: rows, LSE, zeros, ms and host µs at 32K and 131K), the module A/B
#   (overheads --group yes no, two turns, 32K and 131K, causal or not) and the 131K causal
#   forward's kernel timeline; group_bwd: head_groups' configs in one FA4 backward
#   (ringattn.kernels.fa4_group_bwd; step 33; verify, zeros and causal_group: step 34, and
#   persistent, persistent_long and persistent_again: step 35; unit_order: step 36;
#   bwd_tiles and bwd_ab: step 37 (its sections part, run and removed, is at 13b3020; its
#   bwd_persistent and bwd_split parts, run in steps 37-38 and removed, at 59e7a22); each
#   described where it runs
#   below): the kernel's probe (fa4_probe --part group_bwd:
#   gradients against FA4's per-config backward, ms and host µs at 32K and 131K), the module A/B
#   (overheads --group-bwd yes no, two turns, 32K / 65K / 131K, causal or not; from 65K the
#   core leaves it out, fa4_group_bwd.ALL_TILES_MAX) and the GPU oracle check; spanning (on
#   nvidia-h200-x2): 2-GPU
#   weak scaling at 16K per GPU replayed from CUDA graphs, the spanning config's blocks on the
#   caller's stream or on lanes (ringattn.lanes.SPANNING no vs yes; run in step 28: no gain beyond
#   the runs' spread, so SPANNING stays off); weak (on nvidia-h200-x2): the 2-GPU oracle check and
#   eager weak scaling at 16K and 64K per GPU (since step 29 eager calls put the local configs on
#   lanes too: not yet checked on NCCL). Each part writes under $OUT/<part>/ (one tarball,
#   $OUT/<part>.tgz, so no file is left out of what comes back) and prints a short summary last.
set -uo pipefail
part=${1:?usage: gpu_session.sh determinism|dtypes|stop80|typing|threads|grads|review|ops|record|trees|graphs|first_checks|batch|batch_more|replays|graph_modes|add_dq|dpsum|scripts|options|fuzz|merge_cost|long|checks|capture|boundary|traced_first|host|tiles|lanes|parts|settle|small|fill|pack|group|group_bwd|verify|zeros|causal_group|persistent|persistent_long|persistent_again|unit_order|bwd_tiles|bwd_ab|spanning|weak|switches|switches_b2|wide}
out=${OUT:-results}/$part
mkdir -p "$out"
bench=(python -m experiments.bench --computers sdpa --dilations segment_local --no-flash-row
    --no-in-model --no-compile)
script() { # SECONDS NAME ARGS...: experiments.NAME under a time limit, its log and exit status
    local seconds=$1 name=$2
    shift 2
    timeout "$seconds" python -m "experiments.$name" "$@" >>"$out/$name.log" 2>&1
    echo "$name $1: rc=$?" >>"$out/rc.log"
}
per_entry_bench() { # SECONDS PER_ENTRY NAME ARGS...: the bench at b = 2 in a process of its
    # own, ringattn.launches.PER_ENTRY set to PER_ENTRY (True / False), into $out/NAME[.log]
    local seconds=$1 per_entry=$2 name=$3
    shift 3
    timeout "$seconds" python -c "import sys, ringattn.launches as l; l.PER_ENTRY = sys.argv[1] == 'True'
from experiments import bench; sys.exit(bench.main(sys.argv[2:]))" "$per_entry" "${bench[@]:3}" \
        --no-torch-row --batch 2 --repeats 3 --warmup 1 "$@" --out "$out/$name" \
        >"$out/$name.log" 2>&1
}
brief() { # overheads.json rows, a short line each: the A/B choices, ms, host ms, peaks, errors
    python - "$@" <<'PY'
import json, sys
keys = ("n", "mixing", "causal", "lanes", "fill", "zero", "pack_lse", "group", "group_bwd", "group_bwd_zero", "group_bwd_max", "group_persistent", "group_max", "bwd_tiles", "bwd_merge", "fwd_ms",
        "fwdbwd_ms", "fwd_ms_b2b", "fwdbwd_ms_b2b", "fwd_host_ms", "fwdbwd_host_ms", "fwdbwd_mem_vs_io", "vs_first_err",
        "graph_fwd_ms", "graph_fwdbwd_ms", "graph_fwd_err", "graph_fwdbwd_err")
for path in sys.argv[1:]:
    for row in json.load(open(path))["rows"]:
        print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                       for k in keys if k in row))
PY
}
case "$part" in
capture)
    # after a change to what the GPU paths keep between calls (memory managers, replays,
    # prepared launches): CUDA-graph capture of new lengths against the oracle, which of FA4's
    # recordings are kept as replays, then the GPU oracle check (step 55)
    python -m experiments.graph_capture_check --out "$out" >"$out/capture.log" 2>&1
    python -m experiments.replay_check --n 16384 --out "$out" >"$out/replay.log" 2>&1
    python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" >"$out/check.log" 2>&1
    summary="$(tail -n 1 "$out/capture.log")
$(tail -n 1 "$out/replay.log")
$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")"
    ;;
boundary)
    # after a change at the eager boundary (api.py): the GPU oracle check, then the record's
    # 32K / 131K bench (the boundary's host time shows first at 32K)
    python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" >"$out/check.log" 2>&1
    "${bench[@]}" --n 32768 131072 --repeats 10 --warmup 3 --out "$out/bench" >"$out/bench.log" 2>&1
    summary="$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(grep -h "segment_local/sdpa |" "$out/bench.log")"
    ;;
traced_first)
    # a module compiled before any eager call (its trace registers the core's ops; before, the
    # core was traced inline) against eager, compiled and compiled after one eager call
    python -m experiments.bench --computers sdpa --dilations segment_local --no-flash-row \
        --traced-first --n 32768 131072 --repeats 5 --warmup 2 --out "$out/bench" \
        >"$out/bench.log" 2>&1
    summary=$(grep -h "segment_local/sdpa" "$out/bench.log" | grep -v "^row" | cut -d'|' -f2-12)
    ;;
record)
    "${bench[@]}" --n 32768 131072 --repeats 10 --warmup 3 --out "$out/bench" >"$out/bench.log" 2>&1
    "${bench[@]}" --n 1048576 --repeats 5 --warmup 2 --check-n 0 --out "$out/bench_1m" \
        >"$out/bench_1m.log" 2>&1
    python -m experiments.plot_record "$out/bench/bench.json" "$out/bench_1m/bench.json" \
        --out "$out/record_ratios.png" >"$out/record_ratios.log" 2>&1
    summary=$(grep -h "segment_local/sdpa |" "$out"/bench*.log)
    ;;
graphs)
    # the record's first command with --graphs (stop 61, CPU-built): every row, dense SDPA's
    # too, also replayed from CUDA graphs, against dense SDPA replayed in the same run (the
    # owner's third question on issue 5), then plotted as fractions of dense SDPA
    timeout 560 "${bench[@]}" --n 32768 131072 --graphs --no-torch-row --repeats 10 --warmup 3 \
        --out "$out/bench" >"$out/bench.log" 2>&1 || echo "bench: exit $?" >>"$out/bench.log"
    python -m experiments.plot_record "$out/bench/bench.json" --out "$out/graphs_ratios.png" \
        >"$out/graphs_ratios.log" 2>&1
    summary="$(grep -h "^| [0-9]" "$out/graphs_ratios.log")
$(grep -h "FAILED\|bench: exit\|Traceback" "$out/bench.log" | cut -c1-300)"
    ;;
long)
    # LONG_N: the lengths (default 2M and 4M; on an H100, 80 GB, "2097152": 4M's q, k, v, dout
    # and out alone need 86 GB)
    # shellcheck disable=SC2086
    "${bench[@]}" --n ${LONG_N:-2097152 4194304} --fwd-only-from 4194304 --check-n 0 --out "$out/bench" \
        >"$out/bench.log" 2>&1
    summary=$(grep -h "segment_local/sdpa |" "$out/bench.log")
    ;;
first_checks)
    # after a change to the fused kernels' first-call guards (step 71: checked on the blocks'
    # first entries, then launched whole): the GPU oracle check, then the bench at 131K with its
    # oracle check at 131K too, so that head_groups' persistent grouped kernel (past
    # fa4_group.ALL_TILES_MAX tiles: not at the check's 32K) meets its first call there
    python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" >"$out/check.log" 2>&1
    "${bench[@]}" --n 131072 --check-n 131072 --repeats 5 --warmup 2 --out "$out/bench" \
        >"$out/bench.log" 2>&1
    passed=$(grep -c '| True |' "$out/flex_gpu_check/flex_gpu_check.md" 2>/dev/null)
    summary="oracle check: ${passed:-0} rows within tolerance; refusals: $(grep -c "is not used for" "$out"/*.log)
$(grep -h "segment_local/sdpa |" "$out/bench.log" | cut -d'|' -f2-6,9,12,17-18)"
    ;;
batch)
    # b = 2 (step 71: a part whose rows over the batch are no one view goes once per batch entry,
    # ringattn.launches.PER_ENTRY; before, it took the general path, which copies its q, k, v
    # rows): the bench at 131K with PER_ENTRY on, then off (A/B, processes of their own), its
    # oracle check at 16K (lse's float64 oracle at 32K and b = 2 needs more than 80 GB)
    for per_entry in True False; do
        per_entry_bench 280 "$per_entry" "bench_$per_entry" --n 131072 --check-n 16384
    done
    summary="$(grep -H "segment_local/sdpa |\|FAILED" "$out"/bench_*.log | cut -c1-220)"
    ;;
batch_more)
    # after step 72's batch A/B (per-entry launches paid at 131K): b = 2 with tail segments
    # (106496 = 3 x 32768 + 8192; checked at 12288, where the 8K, 16K and 32K configs have tails:
    # head_groups' grouped kernel gets b times the groups, the plain baseline its tails), lse at
    # 1M x 2, then the A/B at 32K, where calls are host-bound (more launches per call)
    per_entry_bench 250 True tail --n 106496 --check-n 12288
    per_entry_bench 250 True lse_1m --n 1048576 --mixing lse --check-n 0
    for per_entry in True False; do
        per_entry_bench 250 "$per_entry" "small_$per_entry" --n 32768 --mixing lse --check-n 0 \
            --b2b-calls 20
    done
    summary="refusals: $(grep -c "is not used for" "$out"/*.log | tr '\n' ' ')
$(grep -H "segment_local/sdpa |\|plain (gather\|FAILED" "$out"/*.log | cut -c1-230)"
    ;;
checks)
    python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" >"$out/check.log" 2>&1
    for probe in merge add zero; do
        python -m experiments.fa4_probe --part "$probe" --n 131072 --repeats 10 --out "$out" \
            >"$out/probe_$probe.log" 2>&1
    done
    python -m experiments.kernel_timeline --n 131072 --calls 10 --out "$out/timeline_fwd" \
        >"$out/timeline_fwd.log" 2>&1
    python -m experiments.kernel_timeline --n 131072 --backward --calls 5 \
        --out "$out/timeline_fwdbwd" >"$out/timeline_fwdbwd.log" 2>&1
    passed=$(grep -c '| True |' "$out/flex_gpu_check/flex_gpu_check.md" 2>/dev/null)
    summary="oracle check: ${passed:-0} rows within tolerance
$(grep -h "GPU busy" "$out"/timeline_*/kernel_timeline.md | cut -c1-120)"
    ;;
host)
    # causal and not, each forward and forward+backward (step 25's record; its causal run passed
    # --forward, which --host ignored then and now keeps to the forward alone)
    for args in "--causal" ""; do
        # shellcheck disable=SC2086
        python -m experiments.profile_core --host --n 32768 --mixing head_groups $args --rows 28 \
            >>"$out/host_profile.txt" 2>&1
    done
    python -m experiments.overheads --n 32768 --split 8 --steady --repeats 10 \
        --out "$out/overheads" >"$out/overheads.log" 2>&1
    summary="$(grep -h "^=== " "$out/host_profile.txt")
$(tail -6 "$out/overheads.log")"
    ;;
tiles)
    python -m experiments.fa4_probe --part config --n 131072 --repeats 10 --out "$out" \
        >"$out/probe_config.log" 2>&1
    summary=$(grep -h "^problem=module" "$out/probe_config.log" | sed 's/ | kernels=.*//')
    ;;
lanes)
    for causal in "" "--causal"; do
        # shellcheck disable=SC2086
        python -m experiments.overheads --n 32768 131072 --mixing head_groups $causal --split 8 \
            --lanes never forward always never forward always --steady --repeats 10 \
            --out "$out/lanes${causal:+_causal}" >"$out/lanes${causal:+_causal}.log" 2>&1
    done
    python -m experiments.overheads --n 131072 --mixing head_groups --split 8 \
        --lanes capture never --graphs --repeats 10 --out "$out/graphs" >"$out/graphs.log" 2>&1
    summary=$(brief "$out"/lanes*/overheads.json "$out/graphs/overheads.json")
    ;;
parts)
    for causal in "" "--causal"; do
        # shellcheck disable=SC2086
        python -m experiments.overheads --n 32768 131072 $causal --split 8 --bwd-merge 2 1 2 1 \
            --steady --repeats 10 --out "$out/parts${causal:+_causal}" \
            >"$out/parts${causal:+_causal}.log" 2>&1
    done
    summary=$(brief "$out"/parts*/overheads.json)
    ;;
spanning)
    NCCL_NVLS_ENABLE=0 timeout 540 torchrun --standalone --nproc_per_node=2 \
        -m experiments.distributed_bench --part weak --weak-n 16384 --graphs \
        --spanning-lanes no yes --out "$out" >"$out/spanning.log" 2>&1
    summary=$(grep -h "^| 16384 | 2 " "$out/distributed_weak.md" | cut -d'|' -f5-7,9,21-)
    ;;
settle)
    i=0
    for seconds in ${2:-0 3}; do
        i=$((i + 1))
        "${bench[@]}" --n 131072 --repeats 10 --warmup 3 --check-n 0 --no-torch-row \
            --settle "$seconds" --out "$out/bench_${i}_settle$seconds" \
            >"$out/bench_${i}_settle$seconds.log" 2>&1
    done
    summary=$(for log in "$out"/bench_*.log; do
        echo "$log"
        grep -h "segment_local/sdpa |\|dense SDPA" "$log" | cut -d'|' -f3-4,7-14
    done)
    ;;
small)
    # 32K, where head_groups' forward+backward stays at ~0.7x: is the GPU idle between kernels
    # (host-bound) or busy with few CTAs? Timelines of both mixings (and head_groups' at 131K:
    # where its fill goes)
    python -m experiments.kernel_timeline --n 32768 --calls 10 --out "$out/timeline_fwd" \
        >"$out/timeline_fwd.log" 2>&1
    python -m experiments.kernel_timeline --n 32768 --backward --calls 5 \
        --out "$out/timeline_fwdbwd" >"$out/timeline_fwdbwd.log" 2>&1
    python -m experiments.kernel_timeline --n 131072 --mixing head_groups --causal no --backward \
        --calls 5 --out "$out/timeline_fwdbwd_131k" >"$out/timeline_fwdbwd_131k.log" 2>&1
    summary="$(grep -h "^## \|GPU busy\|_zero_unselected" "$out"/timeline_*/kernel_timeline.md |
        cut -c1-150)"
    ;;
fill)
    # the backward's gradient fill kernel over rows per program and warps, at 131K and 32K; then
    # head_groups' 32K forward+backward timeline with the host's launch calls (where is the GPU
    # waiting for the host?)
    for n in 131072 32768; do
        python -m experiments.fa4_probe --part fill --n "$n" --repeats 20 --out "$out/fill_$n" \
            >"$out/fill_$n.log" 2>&1
    done
    python -m experiments.kernel_timeline --n 32768 --mixing head_groups --causal no --backward \
        --calls 5 --host --out "$out/timeline_host" >"$out/timeline_host.log" 2>&1
    summary="$(grep -h "^fill=" "$out"/fill_*.log)
$(grep -h "GPU busy" "$out/timeline_host/kernel_timeline.md" | cut -c1-150)"
    ;;
pack)
    # the backward's placed launches reading their LSE from one buffer gathered per call
    # (ringattn.core.PACK_LSE) against a copy per launch: head_groups at 32K and 131K, causal or
    # not, two turns; then head_groups' 32K forward+backward timeline with the host's calls
    for causal in "" "--causal"; do
        # shellcheck disable=SC2086
        python -m experiments.overheads --n 32768 131072 --mixing head_groups $causal --split 8 \
            --pack-lse yes no yes no --steady --repeats 10 --out "$out/pack${causal:+_causal}" \
            >"$out/pack${causal:+_causal}.log" 2>&1
    done
    python -m experiments.kernel_timeline --n 32768 --mixing head_groups --causal no --backward \
        --calls 5 --host --out "$out/timeline_host" >"$out/timeline_host.log" 2>&1
    summary="$(brief "$out"/pack*/overheads.json)
$(grep -h "GPU busy" "$out/timeline_host/kernel_timeline.md" | cut -c1-150)"
    ;;
causal_group)
    # next after step 34: with its zeros in the grouped backward's epilogue (causal), does the
    # one backward launch now pay for causal from 65K too, where the gradients' fill was 7% of
    # the causal forward+backward? (ALL_TILES_MAX 65536: grouped, 1M's 55808 tiles included;
    # 2048: per config and the fill; two turns at 65K / 131K, one at 1M)
    python -m experiments.overheads --n 65536 131072 --mixing head_groups --causal --split 8 \
        --group-bwd-max 65536 2048 65536 2048 --steady --repeats 10 --out "$out/ab" \
        >"$out/ab.log" 2>&1
    python -m experiments.overheads --n 1048576 --mixing head_groups --causal --split 8 \
        --group-bwd-max 65536 2048 --steady --repeats 5 --out "$out/ab_1m" >"$out/ab_1m.log" 2>&1
    summary="$(brief "$out"/ab/overheads.json "$out"/ab_1m/overheads.json)"
    ;;
persistent)
    # step 35: the grouped forward on a persistent grid (one CTA per SM walking FA4's LPT tile
    # order, O's shared memory its own) against one CTA per tile: the kernels' checks and times
    # at 32K and 131K (fa4_probe --part persistent), then the module at 32K and 131K, causal or
    # not, with the grouped forward up to 4096 tiles (131K: the configs' own kernels) or 65536
    # (run at 8ad3dbe as `--group-persistent no yes --group-max 4096 65536`)
    python -m experiments.fa4_probe --part persistent --n 131072 --repeats 10 --out "$out" \
        >"$out/probe.log" 2>&1
    for causal in "--causal" ""; do
        # shellcheck disable=SC2086
        python -m experiments.overheads --n 32768 131072 --mixing head_groups $causal --split 8 \
            --group-persistent never always --group-max 4096 65536 --steady --repeats 10 \
            --out "$out/ab${causal:+_causal}" >"$out/ab${causal:+_causal}.log" 2>&1
    done
    summary="$(python - "$out/fa4_probe_persistent.json" <<'PY'
import json, sys
for row in json.load(open(sys.argv[1])):
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                   if not k.startswith(("warnings", "refusal")) and not k.endswith("host_us")))
PY
)
$(brief "$out"/ab*/overheads.json)"
    ;;
persistent_long)
    # step 35, after `persistent` had the persistent grid 10% faster on 131K's causal forward:
    # the GPU oracle check with every grouped forward on it (PERSISTENT "always", ALL_TILES_MAX
    # 0: the persistent kernel takes every plan of two or more groups), then the module A/B at
    # 65K and 1M, causal (run at 8ad3dbe as `--group-persistent no yes --group-max 4096 65536`:
    # per config / one launch up to 65536 tiles, one CTA per tile or persistent)
    python -c "from ringattn.kernels import fa4_group; fa4_group.PERSISTENT = 'always'
fa4_group.ALL_TILES_MAX = 0
from experiments import flex_gpu; flex_gpu.main(['--part', 'check', '--out', '$out/flex_gpu_check'])" \
        >"$out/check.log" 2>&1
    python -m experiments.overheads --n 65536 --mixing head_groups --causal --split 8 \
        --group-persistent never always --group-max 4096 0 --steady --repeats 10 \
        --out "$out/ab_65k" >"$out/ab_65k.log" 2>&1
    python -m experiments.overheads --n 1048576 --mixing head_groups --causal --split 8 \
        --group-persistent never always --group-max 4096 65536 --steady --repeats 5 \
        --out "$out/ab_1m" >"$out/ab_1m.log" 2>&1
    summary="$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(brief "$out"/ab*/overheads.json)"
    ;;
persistent_again)
    # step 35: `persistent` had the persistent grid 10% faster on 131K's causal forward,
    # `persistent_long` nothing beyond the spread at 65K or 1M: 131K again, and 262K (run at
    # 8ad3dbe as `--group-persistent no yes --group-max 4096 65536`)
    python -m experiments.overheads --n 131072 262144 --mixing head_groups --causal --split 8 \
        --group-persistent never always --group-max 4096 65536 --steady --repeats 10 \
        --out "$out/ab" >"$out/ab.log" 2>&1
    summary="$(brief "$out"/ab/overheads.json)"
    ;;
unit_order)
    # step 36: the non-causal persistent grid walking a unit's query tiles one after another
    # (FA4's one-CTA-per-tile order) instead of the L2 sections: the kernels' checks and times
    # (fa4_probe --part persistent, 32K and 131K), the module at 131K and 1M non-causal
    # (persistent always / never), then the GPU oracle check with every grouped forward on the
    # persistent grid; each under a timeout (the device time left was ~7 min: the check took
    # 124 s on its own afterwards)
    timeout 140 python -m experiments.fa4_probe --part persistent --n 131072 --repeats 10 \
        --out "$out" >"$out/probe.log" 2>&1 || echo "probe: exit $?" >>"$out/probe.log"
    timeout 130 python -m experiments.overheads --n 131072 1048576 --mixing head_groups \
        --split 8 --group-persistent always never --steady --repeats 5 --out "$out/ab" \
        >"$out/ab.log" 2>&1 || echo "ab: exit $?" >>"$out/ab.log"
    timeout 180 python -c "from ringattn.kernels import fa4_group; fa4_group.PERSISTENT = 'always'
fa4_group.ALL_TILES_MAX = 0
from experiments import flex_gpu; flex_gpu.main(['--part', 'check', '--out', '$out/flex_gpu_check'])" \
        >"$out/check.log" 2>&1 || echo "check: exit $?" >>"$out/check.log"
    summary="$(tail -n 1 "$out/probe.log" "$out/ab.log" "$out/check.log")
$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(grep -h "^problem=" "$out/probe.log" | grep -v "causal=True" | cut -c1-1500)
$(brief "$out"/ab/overheads.json)"
    ;;
bwd_tiles)
    # after step 37: FA4's SM90 backward tile configurations on 2048-row blocks (causal first)
    # against the dense problem's rate (fa4_probe --part bwd_sweep): the causal backward on them
    # runs at ~0.73x of FA4's dense causal rate (step 19), non-causal ~0.87x
    timeout 400 python -m experiments.fa4_probe --part bwd_sweep --n 131072 --repeats 5 \
        --out "$out" >"$out/probe.log" 2>&1 || echo "probe: exit $?" >>"$out/probe.log"
    summary="$(grep -h '^{' "$out/probe.log" | cut -c1-300)"
    ;;
merge_cost)
    # step 45: where the lse merge's epilogue time goes (fa4_probe --part merge_cost: the merging
    # kernel against its variants without the merge, with its reads only, its arithmetic only)
    timeout 200 python -m experiments.fa4_probe --part merge_cost --n 1048576 --repeats 5 \
        --out "$out" >"$out/probe.log" 2>&1 || echo "probe: exit $?" >>"$out/probe.log"
    timeout 100 python -m experiments.fa4_probe --part merge_cost --n 131072 --repeats 10 \
        --out "$out/131k" >"$out/probe_131k.log" 2>&1 || echo "131k: exit $?" >>"$out/probe_131k.log"
    summary=$(grep -h "problem=" "$out"/probe*.log | cut -c1-900)
    ;;
bwd_ab)
    # step 37: the module with FA4's backward tiles from bwd_tiles' sweep (overheads
    # --bwd-tiles; fa4.BACKWARD_CONFIG) at 131K: causal both mixings, the untimed combination,
    # then non-causal
    timeout 200 python -m experiments.overheads --n 131072 --mixing head_groups lse --causal \
        --split 8 --bwd-tiles fa4 dq1wg pds1 --steady --repeats 5 --out "$out/causal" \
        >"$out/causal.log" 2>&1 || echo "causal: exit $?" >>"$out/causal.log"
    timeout 80 python -m experiments.overheads --n 131072 --mixing head_groups --causal \
        --split 8 --bwd-tiles fa4 dq1wg_pds1 --steady --repeats 5 --out "$out/both" \
        >"$out/both.log" 2>&1 || echo "both: exit $?" >>"$out/both.log"
    timeout 130 python -m experiments.overheads --n 131072 --mixing head_groups lse \
        --split 8 --bwd-tiles fa4 dq1wg --steady --repeats 5 --out "$out/noncausal" \
        >"$out/noncausal.log" 2>&1 || echo "noncausal: exit $?" >>"$out/noncausal.log"
    summary="$(tail -qn 1 "$out"/*.log)
$(brief "$out"/*/overheads.json)"
    ;;
zeros)
    # step 34: the grouped backward writing its configs' unselected rows' zeros (the gradients'
    # fill skips them) or not: its probe (gradients against FA4's per config, module A/B), the
    # GPU oracle check, the module A/B at 32K (two turns, causal or not) and the 32K timeline
    python -m experiments.fa4_probe --part group_bwd --n 32768 --repeats 10 --out "$out" \
        >"$out/probe.log" 2>&1
    python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" >"$out/check.log" 2>&1
    for causal in "" "--causal"; do
        # shellcheck disable=SC2086
        python -m experiments.overheads --n 32768 --mixing head_groups $causal --split 8 \
            --group-bwd-zero always never always never --steady --repeats 10 \
            --out "$out/ab${causal:+_causal}" >"$out/ab${causal:+_causal}.log" 2>&1
    done
    python -m experiments.kernel_timeline --n 32768 --mixing head_groups --causal no --backward \
        --calls 5 --host --out "$out/timeline_host" >"$out/timeline_host.log" 2>&1
    summary="$(grep -h "^problem=" "$out/probe.log" | cut -c1-300)
$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(brief "$out"/ab*/overheads.json)
$(grep -h "GPU busy" "$out/timeline_host/kernel_timeline.md" | cut -c1-150)"
    ;;
verify)
    # after a refactor of the grouped kernels: both probes (rows, LSE and gradients against FA4's
    # per-config kernels), the GPU oracle check; then where the host's time goes at 32K (the
    # profile of 200 calls, dumped for pstats, and the timeline with the host's launch calls)
    for probe in group group_bwd; do
        python -m experiments.fa4_probe --part "$probe" --n 32768 --repeats 10 --out "$out" \
            >"$out/probe_$probe.log" 2>&1
    done
    python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" >"$out/check.log" 2>&1
    python -m experiments.profile_core --host --n 32768 --mixing head_groups --rows 40 \
        --calls 30 --dump "$out/prof" >"$out/host_profile.txt" 2>&1
    python -m experiments.kernel_timeline --n 32768 --mixing head_groups --causal no --backward \
        --calls 5 --host --out "$out/timeline_host" >"$out/timeline_host.log" 2>&1
    summary="$(grep -h "^problem=" "$out"/probe_*.log | cut -c1-400)
$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(grep -h "^=== " "$out/host_profile.txt")
$(grep -h "GPU busy" "$out/timeline_host/kernel_timeline.md" | cut -c1-150)"
    ;;
group_bwd)
    # the grouped backward's probe: gradients against FA4's per config, ms and host µs at 32K
    # and 131K, the module A/B; then the A/B at 32K / 65K / 131K and the GPU oracle check
    python -m experiments.fa4_probe --part group_bwd --n 131072 --repeats 10 --out "$out" \
        >"$out/probe.log" 2>&1
    for causal in "" "--causal"; do
        # shellcheck disable=SC2086
        python -m experiments.overheads --n 32768 65536 131072 --mixing head_groups $causal \
            --split 8 --group-bwd yes no yes no --steady --repeats 10 \
            --out "$out/ab${causal:+_causal}" >"$out/ab${causal:+_causal}.log" 2>&1
    done
    python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" >"$out/check.log" 2>&1
    summary="$(grep -h "^problem=" "$out/probe.log" | cut -c1-400)
$(brief "$out"/ab*/overheads.json)
$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")"
    ;;
group)
    python -m experiments.fa4_probe --part group --n 131072 --repeats 10 --out "$out" \
        >"$out/probe.log" 2>&1
    for causal in "" "--causal"; do
        # shellcheck disable=SC2086
        python -m experiments.overheads --n 32768 131072 --mixing head_groups $causal --split 8 \
            --group yes no yes no --steady --repeats 10 --out "$out/ab${causal:+_causal}" \
            >"$out/ab${causal:+_causal}.log" 2>&1
    done
    python -m experiments.kernel_timeline --n 131072 --mixing head_groups --causal yes \
        --calls 5 --out "$out/timeline_131k_causal" >"$out/timeline.log" 2>&1
    summary="$(grep -h "^problem=" "$out/probe.log" | cut -c1-400)
$(brief "$out"/ab*/overheads.json)
$(grep -h "GPU busy" "$out/timeline_131k_causal/kernel_timeline.md" | cut -c1-150)"
    ;;
options)
    # after every script's options were given help texts and shared helpers (--n, --mixing,
    # --causal, --heads/--dim): each GPU script whose option table changed, once, short
    run() { script 150 "$@"; }
    run bench --n 32768 --mixing lse --causal yes --computers sdpa --dilations segment_local \
        --no-flash-row --no-in-model --no-compile --repeats 3 --warmup 1 --check-n 0 \
        --out "$out/bench"
    run overheads --n 32768 --mixing head_groups --split 8 --repeats 3 --out "$out/overheads"
    run kernel_timeline --n 32768 --mixing lse --causal no --calls 1 --out "$out/timeline"
    run merge_launch --n 32768 --warps 4 --rounds 1 --repeats 3 --out "$out/merge_launch"
    run profile_core --n 32768 --mixing head_groups --forward --calls 2 --rows 5
    run fa4_probe --n 32768 --heads 16 --head-dim 128 --repeats 3 --out "$out"
    run flex_gpu --part speed --n 32768 --out "$out/flex_gpu"
    summary="$(cat "$out/rc.log")
$(grep -h "Traceback\|Error" "$out"/*.log | sort | uniq -c | head -20)"
    ;;
replays)
    # after gpu_fuzz recorded its draws (--replay-from) and profile_core --host honoured
    # --forward (twelfth session): a short fuzz run, its seed replayed from the run's record,
    # and the host profile of the forward alone
    run() { script 200 "$@"; }
    run gpu_fuzz --draws 2 --max-n 4096 --max-d 128 --seed 14 --out "$out/fuzz"
    run gpu_fuzz --replay-from "$out/fuzz/gpu_fuzz.json" --replay 14 --out "$out/replay"
    python -m experiments.profile_core --host --forward --n 32768 --mixing head_groups \
        --rows 10 --calls 10 >"$out/host_forward.txt" 2>&1
    echo "profile_core --host --forward: rc=$?" >>"$out/rc.log"
    summary="$(cat "$out/rc.log")
$(grep -h "calls checked" "$out/fuzz/gpu_fuzz.md")
$(head -n 1 "$out/replay/gpu_fuzz_replay.md")
$(grep -h "^=== " "$out/host_forward.txt")"
    ;;
scripts)
    # after experiments/ became type-checked (mypy): every GPU-only script path that change
    # touched, short: fa4_probe's parts (replay, add, zero, launch, fill, and the default
    # comparison), the cuDNN frontend probe's plans (it called a launcher helper renamed in
    # 3356c89), the overheads ceiling, the clock probe and the fuzz's A/B variants (--replay);
    # the bench's changed dense baseline runs in `record`
    for probe in replay add zero launch fill compare; do
        timeout 200 python -m experiments.fa4_probe --part "$probe" --n 32768 --repeats 3 \
            --out "$out" >"$out/probe_$probe.log" 2>&1
        echo "fa4_probe $probe: rc=$?" >>"$out/rc.log"
    done
    timeout 200 python -m experiments.cudnn_frontend_probe --part plans >"$out/plans.log" 2>&1
    echo "cudnn_frontend_probe plans: rc=$?" >>"$out/rc.log"
    timeout 200 python -m experiments.overheads --n 32768 --split 8 --ceiling --causal \
        --out "$out/ceiling" >"$out/ceiling.log" 2>&1
    echo "overheads --ceiling: rc=$?" >>"$out/rc.log"
    timeout 100 python -m experiments.clock_probe --n 32768 --seconds 1 --out "$out/clock" \
        >"$out/clock.log" 2>&1
    echo "clock_probe: rc=$?" >>"$out/rc.log"
    timeout 200 python -m experiments.gpu_fuzz --replay 5 --out "$out/fuzz_replay" \
        >"$out/fuzz_replay.log" 2>&1
    echo "gpu_fuzz --replay 5: rc=$?" >>"$out/rc.log"
    summary="$(cat "$out/rc.log")
$(grep -h "Traceback\|Error" "$out"/*.log | sort | uniq -c | head -20)"
    ;;
graph_modes)
    # steps 62-63: compile_mode="reduce-overhead" on CUDA (FA4's kernels at 16K and 131K,
    # torch's at 16K), then a model compiled around the module in that mode (moved to the GPU,
    # or built there: step 63's last change, run in step 64), and a function of the functional
    # form compiled before any eager call (its trace makes the CUDA tag: run on the CPU only)
    run() { script 140 "$@"; }
    run cuda_graph_modes --n 16384 --history --out "$out"
    run cuda_graph_modes --n 131072
    run cuda_graph_modes --n 16384 --kernels torch
    run cuda_graph_modes --n 16384 --outer --history --out "$out"
    run cuda_graph_modes --n 131072 --outer
    run cuda_graph_modes --n 16384 --outer built
    run cuda_graph_modes --n 16384 --outer functional
    run cuda_graph_modes --n 16384 --outer functional --fullgraph  # (ok on 2.11: step 69)
    summary="$(cat "$out/rc.log")
$(grep -h "^| " "$out/cuda_graph_modes.log" | grep -v "^| mixing\|^|---" | cut -c1-200)"
    ;;
review)
    # stop 73 (step 77): this stop's changes on a GPU. The oracle check (every strategy; global's
    # run layout now sized without reading a tensor), bench at 32K with its judged check column
    # and exit status (no sdpa "(compiled)" row: it repeated the eager one), and a LongNet's
    # loss compiled fullgraph against the eager one, with its backward (the targets' traced
    # check is CPU-only: on CUDA the device asserts)
    timeout 300 python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" \
        >"$out/check.log" 2>&1 || echo "check: exit $?" >>"$out/check.log"
    timeout 240 "${bench[@]}" --n 32768 --repeats 5 --out "$out/bench" >"$out/bench.log" 2>&1
    echo "bench: rc=$?" >>"$out/rc.log"
    timeout 120 python - >"$out/model.log" 2>&1 <<'PY'
import torch
from ringattn.models import LongNet, LongNetConfig
torch.manual_seed(0)
config = LongNetConfig(vocab_size=256, dim=512, depth=2, num_heads=4,
                       segment_lengths=(512, 1024, 2048), dilation_rates=(1, 2, 4))
model = LongNet(config).cuda().bfloat16()
tokens = torch.randint(0, 256, (2, 4096), device="cuda")
eager = model.loss(tokens, tokens.roll(-1, 1))
loss = torch.compile(model.loss, fullgraph=True)
compiled = loss(tokens, tokens.roll(-1, 1))
compiled.backward()
print(f"model: eager loss {eager.item():.5f} compiled {compiled.item():.5f}")
PY
    echo "model: rc=$?" >>"$out/rc.log"
    summary="$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(cat "$out/rc.log")
$(grep -h "^model:" "$out/model.log")
$(grep -h "^| 32768" "$out/bench.log" | cut -d'|' -f2-9 | cut -c1-160)"
    ;;
grads)
    # stop 74 (step 78): the backward's gradients of leaf inputs (a .grad kept) now own their
    # storage (three buffers and fills where a graph's inner q, k, v share one): equal to the
    # one-buffer path's, bitwise, on the GPU's kernels (FA4 / cuDNN, both mixings, causal or
    # not); the oracle check; bench at 32K and 131K, whose inputs are leaves (timed on the new
    # path) with its judged check column
    timeout 120 python - >"$out/grads.log" 2>&1 <<'PY'
import torch
import ringattn
from experiments import ISSUE_LENGTHS, ISSUE_RATES
shape = (1, 32768, 16, 128)
for mixing in ("head_groups", "lse"):
    for causal in (False, True):
        module = ringattn.DilatedAttention(ISSUE_LENGTHS, ISSUE_RATES,
                                           mixing=mixing, causal=causal)
        gen = torch.Generator("cuda").manual_seed(0)
        x = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
             for _ in range(4)]
        leaves = [t.clone().requires_grad_() for t in x[:3]]
        module(*leaves).backward(x[3])
        base = [t.clone().requires_grad_() for t in x[:3]]
        inner = [t * 1 for t in base]
        stacked = torch.autograd.grad(module(*inner), inner, x[3])
        same = all(torch.equal(a.grad, b) for a, b in zip(leaves, stacked))
        own = all(t.grad.untyped_storage().nbytes() == t.grad.numel() * 2 for t in leaves)
        shared = len({g.untyped_storage().data_ptr() for g in stacked}) == 1
        print(f"grads: {mixing} causal={causal} equal={same} own_storage={own} "
              f"inner_shared={shared}")
# the cost of three gradient buffers (leaf inputs) over one stacked buffer (views of leaves):
# forward+backward ms, the two alternated, median of 15 each (head_groups: zero fills)
def fwdbwd_ms(module, inputs, grad):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.autograd.grad(module(*inputs), inputs, grad)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)
for n in (32768, 131072):
    for causal in (False, True):
        module = ringattn.DilatedAttention(ISSUE_LENGTHS, ISSUE_RATES,
                                           mixing="head_groups", causal=causal)
        x = [torch.randn(1, n, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        leaves = [t.requires_grad_() for t in x[:3]]
        views = [t.view_as(t) for t in leaves]
        times = {"three": [], "stacked": []}
        for i in range(40):
            for name, inputs in (("three", leaves), ("stacked", views)):
                ms = fwdbwd_ms(module, inputs, x[3])
                if i >= 10:
                    times[name].append(ms)
        med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        print(f"grads: timing n={n} causal={causal} three {med['three']:.3f} ms "
              f"stacked {med['stacked']:.3f} ms ratio {med['three'] / med['stacked']:.3f}")
PY
    echo "grads: rc=$?" >>"$out/rc.log"
    timeout 220 python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" \
        >"$out/check.log" 2>&1 || echo "check: exit $?" >>"$out/check.log"
    timeout 230 "${bench[@]}" --n 32768 131072 --repeats 5 --out "$out/bench" \
        >"$out/bench.log" 2>&1
    echo "bench: rc=$?" >>"$out/rc.log"
    summary="$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(cat "$out/rc.log")
$(grep -h "^grads:" "$out/grads.log")
$(grep -h "^| 32768\|^| 131072" "$out/bench.log" | grep "segment_local/sdpa \|dense" | cut -d'|' -f2-11 | cut -c1-160)"
    ;;
threads)
    # stop 75 (step 79): the tracing check is this thread's (capture.compiling(): torch's flag is
    # the process's, so another thread's compile sent eager calls down their traced path), and
    # forward-mode AD under a user's compile is refused. The GPU oracle check; then gpu_fuzz
    # with each call made from 2 and 4 threads at once on one module (first calls racing on one
    # block signature: FA4's recordings, cuDNN's graphs, pooled buffers; later calls on others
    # side by side), every thread's result against the oracle (step 79 ran it with a 220 s
    # check, which a cold machine's flex compiles outlasted, and 130 / 70 s of fuzz)
    timeout 290 python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" \
        >"$out/check.log" 2>&1 || echo "check: exit $?" >>"$out/check.log"
    timeout 160 python -m experiments.gpu_fuzz --budget 100 --seed "${FUZZ_SEED:-25}" \
        --threads 2 --out "$out/fuzz2" >"$out/fuzz2.log" 2>&1
    echo "fuzz2: rc=$?" >>"$out/rc.log"
    timeout 110 python -m experiments.gpu_fuzz --budget 50 --seed "$((${FUZZ_SEED:-25} + 500))" \
        --threads 4 --out "$out/fuzz4" >"$out/fuzz4.log" 2>&1
    echo "fuzz4: rc=$?" >>"$out/rc.log"
    summary="$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(cat "$out/rc.log")
$(tail -n 3 "$out/fuzz2.log" | cut -c1-300)
$(tail -n 3 "$out/fuzz4.log" | cut -c1-300)"
    ;;
ops)
    # stop 72 (step 76): the forward op takes the call's grad state (core.grad_state), the eager
    # boundary refuses torch.jit.trace and casts half inputs under autocast, each backward makes
    # the ranks' check (on one GPU a no-op): the GPU oracle check, then models compiled around the
    # module in reduce-overhead mode, whose op now carries that argument into cudagraph trees
    timeout 300 python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" \
        >"$out/check.log" 2>&1 || echo "check: exit $?" >>"$out/check.log"
    run() { script 140 "$@"; }
    run cuda_graph_modes --n 16384 --outer
    run cuda_graph_modes --n 16384 --outer functional --fullgraph
    summary="$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(cat "$out/rc.log")
$(grep -h "^| " "$out/cuda_graph_modes.log" | grep -v "^| mixing\|^|---" | cut -c1-200)"
    ;;
add_dq)
    # step 64: lse's dQ added by FA4's postprocess (fa4_add.ADD_DQ): its probe at 131K (the sums
    # against FA4's backward plus the add, kernel ms with all three added / dK and dV / none, the
    # module A/B at 32K and 131K), the GPU oracle check, then reduce-overhead at 131K with q, k,
    # v marked static (is step 63's loss the trees' input copies?)
    timeout 180 python -m experiments.fa4_probe --part add --n 131072 --repeats 10 --out "$out" \
        >"$out/probe_add.log" 2>&1 || echo "probe: exit $?" >>"$out/probe_add.log"
    timeout 230 python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" \
        >"$out/check.log" 2>&1 || echo "check: exit $?" >>"$out/check.log"
    run() { script 75 "$@"; }
    run cuda_graph_modes --n 131072 --outer --static-inputs
    run cuda_graph_modes --n 131072 --static-inputs
    summary="$(grep -h "\"problem\"" "$out/probe_add.log" | cut -c1-700)
$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(cat "$out/rc.log")
$(grep -h "^| " "$out/cuda_graph_modes.log" | grep -v "^| mixing\|^|---" | cut -c1-200)"
    ;;
dpsum)
    # step 65: each row's dPsum formed once per lse backward and handed to FA4's preprocess
    # (ringattn.kernels.fa4_dpsum): its probe at 131K (the gradients against FA4's own, the
    # backward's ms with and without, the sums kernel's ms, the module A/B at 32K and 131K with
    # core.SHARE_DPSUM on and off), then capture's checks (CUDA-graph capture against the
    # oracle, the replays kept) and the GPU oracle check: the capture part and this in one call
    timeout 180 python -m experiments.fa4_probe --part dpsum --n 131072 --repeats 10 \
        --out "$out" >"$out/probe_dpsum.log" 2>&1 || echo "probe: exit $?" >>"$out/probe_dpsum.log"
    timeout 80 python -m experiments.graph_capture_check --out "$out" >"$out/capture.log" 2>&1 \
        || echo "capture: exit $?" >>"$out/capture.log"
    timeout 50 python -m experiments.replay_check --n 16384 --out "$out" >"$out/replay.log" 2>&1 \
        || echo "replay: exit $?" >>"$out/replay.log"
    timeout 260 python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" \
        >"$out/check.log" 2>&1 || echo "check: exit $?" >>"$out/check.log"
    summary="$(grep -h "\"problem\"\|probe: exit" "$out/probe_dpsum.log" | cut -c1-700)
$(tail -n 1 "$out/capture.log")
$(tail -n 1 "$out/replay.log")
$(grep -h "Correctness\|check: exit" "$out/flex_gpu_check/flex_gpu_check.md" "$out/check.log")"
    ;;
flex_groups)
    # global/flex under head_groups as one call per group on its own rows and heads (stop 59,
    # CPU-built): flex_gpu's speed part with both mixings at 32K and 131K (forward, forward+backward
    # and peak against dense SDPA; the lse rows are the reference). Its correctness on the GPU is
    # in flex_gpu --part check (dpsum's and capture's parts)
    timeout 540 python -m experiments.flex_gpu --part speed --n 32768 131072 \
        --mixing lse head_groups --out "$out/flex_gpu_speed" >"$out/flex_speed.log" 2>&1 \
        || echo "speed: exit $?" >>"$out/flex_speed.log"
    summary="$(grep -h "^| [0-9]" "$out/flex_gpu_speed/"*.md | cut -c1-200)
$(grep -h "speed: exit\|failed" "$out/flex_speed.log" | cut -c1-300)"
    ;;
typing)
    # stop 78 (step 84): ringattn/ made mypy --strict clean (annotations; a few casts, the cuDNN
    # graphs cache's lookup restructured, the Triton kernels' sources changed by their ignore
    # comments, so they recompile). The GPU oracle check, step 82's bounded cuDNN graphs check
    # (that lookup, its graphs evicted and rebuilt) and a fuzz seed (FUZZ_SEED, FUZZ_BUDGET)
    timeout 290 python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" \
        >"$out/check.log" 2>&1 || echo "check: exit $?" >>"$out/check.log"
    timeout 60 bash docs/benchmarks/h200_bench/step82_h100_cudnn_graphs_check.sh \
        >"$out/cudnn_graphs.log" 2>&1
    echo "cudnn_graphs: rc=$?" >>"$out/rc.log"
    timeout 170 python -m experiments.gpu_fuzz --budget "${FUZZ_BUDGET:-120}" \
        --seed "${FUZZ_SEED:-30}" --out "$out/fuzz" >"$out/fuzz.log" 2>&1
    echo "fuzz: rc=$?" >>"$out/rc.log"
    summary="$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(cat "$out/rc.log")
$(tail -n 1 "$out/cudnn_graphs.log")
$(tail -n 6 "$out/fuzz.log" | cut -c1-300)"
    ;;
determinism)
    # stop 79 (step 85): torch.use_deterministic_algorithms on every sdpa kernel path (fa4,
    # cudnn, cudnn_op, flash) of issue 5's 32K shape: bits of three runs, the mode's cost, the
    # oracle; then, where OLD_TREE is set (a folder holding an older commit's ringattn/ only),
    # the same script on that library (this tree's experiments/ on the path after it), without
    # the oracle and FlashAttention-2's path
    script 320 determinism_check --out "$out/new"
    if [ -n "${OLD_TREE:-}" ]; then
        (cd "$OLD_TREE" && PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD:$OLDPWD \
            timeout 200 python -m experiments.determinism_check --out "$out/old" --check-n 0 \
            --paths fa4 cudnn cudnn_op \
            >"$out/old.log" 2>&1; echo "old: rc=$?" >>"$out/rc.log")
    fi
    summary="$(cat "$out/rc.log")
$(grep -h "^|" "$out/new/determinism_check.md" "$out"/old/determinism_check.md 2>/dev/null |
        cut -d'|' -f2-10)"
    ;;
stop80)
    # stop 80's reviews changed the eager boundary (autocast casts before the dtype rule), the
    # core's entry (FlopCounterMode / profiler checks per call) and the Triton kernels (int64
    # head offsets): the GPU oracle check, torch's tools on the GPU's kernels
    # (experiments/interop_check.py), and a short fuzz; pair with `trees` for host time
    timeout 290 python -m experiments.flex_gpu --part check --out "$out/flex_gpu_check" \
        >"$out/check.log" 2>&1 || echo "check: exit $?" >>"$out/rc.log"
    script 120 interop_check --out "$out/interop"
    timeout 150 python -m experiments.gpu_fuzz --budget "${FUZZ_BUDGET:-100}" --seed "${FUZZ_SEED:-34}" \
        --out "$out/fuzz" >"$out/fuzz.log" 2>&1
    echo "fuzz: rc=$?" >>"$out/rc.log"
    summary="$(grep -h "Correctness" "$out/flex_gpu_check/flex_gpu_check.md")
$(cat "$out/rc.log")
$(grep -h "^|" "$out/interop/interop_check.md" | cut -d'|' -f2-11)
$(tail -n 1 "$out/fuzz.log" | cut -c1-300)"
    ;;
dtypes)
    # stop 80: the determinism part's check in the dtypes it did not run: float32 (torch's
    # memory-efficient attention, which every path picks; is its backward deterministic in that
    # mode?) and float16 on every path
    script 200 determinism_check --dtype float32 --out "$out/float32"
    script 330 determinism_check --dtype float16 --out "$out/float16"
    summary="$(cat "$out/rc.log")
$(grep -h "^|" "$out"/float*/determinism_check.md 2>/dev/null | cut -d'|' -f2-10)"
    ;;
fuzz)
    # random problems against the oracle on the GPU (experiments/gpu_fuzz.py): head dims, dtypes,
    # input layouts and cache keys the fixed check never draws; FUZZ_SEED / FUZZ_BUDGET override,
    # FUZZ_ARGS adds options (e.g. --deterministic; split on spaces)
    # shellcheck disable=SC2086
    timeout 570 python -m experiments.gpu_fuzz --budget "${FUZZ_BUDGET:-420}" \
        --seed "${FUZZ_SEED:-0}" ${FUZZ_ARGS:-} --out "$out" >"$out/fuzz.log" 2>&1
    summary="$(tail -n 14 "$out/fuzz.log" | cut -c1-400)"
    ;;
weak)
    NCCL_NVLS_ENABLE=0 timeout 560 torchrun --standalone --nproc_per_node=2 \
        -m experiments.distributed_bench --part check weak --weak-n 16384 65536 --out "$out" \
        >"$out/weak.log" 2>&1
    summary="$(grep -c '| True |' "$out/distributed_check_weak.md") check rows within tolerance
$(grep -h "^| 16384 | 2 \|^| 65536 | 2 " "$out/distributed_check_weak.md" | cut -d'|' -f2-8,13,14,17,18)"
    ;;
trees)
    # the 32K head_groups bench (host-bound: where host time per call shows) of an older tree and
    # of this one, alternated in one process each (this, older, this): OLD_TREE, a folder in the
    # working tree holding an older commit's ringattn/ and experiments/ (`git archive REF
    # ringattn experiments | tar -x -C old`), carried as an ignored folder (step 73)
    # TREES (default "new old new"): the order, "new" this tree, "old" OLD_TREE's, any other
    # name a folder of that name in the working tree, carried like it (step 87: "mid")
    # TREE_ARGS (default "--n 32768 --mixing head_groups"): the bench's rows, split on spaces
    # (step 88: "--n 1048576 --mixing lse --causal no")
    old=${OLD_TREE:?set OLD_TREE to the folder of the older tree}
    read -r -a tree_args <<<"${TREE_ARGS:---n 32768 --mixing head_groups}"
    for tree in ${TREES:-new old new}; do
        dir=$PWD
        [ "$tree" = old ] && dir=$PWD/$old
        [ "$tree" != old ] && [ "$tree" != new ] && dir=$PWD/$tree
        (cd "$dir" && PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$dir \
            timeout 150 "${bench[@]}" "${tree_args[@]}" --check-n 0 --repeats 10 \
            --warmup 3 --out "$out/bench_$tree" >>"$out/bench_$tree.log" 2>&1)
        mv "$out/bench_$tree/bench.json" "$out/bench_${tree}_$SECONDS.json" 2>/dev/null
    done
    summary="$(grep -H "segment_local/sdpa |" "$out"/bench_*.log | cut -d'|' -f1-4,7-11)"
    ;;
switches)
    # stop 86 keyed the FA4 grouped kernels' switches and the launch / plan switches: each
    # flipped on a live module against a new module, at 32K where it changes kernels, and
    # fa4_group.PERSISTENT at 131K (the forward's persistent grid runs past 4096 tiles, the
    # grouped backward to 2048); PER_ENTRY matters at b > 1 only (step 92)
    script 330 switch_check --n 32768 --out "$out/n32k" --switches fa4_group.ALL_TILES_MAX \
        fa4_group_bwd.ZEROING fa4_group_bwd.ALL_TILES_MAX launches.FUSE_OFFSETS pattern.BLOCK_SPLIT
    script 150 switch_check --n 131072 --switches fa4_group.PERSISTENT --out "$out/n131k"
    # (step 93: at 32K head_groups causal, ALL_TILES_MAX=0, FUSE_OFFSETS and BLOCK_SPLIT changed
    # no kernel name; kernels are now counted by name and grid, and lse non-causal, whose
    # offsets FUSE_OFFSETS fuses, runs these three too)
    script 250 switch_check --n 32768 --mixing lse --causal no --out "$out/n32k_lse" \
        --switches fa4_group.ALL_TILES_MAX launches.FUSE_OFFSETS pattern.BLOCK_SPLIT
    summary="$(cat "$out/rc.log")
$(grep -h "^|" "$out"/n*/switch_check.md | cut -d'|' -f2-8)"
    ;;
switches_b2)
    # launches.PER_ENTRY acts at b > 1 only: flipped on a live module at b = 2 (step 93)
    script 200 switch_check --n 32768 --batch 2 --mixing lse head_groups --causal both \
        --switches launches.PER_ENTRY --out "$out/n32k_b2"
    summary="$(cat "$out/rc.log")
$(grep -h "^|" "$out"/n*/switch_check.md | cut -d'|' -f2-8)"
    ;;
wide)
    # stop 80's int32 head offsets, on the GPU's kernels: FA4 and the grouped kernels on q, k, v
    # of 2^32 elements through a transposed [b, h, n, d] (the last rows against the oracle;
    # step 94)
    script 500 wide_check --n 1048576 --heads 32 --out "$out/wide"
    summary="$(cat "$out/rc.log")
$(grep -h "^|" "$out/wide/wide_check.md" | cut -d'|' -f2-9)"
    ;;
*)
    echo "unknown part: $part" >&2
    exit 2
    ;;
esac
tar -czf "$out.tgz" -C "$(dirname "$out")" "$part" && rm -rf "$out"
echo "$summary"

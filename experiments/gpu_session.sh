#!/usr/bin/env bash
# One lent-H200 session's runs for issue 5, in parts that each fit one device call (600 s), after
# FA4 arrived (experiments/fa4_carry.sh: call 1 carries .fa4a, call 2 .fa4b and .whl):
#
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh record   # ~4.5 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh long     # ~4 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh checks   # ~6 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh host     # ~2 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh tiles    # ~2 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh lanes    # ~3 min
#   source experiments/fa4_env.sh || exit 1; bash experiments/gpu_session.sh spanning # ~5 min, x2
#
# record: the bench's record at 32K/131K and 1M (docs/benchmarks/h200_perf.md's first two
#   commands); long: its 2M/4M command; checks: every local strategy against the oracle on the
#   GPU, the fused FA4 kernels' probes (merge, add, zero), and the forward and forward+backward
#   kernel timelines at 131K; host: where the host's time goes at 32K (host-bound): the host
#   profile of a head_groups forward and forward+backward, and single / back-to-back times with
#   the host's own time per call; tiles: both mixings' forward with FA4's causal forward tiles
#   at the step-20 sweep's best causal configuration against FA4's default (fa4_probe --part
#   config); lanes: head_groups at 16K-64K with its configs on concurrent streams in eager
#   forwards against one stream (ringattn.lanes.MODE forward vs never), on 2 or 4 streams
#   (ringattn.lanes.LANES; run in step 27: only 32K inference forwards gain, so MODE stays
#   "capture"); spanning (on nvidia-h200-x2): 2-GPU weak scaling at 16K per GPU replayed from
#   CUDA graphs, the spanning config's blocks on the caller's stream or on lanes
#   (ringattn.lanes.SPANNING no vs yes; run in step 28: no gain beyond the runs' spread, so
#   SPANNING stays off). Each part writes under $OUT/<part>/ (one tarball,
#   $OUT/<part>.tgz, so no file is left out of what comes back) and prints a short summary last.
set -uo pipefail
part=${1:?usage: gpu_session.sh record|long|checks|host|tiles|lanes|spanning}
out=${OUT:-results}/$part
mkdir -p "$out"
bench=(python -m experiments.bench --computers sdpa --dilations segment_local --no-flash-row
    --no-in-model --no-compile)
case "$part" in
record)
    "${bench[@]}" --n 32768 131072 --repeats 10 --warmup 3 --out "$out/bench" >"$out/bench.log" 2>&1
    "${bench[@]}" --n 1048576 --repeats 5 --warmup 2 --check-n 0 --out "$out/bench_1m" \
        >"$out/bench_1m.log" 2>&1
    summary=$(grep -h "segment_local/sdpa |" "$out"/bench*.log)
    ;;
long)
    "${bench[@]}" --n 2097152 4194304 --fwd-only-from 4194304 --check-n 0 --out "$out/bench" \
        >"$out/bench.log" 2>&1
    summary=$(grep -h "segment_local/sdpa |" "$out/bench.log")
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
    for args in "--forward --causal" ""; do
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
        python -m experiments.overheads --n 16384 32768 65536 --mixing head_groups $causal \
            --split 8 --lanes never forward --lane-count 2 4 --steady --repeats 10 \
            --out "$out/lanes${causal:+_causal}" >"$out/lanes${causal:+_causal}.log" 2>&1
    done
    summary=$(grep -h "^| [0-9]" "$out"/lanes*/overheads.md | cut -d'|' -f2,4,8,9,16-)
    ;;
spanning)
    NCCL_NVLS_ENABLE=0 timeout 540 torchrun --standalone --nproc_per_node=2 \
        -m experiments.distributed_bench --part weak --weak-n 16384 --graphs \
        --spanning-lanes no yes --out "$out" >"$out/spanning.log" 2>&1
    summary=$(grep -h "^| 16384 | 2 " "$out/distributed_weak.md" | cut -d'|' -f5-7,9,21-)
    ;;
*)
    echo "unknown part: $part" >&2
    exit 2
    ;;
esac
tar -czf "$out.tgz" -C "$(dirname "$out")" "$part" && rm -rf "$out"
echo "$summary"

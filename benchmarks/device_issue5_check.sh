#!/usr/bin/env bash
# Issue 5's configurations again, on the code as it is now, in two device calls (each under 600 s); the JSON of
# each run goes into one tarball, $OUT/results.tgz (the device returns at most 8 files). Usage:
#   device_issue5_check.sh small   the GPU suite, then llama3-8b int4 b16x2048 with the KV cache in HBM (the
#                                  default: CUDA graph replays), in HBM issued from Python (--no-cuda-graphs), in
#                                  host RAM, on disk (bf16, int4); the fused KV attention kernel with its sequence
#                                  split aimed at 4 (now), 2, 8 and 16 blocks per SM; about 8 minutes
#   device_issue5_check.sh 111b    111B int4, gpu_memory 24 GiB: cpu_memory 32 GiB, batch 64, --kv-quant auto
#                                  (issue 5 (b)), then the rest in host RAM, batch 1 and 32 (issue 5 (a)); writes
#                                  the 56 GB store first: about 6 minutes
#   device_issue5_check.sh final   the whole GPU suite (its full output), then the two benchmarks rewritten in
#                                  1dc6d58 once each: graph_host_part.py (bf16 and int4 KV) and repeat_generation.py
#                                  with the KV cache in HBM; about 4 minutes
set -euo pipefail
: "${OUT:?set OUT to the results folder}"
RES=${RES:-/root/issue5_results}
mkdir -p "$RES"
trap 'tar -C "$RES" -czf "$OUT/results.tgz" .' EXIT  # whatever ran, even if a run failed
here=$(dirname "$0")
case ${1:?small, 111b or final} in
    small)
        timeout 200 python3 -m pytest -m gpu -q -rf --tb=line -p no:cacheprovider tests 2>&1 | tail -25 \
            | tee "$RES/gpu_suite.txt" || true
        rm -rf /root/s111  # the disk holds one of the two stores
        OUT=$RES bash "$here/device_kv_tiers.sh" gpu cpu disk disk_int4
        RUNS=1 KV_QUANTS=none OUT=$RES bash "$here/device_cuda_graphs.sh"  # eager against graphs, bf16 KV
        timeout 90 python3 "$here/bench_kernels.py" --only kv_attention --kv-blocks-per-sm 2 8 16 \
            --out "$RES/kv_attention_splits.json" | tail -12
        ;;
    111b)
        rm -rf /root/s8 /root/kv
        OUT=$RES bash "$here/device_111b.sh" disk_plan_auto host_plan
        ;;
    final)
        timeout 300 python3 -m pytest -m gpu -q -rfs --tb=short -p no:cacheprovider tests > "$RES/gpu_suite.txt" 2>&1 \
            || echo "GPU suite: exit $?" >> "$RES/gpu_suite.txt"
        tail -25 "$RES/gpu_suite.txt"
        for kv in none int4; do
            kvq=(); [ "$kv" = none ] || kvq=(--kv-quant "$kv")
            timeout 120 python3 "$here/graph_host_part.py" "${kvq[@]}" --out "$RES/graph_host_part_kv$kv.json" | tail -8
        done
        timeout 150 python3 "$here/repeat_generation.py" --kv-placement gpu --gen-len 32 --repeats 3 \
            --out "$RES/repeat_gpu" | tail -8
        ;;
    *) echo "unknown run $1: small, 111b or final" >&2; exit 2 ;;
esac

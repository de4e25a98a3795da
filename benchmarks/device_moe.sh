#!/usr/bin/env bash
# Mixtral-8x7B-shaped int4 (46.7B parameters, random weights) on the GPU machine, first runs of the sparse MLP
# (tiermem.engine.moe): the whole GPU suite, then decode with every block in HBM as CUDA graph replays (every
# expert on every token) and as eager steps (only the chosen experts), then in 24 GiB of GPU memory with the rest
# streamed from host RAM. Each run's JSON, and the suite's output, go into $OUT/results.tgz.
set -uo pipefail
: "${OUT:?set OUT to the results folder}"
RES=${RES:-/root/moe_results}
mkdir -p "$RES"
trap 'tar -C "$RES" -czf "$OUT/results.tgz" .' EXIT
# TESTS: a pytest -k expression to run part of the suite (default: all of it)
timeout 240 python3 -m pytest -m gpu -q -rfs --tb=short -p no:cacheprovider ${TESTS:+-k "$TESTS"} tests \
    > "$RES/gpu_suite.txt" 2>&1 \
    || echo "GPU suite: exit $?" >> "$RES/gpu_suite.txt"
tail -8 "$RES/gpu_suite.txt"
COMMON=(--quant int4 --group-size 128 --prompt-len 512 --gen-len 16)  # EXTRA: more options for every run
run() {  # run NAME SHAPE BENCH-ARGS...
    local name=$1 shape=$2; shift 2
    echo "== $name: tiermem bench --synthetic $shape ${COMMON[*]} $*"
    timeout 400 tiermem bench --synthetic "$shape" "${COMMON[@]}" "$@" ${EXTRA:-} --out "$RES/$name.json" 2>&1 \
        | tr '\r' '\n' \
        | grep -v "B/s\]$" | tail -6 || echo "== $name failed"
}
# RUNS: which runs (default: the first three; gpu24_host_kvgpu fixes the KV cache in HBM, against the plan's;
# 8x22b_gpu24_host is Mixtral-8x22B in 24 GiB of GPU memory, the rest in 100 GiB of host RAM; *_whole copy the
# streamed sparse layers whole, every expert, against the default that copies only the chosen experts;
# qwen3_235b_resident_graphs: Qwen3-235B-A22B all in HBM; routed_ab: benchmarks/moe_routed_ab.py)
for name in ${RUNS:-resident_graphs resident_eager gpu24_host}; do
    case $name in
        resident_graphs) run mixtral_8x7b_int4_resident_graphs mixtral-8x7b --batch 1,16 --cuda-graphs ;;
        resident_eager) run mixtral_8x7b_int4_resident_eager mixtral-8x7b --batch 1,16 --no-cuda-graphs ;;
        gpu24_host) run mixtral_8x7b_int4_gpu24_host mixtral-8x7b --batch 1,16 --gpu-memory 24GiB --cpu-memory 100GiB ;;
        gpu24_host_kvgpu) run mixtral_8x7b_int4_gpu24_host_kvgpu mixtral-8x7b --batch 1,16 --gpu-memory 24GiB \
            --cpu-memory 100GiB --kv-placement gpu ;;
        gpu24_host_whole) run mixtral_8x7b_int4_gpu24_host_whole_experts mixtral-8x7b --batch 1,16 \
            --gpu-memory 24GiB --cpu-memory 100GiB --whole-experts ;;
        # 141B parameters, about 75 GB in int4: more than the machine's 64 GiB disk, so it lives in host RAM
        8x22b_gpu24_host) run mixtral_8x22b_int4_gpu24_host mixtral-8x22b --batch 1,8 --gpu-memory 24GiB \
            --cpu-memory 100GiB ;;
        8x22b_gpu24_host_whole) run mixtral_8x22b_int4_gpu24_host_whole_experts mixtral-8x22b --batch 1,8 \
            --gpu-memory 24GiB --cpu-memory 100GiB --whole-experts ;;
        # 235B parameters, about 125 GB in int4: all of it in the H200's HBM (tiermem plan places it in 116 GiB)
        qwen3_235b_resident_graphs) run qwen3_235b_a22b_int4_resident_graphs qwen3-235b-a22b --batch 1,16 \
            --cuda-graphs ;;
        # the routed GEMV against chosen_experts / all_experts expert by expert, one process (engine.moe.ROUTED_EXPERTS)
        routed_ab) (cd "$(dirname "$0")" && timeout 400 python3 moe_routed_ab.py --synthetic mixtral-8x7b \
            --batch 1,2,3,16 --prompt-len 512 --gen-len 16 --out "$RES/routed_ab") 2>&1 | grep -v "B/s\]$" | tail -24 ;;
    esac
done

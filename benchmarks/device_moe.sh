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
MODEL=(--synthetic mixtral-8x7b --quant int4 --group-size 128 --prompt-len 512 --gen-len 16)
run() {
    local name=$1; shift
    echo "== $name: tiermem bench ${MODEL[*]} $*"
    timeout 400 tiermem bench "${MODEL[@]}" "$@" --out "$RES/$name.json" 2>&1 | tr '\r' '\n' | grep -v "B/s\]$" \
        | tail -6 || echo "== $name failed"
}
# RUNS: which runs (default: the first three; gpu24_host_kvgpu fixes the KV cache in HBM, against the plan's)
for name in ${RUNS:-resident_graphs resident_eager gpu24_host}; do
    case $name in
        resident_graphs) run mixtral_8x7b_int4_resident_graphs --batch 1,16 --cuda-graphs ;;
        resident_eager) run mixtral_8x7b_int4_resident_eager --batch 1,16 --no-cuda-graphs ;;
        gpu24_host) run mixtral_8x7b_int4_gpu24_host --batch 1,16 --gpu-memory 24GiB --cpu-memory 100GiB ;;
        gpu24_host_kvgpu) run mixtral_8x7b_int4_gpu24_host_kvgpu --batch 1,16 --gpu-memory 24GiB --cpu-memory 100GiB \
            --kv-placement gpu ;;
    esac
done

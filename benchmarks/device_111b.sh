#!/usr/bin/env bash
# Issue 5's 111B int4 runs on the GPU machine; results as JSON under $OUT. Usage: device_111b.sh RUN...
#   host_plan        gpu_memory 24 GiB, the rest in pinned RAM, the planner's placement, batch 1 and 32
#   host_greedy      the same with the greedy placement (HBM-resident prefix in execution order)
#   host_cpu_attention  the same at batch 32 with the KV cache fixed in host RAM and attention on the host
#   disk_plan        gpu_memory 24 GiB, cpu_memory 32 GiB (the rest streams from disk), batch 64, planner
#   disk_kvcpu_bf16  the same with the KV cache fixed in host RAM
#   disk_kvcpu_int4  the same with the KV cache in host RAM, int4
#   disk_plan_int4   the same with an int4 KV cache placed by the planner
#   disk_plan_auto   the same with the KV cache's precision chosen by the planner too (--kv-quant auto)
#   store            only write the store (every run writes the 56 GB int4 store to $STORE if it is not there yet)
# IO_THREADS sets the disk tier's reader threads (default 4).
set -euo pipefail
: "${OUT:?set OUT to the results folder}"
STORE=${STORE:-/root/s111}
MODEL=(--synthetic llama-111b --quant int4 --group-size 128 --write-store "$STORE" --gpu-memory 24GiB)
HOST=(--batch 1,32 --prompt-len 128 --gen-len 8)
DISK=(--cpu-memory 32GiB --batch 64 --prompt-len 512 --gen-len 6 --io-threads "${IO_THREADS:-4}")
for name in "$@"; do
    case $name in
        host_plan) args=("${HOST[@]}") ;;
        host_greedy) args=("${HOST[@]}" --plan greedy) ;;
        host_cpu_attention) args=(--batch 32 --prompt-len 128 --gen-len 8 --cpu-attention) ;;
        disk_plan) args=("${DISK[@]}") ;;
        disk_kvcpu_bf16) args=("${DISK[@]}" --kv-placement cpu) ;;
        disk_kvcpu_int4) args=("${DISK[@]}" --kv-placement cpu --kv-quant int4) ;;
        disk_plan_int4) args=("${DISK[@]}" --kv-quant int4) ;;
        disk_plan_auto) args=("${DISK[@]}" --kv-quant auto) ;;
        store)
            python3 -c "import sys, torch; from tiermem.presets import preset; from tiermem.kernels.quant import \
QuantScheme; from tiermem.synthetic import write_synthetic_store; from pathlib import Path; \
Path(sys.argv[1], 'manifest.json').is_file() or write_synthetic_store(preset('llama-111b'), sys.argv[1], \
QuantScheme.from_name('int4', 128), torch.bfloat16, device='cuda')" "$STORE" 2>&1 | tr '\r' '\n' | tail -1
            continue ;;
        *) echo "unknown run $name" >&2; exit 2 ;;
    esac
    echo "== 111b_$name: tiermem bench ${MODEL[*]} ${args[*]}"
    tiermem bench "${MODEL[@]}" "${args[@]}" --out "$OUT/111b_$name.json" 2>&1 | tr '\r' '\n' | grep -v "B/s\]$" | tail -12
done

#!/usr/bin/env bash
# Where the KV cache lives, side by side on the GPU machine: llama3-8b int4 weights (resident), batch 16 x 2048
# tokens. Results as JSON under $OUT. Usage: device_kv_tiers.sh RUN...
#   gpu            KV in HBM (the planner's choice with no budget)
#   cpu            KV in pinned host RAM, attention on the GPU (KV read over PCIe every step)
#   cpu_attention  KV in pinned host RAM, attention on the CPU (FlexGen's cpu_cache_compute)
#   disk           KV in a file in $KV_DIR (read back every step; page cache dropped after the prompt)
#   disk_int4      the same with an int4 KV cache
# The store is written to $STORE once (about 5 GB) so that bench measures the disk's read ceilings.
set -euo pipefail
: "${OUT:?set OUT to the results folder}"
STORE=${STORE:-/root/s8}
KV_DIR=${KV_DIR:-/root/kv}
mkdir -p "$KV_DIR"
MODEL=(--synthetic llama3-8b --quant int4 --group-size 128 --write-store "$STORE" --batch 16 --prompt-len 2048
       --gen-len 8)
for name in "$@"; do
    case $name in
        gpu) args=() ;;
        cpu) args=(--kv-placement cpu) ;;
        cpu_attention) args=(--cpu-attention) ;;
        disk) args=(--kv-placement disk --offload-dir "$KV_DIR") ;;
        disk_int4) args=(--kv-placement disk --offload-dir "$KV_DIR" --kv-quant int4) ;;
        *) echo "unknown run $name" >&2; exit 2 ;;
    esac
    echo "== kv_$name: tiermem bench ${MODEL[*]} ${args[*]}"
    tiermem bench "${MODEL[@]}" "${args[@]}" --out "$OUT/kv_$name.json" 2>&1 | tr '\r' '\n' | grep -v "B/s\]$" \
        | tail -8
done

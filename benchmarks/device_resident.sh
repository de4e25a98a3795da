#!/usr/bin/env bash
# Resident (host-bound) decode configs on the GPU machine: measured step against the planner's prediction,
# whose host term tiermem.host_probe measures. Results as JSON under $OUT. Usage: device_resident.sh RUN...
#   llama3_8b_int4     llama3-8b int4 (group 128), int4 KV, batch 1, 4, 16, 64, prompt 1024
#   llama3_8b_bf16     llama3-8b bf16 weights, bf16 KV, batch 1, 16, prompt 1024
#   opt_1b_fp16        opt-1.3b fp16, batch 1, 16, 64, prompt 512
# FUSED_KV_QUANTIZE=0|1 sets tiermem.kernels.ops.FUSED_KV_QUANTIZE for the run (default: the library's).
set -euo pipefail
: "${OUT:?set OUT to the results folder}"
for name in "$@"; do
    case $name in
        llama3_8b_int4) args=(--synthetic llama3-8b --quant int4 --group-size 128 --kv-quant int4 --batch 1,4,16,64
                              --prompt-len 1024 --gen-len 16) ;;
        llama3_8b_bf16) args=(--synthetic llama3-8b --batch 1,16 --prompt-len 1024 --gen-len 16) ;;
        opt_1b_fp16) args=(--synthetic opt-1.3b --batch 1,16,64 --prompt-len 512 --gen-len 16) ;;
        *) echo "unknown run $name" >&2; exit 2 ;;
    esac
    echo "== $name: tiermem bench ${args[*]} (FUSED_KV_QUANTIZE=${FUSED_KV_QUANTIZE:-default})"
    python3 -c "import os, sys; import tiermem.kernels.ops as o; f = os.environ.get('FUSED_KV_QUANTIZE'); \
f is None or setattr(o, 'FUSED_KV_QUANTIZE', f == '1'); from tiermem.cli import main; raise SystemExit(main(sys.argv[1:]))" \
        bench "${args[@]}" --out "$OUT/resident_${name}_fkq${FUSED_KV_QUANTIZE:-default}.json" 2>&1 \
        | tr '\r' '\n' | grep -v "B/s\]$" | tail -14
done

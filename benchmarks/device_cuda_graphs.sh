#!/usr/bin/env bash
# Resident decode with and without CUDA graphs (tiermem.engine.static_decode), side by side on the GPU machine:
# llama3-8b int4 weights and the KV cache in HBM, batch 16 x 2048 tokens, each configuration RUNS times,
# alternating, so that the host's drift between runs (19-45 ms per step in session 9) hits both alike; the KV
# cache in each of KV_QUANTS (default: "none int4"). First the GPU tests of static decode. JSON under $OUT.
set -euo pipefail
: "${OUT:?set OUT to the results folder}"
STORE=${STORE:-/root/s8}
RUNS=${RUNS:-3}
KV_QUANTS=${KV_QUANTS:-none int4}
python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_static_decode.py 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt" \
    || true
MODEL=(--synthetic llama3-8b --quant int4 --group-size 128 --write-store "$STORE" --batch 16 --prompt-len 2048
       --gen-len 16)
for run in $(seq "$RUNS"); do
    for kv in $KV_QUANTS; do
        for mode in eager graphs; do
            args=()
            if [ "$mode" = graphs ]; then args+=(--cuda-graphs); else args+=(--no-cuda-graphs); fi
            [ "$kv" != none ] && args+=(--kv-quant "$kv")
            echo "== $mode kv $kv $run: tiermem bench ${MODEL[*]} ${args[*]}"
            tiermem bench "${MODEL[@]}" "${args[@]}" --out "$OUT/resident_kv${kv}_${mode}_$run.json" 2>&1 \
                | tr '\r' '\n' | grep -v "B/s\]$" | tail -3 || echo "== that run failed"
        done
    done
done

#!/usr/bin/env bash
# Resident decode with and without CUDA graphs (tiermem.engine.static_decode), side by side on the GPU machine:
# llama3-8b int4 weights and a bf16 KV cache in HBM, batch 16 x 2048 tokens, each configuration RUNS times,
# alternating, so that the host's drift between runs (19-45 ms per step in session 9) hits both alike.
# First the GPU tests of static decode. Results as JSON under $OUT.
set -euo pipefail
: "${OUT:?set OUT to the results folder}"
STORE=${STORE:-/root/s8}
RUNS=${RUNS:-3}
python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_static_decode.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
MODEL=(--synthetic llama3-8b --quant int4 --group-size 128 --write-store "$STORE" --batch 16 --prompt-len 2048
       --gen-len 16)
for run in $(seq "$RUNS"); do
    for mode in eager graphs; do
        args=()
        [ "$mode" = graphs ] && args=(--cuda-graphs)
        echo "== $mode $run: tiermem bench ${MODEL[*]} ${args[*]}"
        tiermem bench "${MODEL[@]}" "${args[@]}" --out "$OUT/resident_${mode}_$run.json" 2>&1 | tr '\r' '\n' \
            | grep -v "B/s\]$" | tail -3
    done
done

#!/usr/bin/env bash
# tiermem against HF Accelerate's CPU offload on one random-weight bf16 checkpoint of 4 of Mixtral-8x7B's 32 layers
# (12 GB), both capped at GPU_CAP GiB of GPU memory, batch 1 and 8, 32-token prompts, 8 new tokens, in one call:
# the peer writes the checkpoint and runs, tiermem packs it (bf16 and int4) and benches each store; the merged
# JSON (benchmarks/record_results.py) and each run's own go into $OUT/results.tgz.
set -uo pipefail
: "${OUT:?set OUT to the results folder}"
RES=${RES:-/root/moe_peer}
CKPT=${CKPT:-/root/ckpt-mixtral-4l}
GPU_CAP=${GPU_CAP:-8}
mkdir -p "$RES"
trap 'tar -C "$RES" -czf "$OUT/results.tgz" .' EXIT
here=$(dirname "$0")
LAYERS=4 GPU_CAP=$GPU_CAP BATCHES=1,8 NEW_TOKENS=8 CKPT=$CKPT OUT=$RES timeout 240 \
    python3 "$here/peer_accelerate_moe.py" 2>&1 | tail -14
for quant in none int4; do
    store=/root/store-mixtral-4l-$quant
    [ -f "$store/manifest.json" ] || timeout 120 tiermem pack "$CKPT" "$store" --quant "$quant" --group-size 128 \
        2>&1 | tr '\r' '\n' | tail -1
    timeout 150 tiermem bench "$store" --batch 1,8 --prompt-len 32 --gen-len 8 --gpu-memory "${GPU_CAP}GiB" \
        --out "$RES/tiermem_mixtral4l_$quant.json" 2>&1 | tr '\r' '\n' | grep -v "B/s\]$" | tail -5
    python3 "$here/record_results.py" --tiermem "$RES/tiermem_mixtral4l_$quant.json" \
        --accelerate "$RES/peer_accelerate_mixtral8x7b_4l.json" --device-call "${CALL:-session 14}" \
        --peer-command "LAYERS=4 GPU_CAP=$GPU_CAP BATCHES=1,8 NEW_TOKENS=8 python3 benchmarks/peer_accelerate_moe.py" \
        --out "$RES/mixtral8x7b_4l_${quant}_vs_accelerate_bf16.json" | tail -4
done

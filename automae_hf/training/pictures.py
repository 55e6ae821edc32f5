"""Picture grids of what a masking strategy did: the image, what guided the mask, the mask, the reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

def _to_rgb(tile: np.ndarray) -> np.ndarray:
    tile = np.clip(tile, 0, 1)
    if tile.ndim == 2:
        tile = np.repeat(tile[:, :, None], 3, axis=2)
    elif tile.shape[2] == 1:
        tile = np.repeat(tile, 3, axis=2)
    return (tile * 255).astype(np.uint8)


def _upsample(grid_map: np.ndarray, size: int) -> np.ndarray:
    rows, cols = grid_map.shape
    return np.kron(grid_map, np.ones((size // rows, size // cols), dtype=np.float32))


def _norm01(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _draw_boxes(tile: np.ndarray, boxes, colour=(255, 0, 0)) -> np.ndarray:
    """Outlines xyxy pixel boxes on a uint8 `[H, W, 3]` tile."""
    tile = tile.copy()
    height, width = tile.shape[:2]
    for x0, y0, x1, y1 in np.asarray(boxes, np.float32).reshape(-1, 4):
        x0, x1 = (int(np.clip(round(v), 0, width - 1)) for v in (x0, x1))
        y0, y1 = (int(np.clip(round(v), 0, height - 1)) for v in (y0, y1))
        tile[y0, x0:x1 + 1] = tile[y1, x0:x1 + 1] = colour
        tile[y0:y1 + 1, x0] = tile[y0:y1 + 1, x1] = colour
    return tile


def save_image_grid(path: Path, model, pixel_values, output, mean, std, max_images: int = 8, boxes=None) -> None:
    """One row per image; columns show what the masking strategy (`model.config.masking`) used, then its mask:

    - learned:   image | teacher attention (mean over heads) | learned mask probability | mask | reconstruction
    - attention: image | teacher attention (mean over heads), the masked top patches outlined in red | mask | recon.
    - box_prior: image with its boxes in red | the boxes' patches (white = inside) | mask | reconstruction
    - random:    image | mask | reconstruction

    The mask is white where visible, black where masked; the reconstruction pastes the visible patches back. With the
    same data, seed and step, runs of different strategies picture the same images, so the grids compare directly."""
    n = min(max_images, pixel_values.shape[0])
    x = pixel_values[:n].detach().float().cpu()
    size = x.shape[-1]
    grid = model.config.grid_size
    logits = output.logits[:n].detach().float().cpu()
    mask = output.mask[:n].detach().float().cpu()
    if model.config.norm_pix_loss:
        target = model.patchify(x)
        mu, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        logits = logits * (var + 1e-6) ** 0.5 + mu
    patches = model.patchify(x) * (1 - mask[..., None]) + logits * mask[..., None]
    recon = model.unpatchify(patches, (x.shape[-2], x.shape[-1]))
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    images = (x * s + m).permute(0, 2, 3, 1).numpy()
    recon = (recon * s + m).permute(0, 2, 3, 1).numpy()
    rows = []
    masking = getattr(model.config, "masking", "learned")
    for i in range(n):
        tiles = [_to_rgb(images[i])]
        if boxes is not None and i < len(boxes):
            tiles[0] = _draw_boxes(tiles[0], torch.as_tensor(boxes[i]).detach().float().cpu().numpy())
        if getattr(output, "box_patches", None) is not None:
            tiles.append(_to_rgb(_upsample(output.box_patches[i].detach().float().cpu().view(*grid).numpy(), size)))
        if getattr(output, "teacher_attention", None) is not None:
            att = output.teacher_attention[i].detach().float().cpu().mean(0).numpy()
            tile = _to_rgb(_upsample(_norm01(att), size))
            if masking == "attention":  # the masked patches tinted red over the attention they were chosen by
                masked = (_upsample(mask[i].view(*grid).numpy(), size) > 0.5)[..., None]
                tinted = tile.astype(np.float32) * np.array([1.0, 0.45, 0.45]) + np.array([90.0, 0.0, 0.0])
                tile = np.where(masked, np.clip(tinted, 0, 255), tile).astype(np.uint8)
            tiles.append(tile)
        if getattr(output, "mask_probs", None) is not None:
            probs = output.mask_probs[i].detach().float().cpu().view(*grid).numpy()
            tiles.append(_to_rgb(_upsample(_norm01(probs), size)))
        tiles.append(_to_rgb(_upsample(1.0 - mask[i].view(*grid).numpy(), size)))
        tiles.append(_to_rgb(recon[i]))
        sep = np.full((size, 2, 3), 128, np.uint8)
        rows.append(np.concatenate(sum(([t, sep] for t in tiles), [])[:-1], axis=1))
    sep = np.full((2, rows[0].shape[1], 3), 128, np.uint8)
    canvas = np.concatenate(sum(([r, sep] for r in rows), [])[:-1], axis=0)
    scale = max(1, 128 // size)
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)

"""Pictures of what a masking strategy did, drawn the same way for the training-time grids (`--image_log_steps`,
`<output_dir>/images/step_N.png`) and for `training/visualize.py`: one row per image, a title over each column, a
legend under the grid.

    pictures = picture_arrays(model, pixel_values, output, mean, std)       # float arrays, see its docstring
    columns = picture_columns(pictures, model.config.masking)               # [Column(key, title, tiles)]
    render_grid(columns, scale=4).save("grid.png")                          # header + tiles + legend

`save_image_grid` does all three for a training batch.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

SEPARATOR = 2  # grey pixels between tiles, before upscaling
GREY = 128
TEXT = (20, 20, 20)
MASK_TINT = np.array([0.0, 0.0, 0.7], np.float32)  # blue: absent from the black-red-yellow-white heatmap


class Column(NamedTuple):
    """One titled column of a grid: `tiles` is uint8 `[B, H, W, 3]`, one tile per image (row)."""

    key: str
    title: str
    tiles: np.ndarray


# ---- numbers: what the pictures show ---------------------------------------------------------------------------
def unnormalize_prediction(model, pixel_values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Decoder output `[B, L, p*p*C]` -> patches in the (normalised) input's pixel space: under norm-pix loss the
    target's per-patch mean and variance are put back (the inverse of `reconstruction_targets`)."""
    if not model.config.norm_pix_loss:
        return logits
    target = model.patchify(pixel_values)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    return logits * (var + 1.0e-6) ** 0.5 + mean


def _patch_grid(model, pixel_values: torch.Tensor) -> tuple[int, int]:
    patch = model.vit.embeddings.patch_embeddings.patch_size[0]
    return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch


@torch.no_grad()
def picture_arrays(model, pixel_values: torch.Tensor, output, mean, std, max_images: int | None = None) -> dict:
    """What the columns show, for the first `max_images` images of a pretraining forward pass.

    Args:
        pixel_values: `[B, C, H, W]` normalised with `mean`/`std` (the image processor's, C values each).
        output: the `AutoMAEForPreTrainingOutput` of `model(pixel_values, ...)`.
    Returns:
        A dict of float32 numpy arrays (None where the strategy has no such thing):
        image, reconstruction (visible patches pasted back), prediction (the decoder's, every patch): `[n, H, W, C]`
        in [0, 1]; mask `[n, h, w]` (1 = masked); teacher_attention `[n, h, w]` (mean over heads; learned and
        attention masking); learned_p `[n, h, w]` = softmax(mask_logits), the score head's distribution over
        patches, and mask_probs `[n, h, w]`, the Gumbel-Softmax sample whose top-K was masked (learned masking);
        box_patches `[n, h, w]` (1 inside a box; box_prior masking).
    """
    n = pixel_values.shape[0] if max_images is None else min(max_images, pixel_values.shape[0])
    x = pixel_values[:n].detach().float().cpu()
    grid = _patch_grid(model, x)
    channels = x.shape[1]

    def on_grid(value):
        return None if value is None else value[:n].detach().float().cpu().reshape(n, *grid).numpy()

    logits = unnormalize_prediction(model, x, output.logits[:n].detach().float().cpu())
    mask = output.mask[:n].detach().float().cpu()
    pasted = model.patchify(x) * (1 - mask[..., None]) + logits * mask[..., None]
    m = torch.tensor(list(mean)[:channels], dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std)[:channels], dtype=torch.float32).view(1, -1, 1, 1)

    def to_image(values):
        return (values * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    attention = getattr(output, "teacher_attention", None)
    mask_logits = getattr(output, "mask_logits", None)
    return {
        "image": to_image(x),
        "reconstruction": to_image(model.unpatchify(pasted, tuple(x.shape[-2:]))),
        "prediction": to_image(model.unpatchify(logits, tuple(x.shape[-2:]))),
        "mask": on_grid(mask),
        "teacher_attention": None if attention is None else on_grid(attention[:n].float().mean(1)),
        "learned_p": None if mask_logits is None else on_grid(mask_logits[:n].float().softmax(-1)),
        "mask_probs": on_grid(getattr(output, "mask_probs", None)),
        "box_patches": on_grid(getattr(output, "box_patches", None)),
    }


# ---- tiles -------------------------------------------------------------------------------------------------------
def heatmap(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """`[..., h, w]` -> `[..., h, w, 3]` in [0, 1], black (`low`) -> red -> yellow -> white (`high`); the bounds
    default to the map's own min and max."""
    lo = float(values.min()) if low is None else low
    hi = float(values.max()) if high is None else high
    t = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)


def to_uint8(tile: np.ndarray) -> np.ndarray:
    """`[H, W]`, `[H, W, 1]` or `[H, W, 3]` in [0, 1] -> uint8 `[H, W, 3]`."""
    tile = tile if tile.ndim == 3 else tile[..., None]
    tile = np.repeat(tile, 3, axis=2) if tile.shape[2] == 1 else tile
    return (np.clip(tile, 0, 1) * 255).round().astype(np.uint8)


def upsample(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A patch-grid map `[h, w]` or `[h, w, K]` -> `[H, W, K]`, each patch a constant `H/h x W/w` block."""
    rows, cols = grid_map.shape[:2]
    values = grid_map if grid_map.ndim == 3 else grid_map[..., None]
    return np.kron(values, np.ones((size[0] // rows, size[1] // cols, 1), dtype=np.float32))


def draw_boxes(tile: np.ndarray, boxes, colour=(255, 0, 0)) -> np.ndarray:
    """Outlines xyxy pixel boxes `[n, 4]` on a uint8 `[H, W, 3]` tile (a copy); NaN rows (padding) are skipped."""
    tile = tile.copy()
    height, width = tile.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    for x0, y0, x1, y1 in boxes[np.isfinite(boxes).all(axis=1)]:
        x0, x1 = (int(np.clip(round(v), 0, width - 1)) for v in (x0, x1))
        y0, y1 = (int(np.clip(round(v), 0, height - 1)) for v in (y0, y1))
        tile[y0, x0:x1 + 1] = tile[y1, x0:x1 + 1] = colour
        tile[y0:y1 + 1, x0] = tile[y0:y1 + 1, x1] = colour
    return tile


def picture_columns(pictures: dict, masking: str = "learned", boxes=None, prediction: bool = False) -> list[Column]:
    """The titled columns of a grid, left to right (each present when `pictures` has its values):

    - learned:   image | teacher attention (mean over heads) | learned p = softmax(mask_logits) | mask | reconstruction
    - attention: image | teacher attention (mean over heads), the masked patches tinted blue | mask | reconstruction
    - box_prior: image with its boxes in red | the boxes' patches (white = inside) | mask | reconstruction
    - random:    image | mask | reconstruction

    then, with `prediction`, the decoder's prediction for every patch. The mask is white where visible, black where
    masked; heatmaps go black -> red -> yellow -> white on one absolute scale per column, 0 to the column's maximum
    (named in its title, with the uniform value 1/L for p), so a flat map looks flat and the rows compare.

    Args:
        pictures: `picture_arrays`' dict.
        boxes: per image, `[n_i, 4]` xyxy pixel boxes of the pictured images (drawn on the image column), or None.
    """
    image = pictures["image"]
    size = image.shape[1:3]

    def maps(values, colour):
        return np.stack([to_uint8(upsample(colour(v), size)) for v in values])

    def absolute_heatmaps(values):  # why: a per-tile min-max stretch draws noise around a uniform map as structure
        top = float(values.max())
        return maps(values, lambda v: heatmap(v, 0.0, top)), top

    tiles = np.stack([to_uint8(t) for t in image])
    title = "image"
    if boxes is not None:
        tiles = np.stack([draw_boxes(t, torch.as_tensor(boxes[i]).detach().float().cpu().numpy()) if i < len(boxes)
                          else t for i, t in enumerate(tiles)])
        title = "image, boxes in red"
    columns = [Column("image", title, tiles)]
    if pictures.get("box_patches") is not None:
        tiles = maps(pictures["box_patches"], lambda v: v)
        columns.append(Column("box_patches", "box patches (white = inside)", tiles))
    if pictures.get("teacher_attention") is not None:
        tiles, top = absolute_heatmaps(pictures["teacher_attention"])
        title = "teacher attention (mean over heads)"
        if masking == "attention":  # which patches the attention chose, over the attention itself
            masked = np.stack([upsample(m, size) > 0.5 for m in pictures["mask"]])
            tinted = tiles.astype(np.float32) * 0.3 + MASK_TINT * 255
            tiles = np.where(masked, tinted, tiles).round().astype(np.uint8)
            title += ", masked tinted blue"
        columns.append(Column("teacher_attention", f"{title} (scale 0 to {top:.2g})", tiles))
    if pictures.get("learned_p") is not None:
        tiles, top = absolute_heatmaps(pictures["learned_p"])
        uniform = 1.0 / pictures["learned_p"][0].size
        columns.append(Column("learned_p", f"learned p = softmax(mask_logits) (scale 0 to {top:.2g}; uniform "
                                           f"{uniform:.2g})", tiles))
    columns.append(Column("mask", "sampled mask (black = masked)", maps(1.0 - pictures["mask"], lambda v: v)))
    columns.append(Column("reconstruction", "reconstruction (visible patches pasted back)",
                          np.stack([to_uint8(t) for t in pictures["reconstruction"]])))
    if prediction:
        columns.append(Column("prediction", "prediction (every patch)",
                              np.stack([to_uint8(t) for t in pictures["prediction"]])))
    return columns


def legend_lines(columns: list[Column]) -> list[list]:
    """What the colours of these columns mean: lines of tokens, a word (str) or ("swatch", rgb) or ("bar",)."""
    keys = {column.key for column in columns}
    lines = [["sampled", "mask:", ("swatch", (0, 0, 0)), "masked,", ("swatch", (255, 255, 255)), "visible."]]
    if keys & {"teacher_attention", "learned_p"}:
        lines.append(["heatmaps:", "0", ("bar",), "the", "column's", "maximum", "(in", "its", "title),", "one",
                      "scale", "for", "every", "row."])
    if "learned_p" in keys:
        lines.append("learned p: the score head's distribution over patches; its Gumbel-Softmax sample picks the "
                     "top-K whose masking noise is raised.".split())
    if any("tinted blue" in column.title for column in columns):
        lines.append(["attention", "masking:", ("swatch", tuple(int(v) for v in MASK_TINT * 255)), "tint", "=",
                      "a", "masked", "patch."])
    if "box_patches" in keys:
        lines.append(["boxes:", ("swatch", (255, 0, 0)), "outlines", "on", "the", "image;", "box", "patches:",
                      ("swatch", (255, 255, 255)), "inside,", ("swatch", (0, 0, 0)), "outside."])
    lines.append("reconstruction: visible patches are the input's, masked ones the decoder's.".split())
    return lines


# ---- drawing -----------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def font(size: int):
    """Pillow's built-in font at `size` pixels (no font files); the fixed-size bitmap one without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _line_height(draw: ImageDraw.ImageDraw, face) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), "Ag(", font=face)
    return bottom - min(top, 0) + 3


def _token_width(draw, face, token, height: int) -> int:
    if isinstance(token, str):
        return int(np.ceil(draw.textlength(token, font=face)))
    return 6 * height if token[0] == "bar" else height - 3


def _wrap(draw, face, tokens: list, width: int, height: int) -> list[list]:
    """Greedy line breaking of words and swatches into `width` pixels (a too-long word keeps a line of its own)."""
    space = draw.textlength(" ", font=face)
    lines, line, used = [], [], 0.0
    for token in tokens:
        w = _token_width(draw, face, token, height)
        if line and used + space + w > width:
            lines.append(line)
            line, used = [], 0.0
        used += (space if line else 0) + w
        line.append(token)
    return lines + [line] if line else lines


def _draw_tokens(draw, image: Image.Image, face, tokens: list, x: float, y: int, height: int) -> None:
    space = draw.textlength(" ", font=face)
    for token in tokens:
        w = _token_width(draw, face, token, height)
        if isinstance(token, str):
            draw.text((x, y), token, fill=TEXT, font=face)
        elif token[0] == "bar":  # the heatmap colour scale, low to high
            ramp = to_uint8(heatmap(np.linspace(0, 1, w, dtype=np.float32))[None].repeat(height - 5, 0))
            image.paste(Image.fromarray(ramp), (int(x), y + 1))
            draw.rectangle((int(x) - 1, y, int(x) + w, y + height - 4), outline=TEXT)
        else:  # a colour swatch, outlined so white shows on white
            draw.rectangle((int(x), y + 1, int(x) + w - 1, y + height - 4), fill=tuple(token[1]), outline=TEXT)
        x += w + space


def render_grid(columns: list[Column], legend: list[list] | None = None, scale: int | None = None) -> Image.Image:
    """The columns' tiles, one row per image, upscaled `scale` times (nearest; default: tiles about 128 pixels
    wide), with the column titles in a header row above and the `legend` (default: `legend_lines(columns)`) below.

    Returns an RGB image of width `k * W * scale + (k - 1) * SEPARATOR * scale` for k columns of `[B, H, W, 3]` tiles:
    the header, then the tiles framed above, between and below by grey `SEPARATOR * scale` bands (column c at
    x = c * (W + SEPARATOR) * scale), then the legend.
    """
    count, height, width = columns[0].tiles.shape[:3]
    scale = scale or max(1, 128 // width)
    rows = []
    for i in range(count):
        sep = np.full((height, SEPARATOR, 3), GREY, np.uint8)
        rows.append(np.concatenate(sum(([c.tiles[i], sep] for c in columns), [])[:-1], axis=1))
    sep = np.full((SEPARATOR, rows[0].shape[1], 3), GREY, np.uint8)
    body = np.concatenate([sep] + sum(([r, sep] for r in rows), []), axis=0)  # grey above and below: white tiles show
    body = Image.fromarray(body).resize((body.shape[1] * scale, body.shape[0] * scale), Image.NEAREST)

    column_width, pad = width * scale, 4
    face = font(int(np.clip(column_width // 9, 11, 16)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = _line_height(measure, face)
    titles = [_wrap(measure, face, c.title.split(), column_width - 2 * pad, line) for c in columns]
    header_height = max(len(t) for t in titles) * line + 2 * pad
    legend = legend_lines(columns) if legend is None else legend
    wrapped = [w for tokens in legend for w in _wrap(measure, face, tokens, body.width - 2 * pad, line)]
    legend_height = len(wrapped) * line + 2 * pad if wrapped else 0

    canvas = Image.new("RGB", (body.width, header_height + body.height + legend_height), (255, 255, 255))
    canvas.paste(body, (0, header_height))
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(titles):
        left = c * (width + SEPARATOR) * scale
        top = header_height - pad - len(lines) * line  # titles sit on the tiles, centred over their column
        for k, tokens in enumerate(lines):
            text = " ".join(tokens)
            x = left + max(0, (column_width - measure.textlength(text, font=face)) / 2)
            draw.text((x, top + k * line), text, fill=TEXT, font=face)
    for k, tokens in enumerate(wrapped):
        _draw_tokens(draw, canvas, face, tokens, pad, header_height + body.height + pad + k * line, line)
    return canvas


def save_image_grid(path: Path | None, model, pixel_values, output, mean, std, max_images: int = 8,
                    boxes=None) -> Image.Image:
    """Writes the grid of the first `max_images` images of a training batch to `path` (None: computes it only, as the
    non-writing ranks of a sharded model must) and returns it.

    Args:
        pixel_values: `[B, C, H, W]` the batch, normalised with `mean`/`std`.
        output: `model(pixel_values, ...)`'s `AutoMAEForPreTrainingOutput`.
        boxes: box_prior masking: per image, `[n_i, 4]` xyxy pixel boxes of `pixel_values` (outlined in red).
    Columns as `picture_columns` for `model.config.masking`. With the same data, seed and step, runs of different
    strategies picture the same images, so the grids compare directly.
    """
    pictures = picture_arrays(model, pixel_values, output, mean, std, max_images)
    count = pictures["image"].shape[0]
    columns = picture_columns(pictures, getattr(model.config, "masking", "learned"),
                              None if boxes is None else list(boxes)[:count])
    grid = render_grid(columns)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
    return grid

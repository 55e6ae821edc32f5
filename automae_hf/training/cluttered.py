"""Cluttered Fashion-MNIST: one garment at a random place on a larger canvas, among fragments of other garments and
optional pixel noise, with the garment's box recorded. Generated deterministically from the repository's embedded
Fashion-MNIST subset (no download), so that where a model masks and looks can matter: the object covers a minority of
the patch grid and the rest cannot be predicted from it.

    arrays = make_cluttered_splits(np.load("training/data/fashion_mnist_subset.npz"), ClutterSettings())
    arrays["train_images"]  # uint8 [N, canvas, canvas]; also *_labels [N] and *_boxes [N, 4] (COCO xywh, pixels)

Splits: "train" and "validation" (the last `validation_size` training images, held out for every choice made on the
benchmark) from the subset's training images, "test" from its test images (only reported).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ClutterSettings:
    canvas: int = 64  # pixels per side of the square canvas
    object_scale: float = 1.0  # the garment's tight crop is resized by this factor before placement
    fragments: int = 8  # clutter: square crops of other garments, placed outside the garment's box
    fragment_size: int = 8  # pixels per side of a fragment
    noise: float = 0.0  # amplitude (0-255) of uniform per-pixel noise over the whole canvas, garment included
    background_noise: float = 0.0  # amplitude (0-255) of uniform noise on every pixel but the garment's own
    validation_size: int = 1000  # held out of the training images
    seed: int = 0

    def fingerprint(self) -> dict:
        return asdict(self)


def tight_crop(image: np.ndarray) -> np.ndarray:
    """The garment's non-zero pixels' bounding rectangle (the whole image when it is empty)."""
    rows, columns = np.nonzero(image)
    if len(rows) == 0:
        return image
    return image[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]


def resize(crop: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return crop
    height, width = (max(1, round(side * scale)) for side in crop.shape)
    return np.asarray(Image.fromarray(crop).resize((width, height), Image.BILINEAR))


def overlaps(box: tuple[int, int, int, int], x: int, y: int, size: int) -> bool:
    """Whether a `size` square at (x, y) touches the xywh `box`."""
    bx, by, bw, bh = box
    return x < bx + bw and bx < x + size and y < by + bh and by < y + size


def compose(garment: np.ndarray, donors: np.ndarray, settings: ClutterSettings, rng: np.random.Generator,
            background_rng: np.random.Generator | None = None):
    """One canvas: -> (uint8 `[canvas, canvas]` image, xywh box of the garment's non-zero pixels). The background
    noise comes from `background_rng` (default `rng`), so that adding it leaves places and clutter unchanged."""
    canvas = np.zeros((settings.canvas, settings.canvas), dtype=np.float32)
    crop = tight_crop(resize(tight_crop(garment), settings.object_scale))  # resizing can fade an edge row to 0
    height, width = crop.shape
    if height > settings.canvas or width > settings.canvas:
        raise ValueError(f"object_scale={settings.object_scale} makes a {height}x{width} garment; the canvas is "
                         f"{settings.canvas}x{settings.canvas}")
    top = int(rng.integers(0, settings.canvas - height + 1))
    left = int(rng.integers(0, settings.canvas - width + 1))
    box = (left, top, width, height)
    size = settings.fragment_size
    for donor in donors:
        for _ in range(20):  # a free place outside the garment's box; skipped when the canvas has none
            x, y = (int(v) for v in rng.integers(0, settings.canvas - size + 1, size=2))
            if not overlaps(box, x, y, size):
                dy, dx = (int(v) for v in rng.integers(0, donor.shape[0] - size + 1, size=2))
                fragment = donor[dy : dy + size, dx : dx + size]
                canvas[y : y + size, x : x + size] = np.maximum(canvas[y : y + size, x : x + size], fragment)
                break
    if settings.background_noise > 0:  # noise no context predicts, under the clutter and beside the garment
        canvas = np.maximum(canvas, (background_rng or rng).uniform(0, settings.background_noise, size=canvas.shape))
    region = canvas[top : top + height, left : left + width]
    region[crop > 0] = crop[crop > 0]
    if settings.noise > 0:
        canvas = canvas + rng.uniform(0, settings.noise, size=canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8), [float(v) for v in box]


def make_split(images: np.ndarray, labels: np.ndarray, settings: ClutterSettings, stream: int) -> dict:
    """Canvases for one split; every garment's clutter comes from other images of the same split."""
    rng = np.random.default_rng([settings.seed, stream])
    background_rng = np.random.default_rng([settings.seed, stream, 1])
    out_images, out_boxes = [], []
    for index, garment in enumerate(images):
        donor_ids = rng.integers(0, len(images) - 1, size=settings.fragments)
        donor_ids = donor_ids + (donor_ids >= index)  # never the garment itself
        image, box = compose(garment, images[donor_ids], settings, rng, background_rng)
        out_images.append(image)
        out_boxes.append(box)
    return {"images": np.stack(out_images), "labels": np.asarray(labels, dtype=np.int64),
            "boxes": np.asarray(out_boxes, dtype=np.float32)}


def make_cluttered_splits(arrays, settings: ClutterSettings = ClutterSettings()) -> dict:
    """Fashion-MNIST arrays (`train_images`, `train_labels`, `test_images`, `test_labels`) -> `{split}_images`,
    `{split}_labels`, `{split}_boxes` for train, validation and test."""
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    held_out = settings.validation_size
    if not 0 < held_out < len(train_images):
        raise ValueError(f"validation_size must lie in (0, {len(train_images)}), got {held_out}")
    sources = {
        "train": (train_images[:-held_out], train_labels[:-held_out]),
        "validation": (train_images[-held_out:], train_labels[-held_out:]),
        "test": (arrays["test_images"], arrays["test_labels"]),
    }
    out = {}
    for stream, (split, (images, labels)) in enumerate(sources.items()):
        for key, value in make_split(images, labels, settings, stream).items():
            out[f"{split}_{key}"] = value
    return out


def box_patch_share(boxes: np.ndarray, canvas: int, patch: int) -> float:
    """Mean share of the patch grid whose patch centres lie inside the xywh boxes (what random masking puts on the
    object)."""
    centres = (np.arange(canvas // patch) + 0.5) * patch
    x, y, w, h = (boxes[:, i, None] for i in range(4))
    inside_x = (centres[None] >= x) & (centres[None] <= x + w)
    inside_y = (centres[None] >= y) & (centres[None] <= y + h)
    return float((inside_y[:, :, None] & inside_x[:, None, :]).mean())

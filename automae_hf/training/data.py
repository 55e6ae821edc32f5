"""Images for pretraining and finetuning: one decoder (transparency composited on white, as transformers'
`convert_to_rgb`), MAE's augmentation with the boxes and cached teacher maps that follow it, and HF `datasets`
loading (Hub name, `save_to_disk` folder, image folder, streaming)."""

from __future__ import annotations

import io
import logging
import math
import os

import numpy as np
import torch
from PIL import Image

from ..configuration_automae import BOX_FORMATS

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "images", "picture")
BOX_COLUMN_CANDIDATES = ("objects", "bbox")  # HF detection conventions: objects.bbox (COCO xywh), or bbox
DATA_BOX_FORMATS = ("xywh",) + tuple(f for f in BOX_FORMATS if f != "xywh")  # COCO first: HF's `objects` default

logger = logging.getLogger("automae.data")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if text else type(error).__name__


def decode_image(value, mode: str) -> Image.Image:
    """A `datasets.Image(decode=False)` value ({'bytes', 'path'}), a PIL image or an array -> PIL in `mode`."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        if value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            image = Image.open(value["path"])
        else:
            raise ValueError("empty image entry")
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        image = Image.fromarray(np.asarray(value))
    image.load()
    if image.mode != mode:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert(mode)
    return image


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params: (left, top, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def mae_augment(image: Image.Image, size: int, mean: np.ndarray, std: np.ndarray, rng: np.random.Generator,
                return_geometry: bool = False):
    """RandomResizedCrop(size, scale 0.2-1, bicubic) + horizontal flip + normalise -> float32 [C, size, size]
    (and, with `return_geometry`, the crop box (left, top, w, h) in the original image and whether it was flipped)."""
    left, top, w, h = random_resized_crop_box(image.width, image.height, rng)
    image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    flipped = bool(rng.random() < 0.5)
    if flipped:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    array = (array - mean) / std
    array = np.ascontiguousarray(array.transpose(2, 0, 1))
    return (array, (left, top, w, h, flipped)) if return_geometry else array


def read_boxes(value, box_format: str, width: int, height: int) -> np.ndarray:
    """A box-column entry -> `[n, 4]` float32 (x_min, y_min, x_max, y_max) pixels of the original image.

    Accepts HF `objects` entries (a dict with `bbox`, or a list of dicts with `bbox`), a list of boxes, one box, or
    nothing (None / empty: no box)."""
    if isinstance(value, dict):
        value = value.get("bbox")
    elif isinstance(value, (list, tuple)) and value and isinstance(value[0], dict):
        value = [item.get("bbox") for item in value]
    if value is None:
        return np.zeros((0, 4), np.float32)
    boxes = np.asarray(value, dtype=np.float32).reshape(-1, 4)
    if box_format == "xywh":
        boxes = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    elif box_format == "xyxy_normalized":
        boxes = boxes * np.asarray([width, height, width, height], np.float32)
    return boxes


def transform_boxes(boxes: np.ndarray, geometry, size: int) -> np.ndarray:
    """Original-image xyxy pixel boxes -> xyxy pixels of the `size` x `size` crop `mae_augment` produced: the same
    crop (boxes clipped to it, dropped when nothing is left), resize and horizontal flip as the image."""
    left, top, w, h, flipped = geometry
    out = boxes.astype(np.float32).copy()
    out[:, [0, 2]] = np.clip((out[:, [0, 2]] - left) * (size / w), 0, size)
    out[:, [1, 3]] = np.clip((out[:, [1, 3]] - top) * (size / h), 0, size)
    out = out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])]
    if flipped:
        out[:, [0, 2]] = size - out[:, [2, 0]]
    return np.ascontiguousarray(out.reshape(-1, 4))


def crop_attention(attention: np.ndarray, geometry, width: int, height: int) -> np.ndarray:
    """A `[heads, g, g]` map of the whole image -> the map of `mae_augment`'s crop: bilinear samples at the centres
    of the crop's g x g cells (same crop box and flip as the pixels). The identity for a full-image, unflipped crop."""
    left, top, w, h, flipped = geometry
    rows, columns = attention.shape[-2:]
    u = (left + (np.arange(columns) + 0.5) * w / columns) / width * columns - 0.5
    v = (top + (np.arange(rows) + 0.5) * h / rows) / height * rows - 0.5

    def weights(coordinate, size):
        coordinate = np.clip(coordinate, 0, size - 1)
        low = np.floor(coordinate).astype(int)
        high = np.minimum(low + 1, size - 1)
        return low, high, (coordinate - low).astype(np.float32)

    (u0, u1, fu), (v0, v1, fv) = weights(u, columns), weights(v, rows)
    maps = attention.astype(np.float32)
    by_row = maps[:, v0] * (1 - fv)[None, :, None] + maps[:, v1] * fv[None, :, None]
    out = by_row[:, :, u0] * (1 - fu)[None, None, :] + by_row[:, :, u1] * fu[None, None, :]
    return np.ascontiguousarray(out[:, :, ::-1] if flipped else out)


@torch.no_grad()
def add_teacher_attention(hf_data, column, mode, size, mean, std, teacher_attention_fn, batch_size, device):
    """The teacher's maps of every (resized, unaugmented) image as a float16 `teacher_attention` column."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def compute(batch):
        arrays = []
        for value in batch[column]:
            try:
                image = decode_image(value, mode).resize((size, size), Image.BICUBIC)
            except Exception:  # noqa: BLE001  (undecodable: skipped later by the dataset anyway)
                image = Image.new(mode, (size, size))
            array = np.asarray(image, dtype=np.float32) / 255.0
            array = array[:, :, None] if array.ndim == 2 else array
            arrays.append(((array - mean) / std).transpose(2, 0, 1))
        pixel_values = torch.from_numpy(np.stack(arrays)).to(device)
        maps = teacher_attention_fn(pixel_values).to(torch.float16).cpu().numpy()
        return {"teacher_attention": list(maps)}

    return hf_data.map(compute, batched=True, batch_size=batch_size, desc="teacher attention (cached once)")


class MapImageDataset(torch.utils.data.Dataset):
    """Decodes and augments in the DataLoader workers. A corrupt item is replaced by the next decodable one (batch
    sizes stay equal across DDP ranks) and counted. Augmentation is a function of (seed, epoch, index), so a resumed
    run sees exactly the same pixels as an uninterrupted one."""

    def __init__(self, hf_dataset, column: str, size: int, mean, std, mode: str, seed: int,
                 box_column: str | None = None, box_format: str = "xywh"):
        self.data, self.column, self.size, self.mode, self.seed = hf_dataset, column, size, mode, seed
        self.box_column, self.box_format = box_column, box_format
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        self.epoch = 0

    def __len__(self):
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        skipped = 0
        for attempt in range(min(len(self.data), 64)):
            j = (index + attempt) % len(self.data)
            try:
                example = self.data[j]
                image = decode_image(example[self.column], self.mode)
                boxes = (read_boxes(example[self.box_column], self.box_format, image.width, image.height)
                         if self.box_column else None)
            except Exception as error:  # noqa: BLE001  (any undecodable image is skipped, never a crash)
                skipped += 1
                logger.warning("Skipping undecodable image at index %d: %s", j, one_line(error))
                continue
            rng = np.random.default_rng([self.seed, self.epoch, j])
            array, geometry = mae_augment(image, self.size, self.mean, self.std, rng, return_geometry=True)
            item = {"pixel_values": torch.from_numpy(array), "skipped": skipped}
            if boxes is not None:  # the same crop and flip as the pixels
                item["boxes"] = torch.from_numpy(transform_boxes(boxes, geometry, self.size))
            if "teacher_attention" in example:  # cached maps: the same crop and flip as the pixels
                cached = np.asarray(example["teacher_attention"], dtype=np.float32)
                item["teacher_attention"] = torch.from_numpy(crop_attention(cached, geometry, image.width, image.height))
            return item
        raise RuntimeError(f"No decodable image among 64 items from index {index}")


def make_stream_transform(column, size, mean, std, mode, box_column=None, box_format="xywh"):
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def transform(example):
        empty = {"boxes": np.zeros((0, 4), np.float32)} if box_column else {}
        try:
            image = decode_image(example[column], mode)
            boxes = read_boxes(example[box_column], box_format, image.width, image.height) if box_column else None
        except Exception:  # noqa: BLE001
            return {"pixel_values": None, "skipped": 1, **empty}
        array, geometry = mae_augment(image, size, mean, std, np.random.default_rng(), return_geometry=True)
        out = {"pixel_values": array, "skipped": 0}
        if boxes is not None:
            out["boxes"] = transform_boxes(boxes, geometry, size)
        return out

    return transform


def collate(examples):
    """-> pixel_values `[B, C, H, W]`, skipped count, and (box_prior) boxes: a list of `[n_i, 4]` float tensors, xyxy
    pixels of the augmented images."""
    skipped = sum(int(e["skipped"]) for e in examples)
    kept = [e for e in examples if e["pixel_values"] is not None]
    if not kept:
        return {"pixel_values": None, "skipped": torch.tensor(skipped)}
    batch = {"pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in kept]),
             "skipped": torch.tensor(skipped)}
    if "teacher_attention" in kept[0]:
        batch["teacher_attention"] = torch.stack([torch.as_tensor(e["teacher_attention"]) for e in kept])
    if "boxes" in kept[0]:
        batch["boxes"] = [torch.as_tensor(np.asarray(e["boxes"], np.float32)).reshape(-1, 4) for e in kept]
    return batch


def find_box_column(args, parser, data, columns) -> str:
    """The column of `--masking box_prior`'s boxes: `--box_column_name`, else `objects` (with a `bbox` field) or
    `bbox`."""
    if args.box_column_name is not None:
        if args.box_column_name not in columns:
            parser.error(f"--box_column_name {args.box_column_name!r} is not a column of the data set {columns}")
        return args.box_column_name
    features = getattr(data, "features", None) or {}
    if "objects" in columns:
        feature = features.get("objects") if hasattr(features, "get") else None
        inner = getattr(feature, "feature", feature)  # Sequence / List of a struct, or the struct itself
        if feature is None or (hasattr(inner, "keys") and "bbox" in inner.keys()):
            return "objects"
    if "bbox" in columns:
        return "bbox"
    parser.error(f"--masking box_prior needs boxes: no `objects` (with `bbox`) or `bbox` column among {columns}; "
                 "name it with --box_column_name")


def load_images(args, parser, with_boxes: bool = False):
    """-> (hf dataset of one split, image column name, box column name or None)."""
    import datasets

    if args.dataset_name is None and args.train_dir is None:
        parser.error("give --dataset_name (Hub name or save_to_disk folder) or --train_dir (image folder)")
    try:
        if args.train_dir is not None:
            if not os.path.isdir(args.train_dir):
                parser.error(f"--train_dir {args.train_dir!r} is not an existing folder")
            data = datasets.load_dataset("imagefolder", data_dir=args.train_dir, cache_dir=args.cache_dir,
                                         streaming=args.streaming)
        elif os.path.isdir(args.dataset_name):
            data = datasets.load_from_disk(args.dataset_name)
            if args.streaming:
                data = (data.to_iterable_dataset() if isinstance(data, datasets.Dataset)
                        else datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in data.items()}))
        elif os.path.sep in args.dataset_name and (args.dataset_name.startswith((".", "/", "~"))):
            parser.error(f"--dataset_name {args.dataset_name!r}: no such folder")
        else:
            data = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir,
                                         streaming=args.streaming)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001
        parser.error(f"cannot load the data set ({args.dataset_name or args.train_dir}): {one_line(error)}")
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if args.dataset_split not in data:
            parser.error(f"--dataset_split {args.dataset_split!r} not in the data set's splits {list(data)}")
        data = data[args.dataset_split]
    columns = list(data.column_names or (data.features or {}).keys())
    if args.image_column_name is not None:
        if args.image_column_name not in columns:
            parser.error(f"--image_column_name {args.image_column_name!r} is not a column of the data set {columns}")
        column = args.image_column_name
    else:
        column = next((c for c in IMAGE_COLUMN_CANDIDATES if c in columns), None)
        if column is None:
            parser.error(f"no image column found among {columns}; name it with --image_column_name")
    if isinstance(getattr(data, "features", None) or {}, dict) and data.features and isinstance(
        data.features.get(column), datasets.Image
    ):
        data = data.cast_column(column, datasets.Image(decode=False))
    box_column = find_box_column(args, parser, data, columns) if with_boxes else None
    data = data.select_columns([column] + ([box_column] if box_column else []))
    if args.max_train_samples is not None:
        data = data.take(args.max_train_samples) if args.streaming else data.select(range(min(args.max_train_samples, len(data))))
    return data, column, box_column

#!/usr/bin/env python
"""AutoMAE pretraining with Accelerate over Hugging Face datasets (issue 3).

The same script runs with `python training/pretrain.py ...` (one process: CPU or one GPU) and
`accelerate launch training/pretrain.py ...` (DDP on CPU/GPUs/nodes, mixed precision, gradient accumulation).

One iteration (shared doc §3): teacher attention once (no grad) -> discriminator step (Adam) -> student + score-head
step (AdamW, betas 0.9/0.95, no weight decay on biases, norms, tokens). Warm-up + cosine schedule per optimizer step,
lr = base_learning_rate * effective batch / 256.

Examples:
    python training/pretrain.py --train_dir /data/images --output_dir out --image_size 32 \
        --config_overrides "hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128,patch_size=4"
    accelerate launch --num_processes 2 training/pretrain.py --dataset_name cifar10 --output_dir out ...
    python training/pretrain.py ... --teacher_name_or_path none       # plain MAE (the baseline)
    python training/pretrain.py ... --teacher_name_or_path self       # teacher-free: the student's own attention
    python training/pretrain.py ... --masking box_prior               # boxes from an `objects`/`bbox` column
    python training/pretrain.py ... --masking attention --teacher_name_or_path facebook/vit-mae-base  # AttMask high
    python training/pretrain.py ... --resume_from_checkpoint latest   # continue a killed run
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "images", "picture")
BOX_COLUMN_CANDIDATES = ("objects", "bbox")  # HF detection conventions: objects.bbox (COCO xywh), or bbox
MASKING_CHOICES = ("learned", "random", "box_prior", "attention")
DATA_BOX_FORMATS = ("xywh", "xyxy", "xyxy_normalized")

logger = logging.getLogger("automae.pretrain")


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="AutoMAE pretraining (learned masks from a frozen ViT teacher + adversarial box prior).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset_name", default=None,
                   help="Hub data set name, or a local folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.")
    d.add_argument("--dataset_config_name", default=None, help="Configuration name of the Hub data set.")
    d.add_argument("--dataset_split", default="train", help="Split to train on.")
    d.add_argument("--train_dir", default=None, help="A local image folder (loaded with the `imagefolder` builder).")
    d.add_argument("--image_column_name", default=None,
                   help=f"Column holding the images; detected among {IMAGE_COLUMN_CANDIDATES} when unset.")
    d.add_argument("--streaming", action="store_true", help="Stream the data set (needs --max_train_steps).")
    d.add_argument("--max_train_samples", type=int, default=None, help="Truncate the training set (debugging).")
    d.add_argument("--dataloader_num_workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes (decoding and augmentation happen in the workers).")
    d.add_argument("--box_column_name", default=None,
                   help="--masking box_prior: column holding each image's boxes; detected when unset: `objects` (with "
                        "a `bbox` sub-field, HF's detection convention) or `bbox`. Several boxes per image.")
    d.add_argument("--box_format", choices=DATA_BOX_FORMATS, default="xywh",
                   help="Coordinates of the data set's boxes, relative to the original image: COCO (x, y, width, "
                        "height) pixels as in HF `objects`/`bbox` columns, (x_min, y_min, x_max, y_max) pixels, or the "
                        "latter normalised to [0, 1]. They follow the crop and flip of the augmentation.")
    d.add_argument("--image_size", type=int, default=None, help="Training resolution (overrides the config's image_size).")
    d.add_argument("--cache_dir", default=None, help="Where downloaded data sets and models are cached.")

    m = p.add_argument_group("model")
    m.add_argument("--model_name_or_path", default=None,
                   help="Start from this checkpoint (AutoMAE or ViTMAE folder / Hub id); random init when unset.")
    m.add_argument("--config_name", default=None, help="Config (folder / Hub id) for a model trained from scratch.")
    m.add_argument("--preset", default=None,
                   help="Named setting of AutoMAE's mask-learning knobs (automae_hf.AUTOMAE_PRESETS: "
                        f"{', '.join(preset_names())}); --config_overrides and explicit flags apply on top.")
    m.add_argument("--config_overrides", default=None,
                   help='Comma-separated config overrides, e.g. "hidden_size=64,num_hidden_layers=2".')
    m.add_argument("--image_processor_name", default=None, help="Image processor (mean/std); default: the model's or MAE's.")
    m.add_argument("--mask_ratio", type=float, default=None, help="Fraction of masked patches (config default 0.75).")
    m.add_argument("--norm_pix_loss", action="store_true", help="Reconstruct per-patch normalised pixels (MAE's norm-pix).")
    m.add_argument("--mask_factor", type=float, default=None, help="AutoMAE beta: noise raise on the learned top-K (0.5).")
    m.add_argument("--adversarial_weight", type=float, default=None, help="AutoMAE lambda: weight of L_G (0.2).")
    m.add_argument("--masking", choices=MASKING_CHOICES, default=None,
                   help="How masks are chosen: 'learned' (AutoMAE), 'random' (plain MAE), 'box_prior' (boxes of the "
                        "data set raise the masking noise of the patches they cover by --mask_factor), 'attention' "
                        "(the teacher's most-attended patches, AttMask 'high'). Unset: the checkpoint's / config's "
                        "value ('learned'), or 'random' with --teacher_name_or_path none.")
    m.add_argument("--attention_hint_ratio", type=float, default=None,
                   help="--masking attention: share of the masked top patches revealed again at random (0).")
    m.add_argument("--cache_teacher_attention", action="store_true",
                   help="Compute the teacher's attention maps once per image before training (a `datasets.map` pass, "
                        "stored as float16) and crop/flip them with the same random resized crop and flip as the "
                        "image, so the teacher costs nothing per step. Needs a fixed teacher (not 'self', not "
                        "streaming).")
    m.add_argument("--teacher_name_or_path", default=None,
                   help="Frozen ViT-family teacher (Hub id or folder of a ViT / ViTMAE / DINOv2 checkpoint); "
                        "'none' trains plain MAE with random masks (the baseline); 'self' is teacher-free: the "
                        "student's own last-layer CLS attention, without gradient. Unset: the checkpoint's teacher "
                        "(or 'self' when training from scratch).")

    t = p.add_argument_group("training")
    t.add_argument("--output_dir", required=True, help="Where checkpoints, images, logs and the final model go.")
    t.add_argument("--per_device_train_batch_size", type=int, default=64, help="Batch size per process.")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    t.add_argument("--num_train_epochs", type=float, default=800, help="Epochs (ignored when --max_train_steps is set).")
    t.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps (overrides epochs).")
    t.add_argument("--base_learning_rate", type=float, default=1.5e-4,
                   help="lr = base_learning_rate * per_device batch * accumulation * processes / 256.")
    t.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (not on biases/norms/tokens).")
    t.add_argument("--warmup_epochs", type=float, default=40, help="Linear warm-up length in epochs, then cosine to 0.")
    t.add_argument("--warmup_steps", type=int, default=None, help="Warm-up in optimizer steps (overrides epochs).")
    t.add_argument("--adam_beta1", type=float, default=0.9)
    t.add_argument("--adam_beta2", type=float, default=0.95)
    t.add_argument("--optim", choices=("adamw_torch_fused", "adamw_torch"), default="adamw_torch_fused",
                   help="As TrainingArguments.optim: the fused kernels (default) or per-tensor AdamW (devices without "
                   "fused Adam, e.g. XLA). D's Adam follows.")
    t.add_argument("--seed", type=int, default=0, help="Random seed (data order, augmentation, masks, init).")
    t.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="Mixed precision (default: whatever `accelerate launch` / its config says).")
    t.add_argument("--checkpointing_steps", default=None,
                   help="Save the full training state every N optimizer steps, or 'epoch'. A final state is always saved.")
    t.add_argument("--resume_from_checkpoint", default=None,
                   help="A checkpoint folder, or 'latest' for the newest complete one under output_dir/checkpoints.")

    lg = p.add_argument_group("logging")
    lg.add_argument("--with_tracking", action="store_true", help="Log metrics through accelerate's trackers.")
    lg.add_argument("--report_to", default="tensorboard", help="Tracker(s) for --with_tracking: tensorboard, wandb, all, ...")
    lg.add_argument("--logging_steps", type=int, default=1, help="Log metrics every N optimizer steps.")
    lg.add_argument("--image_log_steps", type=int, default=0,
                    help="Save a PNG grid every N steps (image, the strategy's guide: box patches / teacher attention / "
                         "mask probability, the mask, the reconstruction); 0: off.")
    lg.add_argument("--debug_dump_weights", action="store_true", help=argparse.SUPPRESS)
    lg.add_argument("--debug_kill_after_step", type=int, default=None, help=argparse.SUPPRESS)
    lg.add_argument("--debug_kill_during_checkpoint", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_overrides(text: str | None, parser: argparse.ArgumentParser) -> dict:
    out = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            parser.error(f"--config_overrides: expected key=value, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = {"True": True, "False": False, "None": None}.get(value, value)
        out[key] = parsed
    return out


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------------------
# Images: decoding and MAE augmentation (no torchvision)
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    from automae_hf.configuration_automae import AUTOMAE_PRESETS

    return sorted(AUTOMAE_PRESETS)


def build_model(args, parser):
    from automae_hf import AutoMAEConfig, AutoMAEForPreTraining
    from automae_hf.configuration_automae import AUTOMAE_PRESETS

    overrides = {}
    if args.preset is not None:
        if args.preset not in AUTOMAE_PRESETS:
            parser.error(f"--preset {args.preset!r}: expected one of {preset_names()}")
        overrides.update(AUTOMAE_PRESETS[args.preset])
    overrides.update(parse_overrides(args.config_overrides, parser))
    for name in ("mask_ratio", "mask_factor", "adversarial_weight", "image_size", "attention_hint_ratio"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.norm_pix_loss:
        overrides["norm_pix_loss"] = True
    teacher = args.teacher_name_or_path
    if teacher is not None and teacher.lower() == "none":  # the historical spelling of plain MAE
        if args.masking not in (None, "random", "box_prior"):
            parser.error(f"--masking {args.masking} needs a teacher; --teacher_name_or_path none means random masking")
        overrides["masking"] = args.masking or "random"
    elif args.masking is not None:
        overrides["masking"] = args.masking
        if args.masking in ("random", "box_prior") and teacher is not None:
            logger.warning("--masking %s uses no teacher: --teacher_name_or_path %s is ignored", args.masking, teacher)
            teacher = None
    try:
        if args.model_name_or_path:
            base = AutoMAEConfig.from_pretrained(args.model_name_or_path, cache_dir=args.cache_dir)
        elif args.config_name:
            base = AutoMAEConfig.from_pretrained(args.config_name, cache_dir=args.cache_dir)
        else:
            base = AutoMAEConfig()
        values = base.to_dict()
        unknown = [k for k in overrides if k not in values and not hasattr(base, k)]
        if unknown:
            parser.error(f"--config_overrides: unknown config field(s) {unknown}")
        values.update(overrides)
        for key in ("transformers_version", "model_type", "architectures", "auto_map"):
            values.pop(key, None)
        if "hidden_size" in overrides or "num_attention_heads" in overrides:
            if not (base.teacher_config and "teacher_config" in overrides):
                values["teacher_config"] = None if not args.model_name_or_path else values.get("teacher_config")
        if teacher is not None and teacher.lower() not in ("none", "self") and values.get("masking") in (
            "learned", "attention"
        ):
            # The score head is sized by the teacher's heads: build it from the teacher's own config.
            from transformers import AutoConfig

            try:
                teacher_config = AutoConfig.from_pretrained(teacher, cache_dir=args.cache_dir).to_dict()
            except Exception as error:  # noqa: BLE001
                parser.error(f"--teacher_name_or_path {teacher!r}: {one_line(error)}")
            values["teacher_config"] = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
        config = AutoMAEConfig(**values)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001
        parser.error(f"impossible model config: {one_line(error)}")
    try:
        if args.model_name_or_path:
            model = AutoMAEForPreTraining.from_pretrained(args.model_name_or_path, config=config, cache_dir=args.cache_dir)
        else:
            model = AutoMAEForPreTraining(config)
    except Exception as error:  # noqa: BLE001
        parser.error(f"cannot build the model: {one_line(error)}")

    mode = "none" if config.masking in ("random", "box_prior") else "teacher"
    if mode == "teacher":
        if teacher is None:
            if not config.teacher_name_or_path:
                logger.warning("No --teacher_name_or_path: teacher-free mode (the student's own attention).")
                mode = "self"
        elif teacher.lower() == "self":
            mode = "self"
        else:
            try:
                model.load_teacher(teacher, cache_dir=args.cache_dir)
            except Exception as error:  # noqa: BLE001
                parser.error(f"--teacher_name_or_path {teacher!r}: {one_line(error)}")
    return model, mode


def student_param_groups(model, weight_decay: float):
    student_ids = {id(p) for p in model.student_parameters()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if id(param) not in student_ids:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or "norm" in name.lower() or "token" in name or "position" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, resumable
# ----------------------------------------------------------------------------------------------------------------
STEP_DIR = re.compile(r"^step_(\d+)$")


class TrainState:
    """Step counter (and skip count) saved by accelerate's `save_state` via `register_for_checkpointing`."""

    def __init__(self):
        self.completed_steps = 0
        self.skipped_images = 0

    def state_dict(self):
        return {"completed_steps": self.completed_steps, "skipped_images": self.skipped_images}

    def load_state_dict(self, state):
        self.completed_steps = int(state["completed_steps"])
        self.skipped_images = int(state.get("skipped_images", 0))


def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    """The complete `step_N` folder with the largest N (temporary folders of interrupted saves are ignored)."""
    if not checkpoint_root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in checkpoint_root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None


def save_checkpoint(accelerator, checkpoint_root: Path, step: int, kill_before_commit: bool = False) -> Path:
    """`save_state` into a temporary folder, then an atomic rename to `step_N`: a run killed while saving leaves the
    previous checkpoint as `latest`. `kill_before_commit` (tests) dies by SIGKILL between the write and the rename."""
    final = checkpoint_root / f"step_{step}"
    tmp = checkpoint_root / f".tmp-step_{step}"
    if accelerator.is_main_process:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if kill_before_commit:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------------------------
# Picture grid
# ----------------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)  # one line per file saved otherwise
    logging.getLogger("accelerate.accelerator").setLevel(logging.WARNING)

    if args.streaming and args.cache_teacher_attention:
        parser.error("--cache_teacher_attention needs a map-style data set, not --streaming")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps (a stream has no length)")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}")

    import transformers
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, set_seed
    try:  # transformers 5.x: the torchvision-free processor (same fields, same saved format)
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor

    from automae_hf.masking import mask_entropy
    from automae_hf.teacher import resize_attention, teacher_cls_attention

    output_dir = Path(args.output_dir)
    accelerator_kwargs = dict(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # Streaming: every process reads its own batches (undecodable images make them uneven).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                  dispatch_batches=False if args.streaming else None),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    if args.mixed_precision is not None:
        accelerator_kwargs["mixed_precision"] = args.mixed_precision
    if args.with_tracking:
        accelerator_kwargs["log_with"] = args.report_to
    # `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs: DDP over gloo on the CPU
    # (`accelerate launch --cpu` alone starts a single process unless run under mpirun).
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    ):
        accelerator_kwargs["cpu"] = True
    accelerator = Accelerator(**accelerator_kwargs)
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
        logger.setLevel(logging.ERROR)
    set_seed(args.seed)

    # ---- data -----------------------------------------------------------------------------------------------
    model, teacher_mode = build_model(args, parser)
    config = model.config
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    pil_mode = {1: "L", 3: "RGB"}.get(config.num_channels)
    if pil_mode is None:
        parser.error(f"num_channels={config.num_channels}: only 1 (grayscale) or 3 (RGB) images are supported")
    processor = None
    for source in (args.image_processor_name, args.model_name_or_path):
        if source:
            try:
                processor = ViTImageProcessor.from_pretrained(source, cache_dir=args.cache_dir)
                break
            except Exception:  # noqa: BLE001
                pass
    mean0, std0 = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    if processor is None:
        if config.num_channels == 1:
            mean0, std0 = (float(np.mean(mean0)),), (float(np.mean(std0)),)
        processor = ViTImageProcessor(image_mean=list(mean0), image_std=list(std0), size={"height": size, "width": size})
    processor.size = {"height": size, "width": size}
    mean = list(processor.image_mean)[: config.num_channels] if len(processor.image_mean) >= config.num_channels else [processor.image_mean[0]] * config.num_channels
    std = list(processor.image_std)[: config.num_channels] if len(processor.image_std) >= config.num_channels else [processor.image_std[0]] * config.num_channels

    with accelerator.main_process_first():
        hf_data, column, box_column = load_images(args, parser, with_boxes=config.masking == "box_prior")
    if args.streaming:
        train_dataset = hf_data.map(make_stream_transform(column, size, mean, std, pil_mode, box_column, args.box_format),
                                    remove_columns=[column] + ([box_column] if box_column else []))
    else:
        if len(hf_data) == 0:
            parser.error("the training set is empty")
        if args.cache_teacher_attention:
            if teacher_mode != "teacher":
                parser.error("--cache_teacher_attention needs a fixed teacher (--teacher_name_or_path PATH; not "
                             "'self' or 'none')")
            generator_module = model.mask_generator.to(accelerator.device)
            with accelerator.main_process_first():
                hf_data = add_teacher_attention(hf_data, column, pil_mode, size, mean, std,
                                                generator_module.teacher_attention, 256, accelerator.device)
        train_dataset = MapImageDataset(hf_data, column, size, mean, std, pil_mode, args.seed, box_column,
                                        args.box_format)
    loader_kwargs = dict(batch_size=args.per_device_train_batch_size, collate_fn=collate,
                         num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available(),
                         persistent_workers=False)
    if args.dataloader_num_workers > 0:
        loader_kwargs["prefetch_factor"] = 4
    train_dataloader = torch.utils.data.DataLoader(train_dataset, shuffle=not args.streaming, drop_last=False, **loader_kwargs)

    # ---- optimizers and schedules --------------------------------------------------------------------------
    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    lr = args.base_learning_rate * effective_batch / 256
    # fused (the Trainer's default): one kernel per step instead of one per tensor, 4x faster on a tiny CPU model
    fused = args.optim == "adamw_torch_fused"
    student_optimizer = torch.optim.AdamW(student_param_groups(model, args.weight_decay), lr=lr,
                                          betas=(args.adam_beta1, args.adam_beta2), fused=fused)
    discriminator = model.discriminator
    d_optimizer = None
    if discriminator is not None:
        # D: Adam with the student's betas (0.9, 0.95 by default), no weight decay, as the reference
        d_optimizer = torch.optim.Adam(model.discriminator_parameters(), lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                       fused=fused)

    # DDP: the student's DDP must not own D's parameters (they get no gradient from the student loss); D gets its own.
    if discriminator is not None:
        ignore = [n for n, _ in model.named_parameters() if n.startswith("discriminator.")]
        ignore += [n for n, _ in model.named_buffers() if n.startswith("discriminator.")]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)

    if discriminator is not None:
        model, discriminator, student_optimizer, d_optimizer, train_dataloader = accelerator.prepare(
            model, discriminator, student_optimizer, d_optimizer, train_dataloader)
    else:
        model, student_optimizer, train_dataloader = accelerator.prepare(model, student_optimizer, train_dataloader)
    unwrapped = accelerator.unwrap_model(model)

    if args.streaming:
        steps_per_epoch = None
        max_train_steps = args.max_train_steps
        num_epochs = 10**9
    else:
        steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    if args.warmup_steps is not None:
        warmup_steps = args.warmup_steps
    else:
        warmup_steps = int(round(args.warmup_epochs * steps_per_epoch)) if steps_per_epoch else 0
    warmup_steps = min(warmup_steps, max_train_steps)
    # Not prepared: stepped by hand once per optimizer step (a prepared scheduler steps num_processes times).
    student_scheduler = transformers.get_cosine_schedule_with_warmup(student_optimizer.optimizer if hasattr(student_optimizer, "optimizer") else student_optimizer, warmup_steps, max_train_steps)
    d_scheduler = (transformers.get_cosine_schedule_with_warmup(d_optimizer.optimizer if hasattr(d_optimizer, "optimizer") else d_optimizer, warmup_steps, max_train_steps)
                   if d_optimizer is not None else None)

    # Mask / Gumbel / box-prior noise: reseeded from (seed, rank, micro-batch) before every micro-batch, so a resumed
    # run draws exactly what the uninterrupted one drew, on every rank, whatever the global RNG did meanwhile.
    noise_generator = torch.Generator(device=accelerator.device)
    state = TrainState()
    accelerator.register_for_checkpointing(state, student_scheduler)
    if d_scheduler is not None:
        accelerator.register_for_checkpointing(d_scheduler)

    checkpoint_root = output_dir / "checkpoints"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "images").mkdir(exist_ok=True)
        for stale in checkpoint_root.glob(".tmp-step_*") if checkpoint_root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
    if args.with_tracking:
        accelerator.init_trackers("automae_pretrain", {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                       for k, v in vars(args).items()})

    if args.resume_from_checkpoint:
        path = (latest_checkpoint(checkpoint_root) if args.resume_from_checkpoint == "latest"
                else Path(args.resume_from_checkpoint))
        if path is None:
            logger.warning("--resume_from_checkpoint latest: no checkpoint under %s, starting fresh", checkpoint_root)
        elif not path.is_dir():
            parser.error(f"--resume_from_checkpoint {str(path)!r} is not a checkpoint folder")
        else:
            accelerator.print(f"Resuming from {path}")
            accelerator.load_state(str(path))
    start_step = state.completed_steps
    start_epoch = start_step // steps_per_epoch if steps_per_epoch else 0
    skip_batches = (start_step % steps_per_epoch) * args.gradient_accumulation_steps if steps_per_epoch else 0

    logger.info("AutoMAE pretraining: masking=%s, teacher=%s, %d examples/epoch, %d steps, lr %.3g (effective batch %d), "
                "%d processes", config.masking, teacher_mode, len(train_dataset) if not args.streaming else -1, max_train_steps, lr,
                effective_batch, accelerator.num_processes)

    from tqdm.auto import tqdm

    progress = tqdm(total=max_train_steps, initial=start_step, disable=not accelerator.is_local_main_process,
                    desc="pretrain", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10)
    log_file = open(output_dir / "train_log.jsonl", "a") if accelerator.is_main_process else None
    grid = config.grid_size
    model.train()
    if discriminator is not None:
        discriminator.train()

    def get_teacher_attention(pixel_values):
        with torch.no_grad(), accelerator.autocast():
            if teacher_mode == "self":
                was_training = unwrapped.vit.training
                unwrapped.vit.eval()
                attention = resize_attention(teacher_cls_attention(unwrapped.vit, pixel_values), grid)
                unwrapped.vit.train(was_training)
                return attention.float()
            return unwrapped.mask_generator.teacher_attention(pixel_values).float()

    def discriminator_step(attention):
        """The D step, through the DDP-wrapped D (real and fake in one call, so its gradients sync)."""
        output = unwrapped.discriminator_loss(
            teacher_attention=attention, generator=noise_generator, discriminator=discriminator
        )
        accelerator.backward(output.loss)
        d_optimizer.step()
        d_optimizer.zero_grad(set_to_none=True)
        return output.loss.detach(), output.real_accuracy, output.fake_accuracy

    completed = start_step
    window_images, window_start = 0, time.perf_counter()
    sums: dict[str, float] = {}
    sum_count = 0
    micro_in_step = 0
    last_saved = None
    done = completed >= max_train_steps
    epoch = start_epoch
    while not done and epoch < num_epochs:
        if hasattr(train_dataset, "set_epoch"):
            train_dataset.set_epoch(epoch)
        if hasattr(train_dataloader, "set_epoch"):
            train_dataloader.set_epoch(epoch)
        loader = train_dataloader
        if epoch == start_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in loader:
            skipped = int(batch["skipped"])
            state.skipped_images += skipped
            pixel_values = batch["pixel_values"]
            if pixel_values is None:  # only possible when streaming: a whole batch undecodable
                continue
            micro_index = completed * args.gradient_accumulation_steps + micro_in_step
            noise_generator.manual_seed((args.seed * 1_000_003 + accelerator.process_index * 7_919 + micro_index) % 2**63)
            with accelerator.accumulate(*([model, discriminator] if discriminator is not None else [model])):
                metrics = {}
                if "teacher_attention" in batch:  # cached once, cropped and flipped with the image
                    attention = batch["teacher_attention"].to(pixel_values.device, torch.float32)
                else:
                    attention = get_teacher_attention(pixel_values) if teacher_mode != "none" else None
                if discriminator is not None:
                    d_loss, real_acc, fake_acc = discriminator_step(attention)
                    metrics.update(d_loss=d_loss, d_real_accuracy=real_acc, d_fake_accuracy=fake_acc)
                boxes = batch.get("boxes") if config.masking == "box_prior" else None
                box_kwargs = {"boxes": boxes, "box_format": "xyxy"} if boxes is not None else {}
                output = model(pixel_values, teacher_attention=attention, generator=noise_generator, **box_kwargs)
                accelerator.backward(output.loss)
                student_optimizer.step()
                student_optimizer.zero_grad(set_to_none=True)
                metrics.update(loss=output.loss.detach(), reconstruction_loss=output.reconstruction_loss.detach())
                if output.generator_loss is not None:
                    metrics["generator_loss"] = output.generator_loss.detach()
                if output.mask_probs is not None:
                    metrics["mask_entropy"] = mask_entropy(output.mask_probs.detach().float())
            window_images += pixel_values.shape[0]
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            sum_count += 1
            micro_in_step += 1
            if not accelerator.sync_gradients:
                continue
            micro_in_step = 0

            student_scheduler.step()
            if d_scheduler is not None:
                d_scheduler.step()
            completed += 1
            state.completed_steps = completed
            progress.update(1)

            if completed % args.logging_steps == 0 or completed == max_train_steps:
                stats = torch.tensor([window_images, state.skipped_images], device=accelerator.device, dtype=torch.float64)
                stats = accelerator.reduce(stats, reduction="sum")
                elapsed = time.perf_counter() - window_start
                log = {k: v / sum_count for k, v in sums.items()}
                log.update(lr=student_scheduler.get_last_lr()[0], images_per_second=float(stats[0]) / max(elapsed, 1e-9),
                           skipped_images=int(stats[1]), epoch=epoch, step=completed)
                progress.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in log.items()
                                      if k in ("loss", "d_loss", "images_per_second", "skipped_images")},
                                     refresh=False)
                if args.with_tracking:
                    accelerator.log(log, step=completed)
                if log_file is not None:
                    log_file.write(json.dumps(log) + "\n")
                    log_file.flush()
                sums, sum_count, window_images, window_start = {}, 0, 0, time.perf_counter()

            if args.image_log_steps and completed % args.image_log_steps == 0 and accelerator.is_main_process:
                save_image_grid(output_dir / "images" / f"step_{completed:07d}.png", unwrapped, pixel_values,
                                output, mean, std, boxes=batch.get("boxes"))

            if (args.checkpointing_steps not in (None, "epoch") and completed % int(args.checkpointing_steps) == 0
                    and completed < max_train_steps):
                save_checkpoint(accelerator, checkpoint_root, completed,
                                kill_before_commit=args.debug_kill_during_checkpoint == completed)
                last_saved = completed
            if args.debug_kill_after_step is not None and completed >= args.debug_kill_after_step:
                import signal  # tests: die like a preempted job (SIGKILL, no cleanup)

                os.kill(os.getpid(), signal.SIGKILL)
            if completed >= max_train_steps:
                done = True
                break
        if args.checkpointing_steps == "epoch" and not done:
            save_checkpoint(accelerator, checkpoint_root, completed)
            last_saved = completed
        epoch += 1
    progress.close()

    if last_saved != completed:
        save_checkpoint(accelerator, checkpoint_root, completed)
    accelerator.wait_for_everyone()
    total_skipped = int(accelerator.reduce(torch.tensor([state.skipped_images], device=accelerator.device), "sum")[0])
    if args.debug_dump_weights:
        torch.save({k: v.detach().cpu() for k, v in unwrapped.state_dict().items()},
                   output_dir / f"weights_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        unwrapped.save_pretrained(str(output_dir), safe_serialization=True)
        processor.save_pretrained(str(output_dir))
        summary = {"final_step": completed, "skipped_images": total_skipped, "teacher": teacher_mode,
                   "teacher_name_or_path": args.teacher_name_or_path, "output_dir": str(output_dir),
                   "dataset_name": args.dataset_name or args.train_dir, "dataset_config_name": args.dataset_config_name,
                   "effective_batch_size": effective_batch, "learning_rate": lr, "mask_ratio": config.mask_ratio,
                   "mask_factor": config.mask_factor, "masking": config.masking,
                   "box_column_name": box_column, "box_format": args.box_format if box_column else None}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"Done: {completed} steps; skipped {total_skipped} undecodable image(s); model in {output_dir}")
    if log_file is not None:
        log_file.close()
    if args.with_tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()

"""Images for pretraining and finetuning: one decoder (transparency composited on white, as transformers'
`convert_to_rgb`), MAE's augmentation with the boxes and cached teacher maps that follow it (`torchvision.transforms.v2`
where torchvision imports, else a PIL/numpy fallback with the same geometry), and HF `datasets` loading (Hub name,
`save_to_disk` folder, image folder, streaming: one rule for every command line, `load_image_dataset`)."""

from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import os
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..configuration_automae import BOX_FORMATS
from ..masking import pad_boxes

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "images", "picture")
# Looked for after a `ClassLabel` column, which is the label wherever a data set has one.
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "coarse_label", "class", "target", "category")
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


# ---- MAE's augmentation: one geometry, two backends ---------------------------------------------------------------
AUGMENT_BACKENDS = ("auto", "torchvision", "pil")


class Geometry(NamedTuple):
    """One augmentation's geometry: the crop box (pixels of the original image) and whether it was flipped."""

    left: int
    top: int
    width: int
    height: int
    flipped: bool


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


def draw_geometry(width: int, height: int, rng: np.random.Generator) -> Geometry:
    """MAE's RandomResizedCrop (scale 0.2-1, ratio 3/4-4/3) and a fair-coin horizontal flip, drawn from `rng` only."""
    # numpy, not torch's global RNG (which v2's transforms use): a pure function of the rng's seed, on both backends.
    left, top, w, h = random_resized_crop_box(width, height, rng)
    return Geometry(left, top, w, h, bool(rng.random() < 0.5))


@functools.lru_cache(maxsize=None)
def _torchvision():
    """-> a namespace (functional: `transforms.v2.functional`, tv_tensors, roi_align), or the one-line reason why
    torchvision cannot be used."""
    try:
        from torchvision import tv_tensors
        from torchvision.ops import roi_align
        from torchvision.transforms.v2 import functional
    except Exception as error:  # noqa: BLE001  (not only ImportError: a wheel built for another torch fails to load)
        return f"torchvision does not import ({one_line(error)})"
    return SimpleNamespace(functional=functional, tv_tensors=tv_tensors, roi_align=roi_align)


def resolve_backend(backend: str = "auto") -> str:
    """"auto" -> "torchvision" where it imports, else "pil" (logged); "torchvision" where it does not -> ImportError."""
    if backend not in AUGMENT_BACKENDS:
        raise ValueError(f"augmentation backend {backend!r}: one of {AUGMENT_BACKENDS}")
    if backend == "pil":
        return "pil"
    found = _torchvision()
    if isinstance(found, str):
        if backend == "torchvision":
            raise ImportError(f"{found}; install the training extra: pip install automae-hf[training]")
        _log_fallback_once(found)
        return "pil"
    return "torchvision"


@functools.lru_cache(maxsize=None)
def _log_fallback_once(reason: str) -> None:
    logger.info("%s: augmenting with the PIL/numpy fallback", reason)


def available_backends() -> tuple[str, ...]:
    """The augmentation backends that work here: ("torchvision", "pil") or ("pil",)."""
    return ("pil",) if isinstance(_torchvision(), str) else ("torchvision", "pil")


def augment(image: Image.Image, size: int, mean, std, rng: np.random.Generator, boxes=None, attention=None,
            backend: str = "auto") -> dict:
    """MAE's augmentation of one image, its boxes and its teacher map: `draw_geometry(rng)`, then `apply_geometry`.
    -> `apply_geometry`'s dict and "geometry": the `Geometry`. The geometry depends on `rng` alone, so both backends
    crop and flip alike; their pixels differ by resampling only (PIL's bicubic also reads a few pixels past the crop's
    edges, v2's stops at them)."""
    geometry = draw_geometry(image.width, image.height, rng)
    return {**apply_geometry(image, geometry, size, mean, std, boxes, attention, backend), "geometry": geometry}


def apply_geometry(image: Image.Image, geometry, size: int, mean, std, boxes=None, attention=None,
                   backend: str = "auto") -> dict:
    """One crop and flip applied to an image, its boxes and its teacher map together.

    image: PIL, "L" or "RGB", W x H. geometry: (left, top, w, h, flipped), the crop in pixels of the image. boxes:
    `[n, 4]` xyxy pixels of the image, or None. attention: `[heads, g, g]` map of the whole image (any float dtype), or
    None. mean, std: C (or 1) values.
    mean, std None: the pixels stay uint8 (normalised later, on the device: `normalize_pixels`).
    -> {"pixel_values": float32 `[C, size, size]` (the crop resized to size, bicubic; flipped; normalised; or uint8
    without mean / std), and where
    given "boxes": float32 `[m, 4]` xyxy pixels of the output (clipped to the crop, those with nothing left dropped)
    and "teacher_attention": float32 `[heads, g, g]` (bilinear samples at the centres of the crop's g x g cells)},
    all tensors."""
    apply = _augment_torchvision if resolve_backend(backend) == "torchvision" else _augment_pil
    if mean is not None:
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return apply(image, Geometry(*geometry), size, mean, std, boxes, attention)


def normalize_pixels(pixel_values: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 `[B, C, H, W]` (on any device) -> float32 (x / 255 - mean) / std, the same float32 operations as the
    loader's own normalisation, so both give identical values. Float input is returned unchanged (normalised)."""
    if pixel_values.dtype != torch.uint8:
        return pixel_values
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixel_values.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixel_values.device).view(1, -1, 1, 1)
    return pixel_values.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def _augment_torchvision(image, geometry, size, mean, std, boxes, attention) -> dict:
    tv = _torchvision()
    F, (left, top, w, h, flipped) = tv.functional, geometry

    def crop_flip(inpt, interpolation=F.InterpolationMode.BICUBIC):
        out = F.resized_crop(inpt, top, left, h, w, [size, size], interpolation=interpolation, antialias=True)
        return F.horizontal_flip(out) if flipped else out

    # uint8 through the resize: rounded and clamped to 0-255 like PIL's, before the float conversion.
    pixels = crop_flip(F.to_image(image)).as_subclass(torch.Tensor)
    if mean is not None:
        pixels = pixels.to(torch.float32).div_(255.0)
        pixels = pixels.sub_(torch.from_numpy(mean).view(-1, 1, 1)).div_(torch.from_numpy(std).view(-1, 1, 1))
    out = {"pixel_values": pixels.contiguous()}
    if boxes is not None:
        wrapped = tv.tv_tensors.BoundingBoxes(torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 4),
                                              format="XYXY", canvas_size=(image.height, image.width))
        moved = crop_flip(wrapped).as_subclass(torch.Tensor)  # clipped to the crop by v2
        # Not v2.SanitizeBoundingBoxes: its min_size >= 1 px would also drop the thin boxes the fallback keeps.
        out["boxes"] = moved[(moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])].contiguous()
    if attention is not None:
        maps = torch.as_tensor(np.asarray(attention, np.float32))
        rows, columns = maps.shape[-2:]
        sx, sy = columns / image.width, rows / image.height
        # The map covers the whole image on a g x g grid, so v2's pixel crop params do not apply to it (as an Image
        # it would be cropped in its own cells; a plain tensor beside an Image passes v2 untouched): RoIAlign with
        # one sample per cell takes bilinear samples at the crop's cell centres in map coordinates instead.
        box = torch.tensor([[0.0, left * sx, top * sy, (left + w) * sx, (top + h) * sy]])
        crop = tv.roi_align(maps[None], box, (rows, columns), spatial_scale=1.0, sampling_ratio=1, aligned=True)[0]
        out["teacher_attention"] = (F.horizontal_flip(crop) if flipped else crop).contiguous()
    return out


# ---- the fallback where torchvision does not import: PIL for pixels, numpy for boxes and maps --------------------
# Kept rather than an ImportError: PyPI's Linux torchvision wheels are CUDA builds that do not load beside a CPU torch.
def _augment_pil(image, geometry, size, mean, std, boxes, attention) -> dict:
    out = {"pixel_values": torch.from_numpy(_pil_pixels(image, geometry, size, mean, std))}
    if boxes is not None:
        out["boxes"] = torch.from_numpy(_numpy_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), geometry, size))
    if attention is not None:
        out["teacher_attention"] = torch.from_numpy(_numpy_attention(np.asarray(attention, np.float32), geometry,
                                                                     image.width, image.height))
    return out


def _pil_pixels(image: Image.Image, geometry, size: int, mean: np.ndarray | None, std: np.ndarray | None) -> np.ndarray:
    """-> float32 `[C, size, size]`: the crop resized (bicubic), flipped, normalised (uint8 when mean is None)."""
    left, top, w, h, flipped = geometry
    image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
    if flipped:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.array(image)  # a writable copy (PIL's buffer is read-only, and torch warns on those)
    if array.ndim == 2:
        array = array[:, :, None]
    if mean is not None:
        array = (array.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _numpy_boxes(boxes: np.ndarray, geometry, size: int) -> np.ndarray:
    """`[n, 4]` xyxy pixels of the original image -> `[m, 4]` xyxy pixels of the `size` x `size` output: clipped to
    the crop (dropped when nothing is left), resized, flipped as the image."""
    left, top, w, h, flipped = geometry
    out = boxes.astype(np.float32).copy()
    out[:, [0, 2]] = np.clip((out[:, [0, 2]] - left) * (size / w), 0, size)
    out[:, [1, 3]] = np.clip((out[:, [1, 3]] - top) * (size / h), 0, size)
    out = out[(out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])]
    if flipped:
        out[:, [0, 2]] = size - out[:, [2, 0]]
    return np.ascontiguousarray(out.reshape(-1, 4))


def _numpy_attention(attention: np.ndarray, geometry, width: int, height: int) -> np.ndarray:
    """A `[heads, g, g]` map of the whole (width x height) image -> the map of the crop: bilinear samples at the centres
    of the crop's g x g cells, flipped as the image. The identity for a full-image, unflipped crop."""
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
def add_teacher_attention(hf_data, column, mode, size, mean, std, teacher_attention_fn, batch_size, device,
                          teacher_key: str | None = None):
    """The teacher's maps of every (resized, unaugmented) image as a float16 `teacher_attention` column.

    `teacher_key` names the teacher and how it reads the images (e.g. its path and config): with it, `datasets`
    stores the column under a fingerprint of (data, teacher_key, size, normalisation), so the next run with the same
    teacher and data reuses the maps instead of running the teacher over every image again."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    fingerprint = None
    if teacher_key is not None and getattr(hf_data, "_fingerprint", None):
        from datasets.fingerprint import Hasher

        fingerprint = Hasher.hash([hf_data._fingerprint, teacher_key, column, mode, size, mean.tolist(), std.tolist()])

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

    return hf_data.map(compute, batched=True, batch_size=batch_size, desc="teacher attention (cached once)",
                       new_fingerprint=fingerprint)


class EpochDataset(torch.utils.data.Dataset):
    """A map-style data set of `data` whose augmentation depends on the epoch. An item is asked for as
    `dataset[(epoch, index)]` (the keys of `EpochSpanningSampler`: the epoch travels with the index, so workers that
    run ahead into the next epoch augment for that epoch) or as `dataset[index]`, in the epoch of `set_epoch`. That
    epoch lives in a shared tensor (not a multiprocessing.Value: it survives fork, spawn, pickling and deepcopy), so
    `set_epoch` in the main process reaches the copies inside persistent DataLoader workers, which read it per item."""

    def __init__(self, data):
        self.data = data
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self):
        return len(self.data)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def epoch_and_index(self, key) -> tuple[int, int]:
        """`(epoch, index)` -> itself; `index` -> (the epoch of `set_epoch`, index)."""
        if isinstance(key, tuple):
            epoch, index = key
            return int(epoch), int(index)
        return self.epoch, int(key)


class EpochSpanningSampler(torch.utils.data.Sampler):
    """The keys of a whole run for one DataLoader iterator: `(epoch, index)` pairs, epoch after epoch.

    Why one iterator: torch's DataLoader hands even persistent workers the next epoch's indices only when that epoch's
    iterator starts, so the first batches of every epoch waited for the workers. Over this sampler the workers run
    into epoch e + 1 while the loop finishes epoch e; the loop cuts the run into epochs (`RunBatches`).

    Epoch e's order is `torch.randperm(num_items)` from a generator seeded with `seed + e`: the order accelerate's
    `SeedableRandomSampler` (a shuffled DataLoader prepared with `use_seedable_sampler`) gave each epoch, a function
    of (seed, epoch) alone. Each epoch is cut to `items_per_epoch`: whole global batches (`batch_size` x
    `num_processes`), so every epoch starts a new batch on every process and accelerate's `BatchSamplerShard` deals
    process p the same batches as it did per epoch (drop_last, as MAE). `set_epoch(e)`: iteration starts at epoch e
    (a resumed run); accelerate's DataLoaderShard calls it with its own epoch count when iteration starts."""

    def __init__(self, num_items: int, batch_size: int, num_processes: int, seed: int, num_epochs: int):
        self.num_items, self.seed, self.num_epochs = num_items, seed, num_epochs
        self.batches_per_epoch = num_items // (batch_size * num_processes)  # per process
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_items} items make no batch of {batch_size} on each of {num_processes} processes")
        self.items_per_epoch = self.batches_per_epoch * batch_size * num_processes
        self.start_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.start_epoch = int(epoch)

    def epoch_order(self, epoch: int) -> list[int]:
        """The indices of `epoch`, in order, cut to `items_per_epoch`."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=generator)[: self.items_per_epoch].tolist()

    def __iter__(self):
        for epoch in range(self.start_epoch, self.num_epochs):
            for index in self.epoch_order(epoch):
                yield epoch, index

    def __len__(self) -> int:
        return max(self.num_epochs - self.start_epoch, 0) * self.items_per_epoch


class RunBatches:
    """One iterator over a DataLoader whose sampler is an `EpochSpanningSampler`, handed out an epoch at a time:
    `epoch(e)` -> the batches of epoch e, while the workers already load epoch e + 1's first ones.

    `start_epoch` and `skip_batches` (this process's batches of the start epoch already trained on) place a resumed
    run where the uninterrupted one was: the sampler starts at the epoch and accelerate's `skip_first_batches` drops
    the first batches by index, before any is loaded. `loader`: a plain DataLoader or one prepared by accelerate."""

    def __init__(self, loader, sampler: EpochSpanningSampler, start_epoch: int = 0, skip_batches: int = 0):
        from accelerate import skip_first_batches

        if not 0 <= skip_batches < sampler.batches_per_epoch:
            raise ValueError(f"skip_batches {skip_batches}: an epoch has {sampler.batches_per_epoch} batches")
        sampler.set_epoch(start_epoch)
        if hasattr(loader, "set_epoch"):  # accelerate's DataLoaderShard sets its own epoch count on the sampler
            loader.set_epoch(start_epoch)  # when iteration starts: the same one
        self.loader = skip_first_batches(loader, skip_batches) if skip_batches else loader
        self.batches_per_epoch = sampler.batches_per_epoch
        self.start_epoch, self.skip_batches = start_epoch, skip_batches
        self.next_epoch = start_epoch
        self._iterator = None  # made on the first epoch asked for: a plain DataLoader starts its workers in iter()

    def batches_in(self, epoch: int) -> int:
        """How many batches `epoch(epoch)` yields on this process."""
        return self.batches_per_epoch - (self.skip_batches if epoch == self.start_epoch else 0)

    def epoch(self, epoch: int):
        """-> an iterator over the batches of `epoch`; epochs must be asked for in order, each once."""
        if epoch != self.next_epoch:
            raise ValueError(f"epoch {epoch} asked for, the loader is at epoch {self.next_epoch}")
        self.next_epoch += 1
        if self._iterator is None:
            self._iterator = iter(self.loader)
        return itertools.islice(self._iterator, self.batches_in(epoch))


class MapImageDataset(EpochDataset):
    """Decodes and augments in the DataLoader workers. A corrupt item is replaced by the next decodable one (batch
    sizes stay equal across DDP ranks) and counted. Augmentation is a function of (seed, epoch, index), so a resumed
    run sees exactly the same pixels as an uninterrupted one. The epoch comes with the key (`(epoch, index)`, from
    `EpochSpanningSampler`) or, for a plain index, from `set_epoch` (`EpochDataset`)."""

    def __init__(self, hf_dataset, column: str, size: int, mean, std, mode: str, seed: int,
                 box_column: str | None = None, box_format: str = "xywh", backend: str = "auto"):
        super().__init__(hf_dataset)
        self.column, self.size, self.mode, self.seed = column, size, mode, seed
        self.box_column, self.box_format = box_column, box_format
        self.mean, self.std = mean, std  # None: uint8 pixels, normalised on the device (`normalize_pixels`)
        self.backend = resolve_backend(backend)  # here, not in each worker: they inherit the imported torchvision

    def __getitem__(self, key):
        """key: `(epoch, index)` or `index` (`EpochDataset.epoch_and_index`)."""
        epoch, index = self.epoch_and_index(key)
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
            out = augment(image, self.size, self.mean, self.std, np.random.default_rng([self.seed, epoch, j]),
                          boxes=boxes, attention=example.get("teacher_attention"), backend=self.backend)
            item = {"pixel_values": out["pixel_values"], "skipped": skipped}
            if boxes is not None:
                item["boxes"] = out["boxes"]
            if "teacher_attention" in out:  # cached maps of the whole image
                item["teacher_attention"] = out["teacher_attention"]
            return item
        raise RuntimeError(f"No decodable image among 64 items from index {index}")


def make_stream_transform(column, size, mean, std, mode, box_column=None, box_format="xywh", backend="auto"):
    """-> a `datasets.map` function: example -> {"pixel_values": float32 `[C, size, size]` numpy (uint8 when mean and
    std are None) or None (undecodable), "skipped": 0 or 1, and with `box_column` "boxes": float32 `[n, 4]`}.
    Unseeded: a stream does not resume exactly."""
    backend = resolve_backend(backend)

    def transform(example):
        empty = {"boxes": np.zeros((0, 4), np.float32)} if box_column else {}
        try:
            image = decode_image(example[column], mode)
            boxes = read_boxes(example[box_column], box_format, image.width, image.height) if box_column else None
        except Exception:  # noqa: BLE001
            return {"pixel_values": None, "skipped": 1, **empty}
        out = augment(image, size, mean, std, np.random.default_rng(), boxes=boxes, backend=backend)
        result = {"pixel_values": out["pixel_values"].numpy(), "skipped": 0}
        if boxes is not None:
            result["boxes"] = out["boxes"].numpy()
        return result

    return transform


def collate(examples):
    """-> pixel_values `[B, C, H, W]` (uint8 or float32, as the items), skipped count (int), and (box_prior) boxes:
    `[B, max n_i, 4]` float, xyxy pixels of the augmented images, NaN rows for padding."""
    skipped = sum(int(e["skipped"]) for e in examples)
    kept = [e for e in examples if e["pixel_values"] is not None]
    if not kept:
        return {"pixel_values": None, "skipped": skipped}
    # `skipped` stays a Python int: accelerate moves tensors to the device, and reading one back would sync each step.
    batch = {"pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in kept]), "skipped": skipped}
    if "teacher_attention" in kept[0]:
        batch["teacher_attention"] = torch.stack([torch.as_tensor(e["teacher_attention"]) for e in kept])
    if "boxes" in kept[0]:
        # One [B, max n, 4] tensor, NaN rows for padding: one copy to the device, one batched box test there.
        batch["boxes"] = pad_boxes([np.asarray(e["boxes"], np.float32).reshape(-1, 4) for e in kept])
    return batch


def find_box_column(args, parser, data, columns) -> str:
    """The column of `--masking box_prior`'s boxes: `--box_column_name`, else, by HF's detection conventions, `objects`
    (with a `bbox` field, COCO xywh) or `bbox`."""
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


# Files that `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write: a folder holding one is a saved data set.
SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")
DATA_LAYOUT = ("--dataset_name takes a Hub data set id, a `save_to_disk` folder, or an image-folder root (split "
               "sub-folders train/, test/, ... holding one folder per class); --train_dir takes one split's image "
               "folder (one folder per class)")


def load_image_dataset(parser, dataset_name=None, train_dir=None, eval_dir=None, train_split="train",
                       eval_split=None, dataset_config_name=None, cache_dir=None, streaming=False):
    """The one rule every command line reads its images by (`DATA_LAYOUT`) -> a `DatasetDict` (an
    `IterableDatasetDict` with `streaming`), keyed by split.

    - `dataset_name`, a folder holding `dataset_dict.json` or `state.json`: `datasets.load_from_disk` (a single saved
      `Dataset` becomes the `train_split`);
    - `dataset_name`, any other folder: an image-folder root, `load_dataset("imagefolder", data_dir=...)`: split
      sub-folders as `datasets` names them (train/, test/, validation/, ...; none: everything is "train"), the class
      of an image the name of the folder it lies in;
    - `dataset_name`, anything else: a Hub data set (`dataset_config_name`);
    - `train_dir` (and `eval_dir`): one image folder per split, stored as `train_split` (and `eval_split`).
    A wrong argument ends in a one-line `parser.error` that names the flag."""
    import datasets

    if dataset_name is None and train_dir is None:
        parser.error(f"give --dataset_name or --train_dir: {DATA_LAYOUT}")
    try:
        if train_dir is not None:
            folders = {train_split: train_dir, **({eval_split: eval_dir} if eval_dir is not None else {})}
            for split, folder in folders.items():
                if not os.path.isdir(folder):
                    flag = "--train_dir" if split == train_split else "--eval_dir"
                    parser.error(f"{flag} {folder!r} is not an existing folder")
            files = {split: os.path.join(folder, "**") for split, folder in folders.items()}
            return datasets.load_dataset("imagefolder", data_files=files, cache_dir=cache_dir, streaming=streaming)
        folder = os.path.expanduser(dataset_name)
        if os.path.isdir(folder):
            if not any(os.path.exists(os.path.join(folder, name)) for name in SAVED_DATASET_FILES):
                return datasets.load_dataset("imagefolder", data_dir=folder, cache_dir=cache_dir, streaming=streaming)
            data = datasets.load_from_disk(folder)
            if isinstance(data, datasets.Dataset):
                data = datasets.DatasetDict({train_split: data})
            if streaming:
                data = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in data.items()})
            return data
        if dataset_name.startswith((".", "/", "~")):
            parser.error(f"--dataset_name {dataset_name!r}: no such folder")
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, streaming=streaming)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001  (a one-line error, never a traceback)
        parser.error(f"cannot load the data set ({dataset_name or train_dir}): {one_line(error)}. {DATA_LAYOUT}")


def column_names(data) -> list[str]:
    """The columns of a split, streamed or not (a streamed split may know its features only)."""
    return list(data.column_names or (data.features or {}).keys())


def pick_split(parser, data, split: str, flag: str):
    """-> `data[split]`; a split the data set lacks ends in one `parser.error` naming `flag` and the splits it has."""
    if split not in data:
        parser.error(f"{flag} {split!r} not in the data set's splits {list(data)}")
    return data[split]


def image_column_of(parser, data, name: str | None = None) -> str:
    """The image column of a split: `name` (--image_column_name) when given, else the first of
    `IMAGE_COLUMN_CANDIDATES` it has."""
    return _find_column(parser, column_names(data), name, IMAGE_COLUMN_CANDIDATES, "--image_column_name", "image")


def label_column_of(parser, data, name: str | None = None) -> str:
    """The label column of a split: `name` (--label_column_name) when given, else its `ClassLabel` column, else the
    first of `LABEL_COLUMN_CANDIDATES` it has."""
    import datasets

    features = getattr(data, "features", None) or {}
    class_labels = tuple(c for c, feature in features.items() if isinstance(feature, datasets.ClassLabel))
    return _find_column(parser, column_names(data), name, class_labels + LABEL_COLUMN_CANDIDATES,
                        "--label_column_name", "label")


def _find_column(parser, columns, name, candidates, flag: str, kind: str) -> str:
    if name is not None:
        if name not in columns:
            parser.error(f"{flag} {name!r} is not a column of the data set {columns}")
        return name
    found = next((column for column in candidates if column in columns), None)
    if found is None:
        parser.error(f"no {kind} column found among {columns}; name it with {flag}")
    return found


def undecoded(data, column: str):
    """`data` with its `datasets.Image` column left as bytes / paths: images are decoded in the DataLoader workers
    (`decode_image`), where an undecodable one is skipped or named instead of failing the whole split."""
    import datasets

    features = getattr(data, "features", None) or {}
    if isinstance(features.get(column), datasets.Image):
        return data.cast_column(column, datasets.Image(decode=False))
    return data


def load_images(args, parser, with_boxes: bool = False):
    """-> (hf dataset of one split, image column name, box column name or None), read by `load_image_dataset`'s
    rule; `--dataset_split` picks the split."""
    data = load_image_dataset(parser, args.dataset_name, args.train_dir, train_split=args.dataset_split,
                              dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir,
                              streaming=args.streaming)
    data = pick_split(parser, data, args.dataset_split, "--dataset_split")
    column = image_column_of(parser, data, args.image_column_name)
    data = undecoded(data, column)
    box_column = find_box_column(args, parser, data, column_names(data)) if with_boxes else None
    data = data.select_columns([column] + ([box_column] if box_column else []))
    if args.max_train_samples is not None:
        data = data.take(args.max_train_samples) if args.streaming else data.select(range(min(args.max_train_samples, len(data))))
    return data, column, box_column


# ---- the image processor saved beside a model ----------------------------------------------------------------------
def vit_image_processor_class():
    """transformers 5.x's torchvision-free `ViTImageProcessorPil` (same fields, same saved format), else
    `ViTImageProcessor`."""
    try:
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor
    return ViTImageProcessor


def default_image_processor(config):
    """The processor of a model saved without one: MAE's ImageNet mean/std (averaged over the channels for a grayscale
    model), resized to the model's `image_size`."""
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if config.num_channels == 1:
        mean, std = [float(np.mean(mean))], [float(np.mean(std))]
    return vit_image_processor_class()(image_mean=list(mean), image_std=list(std), size={"height": size, "width": size})


def load_image_processor(name_or_path: str, config, cache_dir=None):
    """The checkpoint's image processor (its pretraining mean/std/size), else `default_image_processor(config)`; a
    3-channel model's processor converts grayscale / RGBA inputs to RGB, as in pretraining."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001  (no preprocessor_config.json, or one that does not load)
        logger.warning("No image processor in %s: using ImageNet mean/std", name_or_path)
        processor = default_image_processor(config)
    if config.num_channels == 3:
        processor.do_convert_rgb = True
    return processor

"""What the input pipeline delivers: images per second per CPU core for pretraining's decode + augmentation (JPEG
decode, RandomResizedCrop(0.2-1, bicubic) + flip + normalise at 224 px), through the real `MapImageDataset` and the
DataLoader that `training/pretrain.py` builds (`build_training_data`: persistent workers, prefetch 4, its collate).

    python benchmarks/loader.py                         # 256 generated 256-px JPEGs, 1 and 2 workers (~40 s, 2 cores)
    python benchmarks/loader.py --source_size 500x375   # ImageNet-like photo size
    python benchmarks/loader.py --photos DIR            # also real JPEGs (e.g. foolbox's 20 ImageNet photos), in process
    python benchmarks/loader.py --make_images DIR --images 2048   # only write the JPEGs (benchmarks/gpu.sh's loop data)

Arms:
  in process        `dataset[i]` in a loop, one thread: decode alone and decode + augmentation, per image
  imagefolder / arrow, W workers
                    epoch after epoch through the loader, as pretraining reads it (one iterator over the run, cut into
                    epochs: `RunBatches`), the first epoch untimed (it starts the workers): images/s of wall time,
                    images per worker-CPU-second (what one core sustains, the figure to divide a GPU's images/s by),
                    the main process's CPU time per batch, and the wait for each epoch's first batch against the
                    others' (the epoch boundary); imagefolder reads the files, arrow the same bytes from a
                    `save_to_disk` folder
  synthetic tensors, W workers
                    the same DataLoader and collate over ready-made `[3, 224, 224]` tensors: what moving batches costs
                    when decoding is free (the loader's own ceiling, and the main process's share per step)
Rates are per CPU-second of the worker processes (read from the OS), so they hold on a busy machine too; wall-clock
rates are printed beside them. The generated JPEGs are smooth colour fields with grain, quality 90: about 0.28 bytes
per pixel, like ImageNet photos re-encoded at that quality.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


# ---- data ---------------------------------------------------------------------------------------------------------
def photo_like(index: int, width: int, height: int, seed: int = 0):
    """A PIL RGB image: two smooth colour fields (coarse and 16-px detail) plus grain, a JPEG as dense as a photo's."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    detail = Image.fromarray(rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8))
    detail = detail.resize((width, height), Image.BICUBIC)
    array = 0.6 * np.asarray(coarse, np.float32) + 0.4 * np.asarray(detail, np.float32)
    array += rng.normal(0.0, 6.0, (height, width, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _write_one(job):
    folder, index, width, height = job
    photo_like(index, width, height).save(Path(folder) / f"{index:06d}.jpg", "JPEG", quality=90)


def make_images(folder: Path, count: int, width: int, height: int) -> Path:
    """`count` JPEGs in `folder/train/` (an imagefolder); kept when already there."""
    target = Path(folder) / "train"
    target.mkdir(parents=True, exist_ok=True)
    missing = [(str(target), i, width, height) for i in range(count) if not (target / f"{i:06d}.jpg").exists()]
    processes = min(os.cpu_count() or 1, max(1, len(missing) // 256))  # a pool only where it pays for itself
    if processes > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_write_one, missing, chunksize=32)
    else:
        for job in missing:
            _write_one(job)
    return Path(folder)


def make_arrow(image_folder: Path, target: Path) -> Path:
    """The same JPEG bytes in a `save_to_disk` folder (bytes inside the Arrow file, not paths)."""
    import datasets

    if (target / "dataset_info.json").exists():
        return target
    files = sorted((image_folder / "train").glob("*.jpg"))
    entries = [{"bytes": path.read_bytes(), "path": None} for path in files]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": entries}, features=features).save_to_disk(str(target))
    return target


# ---- measurement --------------------------------------------------------------------------------------------------
def cpu_seconds(pids) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def build_loader(source: dict, size: int, batch_size: int, workers: int, cache_dir: Path, epochs: int = 1):
    """(dataset, `RunBatches` over `epochs` epochs): the DataLoader exactly as `training/pretrain.py` builds it, with
    a stand-in model."""
    from automae_hf.training import pretraining
    from automae_hf.training.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, RunBatches

    parser = pretraining.build_parser()
    where = (["--train_dir", str(source["train_dir"])] if "train_dir" in source
             else ["--dataset_name", str(source["dataset_name"])])
    args = parser.parse_args(where + ["--output_dir", str(cache_dir / "unused"), "--cache_dir", str(cache_dir),
                                      "--per_device_train_batch_size", str(batch_size),
                                      "--dataloader_num_workers", str(workers), "--num_train_epochs", str(epochs)])
    model = SimpleNamespace(config=SimpleNamespace(image_size=size, num_channels=3, masking="random"))
    accelerator = SimpleNamespace(main_process_first=contextlib.nullcontext, num_processes=1)
    data = pretraining.build_training_data(args, parser, accelerator, model, "none", IMAGENET_DEFAULT_MEAN,
                                           IMAGENET_DEFAULT_STD)
    return data.dataset, RunBatches(data.loader, data.sampler)


def time_epochs(batches, epochs: int) -> dict:
    """`batches`: a `RunBatches`. One untimed epoch (starts the persistent workers), then `epochs` timed ones; each
    epoch's first batch's wait kept apart from the others', so the epoch boundary shows."""
    images = 0
    first_waits, other_waits = [], []
    for epoch in range(epochs + 1):
        if epoch == 1:
            workers = batches.loader._iterator._workers  # private, but the one place that names the processes
            pids = [worker.pid for worker in workers]  # persistent: the same processes from now on
            wall, main_cpu, worker_cpu = time.perf_counter(), time.process_time(), cpu_seconds(pids)
        iterator = batches.epoch(epoch)
        for position in itertools.count():
            waited = time.perf_counter()
            batch = next(iterator, None)
            waited = time.perf_counter() - waited
            if batch is None:
                break
            if epoch:
                (first_waits if position == 0 else other_waits).append(1000 * waited)
                images += batch["pixel_values"].shape[0]
    wall, main_cpu = time.perf_counter() - wall, time.process_time() - main_cpu
    worker_cpu = cpu_seconds(pids) - worker_cpu
    count = len(first_waits) + len(other_waits)
    # The OS counts CPU time in ticks (10 ms): too few of them and there is no per-core rate to give.
    per_core = images / worker_cpu if worker_cpu >= 0.1 else None
    return {"images": images, "batches": count, "wall_s": wall, "images_per_s": images / wall,
            "images_per_worker_cpu_s": per_core, "worker_cpu_ms_per_batch": 1000 * worker_cpu / count,
            "main_cpu_ms_per_batch": 1000 * main_cpu / count,
            "epoch_first_batch_wait_ms": statistics.mean(first_waits),
            "other_batch_wait_ms": statistics.mean(other_waits) if other_waits else None}


def in_process(dataset, count: int) -> dict:
    """Decode alone and decode + augmentation, `dataset[i]` in a loop on one thread: ms per image (CPU time)."""
    import torch

    from automae_hf.training.data import decode_image

    torch.set_num_threads(1)
    indices = [i % len(dataset) for i in range(count)]
    start = time.process_time()
    for i in indices:
        decode_image(dataset.data[i][dataset.column], dataset.mode)
    decode = (time.process_time() - start) / count
    start, wall = time.process_time(), time.perf_counter()
    for i in indices:
        dataset[i]
    full, wall = (time.process_time() - start) / count, (time.perf_counter() - wall) / count
    return {"decode_ms": 1000 * decode, "augment_ms": 1000 * (full - decode), "total_ms": 1000 * full,
            "images_per_cpu_s": 1 / full, "images_per_s": 1 / wall}


class SyntheticImages:
    """Ready-made pixels: what the loader costs when decoding and augmentation are free. Keys as pretraining's data
    set takes them: `(epoch, index)`."""

    def __init__(self, count: int, size: int):
        import torch

        self.count, self.pixels = count, torch.randn(3, size, size)

    def __len__(self):
        return self.count

    def __getitem__(self, key):
        return {"pixel_values": self.pixels, "skipped": 0}


def collate_in_shared_memory(examples):
    """`collate` as torch's `default_collate` stacks: straight into shared memory inside a worker, which saves the
    copy that sending a batch to the main process otherwise makes."""
    import torch

    pixels = [e["pixel_values"] for e in examples]
    out = None
    if torch.utils.data.get_worker_info() is not None:
        storage = pixels[0]._typed_storage()._new_shared(len(pixels) * pixels[0].numel(), device=pixels[0].device)
        out = pixels[0].new(storage).resize_(len(pixels), *pixels[0].shape)
    return {"pixel_values": torch.stack(pixels, out=out), "skipped": torch.tensor(0)}


def synthetic(size: int, batch_size: int, workers: int, batches: int, epochs: int, shared: bool = False) -> dict:
    import torch

    from automae_hf.training.data import EpochSpanningSampler, RunBatches, collate

    dataset = SyntheticImages(batch_size * batches, size)
    sampler = EpochSpanningSampler(len(dataset), batch_size, 1, seed=0, num_epochs=epochs + 1)
    # The kwargs of `build_training_data`: the run's sampler, persistent workers, prefetch 4, its collate.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, sampler=sampler,
                                         drop_last=True, collate_fn=collate_in_shared_memory if shared else collate,
                                         persistent_workers=True, prefetch_factor=4,
                                         pin_memory=torch.cuda.is_available())
    result = time_epochs(RunBatches(loader, sampler), epochs)
    result["ms_per_batch"] = 1000 * result["wall_s"] / result["batches"]
    del loader
    return result


# ---- report -------------------------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="generated JPEGs (default 256)")
    parser.add_argument("--source_size", default="256", help="their size: W or WxH pixels (default 256)")
    parser.add_argument("--size", type=int, default=224, help="training resolution (default 224)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts (default 1 2)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loader arm, after one untimed")
    parser.add_argument("--sources", nargs="+", choices=["imagefolder", "arrow"], default=["imagefolder", "arrow"])
    parser.add_argument("--photos", default=None, help="a folder of real JPEGs, also timed in process")
    parser.add_argument("--gpu_rates", type=float, nargs="+", default=[2245.0, 1670.0],
                        help="model-only images/s to divide by the per-core rate (default: ViT-B/16 MAE and AutoMAE "
                             "at batch 128 on one H200)")
    parser.add_argument("--workdir", default=None, help="keep the data here (default: a temporary folder)")
    parser.add_argument("--make_images", default=None, metavar="DIR", help="only write --images JPEGs to DIR/train")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)
    width, height = parse_size(args.source_size)
    if args.make_images:
        folder = make_images(Path(args.make_images), args.images, width, height)
        print(f"{args.images} JPEGs of {width}x{height} in {folder / 'train'}")
        return

    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="automae-loader-"))
    started = time.perf_counter()
    try:
        images = make_images(workdir / f"jpeg_{width}x{height}_{args.images}", args.images, width, height)
        sources = {"imagefolder": {"train_dir": images / "train"}}
        if "arrow" in args.sources:
            sources["arrow"] = {"dataset_name": make_arrow(images, workdir / f"arrow_{width}x{height}_{args.images}")}
        mean_bytes = statistics.mean(p.stat().st_size for p in (images / "train").glob("*.jpg"))
        figures = {"images": args.images, "source_size": [width, height], "size": args.size,
                   "batch_size": args.batch_size, "jpeg_bytes_mean": mean_bytes, "cpu": cpu_name(),
                   "cpu_count": os.cpu_count(), "torch": torch.__version__, "pillow": pillow_version(),
                   "backend": None, "in_process": {}, "loader": {}, "synthetic": {}}
        dataset, _ = build_loader(sources["imagefolder"], args.size, args.batch_size, 0, workdir / "cache")
        figures["backend"] = dataset.backend
        figures["in_process"]["generated"] = in_process(dataset, args.images)
        if args.photos:
            photo_set = datasets.Dataset.from_dict(
                {"image": [{"bytes": p.read_bytes(), "path": None} for p in sorted(Path(args.photos).glob("*.jp*g"))]},
                features=datasets.Features({"image": datasets.Image(decode=False)}))
            dataset.data = photo_set
            figures["in_process"][f"photos ({len(photo_set)} files)"] = in_process(dataset, max(args.images, 100))
        for name in args.sources:
            for workers in args.workers:
                _, batches = build_loader(sources[name], args.size, args.batch_size, workers, workdir / "cache",
                                          epochs=args.epochs + 1)
                figures["loader"][f"{name}, {workers} worker(s)"] = time_epochs(batches, args.epochs)
                del batches
        for workers in args.workers:
            figures["synthetic"][f"{workers} worker(s)"] = synthetic(args.size, args.batch_size, workers, 4, args.epochs)
        figures["synthetic"]["1 worker(s), stacked in shared memory"] = synthetic(args.size, args.batch_size, 1, 4,
                                                                                  args.epochs, shared=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    figures["seconds"] = time.perf_counter() - started
    report(figures, args.gpu_rates)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(figures, indent=1) + "\n")


def report(figures: dict, gpu_rates) -> None:
    width, height = figures["source_size"]
    print(f"{figures['images']} JPEGs of {width}x{height} ({figures['jpeg_bytes_mean'] / 1024:.1f} KiB mean) -> "
          f"{figures['size']} px, augmentation backend {figures['backend']}; {figures['cpu']}, "
          f"{figures['cpu_count']} cores; torch {figures['torch']}, Pillow {figures['pillow']}")
    print("in process (one thread, CPU time per image):")
    for name, row in figures["in_process"].items():
        print(f"  {name:28s} decode {row['decode_ms']:5.2f} ms + augment {row['augment_ms']:5.2f} ms = "
              f"{row['total_ms']:5.2f} ms: {row['images_per_cpu_s']:6.0f} images per CPU-second "
              f"({row['images_per_s']:.0f}/s wall)")
    print(f"through the DataLoader (batch {figures['batch_size']}, persistent workers, prefetch 4):")
    for name, row in figures["loader"].items():
        rate = row["images_per_worker_cpu_s"]
        print(f"  {name:28s} {row['images_per_s']:6.0f} images/s wall, {f'{rate:6.0f}' if rate else '     -'} per "
              f"worker-CPU-second; main process {row['main_cpu_ms_per_batch']:6.1f} ms CPU per batch; "
              f"{epoch_boundary(row)}")
    for name, row in figures["synthetic"].items():
        print(f"  synthetic tensors, {name}: {row['ms_per_batch']:.1f} ms per batch wall ("
              f"{row['images_per_s']:.0f} images/s), workers {row['worker_cpu_ms_per_batch']:.1f} ms CPU per batch, "
              f"main process {row['main_cpu_ms_per_batch']:.1f} ms CPU per batch; {epoch_boundary(row)}")
    measured = [row["images_per_worker_cpu_s"] for row in figures["loader"].values() if row["images_per_worker_cpu_s"]]
    per_core = min(measured) if measured else figures["in_process"]["generated"]["images_per_cpu_s"]
    figures["per_core_rate"] = per_core
    figures["cores_for"] = {str(rate): rate / per_core for rate in gpu_rates}
    where = "the slowest loader arm" if measured else "in process: the loader arms ran too briefly to time"
    print(f"loader cores per GPU at {per_core:.0f} images per core-second ({where}): " + ", ".join(
        f"{rate:.0f} images/s -> {rate / per_core:.1f} cores" for rate in gpu_rates))
    print(f"({figures['seconds']:.0f} s)")


def epoch_boundary(row: dict) -> str:
    """The wait for an epoch's first batch beside the others' (mean ms): about equal when the next epoch was already
    loading as the last one ended."""
    others = row["other_batch_wait_ms"]
    return (f"wait {row['epoch_first_batch_wait_ms']:.1f} ms for an epoch's first batch, "
            f"{'-' if others is None else f'{others:.1f}'} ms for the others")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "unknown CPU"


def pillow_version() -> str:
    import PIL

    return PIL.__version__


if __name__ == "__main__":
    main()

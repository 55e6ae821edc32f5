"""The README's main job: pretrain a small AutoMAE on the embedded Fashion-MNIST subset, then show what it learned.

Offline, CPU, about 5 minutes on 2 cores. The reference recipe at toy scale, each arm through `training/pretrain.py`:
  1. MAE (random masks, `--teacher_name_or_path none`) for N steps: the baseline and, as in the paper, the teacher;
  2. AutoMAE for N steps from scratch, its mask generator reading (1)'s frozen attention.
Then frozen-feature kNN and linear-probe accuracies on the held-out test images, for both encoders beside raw pixels
and a randomly initialised encoder, with the full label set and with 10 labels per class; and the picture grid.

    python training/default_job.py [--steps 500] [--output_dir outputs/default]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

# The embedded Fashion-MNIST subset (MIT), in the repository's training/data folder.
DATA = Path(__file__).resolve().parents[2] / "training" / "data" / "fashion_mnist_subset.npz"
MODEL = (
    "image_size=28,patch_size=4,num_channels=1,hidden_size=128,num_hidden_layers=4,num_attention_heads=4,"
    "intermediate_size=512,decoder_hidden_size=64,decoder_num_hidden_layers=2,decoder_num_attention_heads=4,"
    "decoder_intermediate_size=256,layer_norm_eps=1e-6"
)


def build_dataset(output_dir: Path) -> Path:
    """The embedded subset as a `datasets` folder (`save_to_disk`), with `image` (PIL, grayscale) and `label`."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    target = output_dir / "data"
    if (target / "dataset_dict.json").exists():
        return target
    arrays = np.load(DATA)
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    splits = {}
    for split in ("train", "test"):
        from PIL import Image as PILImage

        images = [PILImage.fromarray(image, mode="L") for image in arrays[f"{split}_images"]]
        splits[split] = Dataset.from_dict({"image": images, "label": arrays[f"{split}_labels"].tolist()}, features)
    DatasetDict(splits).save_to_disk(str(target))
    return target


def pretrain(data: Path, output_dir: Path, teacher: str, steps: int, batch_size: int, seed: int) -> float:
    command = [
        sys.executable, "-m", "automae_hf.training.pretraining",
        "--dataset_name", str(data),
        "--output_dir", str(output_dir),
        "--config_overrides", MODEL,
        "--teacher_name_or_path", teacher,
        "--norm_pix_loss",
        "--per_device_train_batch_size", str(batch_size),
        "--max_train_steps", str(steps),
        "--base_learning_rate", "1.5e-3",
        "--warmup_steps", str(max(1, steps // 10)),
        "--checkpointing_steps", str(max(1, steps // 2)),
        "--image_log_steps", str(steps),
        "--dataloader_num_workers", "1",
        "--seed", str(seed),
    ]
    if (output_dir / "checkpoints").is_dir():  # a killed run continues where it stopped
        command += ["--resume_from_checkpoint", "latest"]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return time.perf_counter() - start


def last_mask_statistics(run_dir: Path) -> dict | None:
    """The discriminator's accuracies and the mask distribution's entropy at the run's last logged step."""
    log = run_dir / "train_log.jsonl"
    if not log.is_file():
        return None
    last = json.loads(log.read_text().splitlines()[-1])
    if "mask_entropy" not in last:
        return None
    from automae_hf import AutoMAEConfig
    from automae_hf.masking import max_entropy

    keys = ("d_real_accuracy", "d_fake_accuracy", "mask_entropy")
    return {**{k: last[k] for k in keys}, "uniform_entropy": max_entropy(AutoMAEConfig.from_pretrained(run_dir).num_patches)}


def load_split(split: str):
    arrays = np.load(DATA)
    images = torch.tensor(arrays[f"{split}_images"]).float().unsqueeze(1) / 255.0
    return images, torch.tensor(arrays[f"{split}_labels"]).long()


def evaluate(encoders: dict, image_mean: float, image_std: float) -> dict:
    from .probes import evaluate_features, extract_features

    (train_x, train_y), (test_x, test_y) = load_split("train"), load_split("test")
    results = {}
    for name, encoder in encoders.items():
        if encoder is None:  # raw pixels
            train_f, test_f = train_x.flatten(1), test_x.flatten(1)
        else:
            train_f = extract_features(encoder, (train_x - image_mean) / image_std)
            test_f = extract_features(encoder, (test_x - image_mean) / image_std)
        results[name] = {  # the probes' defaults, which `training/linear_probe.py` shares
            "all labels": evaluate_features(train_f, train_y, test_f, test_y),
            "10 labels/class": evaluate_features(train_f, train_y, test_f, test_y, samples_per_class=10),
        }
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/default")
    parser.add_argument("--steps", type=int, default=500, help="pretraining steps of each arm")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    data = build_dataset(output_dir)
    mae_dir, automae_dir = output_dir / "mae", output_dir / "automae"
    print(f"[1/3] MAE, random masks, {args.steps} steps -> {mae_dir}", flush=True)
    mae_seconds = pretrain(data, mae_dir, "none", args.steps, args.batch_size, args.seed)
    print(f"[2/3] AutoMAE, teacher = that MAE, {args.steps} steps -> {automae_dir}", flush=True)
    automae_seconds = pretrain(data, automae_dir, str(mae_dir), args.steps, args.batch_size, args.seed)

    print("[3/3] frozen-feature kNN and linear probe on the 2,000 test images", flush=True)
    from transformers import AutoImageProcessor
    from transformers.utils import logging

    from automae_hf import AutoMAEConfig, AutoMAEModel

    logging.set_verbosity_error()
    processor = AutoImageProcessor.from_pretrained(automae_dir)
    mean, std = float(processor.image_mean[0]), float(processor.image_std[0])
    torch.manual_seed(args.seed)
    random_encoder = AutoMAEModel(AutoMAEConfig.from_pretrained(mae_dir))
    encoders = {
        "raw pixels": None,
        "random init encoder": random_encoder,
        "MAE": AutoMAEModel.from_pretrained(mae_dir),
        "AutoMAE": AutoMAEModel.from_pretrained(automae_dir),
    }
    results = evaluate(encoders, mean, std)

    header = f"{'encoder':22s} {'kNN':>7s} {'linear':>7s} {'kNN@10':>7s} {'lin@10':>7s}"
    lines = [header, "-" * len(header)]
    for name, row in results.items():
        full, few = row["all labels"], row["10 labels/class"]
        lines.append(
            f"{name:22s} {100 * full['knn']:7.2f} {100 * full['linear']:7.2f} {100 * few['knn']:7.2f} {100 * few['linear']:7.2f}"
        )
    table = "\n".join(lines)
    grids = sorted((automae_dir / "images").glob("*.png"))
    mask_learning = last_mask_statistics(automae_dir)
    summary = {
        "steps_per_arm": args.steps,
        "batch_size": args.batch_size,
        "seconds": {"mae": round(mae_seconds, 1), "automae": round(automae_seconds, 1),
                    "total": round(time.perf_counter() - start, 1)},
        "accuracy": results,
        "mask_learning": mask_learning,
        "checkpoint": str(automae_dir),
        "picture": str(grids[-1]) if grids else None,
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    print()
    print("Test accuracy (%) of frozen features: kNN (k=20) and linear probe, all 10,000 training labels or 10 per")
    print("class (mean of 3 draws); 2,000 test images.")
    print(table)
    print()
    if mask_learning:
        print(f"AutoMAE's last logged step: discriminator accuracy {100 * mask_learning['d_real_accuracy']:.0f}% on "
              f"box-prior maps and {100 * mask_learning['d_fake_accuracy']:.0f}% on generated ones; mask "
              f"distribution entropy {mask_learning['mask_entropy']:.2f} nats (uniform: "
              f"{mask_learning['uniform_entropy']:.2f})")
        print()
    print(f"AutoMAE checkpoint:   {automae_dir}  (AutoMAEForPreTraining.from_pretrained / AutoModel.from_pretrained)")
    print(f"MAE baseline:         {mae_dir}")
    print(f"picture grid:         {summary['picture']}  (image | teacher attention | mask probability | mask | reconstruction)")
    print(f"results:              {output_dir / 'results.json'}")
    print(f"wall time:            {summary['seconds']['total']:.0f} s (MAE {mae_seconds:.0f} s, AutoMAE {automae_seconds:.0f} s)")


if __name__ == "__main__":
    main()

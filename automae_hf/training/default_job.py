"""The README's main job: pretrain a small AutoMAE on the embedded Fashion-MNIST subset, then show what it learned.

Offline, CPU, about 5 minutes on 2 cores. The reference recipe at toy scale, each arm through `training/pretrain.py`:
  1. MAE (random masks, `--teacher_name_or_path none`) for N steps: the baseline and, as in the paper, the teacher;
  2. AutoMAE for N steps from scratch, its mask generator reading (1)'s frozen attention.
Then frozen-feature kNN and linear-probe accuracies on the held-out test images, for both encoders beside raw pixels
and a randomly initialised encoder, with the full label set and with 10 labels per class; and the picture grid.

    python training/default_job.py [--steps 500] [--output_dir outputs/default] [--overwrite_output_dir]

The data set goes to OUTPUT_DIR/data, a run to a folder named by its arguments (OUTPUT_DIR/steps500; other values of
--batch_size / --seed add _batchB / _seedS), so runs of other arguments sit side by side. An arm whose folder holds
the run these arguments ask for is reused when finished and resumed when killed (`plan_pretraining_run`); a folder
holding another run is refused unless --overwrite_output_dir.
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


# Resolved by the launcher, not asked for by the command: a run's other saved arguments decide whether it is this one.
LAUNCHER_ARGUMENTS = ("num_processes", "mixed_precision")


def plan_pretraining_run(argv: list[str], overwrite: bool = False, teacher_retrained: bool = False) -> list[str] | None:
    """What to do with the `training/pretrain.py` run `argv` (its --output_dir among them), from the arguments the
    folder's run saved (`run_args.json`, `checkpointing.read_run_arguments`):
    None: the folder holds this run, finished: reuse it;
    []: nothing there yet: run it;
    ["--resume_from_checkpoint", "latest"]: this run, killed before its end: continue it;
    ["--overwrite_output_dir"]: another run (or this one, finished, but `teacher_retrained` since), and `overwrite`.
    Another run without `overwrite`: SystemExit naming the differing arguments and the flag."""
    from .checkpointing import differing_arguments, read_run_arguments
    from .pretraining import build_parser, run_arguments

    args = build_parser().parse_args(argv)
    run_dir = Path(args.output_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return []
    saved = read_run_arguments(run_dir)
    expected = run_arguments(args, 1, "no")
    differing = None if saved is None else [
        name for name in differing_arguments(saved, expected) if name not in LAUNCHER_ARGUMENTS]
    if differing == []:
        if not ((run_dir / "train_summary.json").is_file() and (run_dir / "model.safetensors").is_file()):
            return ["--resume_from_checkpoint", "latest"]
        if not teacher_retrained:
            return None
        print(f"{run_dir}: its teacher was trained again, so it is too", flush=True)
        return ["--overwrite_output_dir"]
    if not overwrite:
        what = ("a run that saved no arguments (an older version)" if saved is None else "a run with other arguments ("
                + "; ".join(f"{name} {saved.get(name)!r} there, {expected.get(name)!r} now" for name in differing) + ")")
        raise SystemExit(f"error: {run_dir} holds {what}: pass --overwrite_output_dir to train it again there, or "
                         "choose another --output_dir")
    return ["--overwrite_output_dir"]


def run_folder_name(steps: int, batch_size: int, seed: int) -> str:
    """The job's run folder, named by the arguments it trains with: steps500, steps100_batch64_seed1, ..."""
    return f"steps{steps}" + (f"_batch{batch_size}" if batch_size != 128 else "") + (f"_seed{seed}" if seed else "")


def pretrain(data: Path, output_dir: Path, teacher: str, steps: int, batch_size: int, seed: int,
             overwrite: bool = False, teacher_retrained: bool = False) -> float | None:
    """One arm through `training/pretrain.py` (a subprocess) -> its wall seconds, or None where a finished run with
    these arguments was reused."""
    arguments = [
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
    plan = plan_pretraining_run(arguments, overwrite, teacher_retrained)
    if plan is None:
        print(f"      reusing the finished run in {output_dir}", flush=True)
        return None
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "automae_hf.training.pretraining", *arguments, *plan], check=True,
                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return time.perf_counter() - start


def mask_learning_statistics(run_dir: Path) -> dict | None:
    """D's accuracies and mean raw scores, and the entropy of the score head's distribution p, averaged over the
    second half of the run's logged steps (one step's values jump with its batch)."""
    log = run_dir / "train_log.jsonl"
    if not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    rows = [row for row in rows[len(rows) // 2 :] if "mask_entropy" in row and "d_real_score" in row]
    if not rows:
        return None
    from automae_hf import AutoMAEConfig
    from automae_hf.masking import max_entropy

    keys = ("d_real_accuracy", "d_fake_accuracy", "d_real_score", "d_fake_score", "mask_entropy")
    means = {key: float(np.mean([row[key] for row in rows])) for key in keys}
    return {**means, "uniform_entropy": max_entropy(AutoMAEConfig.from_pretrained(run_dir).num_patches)}


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


def seconds_or_reused(seconds: float | None) -> float | str:
    return "reused" if seconds is None else round(seconds, 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/default",
                        help="the data set goes to OUTPUT_DIR/data, the run to OUTPUT_DIR/steps{N}[_batch{B}][_seed{S}]")
    parser.add_argument("--steps", type=int, default=500, help="pretraining steps of each arm")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="train an arm again where its folder holds a run with other arguments (default: refused)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    start = time.perf_counter()
    data = build_dataset(Path(args.output_dir))
    output_dir = Path(args.output_dir) / run_folder_name(args.steps, args.batch_size, args.seed)
    mae_dir, automae_dir = output_dir / "mae", output_dir / "automae"
    print(f"[1/3] MAE, random masks, {args.steps} steps -> {mae_dir}", flush=True)
    mae_seconds = pretrain(data, mae_dir, "none", args.steps, args.batch_size, args.seed, args.overwrite_output_dir)
    print(f"[2/3] AutoMAE, teacher = that MAE, {args.steps} steps -> {automae_dir}", flush=True)
    automae_seconds = pretrain(data, automae_dir, str(mae_dir), args.steps, args.batch_size, args.seed,
                               args.overwrite_output_dir, teacher_retrained=mae_seconds is not None)

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
    picture = automae_dir / "images" / f"step_{args.steps:07d}.png"  # the grid of the run's last step
    mask_learning = mask_learning_statistics(automae_dir)
    summary = {
        "steps_per_arm": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "seconds": {"mae": seconds_or_reused(mae_seconds), "automae": seconds_or_reused(automae_seconds),
                    "total": round(time.perf_counter() - start, 1)},
        "accuracy": results,
        "mask_learning": mask_learning,
        "checkpoint": str(automae_dir),
        "picture": str(picture) if picture.is_file() else None,
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    print()
    print("Test accuracy (%) of frozen features: kNN (k=20) and linear probe, all 10,000 training labels or 10 per")
    print("class (mean of 3 draws); 2,000 test images.")
    print(table)
    print()
    if mask_learning:
        print(f"AutoMAE over the second half of its run: the discriminator's mean raw score is "
              f"{mask_learning['d_real_score']:.2f} on box-prior maps and {mask_learning['d_fake_score']:.2f} on "
              f"generated ones (targets 1 and 0; above / below 0.5: {100 * mask_learning['d_real_accuracy']:.0f}% / "
              f"{100 * mask_learning['d_fake_accuracy']:.0f}%); the entropy of the learned p is "
              f"{mask_learning['mask_entropy']:.2f} nats (uniform: {mask_learning['uniform_entropy']:.2f})")
        print()
    print(f"AutoMAE checkpoint:   {automae_dir}  (AutoMAEForPreTraining.from_pretrained / AutoModel.from_pretrained)")
    print(f"MAE baseline:         {mae_dir}")
    print(f"picture grid:         {summary['picture']}  (image | teacher attention | mask probability | mask | reconstruction)")
    print(f"results:              {output_dir / 'results.json'}")
    arms = ", ".join(f"{name} {'reused' if seconds is None else f'{seconds:.0f} s'}"
                     for name, seconds in (("MAE", mae_seconds), ("AutoMAE", automae_seconds)))
    print(f"wall time:            {summary['seconds']['total']:.0f} s ({arms})")


if __name__ == "__main__":
    main()

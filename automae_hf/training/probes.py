"""Frozen-feature evaluation of an encoder: weighted kNN and the MAE linear probe (BatchNorm without affine + linear).

From Python:

    features = extract_features(encoder, pixel_values)             # [N, D], frozen, no grad
    knn_accuracy(train_f, train_y, test_f, test_y)                  # cosine, k=20, T=0.07 (DINO's weighted kNN)
    linear_probe_accuracy(train_f, train_y, test_f, test_y)         # BN(affine=False) + Linear, SGD + cosine

From the shell, on a data set saved with `save_to_disk` (columns `image`/`img` and `label`/`labels`):

    python training/linear_probe.py --model_name_or_path OUT --dataset_name DATA [--pooling cls] [--samples_per_class 10]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import decode_image, one_line


@torch.no_grad()
def extract_features(
    encoder, pixel_values: torch.Tensor, batch_size: int = 256, pooling: str = "cls", progress: bool = False
) -> torch.Tensor:
    """`[N, C, H, W]` -> `[N, D]` features of a frozen encoder (any model returning `last_hidden_state`, CLS first).

    `pooling`: "cls" (the CLS token, MAE's linear-probe recipe) or "mean" (mean of the patch tokens).
    """
    if pooling not in ("cls", "mean"):
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    chunks = []
    batches = range(0, len(pixel_values), batch_size)
    for start in tqdm(batches, desc="features", disable=not progress):
        hidden = encoder(pixel_values[start : start + batch_size].to(device)).last_hidden_state
        chunks.append((hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(1)).float().cpu())
    encoder.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Weighted kNN (DINO): cosine similarity, votes exp(sim / T) from the k nearest training features."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk_size):
        similarity, index = (test[start : start + chunk_size] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(index), num_classes)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start : start + chunk_size]).sum().item()
    return correct / len(test)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    """MAE's linear probe on frozen features: BatchNorm1d(affine=False) then Linear, SGD (momentum 0.9) with a
    cosine schedule (MAE uses LARS at ImageNet scale; plain SGD is its small-batch equivalent)."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_features.shape[1], affine=False), nn.Linear(train_features.shape[1], num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_features) / batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    features, labels = train_features.float(), train_labels.long()
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for start in range(0, len(features), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(head(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    head.eval()
    with torch.no_grad():
        predictions = head(test_features.float()).argmax(1)
    return (predictions == test_labels).float().mean().item()


def few_shot_indices(labels: torch.Tensor, samples_per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of `samples_per_class` random examples of each class (a fixed draw per seed)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:samples_per_class]])
    return torch.cat(chosen).sort().values


def evaluate_features(train_f, train_y, test_f, test_y, samples_per_class=None, seeds=(0,), probe_epochs=100):
    """kNN and linear-probe accuracy (mean over seeds when a few-shot subset is drawn)."""
    results = {"knn": [], "linear": []}
    for seed in seeds if samples_per_class else (0,):
        index = few_shot_indices(train_y, samples_per_class, seed) if samples_per_class else slice(None)
        f, y = train_f[index], train_y[index]
        results["knn"].append(knn_accuracy(f, y, test_f, test_y, k=min(20, len(f))))
        results["linear"].append(
            linear_probe_accuracy(f, y, test_f, test_y, epochs=probe_epochs, batch_size=min(256, len(f)), seed=seed)
        )
    return {name: float(np.mean(values)) for name, values in results.items()}


# ---- command line --------------------------------------------------------------------------------------------------
def _load_split(dataset, image_column, label_column, processor, num_channels):
    """-> pixel_values `[N, C, H, W]` (the processor's), labels `[N]`; images decoded as in pretraining and
    finetuning (`data.decode_image`: transparent pixels composited on white, not the colour hidden under them)."""
    mode = "L" if num_channels == 1 else "RGB"
    images = [decode_image(image, mode) for image in dataset[image_column]]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values[:, :num_channels], torch.tensor(dataset[label_column])


def load_probe_data(args, parser):
    """-> a DatasetDict with the train and evaluation splits: `--train_dir` / `--eval_dir` image folders, a
    `save_to_disk` folder, an image folder given as `--dataset_name`, or a Hub data set."""
    import os

    import datasets

    try:
        if args.train_dir:
            for folder in (args.train_dir, args.eval_dir):
                if folder and not os.path.isdir(folder):
                    parser.error(f"{folder!r} is not an existing folder")
            if not args.eval_dir:
                parser.error("--train_dir needs --eval_dir, the image folder of the evaluation split")
            files = {args.train_split: os.path.join(args.train_dir, "**"), args.eval_split: os.path.join(args.eval_dir, "**")}
            return datasets.load_dataset("imagefolder", data_files=files)
        if not args.dataset_name:
            parser.error("give --dataset_name (save_to_disk folder, image folder or Hub name) or --train_dir/--eval_dir")
        if os.path.isdir(args.dataset_name):
            saved = any(os.path.exists(os.path.join(args.dataset_name, name))
                        for name in ("dataset_dict.json", "dataset_info.json", "state.json"))
            if saved:
                return datasets.load_from_disk(args.dataset_name)
            return datasets.load_dataset("imagefolder", data_dir=args.dataset_name)  # split sub-folders: train/, test/
        if args.dataset_name.startswith((".", "/", "~")):
            parser.error(f"--dataset_name {args.dataset_name!r}: no such folder")
        return datasets.load_dataset(args.dataset_name)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001  (a one-line error, never a traceback)
        parser.error(f"cannot load the data set ({args.dataset_name or args.train_dir}): {one_line(error)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="An AutoMAE / ViT checkpoint folder or Hub id.")
    parser.add_argument("--dataset_name", default=None,
                        help="A `save_to_disk` folder, an image folder with split sub-folders, or a Hub data set name.")
    parser.add_argument("--train_dir", default=None, help="Image folder of the training split (class = sub-folder).")
    parser.add_argument("--eval_dir", default=None, help="Image folder of the evaluation split (with --train_dir).")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--image_column_name", default=None)
    parser.add_argument("--label_column_name", default=None)
    parser.add_argument("--pooling", choices=["cls", "mean"], default="cls")
    parser.add_argument("--samples_per_class", type=int, default=None, help="Few-shot probe with N labels per class.")
    parser.add_argument("--seeds", type=int, default=1, help="Few-shot draws to average.")
    parser.add_argument("--probe_epochs", type=int, default=100)
    parser.add_argument("--random_init", action="store_true",
                        help="Also probe the same architecture randomly initialised: the baseline a probe is read against.")
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    import automae_hf  # noqa: F401  (registers the AutoMAE classes)

    data = load_probe_data(args, parser)
    for split in (args.train_split, args.eval_split):
        if split not in data:
            parser.error(f"split {split!r} not in the data set's splits {list(data)} (--train_split / --eval_split)")
    columns = data[args.train_split].column_names
    image_column = args.image_column_name or next((c for c in ("image", "img") if c in columns), None)
    label_column = args.label_column_name or next((c for c in ("label", "labels") if c in columns), None)
    if image_column not in columns or label_column not in columns:
        parser.error(f"need image and label columns; the data set has {columns}")
    try:
        encoders = {"encoder": AutoModel.from_pretrained(args.model_name_or_path)}
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
        if args.random_init:
            torch.manual_seed(0)
            encoders["random init"] = AutoModel.from_config(AutoConfig.from_pretrained(args.model_name_or_path))
    except Exception as error:  # noqa: BLE001
        parser.error(f"--model_name_or_path {args.model_name_or_path!r}: {one_line(error)}")
    num_channels = encoders["encoder"].config.num_channels
    pixels = {split: _load_split(data[split], image_column, label_column, processor, num_channels)
              for split in (args.train_split, args.eval_split)}
    report = {"model": args.model_name_or_path, "pooling": args.pooling}
    for name, encoder in encoders.items():
        features = {split: (extract_features(encoder, pixel_values, pooling=args.pooling, progress=True), labels)
                    for split, (pixel_values, labels) in pixels.items()}
        result = evaluate_features(*features[args.train_split], *features[args.eval_split], args.samples_per_class,
                                   range(args.seeds), args.probe_epochs)
        report.update(result) if name == "encoder" else report.update({name: result})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

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

from .data import decode_image


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="An AutoMAE / ViT checkpoint folder or Hub id.")
    parser.add_argument("--dataset_name", required=True, help="A `save_to_disk` folder or a Hub data set name.")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--image_column_name", default=None)
    parser.add_argument("--label_column_name", default=None)
    parser.add_argument("--pooling", choices=["cls", "mean"], default="cls")
    parser.add_argument("--samples_per_class", type=int, default=None, help="Few-shot probe with N labels per class.")
    parser.add_argument("--seeds", type=int, default=1, help="Few-shot draws to average.")
    parser.add_argument("--probe_epochs", type=int, default=100)
    args = parser.parse_args(argv)

    import os

    from datasets import load_dataset, load_from_disk
    from transformers import AutoImageProcessor, AutoModel

    import automae_hf  # noqa: F401  (registers the AutoMAE classes)

    data = load_from_disk(args.dataset_name) if os.path.isdir(args.dataset_name) else load_dataset(args.dataset_name)
    columns = data[args.train_split].column_names
    image_column = args.image_column_name or next((c for c in ("image", "img") if c in columns), None)
    label_column = args.label_column_name or next((c for c in ("label", "labels") if c in columns), None)
    if image_column not in columns or label_column not in columns:
        parser.error(f"need image and label columns; the data set has {columns}")
    encoder = AutoModel.from_pretrained(args.model_name_or_path)
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    num_channels = encoder.config.num_channels
    features = {}
    for split in (args.train_split, args.eval_split):
        pixel_values, labels = _load_split(data[split], image_column, label_column, processor, num_channels)
        features[split] = (extract_features(encoder, pixel_values, pooling=args.pooling, progress=True), labels)
    result = evaluate_features(
        *features[args.train_split], *features[args.eval_split], args.samples_per_class, range(args.seeds), args.probe_epochs
    )
    print(json.dumps({"model": args.model_name_or_path, "pooling": args.pooling, **result}, indent=2))


if __name__ == "__main__":
    main()

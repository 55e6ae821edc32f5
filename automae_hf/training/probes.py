"""Frozen-feature evaluation of an encoder: weighted kNN and the MAE linear probe (BatchNorm without affine + linear).

From Python:

    features = extract_features(encoder, pixel_values)             # [N, D], frozen, no grad
    knn_accuracy(train_f, train_y, test_f, test_y)                  # cosine, k=20, T=0.07 (DINO's weighted kNN)
    linear_probe_accuracy(train_f, train_y, test_f, test_y)         # BN(affine=False) + Linear, SGD + cosine
    evaluate_features(train_f, train_y, test_f, test_y)             # both, with the main job's settings

From the shell (the data layout and the image / label columns found as in pretraining and finetuning:
`data.load_image_dataset`, `data.image_column_of`, `data.label_column_of`):

    python training/linear_probe.py --model_name_or_path OUT --dataset_name DATA [--pooling cls] [--samples_per_class 10]

Both use the main job's settings unless told otherwise: the linear probe trains 30 epochs on all labels, 100 epochs
on a few-shot subset (one or two steps per epoch there), and a few-shot score is the mean of 3 draws.
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

from .data import (
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    decode_image,
    image_column_of,
    label_column_of,
    load_image_dataset,
    load_image_processor,
    one_line,
    pick_split,
)

# The main job's probe settings (the README's table), also `training/linear_probe.py`'s defaults.
PROBE_EPOCHS = 30  # linear probe on all training labels
FEW_SHOT_PROBE_EPOCHS = 100  # on `samples_per_class` labels per class: about one step per epoch, so more epochs
FEW_SHOT_DRAWS = 3  # few-shot subsets drawn (seeds 0, 1, 2), scores averaged


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


def balanced_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in `labels` of the share of each class predicted right (its recall): plain
    accuracy where the classes are balanced, and no reward for favouring a frequent class where they are not."""
    recalls = [(predictions[labels == label] == label).float().mean() for label in labels.unique()]
    return torch.stack(recalls).mean().item()


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Weighted kNN (DINO): cosine similarity, votes exp(sim / T) from the k nearest training features.
    -> predicted labels `[N_test]`."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, len(train))
    predictions = []
    for start in range(0, len(test), chunk_size):
        similarity, index = (test[start : start + chunk_size] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(index), num_classes)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 1024) -> float:
    """`knn_predict`'s accuracy on `test_labels`."""
    predictions = knn_predict(train_features, train_labels, test_features, k, temperature, chunk_size)
    return (predictions == test_labels).float().mean().item()


def linear_probe_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    epochs: int = PROBE_EPOCHS,
    batch_size: int = 256,
    learning_rate: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    num_classes: int | None = None,
) -> torch.Tensor:
    """MAE's linear probe on frozen features: BatchNorm1d(affine=False) then Linear, SGD (momentum 0.9) with a
    cosine schedule (MAE uses LARS at ImageNet scale; plain SGD is its small-batch equivalent).
    -> predicted labels `[N_test]`."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = num_classes or int(train_labels.max()) + 1
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
        return head(test_features.float()).argmax(1)


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels, epochs: int = PROBE_EPOCHS,
                          batch_size: int = 256, learning_rate: float = 0.1, weight_decay: float = 0.0,
                          seed: int = 0) -> float:
    """`linear_probe_predict`'s accuracy on `test_labels`."""
    predictions = linear_probe_predict(train_features, train_labels, test_features, epochs, batch_size,
                                       learning_rate, weight_decay, seed)
    return (predictions == test_labels).float().mean().item()


def few_shot_indices(labels: torch.Tensor, samples_per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of `samples_per_class` random examples of each class (a fixed draw per seed)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:samples_per_class]])
    return torch.cat(chosen).sort().values


def evaluate_features(train_f, train_y, test_f, test_y, samples_per_class=None, seeds=None, probe_epochs=None) -> dict:
    """kNN and linear-probe scores of frozen features `[N, D]` with labels `[N]`.

    With `samples_per_class`, on that many training labels per class, one subset per seed (default: the main job's
    `FEW_SHOT_DRAWS`); `probe_epochs` defaults to the main job's (`PROBE_EPOCHS`, `FEW_SHOT_PROBE_EPOCHS`).
    -> {"knn", "linear": accuracy, "knn_balanced", "linear_balanced": balanced accuracy (`balanced_accuracy`), means
    over the draws; "knn_std", "linear_std": their accuracies' standard deviation over the draws (0 for one);
    "samples_per_class", "seeds", "probe_epochs": what was run}."""
    if samples_per_class:
        seeds = list(range(FEW_SHOT_DRAWS) if seeds is None else seeds)
        probe_epochs = FEW_SHOT_PROBE_EPOCHS if probe_epochs is None else probe_epochs
    else:
        seeds, probe_epochs = [0], PROBE_EPOCHS if probe_epochs is None else probe_epochs
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    scores = {"knn": [], "linear": [], "knn_balanced": [], "linear_balanced": []}
    for seed in seeds:
        index = few_shot_indices(train_y, samples_per_class, seed) if samples_per_class else slice(None)
        f, y = train_f[index], train_y[index]
        predictions = {
            "knn": knn_predict(f, y, test_f, k=min(20, len(f)), num_classes=num_classes),
            "linear": linear_probe_predict(f, y, test_f, epochs=probe_epochs, batch_size=min(256, len(f)), seed=seed,
                                           num_classes=num_classes),
        }
        for name, predicted in predictions.items():
            scores[name].append((predicted == test_y).float().mean().item())
            scores[f"{name}_balanced"].append(balanced_accuracy(predicted, test_y))
    result = {name: float(np.mean(values)) for name, values in scores.items()}
    for name in ("knn", "linear"):
        result[f"{name}_std"] = float(np.std(scores[name], ddof=1)) if len(seeds) > 1 else 0.0
    return {**result, "samples_per_class": samples_per_class, "seeds": [int(seed) for seed in seeds],
            "probe_epochs": probe_epochs}


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
    parser.add_argument("--dataset_name", default=None,
                        help="A Hub data set id, a `save_to_disk` folder (e.g. the main job's outputs/default/data), or "
                             "an image-folder root with split sub-folders (train/, test/, each one folder per class).")
    parser.add_argument("--dataset_config_name", default=None, help="Configuration name of the Hub data set.")
    parser.add_argument("--train_dir", default=None, help="Image folder of the training split (one folder per class).")
    parser.add_argument("--eval_dir", default=None, help="Image folder of the evaluation split (with --train_dir).")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--image_column_name", default=None,
                        help=f"Detected among {IMAGE_COLUMN_CANDIDATES} when unset.")
    parser.add_argument("--label_column_name", default=None,
                        help=f"Detected (a ClassLabel column, else {LABEL_COLUMN_CANDIDATES}) when unset.")
    parser.add_argument("--pooling", choices=["cls", "mean"], default="cls")
    parser.add_argument("--samples_per_class", type=int, default=None, help="Few-shot probe with N labels per class.")
    parser.add_argument("--seeds", type=int, default=FEW_SHOT_DRAWS,
                        help="Few-shot draws (seeds 0..N-1) to average, as the main job (default %(default)s).")
    parser.add_argument("--probe_epochs", type=int, default=None,
                        help=f"Linear-probe epochs; default the main job's: {PROBE_EPOCHS} on all labels, "
                             f"{FEW_SHOT_PROBE_EPOCHS} with --samples_per_class.")
    parser.add_argument("--random_init", action="store_true",
                        help="Also probe the same architecture randomly initialised: the baseline a probe is read against.")
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoModel

    import automae_hf  # noqa: F401  (registers the AutoMAE classes)

    if args.train_dir is not None and args.eval_dir is None:
        parser.error("--train_dir needs --eval_dir, the image folder of the evaluation split")
    data = load_image_dataset(parser, args.dataset_name, args.train_dir, args.eval_dir, args.train_split,
                              args.eval_split, args.dataset_config_name)
    train = pick_split(parser, data, args.train_split, "--train_split")
    pick_split(parser, data, args.eval_split, "--eval_split")
    image_column = image_column_of(parser, train, args.image_column_name)
    label_column = label_column_of(parser, train, args.label_column_name)
    try:
        encoders = {"encoder": AutoModel.from_pretrained(args.model_name_or_path)}
        processor = load_image_processor(args.model_name_or_path, encoders["encoder"].config)
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
                                   range(args.seeds) if args.samples_per_class else None, args.probe_epochs)
        report.update(result) if name == "encoder" else report.update({name: result})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

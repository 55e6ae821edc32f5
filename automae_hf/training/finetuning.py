#!/usr/bin/env python
"""Finetune an exported AutoMAE encoder (or any AutoMAE / ViTMAE / ViT checkpoint) for image classification with the
Hugging Face `Trainer` (issue 4).

    python training/finetune.py --model_name_or_path runs/encoder --dataset_name cifar10 --output_dir runs/cls \
        --num_train_epochs 50 --learning_rate 1e-3 --layer_decay 0.75 --pooling cls
    python training/finetune.py ... --train_dir images/train --validation_dir images/val      # imagefolder
    python training/finetune.py ... --train_samples_per_class 10                              # few-shot
    python training/finetune.py ... --push_to_hub --hub_model_id org/automae-cls [--private --revision v1 --dry_run]

MAE's finetuning recipe, scaled down: RandomResizedCrop (0.08-1, bicubic) + horizontal flip (PIL/numpy, no
torchvision), AdamW with layer-wise lr decay (`--layer_decay`; param groups handed to the Trainer), warm-up + cosine,
evaluation every epoch, early stopping and the best checkpoint restored at the end. Grayscale / RGBA images are
converted to the model's channels. Accuracy: `evaluate.load("accuracy")` when it can be loaded (it fetches its
script from the Hub), otherwise the same number computed with numpy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

from .data import IMAGE_COLUMN_CANDIDATES, decode_image, one_line, random_resized_crop_box
from .hub import HubPushError, add_hub_arguments, check_hub_arguments, push_folder

logger = logging.getLogger("automae.finetune")

LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "coarse_label", "class", "target", "category")


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Finetune an AutoMAE / ViT encoder for image classification (HF Trainer).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset_name", default=None, help="Hub data set name or a `save_to_disk` folder.")
    d.add_argument("--dataset_config_name", default=None)
    d.add_argument("--train_dir", default=None, help="Image folder (imagefolder: class = sub-folder name).")
    d.add_argument("--validation_dir", default=None, help="Image folder for evaluation (with --train_dir).")
    d.add_argument("--train_split", default="train")
    d.add_argument("--validation_split", default=None,
                   help="Evaluation split; default the first of validation/valid/val/test, else a held-out part of train.")
    d.add_argument("--validation_split_percentage", type=float, default=10.0,
                   help="Share of train held out for evaluation when the data set has no evaluation split.")
    d.add_argument("--image_column_name", default=None, help=f"Detected among {IMAGE_COLUMN_CANDIDATES} when unset.")
    d.add_argument("--label_column_name", default=None,
                   help=f"Detected (a ClassLabel column, else {LABEL_COLUMN_CANDIDATES}) when unset.")
    d.add_argument("--train_samples_per_class", type=int, default=None, help="Few-shot: N training images per class.")
    d.add_argument("--max_train_samples", type=int, default=None)
    d.add_argument("--max_eval_samples", type=int, default=None)
    d.add_argument("--no_augmentation", action="store_true", help="Train on resized images (no crop / flip).")
    d.add_argument("--cache_dir", default=None)

    m = p.add_argument_group("model")
    m.add_argument("--model_name_or_path", required=True,
                   help="Exported encoder, pretraining folder, finetuned AutoMAE, ViTMAE or ViT checkpoint (folder/Hub id).")
    m.add_argument("--pooling", choices=("cls", "mean"), default=None,
                   help="Head on the CLS token or the mean patch token (AutoMAE models; default: the checkpoint's).")
    m.add_argument("--trust_remote_code", action="store_true", help="Allow remote code for non-AutoMAE checkpoints.")

    t = p.add_argument_group("training")
    t.add_argument("--output_dir", required=True)
    t.add_argument("--num_train_epochs", type=float, default=10)
    t.add_argument("--max_steps", type=int, default=-1)
    t.add_argument("--per_device_train_batch_size", type=int, default=64)
    t.add_argument("--per_device_eval_batch_size", type=int, default=128)
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--learning_rate", type=float, default=1e-3, help="Peak lr of the head / last layers.")
    t.add_argument("--layer_decay", type=float, default=0.75, help="lr x layer_decay^(depth from the top); 1: none.")
    t.add_argument("--weight_decay", type=float, default=0.05, help="Not on biases, norms, tokens.")
    t.add_argument("--adam_beta2", type=float, default=0.999)
    t.add_argument("--warmup_ratio", type=float, default=0.1)
    t.add_argument("--label_smoothing_factor", type=float, default=0.0)
    t.add_argument("--early_stopping_patience", type=int, default=5, help="Epochs without improvement; 0: off.")
    t.add_argument("--eval_strategy", choices=("epoch", "no"), default="epoch",
                   help="epoch: evaluate and checkpoint every epoch, restore the best; no: a fixed schedule, the last "
                        "weights evaluated once at the end (no model selection on the evaluation split).")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--logging_steps", type=int, default=10)
    t.add_argument("--dataloader_num_workers", type=int, default=min(4, os.cpu_count() or 1))
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--fp16", action="store_true")
    t.add_argument("--license", default="apache-2.0", help="License in the model card metadata.")
    add_hub_arguments(p)
    return p


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def load_splits(args, parser):
    """-> (train, eval, image column, label column, label names)."""
    import datasets

    if args.dataset_name is None and args.train_dir is None:
        parser.error("give --dataset_name (Hub name or save_to_disk folder) or --train_dir (image folder)")
    try:
        if args.train_dir is not None:
            for folder in (args.train_dir, args.validation_dir):
                if folder is not None and not os.path.isdir(folder):
                    parser.error(f"{folder!r} is not an existing folder")
            files = {"train": os.path.join(args.train_dir, "**")}
            if args.validation_dir:
                files["validation"] = os.path.join(args.validation_dir, "**")
            data = datasets.load_dataset("imagefolder", data_files=files, cache_dir=args.cache_dir)
        elif os.path.isdir(args.dataset_name):
            data = datasets.load_from_disk(args.dataset_name)
        elif args.dataset_name.startswith((".", "/", "~")):
            parser.error(f"--dataset_name {args.dataset_name!r}: no such folder")
        else:
            data = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001
        parser.error(f"cannot load the data set ({args.dataset_name or args.train_dir}): {one_line(error)}")
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({"train": data})
    if args.train_split not in data:
        parser.error(f"--train_split {args.train_split!r} not in the data set's splits {list(data)}")
    train = data[args.train_split]
    eval_split = args.validation_split or next((s for s in ("validation", "valid", "val", "test") if s in data), None)
    if args.validation_split and args.validation_split not in data:
        parser.error(f"--validation_split {args.validation_split!r} not in the data set's splits {list(data)}")

    columns = train.column_names
    image_column = args.image_column_name or next((c for c in IMAGE_COLUMN_CANDIDATES if c in columns), None)
    if image_column is None or image_column not in columns:
        parser.error(f"no image column {args.image_column_name or ''} among {columns}; name it with --image_column_name")
    label_column = args.label_column_name
    if label_column is None:
        label_column = next((c for c, f in train.features.items() if isinstance(f, datasets.ClassLabel)), None)
        label_column = label_column or next((c for c in LABEL_COLUMN_CANDIDATES if c in columns), None)
    if label_column is None or label_column not in columns:
        parser.error(f"no label column {args.label_column_name or ''} among {columns}; name it with --label_column_name")

    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:  # strings or integers: classes in sorted order
        values = set(train[label_column]) | (set(data[eval_split][label_column]) if eval_split else set())
        names = [str(v) for v in sorted(values)]
        index = {v: i for i, v in enumerate(sorted(values))}
        data = data.map(lambda e: {label_column: index[e[label_column]]}, desc="label ids")
        train = data[args.train_split]
    if eval_split is None:
        held_out = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed,
                                          stratify_by_column=label_column
                                          if isinstance(train.features[label_column], datasets.ClassLabel) else None)
        train, evaluation, eval_split = held_out["train"], held_out["test"], f"{args.train_split} (held out)"
    else:
        evaluation = data[eval_split]
    if args.train_samples_per_class is not None:
        train = few_shot(train, label_column, args.train_samples_per_class, args.seed)
    if args.max_train_samples is not None:
        train = train.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    if isinstance(train.features[image_column], datasets.Image):  # decode in the transform (corrupt -> clear error)
        train = train.cast_column(image_column, datasets.Image(decode=False))
    if isinstance(evaluation.features[image_column], datasets.Image):
        evaluation = evaluation.cast_column(image_column, datasets.Image(decode=False))
    if len(train) == 0 or len(evaluation) == 0:
        parser.error("the training or evaluation set is empty")
    return train, evaluation, image_column, label_column, names, eval_split


def few_shot(dataset, label_column: str, per_class: int, seed: int):
    """The first `per_class` examples of each class after a seeded shuffle."""
    labels = np.asarray(dataset[label_column])
    order = np.random.default_rng(seed).permutation(len(labels))
    keep, counts = [], {}
    for i in order:
        label = int(labels[i])
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            keep.append(int(i))
    return dataset.select(sorted(keep))


class ImageTransform:
    """Decoded image -> normalised `[C, size, size]` float32. Train: RandomResizedCrop(0.08-1, bicubic) + flip; eval:
    resize to size x size, which is what the saved image processor (and `pipeline`) does."""

    def __init__(self, size: int, mean, std, mode: str, train: bool, seed: int):
        self.size, self.mode, self.train, self.seed = size, mode, train, seed
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.calls = 0

    def __call__(self, value) -> np.ndarray:
        image = decode_image(value, self.mode)
        if self.train:
            rng = np.random.default_rng([self.seed, os.getpid(), self.calls])
            self.calls += 1
            left, top, w, h = random_resized_crop_box(image.width, image.height, rng, scale=(0.08, 1.0))
            image = image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            image = image.resize((self.size, self.size), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[:, :, None]
        return np.ascontiguousarray(((array - self.mean) / self.std).transpose(2, 0, 1))


def with_transform(dataset, transform: ImageTransform, image_column: str, label_column: str):
    def apply(batch):
        return {"pixel_values": [torch.from_numpy(transform(v)) for v in batch[image_column]],
                "labels": list(batch[label_column])}

    return dataset.with_transform(apply)


def collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)}


# ----------------------------------------------------------------------------------------------------------------
# Model and optimizer
# ----------------------------------------------------------------------------------------------------------------
def load_model(args, parser, names):
    """AutoMAE / ViTMAE folders -> `AutoMAEForImageClassification`; other ViT-family -> `AutoModelForImageClassification`."""
    import automae_hf  # noqa: F401
    from transformers import AutoConfig, AutoModelForImageClassification

    from automae_hf import AutoMAEForImageClassification

    labels = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path, cache_dir=args.cache_dir,
                                            trust_remote_code=args.trust_remote_code)
    except Exception as error:  # noqa: BLE001
        parser.error(f"cannot read the checkpoint {args.model_name_or_path!r}: {one_line(error)}")
    try:
        if config.model_type in ("automae", "vit_mae"):
            extra = {"pooling": args.pooling} if args.pooling else {}
            model = AutoMAEForImageClassification.from_pretrained(
                args.model_name_or_path, cache_dir=args.cache_dir, ignore_mismatched_sizes=True, **labels, **extra)
        else:
            if args.pooling == "mean":
                parser.error(f"--pooling mean needs an AutoMAE checkpoint (got model_type {config.model_type!r})")
            model = AutoModelForImageClassification.from_pretrained(
                args.model_name_or_path, cache_dir=args.cache_dir, ignore_mismatched_sizes=True,
                trust_remote_code=args.trust_remote_code, **labels)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001
        parser.error(f"cannot load {args.model_name_or_path!r} for classification: {one_line(error)}")
    return model


_LAYER = re.compile(r"(?:^|\.)(?:layer|layers)\.(\d+)\.")


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings (patch projection, CLS, positions), i + 1 for block i, num_layers + 1 for the final norm and
    the head (BEiT / MAE's layer-wise decay)."""
    match = _LAYER.search(name)
    if match:
        return int(match.group(1)) + 1
    if "embeddings" in name or "cls_token" in name:
        return 0
    return num_layers + 1


def param_groups_lrd(model, learning_rate: float, weight_decay: float, layer_decay: float):
    """AdamW parameter groups: lr = learning_rate * layer_decay^(num_layers + 1 - layer id); no decay on 1-D
    tensors, biases and tokens. Frozen tensors (fixed sin-cos positions) are left out."""
    num_layers = model.config.num_hidden_layers
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(".bias") or "token" in name or "position" in name
        layer = layer_id(name, num_layers)
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr": learning_rate * layer_decay ** (num_layers + 1 - layer), "layer_id": layer}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def accuracy_metric():
    """`evaluate`'s accuracy when its script can be loaded (it comes from the Hub), else a numpy equivalent."""
    try:
        import evaluate

        metric = evaluate.load("accuracy")
        return lambda predictions, references: metric.compute(predictions=predictions, references=references), "evaluate"
    except Exception as error:  # noqa: BLE001
        logger.info("evaluate.load('accuracy') unavailable (%s): computing accuracy with numpy", one_line(error)[:120])
        return (lambda predictions, references: {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))},
                "numpy")


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_hub_arguments(args, parser)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not 0 < args.layer_decay <= 1:
        parser.error(f"--layer_decay must lie in (0, 1], got {args.layer_decay}")
    if args.train_samples_per_class is not None and args.train_samples_per_class < 1:
        parser.error("--train_samples_per_class must be >= 1")

    from transformers import AutoImageProcessor, EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

    set_seed(args.seed)
    train, evaluation, image_column, label_column, names, eval_split = load_splits(args, parser)
    model = load_model(args, parser, names)
    config = model.config
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    mode = {1: "L", 3: "RGB"}.get(config.num_channels)
    if mode is None:
        parser.error(f"num_channels={config.num_channels}: only grayscale (1) or RGB (3) models are supported")
    try:
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, cache_dir=args.cache_dir)
    except Exception:  # noqa: BLE001
        from .export import load_image_processor

        processor = load_image_processor(args.model_name_or_path, config, args.cache_dir)
    processor.size = {"height": size, "width": size}
    if config.num_channels == 3:
        processor.do_convert_rgb = True
    mean = list(processor.image_mean)[: config.num_channels]
    std = list(processor.image_std)[: config.num_channels]
    mean = mean * config.num_channels if len(mean) == 1 else mean
    std = std * config.num_channels if len(std) == 1 else std

    train_ds = with_transform(train, ImageTransform(size, mean, std, mode, not args.no_augmentation, args.seed),
                              image_column, label_column)
    eval_ds = with_transform(evaluation, ImageTransform(size, mean, std, mode, False, args.seed), image_column,
                             label_column)
    compute, metric_source = accuracy_metric()

    def compute_metrics(prediction):
        logits, labels = prediction
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        return compute(np.argmax(logits, axis=-1), labels)

    steps_per_epoch = math.ceil(len(train) / (args.per_device_train_batch_size * args.gradient_accumulation_steps))
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta2=args.adam_beta2,
        lr_scheduler_type="cosine",
        warmup_steps=int(round(args.warmup_ratio * steps_per_epoch * max(args.num_train_epochs, 1)))
        if args.max_steps <= 0 else int(round(args.warmup_ratio * args.max_steps)),
        label_smoothing_factor=args.label_smoothing_factor,
        eval_strategy=args.eval_strategy,
        save_strategy=args.eval_strategy,
        save_total_limit=2,
        load_best_model_at_end=args.eval_strategy == "epoch",
        metric_for_best_model="accuracy",
        greater_is_better=True,
        logging_steps=args.logging_steps,
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        dataloader_num_workers=args.dataloader_num_workers,
        report_to="none",
        seed=args.seed,
        bf16=args.bf16,
        fp16=args.fp16,
    )
    # layer-wise lr decay needs our own param groups; fused as the Trainer's default optimizer (adamw_torch_fused)
    optimizer = torch.optim.AdamW(param_groups_lrd(model, args.learning_rate, args.weight_decay, args.layer_decay),
                                  lr=args.learning_rate, betas=(0.9, args.adam_beta2), fused=True)
    selecting = args.eval_strategy == "epoch" and args.early_stopping_patience > 0
    callbacks = [EarlyStoppingCallback(args.early_stopping_patience)] if selecting else []
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collate, compute_metrics=compute_metrics, optimizers=(optimizer, None),
                      callbacks=callbacks)
    logger.info("Finetuning %s: %d classes, %d train / %d eval images (%s), %d layers with layer decay %.2f, "
                "pooling %s, accuracy via %s", args.model_name_or_path, len(names), len(train), len(evaluation),
                eval_split, config.num_hidden_layers, args.layer_decay, getattr(config, "pooling", "cls"),
                metric_source)
    train_result = trainer.train()
    trainer.save_model(args.output_dir)  # the best checkpoint (load_best_model_at_end), else the last weights
    processor.save_pretrained(args.output_dir)
    metrics = {**train_result.metrics, **trainer.evaluate()}
    metrics.update(eval_split=eval_split, train_samples=len(train), eval_samples=len(evaluation),
                   accuracy_source=metric_source, best_checkpoint=trainer.state.best_model_checkpoint)
    trainer.save_metrics("all", {k: v for k, v in metrics.items() if v is not None})
    trainer.save_state()

    from .model_card import write_card

    settings = [("base model", args.model_name_or_path), ("data set", args.dataset_name or args.train_dir),
                ("classes", len(names)), ("train / eval images", f"{len(train)} / {len(evaluation)}"),
                ("few-shot (per class)", args.train_samples_per_class or "all"),
                ("epochs run", f"{metrics.get('epoch', '—')}"), ("learning rate", args.learning_rate),
                ("layer decay", args.layer_decay), ("weight decay", args.weight_decay),
                ("pooling", getattr(config, "pooling", "cls")), ("batch size", args.per_device_train_batch_size),
                ("augmentation", "none" if args.no_augmentation else "RandomResizedCrop(0.08-1) + flip"),
                ("accuracy computed by", metric_source)]
    write_card("finetuned", args.output_dir, repo_id=args.hub_model_id, dataset_name=args.dataset_name,
               base_model=args.model_name_or_path, results=metrics, license=args.license,
               extra_settings=[(k, str(v)) for k, v in settings])
    print(json.dumps({"eval_accuracy": metrics.get("eval_accuracy"), "output_dir": args.output_dir}))
    if args.push_to_hub:
        try:
            push_folder(args.output_dir, args.hub_model_id, args.private, args.revision, args.hub_token,
                        dry_run=args.dry_run)
        except HubPushError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Finetune an exported AutoMAE encoder (or any AutoMAE / ViTMAE / ViT checkpoint) for image classification with the
Hugging Face `Trainer`, on `HfArgumentParser` + `TrainingArguments` like transformers' own
`examples/pytorch/image-classification/run_image_classification.py`.

    python training/finetune.py --model_name_or_path runs/encoder --dataset_name cifar10 --output_dir runs/cls \
        --num_train_epochs 50 --learning_rate 1e-3 --layer_decay 0.75 --pooling cls
    python training/finetune.py ... --train_dir images/train --validation_dir images/val      # imagefolder
    python training/finetune.py ... --train_samples_per_class 10                              # few-shot
    python training/finetune.py ... --push_to_hub --hub_model_id org/automae-cls [--hub_private_repo --hub_revision v1]
    python training/finetune.py ... --resume_from_checkpoint latest                           # or a checkpoint folder
    python training/finetune.py args.json                                                     # every flag from a file

Every `TrainingArguments` flag works (`--report_to`, `--activation_checkpointing`, `--torch_compile`, `--fsdp`,
`--deepspeed`, `--hub_strategy`, ...); the defaults differ where MAE's recipe does (lr 1e-3, weight decay 0.05,
10 epochs, cosine schedule with 10% warm-up, evaluation and checkpoints every epoch, the best checkpoint restored at
the end). The old hub spellings `--private` and `--revision` still work (aliases of `--hub_private_repo` and
`--hub_revision`); `--dry_run` lists what `--push_to_hub` would upload and uploads nothing.

MAE's finetuning recipe, scaled down: RandomResizedCrop (0.08-1, bicubic) + horizontal flip (PIL/numpy, no
torchvision), AdamW (fused, the Trainer's default `--optim`) with layer-wise lr decay built by the Trainer's own
`create_optimizer` (so FSDP / DeepSpeed see it), warm-up + cosine, early stopping. Augmentation is a function of
(seed, epoch, index): two runs with the same `--seed` give the same weights, and a resumed run sees the same pixels.
A few-shot epoch of one or two optimizer steps is evaluated every few epochs instead, so that early stopping counts
at least `early_stopping_patience` x 10 optimizer steps. Grayscale / RGBA images are converted to the model's
channels. Accuracy: `evaluate.load("accuracy")` when it can be loaded (it fetches its script from the Hub), otherwise
the same number computed with numpy.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

from .data import (
    DATA_LAYOUT,
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    EpochDataset,
    decode_image,
    image_column_of,
    label_column_of,
    load_image_dataset,
    load_image_processor,
    one_line,
    pick_split,
    random_resized_crop_box,
    undecoded,
)
from .hub import push_folder
from .model_card import dataset_label, public_name

logger = logging.getLogger("automae.finetune")

# Split names that mean "held back for model selection"; any other evaluation split (test, ...) is a reported split.
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "dev")
# A split of this name, when it is not the evaluation split, is evaluated once at the end (test_accuracy).
TEST_SPLIT_NAME = "test"
# Fewer optimizer steps than this per epoch: evaluate every few epochs instead (a few-shot epoch is 1-2 steps).
MIN_STEPS_BETWEEN_EVALUATIONS = 10
# What `Trainer.push_to_hub` leaves out of the upload; the dry run lists the same files.
TRAINER_PUSH_IGNORE = ("_*", "checkpoint-*")


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """Which checkpoint to finetune and how its head pools the tokens."""

    model_name_or_path: str = field(metadata={
        "help": "Exported encoder, pretraining folder, finetuned AutoMAE, ViTMAE or ViT checkpoint (folder/Hub id)."})
    pooling: str | None = field(default=None, metadata={
        "choices": ("cls", "mean"),
        "help": "Head on the CLS token or the mean patch token (AutoMAE models; default: the checkpoint's)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow remote code for non-AutoMAE checkpoints."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub models and data sets."})


@dataclass
class DataArguments:
    """Where the images come from, which columns hold them, and how many are used."""

    dataset_name: str | None = field(default=None, metadata={"help": f"Hub data set, `save_to_disk` folder or image-folder root. {DATA_LAYOUT}"})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub data set."})
    train_dir: str | None = field(default=None, metadata={
        "help": "Image folder (imagefolder: class = sub-folder name)."})
    validation_dir: str | None = field(default=None, metadata={
        "help": "Image folder for evaluation (with --train_dir)."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    validation_split: str | None = field(default=None, metadata={
        "help": "Evaluation split (model selection, early stopping); default the first of "
                f"{'/'.join(VALIDATION_SPLIT_NAMES)}, else a held-out part of train. A '{TEST_SPLIT_NAME}' split "
                "that is not this one is evaluated once at the end."})
    validation_split_percentage: float = field(default=10.0, metadata={
        "help": "Share of train held out for evaluation when the data set has no validation split."})
    image_column_name: str | None = field(default=None, metadata={
        "help": f"Detected among {IMAGE_COLUMN_CANDIDATES} when unset."})
    label_column_name: str | None = field(default=None, metadata={
        "help": f"Detected (a ClassLabel column, else {LABEL_COLUMN_CANDIDATES}) when unset."})
    train_samples_per_class: int | None = field(default=None, metadata={"help": "Few-shot: N training images per class."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many evaluation images."})
    no_augmentation: bool = field(default=False, metadata={"help": "Train on resized images (no crop / flip)."})


@dataclass
class FinetuningArguments(TrainingArguments):
    """`TrainingArguments` with MAE's finetuning defaults where they differ, plus layer decay, warm-up ratio, early
    stopping patience, the card's license and the hub dry run. Fields left alone keep the Trainer's defaults."""

    output_dir: str = field(metadata={"help": "Where the finetuned model, checkpoints and results are written."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs (ignored when --max_steps > 0)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size per device."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak lr of the head / last layers."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay; not on biases, norms, tokens."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    eval_strategy: IntervalStrategy | str = field(default="epoch", metadata={
        "help": "epoch: evaluate and checkpoint every epoch (every few epochs when an epoch has fewer than "
                f"{MIN_STEPS_BETWEEN_EVALUATIONS} optimizer steps), restore the best; steps: every --eval_steps; "
                "no: a fixed schedule, the last weights evaluated once at the end (no model selection)."})
    save_strategy: str | None = field(default=None, metadata={
        "choices": ("no", "steps", "epoch", "best"),
        "help": "Checkpoint cadence; default the same as --eval_strategy (and --save_steps = --eval_steps)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept (the best one is never removed)."})
    load_best_model_at_end: bool | None = field(default=None, metadata={
        "help": "Restore the best checkpoint at the end; default on whenever there is evaluation during training."})
    metric_for_best_model: str | None = field(default="accuracy", metadata={"help": "Metric for model selection."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Must stay off: the image data sets have no model-argument columns."})
    dataloader_num_workers: int = field(default=min(4, os.cpu_count() or 1), metadata={
        "help": "Processes decoding and augmenting images."})
    dataloader_persistent_workers: bool = field(default=True, metadata={
        "help": "Keep the workers between epochs (a few-shot epoch is shorter than starting them); off without "
                "workers. The augmentation does not depend on it."})
    dataloader_pin_memory: bool = field(default=torch.cuda.is_available(), metadata={
        "help": "Pin host memory (only useful with a GPU)."})
    hub_private_repo: bool | None = field(default=None, metadata={
        "aliases": ["--private"], "nargs": "?", "const": True,  # a bare flag, as the old --private was
        "help": "Create the Hub repository as private (old spelling: --private); default the account's setting."})
    hub_revision: str | None = field(default=None, metadata={
        "aliases": ["--revision"], "help": "Branch to push to, created when missing (old spelling: --revision)."})
    layer_decay: float = field(default=0.75, metadata={
        "help": "lr x layer_decay^(depth from the top), in (0, 1]; 1: the same lr everywhere."})
    warmup_steps: float | None = field(default=None, metadata={
        "help": "Warm-up optimizer steps (0: none; a float in (0, 1): a share of the schedule); default: "
                "--warmup_ratio."})
    warmup_ratio: float = field(default=0.1, metadata={
        "help": "Share of the optimizer steps spent warming up, in [0, 1); ignored when --warmup_steps is given."})
    early_stopping_patience: int = field(default=5, metadata={
        "help": "Evaluations without improvement before stopping (an evaluation spans at least "
                f"{MIN_STEPS_BETWEEN_EVALUATIONS} optimizer steps with --eval_strategy epoch); 0: off."})
    license: str = field(default="apache-2.0", metadata={"help": "License in the model card metadata."})
    dry_run: bool = field(default=False, metadata={
        "help": "With --push_to_hub: list what would be uploaded, upload nothing (no Hub call at all)."})

    def __post_init__(self):
        """Checks our fields, then fills in what follows from the others before `TrainingArguments` validates them:
        the warm-up as a share of the schedule, checkpoints where the evaluations are, and restoring the best one
        whenever there is evaluation during training."""
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer_decay must lie in (0, 1], got {self.layer_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.early_stopping_patience < 0:
            raise ValueError(f"--early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        if self.warmup_steps is None:  # not given (an explicit 0 means no warm-up)
            self.warmup_steps = self.warmup_ratio  # a float below 1 is a share of the schedule for the Trainer
        if self.dataloader_num_workers == 0:
            self.dataloader_persistent_workers = False  # the DataLoader refuses it without workers
        eval_strategy = _value(self.eval_strategy)
        if self.save_strategy is None:
            self.save_strategy = eval_strategy
            if eval_strategy == "steps":
                self.save_steps = self.eval_steps or self.logging_steps  # the Trainer's eval_steps fallback
        if self.load_best_model_at_end is None:
            self.load_best_model_at_end = eval_strategy != "no" and _value(self.save_strategy) in (eval_strategy, "best")
        super().__post_init__()


def _value(option) -> str:
    """An enum option of TrainingArguments (after validation) or its string (before) -> the string."""
    return str(getattr(option, "value", option))


def build_parser() -> HfArgumentParser:
    """The command line: every field of the three dataclasses is a `--flag`, TrainingArguments' included."""
    return HfArgumentParser((ModelArguments, DataArguments, FinetuningArguments),
                            description="Finetune an AutoMAE / ViT encoder for image classification (HF Trainer).")


def parse_arguments(argv=None):
    """-> (parser, ModelArguments, DataArguments, FinetuningArguments). One `.json` / `.yaml` file argument holds
    every flag; bad values end in one `error:` line (argparse's exit code 2), not a traceback."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            parsed = parser.parse_json_file(os.path.abspath(argv[0]))
        elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            parsed = parser.parse_yaml_file(os.path.abspath(argv[0]))
        else:
            parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False,
                                                        return_remaining_strings=True)
            if parsed[-1]:
                parser.error(f"unrecognized arguments: {' '.join(parsed[-1])}")
            parsed = parsed[:-1]
    except (ValueError, OSError) as error:  # a dataclass refusing a value, an unreadable arguments file
        parser.error(one_line(error))
    model_args, data_args, training_args = parsed
    if training_args.push_to_hub and not training_args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. org/name)")
    if training_args.dry_run and not training_args.push_to_hub:
        parser.error("--dry_run only applies with --push_to_hub")
    if data_args.train_samples_per_class is not None and data_args.train_samples_per_class < 1:
        parser.error(f"--train_samples_per_class must be >= 1, got {data_args.train_samples_per_class}")
    if not 0 < data_args.validation_split_percentage < 100:
        parser.error(f"--validation_split_percentage must lie in (0, 100), got {data_args.validation_split_percentage}")
    return parser, model_args, data_args, training_args


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
class Splits(NamedTuple):
    """What `load_splits` chose: `evaluation` selects the checkpoint and stops early; `test` (None when absent or
    when it is the evaluation split) is only evaluated at the end."""

    train: object
    evaluation: object
    test: object
    image_column: str
    label_column: str
    names: list
    eval_split: str
    test_split: str | None


def load_splits(args: DataArguments, parser, seed: int, cache_dir=None) -> Splits:
    """The training, evaluation and test splits. Evaluation: `--validation_split`, else the first validation-named
    split, else `--validation_split_percentage` % of train held out (never the test split unless asked for)."""
    import datasets

    data = load_image_dataset(parser, args.dataset_name, args.train_dir, eval_dir=args.validation_dir,
                              train_split="train", eval_split="validation",
                              dataset_config_name=args.dataset_config_name, cache_dir=cache_dir)
    train = pick_split(parser, data, args.train_split, "--train_split")
    eval_split = args.validation_split or next((s for s in VALIDATION_SPLIT_NAMES if s in data), None)
    if args.validation_split:
        pick_split(parser, data, args.validation_split, "--validation_split")
    image_column = image_column_of(parser, train, args.image_column_name)
    label_column = label_column_of(parser, train, args.label_column_name)
    test_split = TEST_SPLIT_NAME if TEST_SPLIT_NAME in data and TEST_SPLIT_NAME != eval_split else None
    if test_split and (label_column not in data[test_split].column_names or not len(data[test_split])
                       or {-1, None} & set(data[test_split][label_column])):  # -1: ClassLabel's "no label"
        logger.warning("The %r split is empty or lacks labels: it is not evaluated", test_split)
        test_split = None
    used = [s for s in dict.fromkeys((args.train_split, eval_split, test_split)) if s is not None]
    data = datasets.DatasetDict({s: data[s] for s in used})  # the label mapping below touches these only

    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:  # strings or integers: classes in sorted order
        values = set().union(*(data[s][label_column] for s in used))
        names = [str(v) for v in sorted(values)]
        index = {v: i for i, v in enumerate(sorted(values))}
        data = data.map(lambda e: {label_column: index[e[label_column]]}, desc="label ids")
        train = data[args.train_split]
    if eval_split is None:
        held_out = train.train_test_split(test_size=args.validation_split_percentage / 100, seed=seed,
                                          stratify_by_column=label_column
                                          if isinstance(train.features[label_column], datasets.ClassLabel) else None)
        train, evaluation, eval_split = held_out["train"], held_out["test"], f"{args.train_split} (held out)"
    else:
        evaluation = data[eval_split]
    if args.train_samples_per_class is not None:
        train = few_shot(train, label_column, args.train_samples_per_class, seed)
    if args.max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(args.max_train_samples, len(train))))
    test = data[test_split] if test_split else None
    if args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
        test = test.select(range(min(args.max_eval_samples, len(test)))) if test is not None else None

    train, evaluation = undecoded(train, image_column), undecoded(evaluation, image_column)
    test = undecoded(test, image_column) if test is not None else None
    if len(train) == 0 or len(evaluation) == 0:
        parser.error("the training or evaluation set is empty")
    return Splits(train, evaluation, test, image_column, label_column, names, eval_split, test_split)


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


def selects_on_reported_split(eval_split: str) -> bool:
    """True when `eval_split` is not a validation split (nor a held-out part of train): choosing the best
    checkpoint on it makes the accuracy reported on that same split optimistic."""
    return eval_split.lower() not in VALIDATION_SPLIT_NAMES and not eval_split.endswith("(held out)")


class ClassificationImages(EpochDataset):
    """A `datasets` split -> {"pixel_values": `[C, size, size]` float32, "labels": int}, decoded in the DataLoader
    workers. Training: RandomResizedCrop(0.08-1, bicubic) + flip drawn from `default_rng([seed, epoch, index])`, so the
    pixels depend on the seed, the epoch and the image only (not on the worker, the process or the call order);
    evaluation: resize to size x size, which is what the saved image processor (and `pipeline`) does."""

    def __init__(self, data, image_column: str, label_column: str, size: int, mean, std, mode: str, augment: bool,
                 seed: int):
        super().__init__(data)
        self.image_column, self.label_column = image_column, label_column
        self.size, self.mode, self.augment, self.seed = size, mode, augment, seed
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def pixels(self, value, index: int) -> np.ndarray:
        image = decode_image(value, self.mode)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
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

    def __getitem__(self, index: int):
        example = self.data[int(index)]
        try:
            array = self.pixels(example[self.image_column], int(index))
        except Exception as error:  # noqa: BLE001  (one line naming the image instead of a worker traceback)
            raise RuntimeError(f"cannot decode image {index} of the data set: {one_line(error)}") from None
        return {"pixel_values": torch.from_numpy(array), "labels": int(example[self.label_column])}


class EpochToDataset(TrainerCallback):
    """Tells the training set which epoch starts, so its augmentation is a function of (seed, epoch, index); also
    right after `--resume_from_checkpoint`, where the Trainer's state holds the epoch reached."""

    def __init__(self, dataset: ClassificationImages):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int((state.epoch or 0) + 1e-6))  # state.epoch is a float count of epochs done


def collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)}


# ----------------------------------------------------------------------------------------------------------------
# Model and optimizer
# ----------------------------------------------------------------------------------------------------------------
def load_model(args: ModelArguments, parser, names):
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
    the head (BEiT / MAE's layer-wise decay). Wrapper prefixes (FSDP, DDP, compile) do not change the answer."""
    match = _LAYER.search(name)
    if match:
        return int(match.group(1)) + 1
    if "embeddings" in name or "cls_token" in name:
        return 0
    return num_layers + 1


def param_groups_lrd(model, learning_rate: float, weight_decay: float, layer_decay: float,
                     num_layers: int | None = None):
    """AdamW parameter groups: lr = learning_rate * layer_decay^(num_layers + 1 - layer id); no decay on 1-D
    tensors, biases and tokens. Frozen tensors (fixed sin-cos positions) are left out. `num_layers` defaults to
    `model.config.num_hidden_layers` (give it when `model` is a wrapper without a config)."""
    num_layers = model.config.num_hidden_layers if num_layers is None else num_layers
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


def takes_param_groups(optimizer_cls, optimizer_kwargs) -> bool:
    """False for the `--optim` choices that build their own parameter groups (GaLore, LOMO, Muon, ...): a factory
    instead of an optimizer class, or keyword arguments that replace the parameters."""
    is_class = isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)
    return is_class and not {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)


def check_optimizer(args: FinetuningArguments, model, parser) -> None:
    """Fails in one line, before any training, on an `--optim` that cannot be built (a missing package) or that
    cannot take the layer-decay parameter groups."""
    optim = _value(args.optim)
    try:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    except Exception as error:  # noqa: BLE001  (unknown optimizer, optional package not installed)
        parser.error(f"--optim {optim}: {one_line(error)}")
    if args.layer_decay != 1 and not takes_param_groups(optimizer_cls, optimizer_kwargs):
        parser.error(f"--optim {optim} builds its own parameter groups: use it with --layer_decay 1")


class FinetuningTrainer(Trainer):
    """`Trainer` whose optimizer has one parameter group per (layer, decay / no decay) with the layer-decayed lr.

    The optimizer is still created by the Trainer (`create_optimizer`, at the moment it chooses: after FSDP /
    DeepSpeed wrapping), with the class and keyword arguments of `--optim` (fused AdamW by default); the lr schedule
    scales every group's lr alike. Checkpoints (resuming, the best one at the end) are restored by the Trainer's own
    `load_state_dict`, which AutoMAE models read under their saved key names too. `create_model_card` writes this
    project's card (`model_card.write_card`) instead of the Trainer's, so `push_to_hub` uploads it."""

    card_kwargs: dict | None = None

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = (self.optimizer_cls_and_kwargs
                                           or self.get_optimizer_cls_and_kwargs(self.args, opt_model))
        if not takes_param_groups(optimizer_cls, optimizer_kwargs):
            if self.args.layer_decay != 1:  # main() refuses this combination before training
                raise ValueError(f"--optim {_value(self.args.optim)} builds its own parameter groups: use it "
                                 "with --layer_decay 1")
            return super().create_optimizer(model)
        num_layers = self.accelerator.unwrap_model(self.model).config.num_hidden_layers
        groups = param_groups_lrd(opt_model, self.args.learning_rate, self.args.weight_decay, self.args.layer_decay,
                                  num_layers=num_layers)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_model_card(self, **kwargs):
        if not self.is_world_process_zero():
            return
        from .model_card import write_card

        write_card("finetuned", self.args.output_dir, **(self.card_kwargs or {}))


def accuracy_metric():
    """`evaluate`'s accuracy when its script can be loaded (it comes from the Hub), else a numpy equivalent."""
    try:
        import evaluate
        from evaluate.utils.file_utils import DownloadConfig
        from huggingface_hub import constants

        # evaluate ignores HF_HUB_OFFLINE and retries the Hub for seconds; offline, only a cached script is used
        metric = evaluate.load("accuracy", download_config=DownloadConfig(local_files_only=constants.HF_HUB_OFFLINE))
        return lambda predictions, references: metric.compute(predictions=predictions, references=references), "evaluate"
    except Exception as error:  # noqa: BLE001
        logger.info("Computing accuracy with numpy, the same number: evaluate.load('accuracy') is unavailable. %s",
                    one_line(error))  # whole: a cut message hides why
        return (lambda predictions, references: {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))},
                "numpy")


def optimizer_steps_per_epoch(num_examples: int, args: TrainingArguments) -> int:
    """The Trainer's count: batches per process (all processes share an epoch), then gradient accumulation."""
    batches = math.ceil(num_examples / (args.train_batch_size * max(1, args.world_size)))
    return max(math.ceil(batches / args.gradient_accumulation_steps), 1)


def plan_evaluation(args: FinetuningArguments, steps_per_epoch: int) -> str:
    """Spaces evaluations (and the checkpoints that go with them) at least MIN_STEPS_BETWEEN_EVALUATIONS optimizer
    steps apart when `--eval_strategy epoch` meets a tiny (few-shot) epoch; otherwise leaves the arguments alone.

    Why: with 10 images per class an epoch is one or two steps, so evaluating every epoch writes a checkpoint per
    step and a patience of 5 epochs stops a 50-step schedule after about 10 steps, before anything is learnt.
    Evaluating every k whole epochs (k * steps_per_epoch >= the minimum) makes the patience span at least
    `early_stopping_patience` x that many steps. Returns a description for the log, results and model card."""
    if args.eval_strategy == IntervalStrategy.NO:
        return "none during training (fixed schedule, last weights)"
    if args.eval_strategy == IntervalStrategy.STEPS:
        return f"every {args.eval_steps:g} optimizer steps"
    if steps_per_epoch >= MIN_STEPS_BETWEEN_EVALUATIONS:
        return "every epoch"
    epochs = math.ceil(MIN_STEPS_BETWEEN_EVALUATIONS / steps_per_epoch)
    args.eval_strategy = IntervalStrategy.STEPS
    args.eval_steps = epochs * steps_per_epoch
    if args.save_strategy == SaveStrategy.EPOCH:  # checkpoints stay where the evaluations are
        args.save_strategy = SaveStrategy.STEPS
        args.save_steps = args.eval_steps
    logger.info("An epoch is %d optimizer step(s): evaluating every %d epochs (%d steps) instead of every epoch",
                steps_per_epoch, epochs, args.eval_steps)
    return f"every {epochs} epochs ({args.eval_steps} optimizer steps; an epoch is {steps_per_epoch})"


def resolve_checkpoint(value, output_dir: str, parser):
    """`--resume_from_checkpoint latest` (or true, as the Trainer) -> the newest checkpoint-* in --output_dir; a folder
    as it is."""
    from .checkpointing import LATEST_CHECKPOINT

    if value is None or str(value).lower() in ("false", "none", ""):
        return None
    if str(value).lower() in (LATEST_CHECKPOINT, "true"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            parser.error(f"--resume_from_checkpoint {value}: no checkpoint-* folder in {output_dir}")
        return last
    if not os.path.isdir(value):
        parser.error(f"--resume_from_checkpoint {value!r}: expected a checkpoint folder or '{LATEST_CHECKPOINT}'")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
class ModelInput(NamedTuple):
    """How the model reads images: the processor saved beside it, and the size, PIL mode and per-channel mean / std
    the training images are prepared with (the processor's own)."""

    processor: object
    size: int
    mode: str
    mean: list
    std: list


def model_input(model_args: ModelArguments, config, parser) -> ModelInput:
    """The checkpoint's image processor (`data.load_image_processor`: ImageNet's without one) at the model's size."""
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    mode = {1: "L", 3: "RGB"}.get(config.num_channels)
    if mode is None:
        parser.error(f"num_channels={config.num_channels}: only grayscale (1) or RGB (3) models are supported")
    processor = load_image_processor(model_args.model_name_or_path, config, model_args.cache_dir)
    processor.size = {"height": size, "width": size}

    def per_channel(values):  # one value stands for every channel
        values = list(values)[: config.num_channels]
        return values * config.num_channels if len(values) == 1 else values

    return ModelInput(processor, size, mode, per_channel(processor.image_mean), per_channel(processor.image_std))


def build_trainer(training_args: FinetuningArguments, model, train_ds, eval_ds, processor, accuracy, push: bool):
    """The `FinetuningTrainer` with `accuracy` (`accuracy_metric`'s function), the epoch callback and early stopping.
    With `push`, the Hub repository (and `--hub_revision`'s branch) is created here, before any training: a failure
    ends in one line."""
    from transformers import EarlyStoppingCallback

    def compute_metrics(prediction):
        logits, labels = prediction
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        return accuracy(np.argmax(logits, axis=-1), labels)

    callbacks = [EpochToDataset(train_ds)]
    if training_args.eval_strategy != IntervalStrategy.NO and training_args.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(training_args.early_stopping_patience))
    try:
        trainer = FinetuningTrainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                                    data_collator=collate, compute_metrics=compute_metrics, processing_class=processor,
                                    callbacks=callbacks)
        if push and training_args.hub_revision:  # the Trainer pushes to the branch but does not create it
            import transformers.trainer

            transformers.trainer.hf_api().create_branch(trainer.hub_model_id, branch=training_args.hub_revision,
                                                        token=training_args.hub_token, exist_ok=True)
    except Exception as error:  # noqa: BLE001  (push_to_hub creates the repository here, before any training)
        if not push:
            raise
        print(f"error: could not create the Hub repository {training_args.hub_model_id} (nothing was trained): "
              f"{one_line(error)[:300]}", file=sys.stderr)
        sys.exit(1)
    return trainer


def card_settings(model_args, data_args, training_args, splits: Splits, metrics: dict, state, selection: str,
                  model_pooling: str) -> list[tuple[str, str]]:
    """The run's settings as the model card's table rows (no local paths)."""
    test = f"{len(splits.test)} ({splits.test_split!r})" if splits.test is not None else "none"
    settings = [("base model", public_name(model_args.model_name_or_path)),
                ("data set", dataset_label(data_args.dataset_name, run_recorded=True)), ("classes", len(splits.names)),
                ("train / eval images", f"{len(splits.train)} / {len(splits.evaluation)}"),
                ("test images (reported only)", test),
                ("few-shot (per class)", data_args.train_samples_per_class or "all"),
                ("epochs run", f"{metrics.get('epoch', '—')}"),
                ("optimizer steps", f"{state.global_step} of {state.max_steps}"),
                ("learning rate", training_args.learning_rate), ("layer decay", training_args.layer_decay),
                ("weight decay", training_args.weight_decay), ("pooling", model_pooling),
                ("batch size", training_args.per_device_train_batch_size),
                ("augmentation", "none" if data_args.no_augmentation else "RandomResizedCrop(0.08-1) + flip"),
                ("evaluation", metrics["evaluation"]), ("model selection", selection), ("seed", metrics["seed"]),
                ("accuracy computed by", metrics["accuracy_source"])]
    return [(name, str(value)) for name, value in settings]


def save_or_push(trainer, training_args: FinetuningArguments, push: bool) -> None:
    """Saves the kept weights (the best checkpoint with `load_best_model_at_end`, else the last) with the processor
    and the card; with `push`, uploads them too, and a failed upload ends in one line (the folder stays complete)."""
    if not push:
        trainer.save_model()
        trainer.create_model_card()
        if training_args.dry_run and trainer.is_world_process_zero():
            push_folder(training_args.output_dir, training_args.hub_model_id, bool(training_args.hub_private_repo),
                        training_args.hub_revision, dry_run=True, ignore_patterns=TRAINER_PUSH_IGNORE)
        return
    try:  # saves the model and the processor, writes the card (create_model_card), uploads
        trainer.push_to_hub(commit_message="End of training")
    except Exception as error:  # noqa: BLE001  (offline, 401/403, ...: one clear line, the folder is complete)
        print(f"error: could not push {training_args.output_dir} to {training_args.hub_model_id}: "
              f"{one_line(error)[:300]}; the local folder is complete (retry with: huggingface-cli upload "
              f"{training_args.hub_model_id} {training_args.output_dir} .)", file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    parser, model_args, data_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from transformers import set_seed

    resume = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir, parser)
    push = training_args.push_to_hub and not training_args.dry_run
    training_args.push_to_hub = push  # a dry run must not create the repository either
    seed = training_args.seed
    set_seed(seed)  # the new head's initialisation
    splits = load_splits(data_args, parser, seed, model_args.cache_dir)
    eval_split = splits.eval_split
    model = load_model(model_args, parser, splits.names)
    check_optimizer(training_args, model, parser)
    config = model.config
    pooling = getattr(config, "pooling", "cls")
    inputs = model_input(model_args, config, parser)

    def images(split, augment: bool) -> ClassificationImages:
        return ClassificationImages(split, splits.image_column, splits.label_column, inputs.size, inputs.mean,
                                    inputs.std, inputs.mode, augment, seed)

    train_ds, eval_ds = images(splits.train, not data_args.no_augmentation), images(splits.evaluation, False)
    steps_per_epoch = optimizer_steps_per_epoch(len(splits.train), training_args)
    evaluation_plan = plan_evaluation(training_args, steps_per_epoch)
    selecting = training_args.load_best_model_at_end or (
        training_args.eval_strategy != IntervalStrategy.NO and training_args.early_stopping_patience > 0)
    on_reported_split = selecting and selects_on_reported_split(eval_split)
    if on_reported_split:
        logger.warning("Best-checkpoint selection and early stopping use the %r split, the same split the final "
                       "accuracy is reported on, so that accuracy is optimistic. Give a validation split "
                       "(--validation_split / --validation_dir) or train a fixed schedule (--eval_strategy no).",
                       eval_split)
    accuracy, metric_source = accuracy_metric()
    trainer = build_trainer(training_args, model, train_ds, eval_ds, inputs.processor, accuracy, push)
    logger.info("Finetuning %s: %d classes, %d train / %d eval images (%s), %d layers with layer decay %.2f, "
                "pooling %s, %d optimizer steps per epoch, evaluation %s, accuracy via %s",
                model_args.model_name_or_path, len(splits.names), len(splits.train), len(splits.evaluation),
                eval_split, config.num_hidden_layers, training_args.layer_decay, pooling, steps_per_epoch,
                evaluation_plan, metric_source)
    train_result = trainer.train(resume_from_checkpoint=resume)
    state = trainer.state
    metrics = {**train_result.metrics, **trainer.evaluate()}
    if splits.test is not None:  # the selected weights, on a split no choice was made on
        metrics.update(trainer.evaluate(images(splits.test, False), metric_key_prefix="test"),
                       test_split=splits.test_split, test_samples=len(splits.test))
    metrics.update(
        eval_split=eval_split, train_samples=len(splits.train), eval_samples=len(splits.evaluation),
        accuracy_source=metric_source,
        best_checkpoint=state.best_model_checkpoint if training_args.load_best_model_at_end else None,
        global_step=state.global_step, max_steps=state.max_steps, steps_per_epoch=steps_per_epoch,
        evaluation=evaluation_plan, stopped_early=state.global_step < state.max_steps,
        model_selection_split=eval_split if selecting else None, selected_on_reported_split=on_reported_split,
        seed=seed)
    trainer.save_metrics("all", {k: v for k, v in metrics.items() if v is not None})
    trainer.save_state()

    selection = (f"best checkpoint on {eval_split!r}" + (" (the reported split)" if on_reported_split else "")
                 if selecting else "none (last weights)")
    trainer.card_kwargs = dict(repo_id=training_args.hub_model_id, dataset_name=data_args.dataset_name,
                               base_model=model_args.model_name_or_path, results=metrics,
                               license=training_args.license,
                               extra_settings=card_settings(model_args, data_args, training_args, splits, metrics,
                                                            state, selection, pooling))
    if trainer.is_world_process_zero():
        print(json.dumps({"eval_accuracy": metrics.get("eval_accuracy"), "test_accuracy": metrics.get("test_accuracy"),
                          "output_dir": training_args.output_dir}))
    save_or_push(trainer, training_args, push)
    return metrics


if __name__ == "__main__":
    main()

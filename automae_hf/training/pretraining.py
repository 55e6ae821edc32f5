#!/usr/bin/env python
"""AutoMAE pretraining with Accelerate over Hugging Face datasets.

The same script runs with `python training/pretrain.py ...` (one process: CPU or one GPU) and
`accelerate launch training/pretrain.py ...` (DDP on CPU/GPUs/nodes, mixed precision, gradient accumulation).

One iteration (docs/method.md §3): teacher attention once (no grad) -> discriminator step (Adam) -> student + score-head
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
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch


from ..configuration_automae import MASKING_STRATEGIES as MASKING_CHOICES
from ..teacher import looks_like_a_local_path
from .checkpointing import (
    CHECKPOINTS_FOLDER,
    LATEST_CHECKPOINT,
    RUN_ARGUMENTS_FILE,
    TrainState,
    arguments_fingerprint,
    differing_arguments,
    latest_checkpoint,
    read_run_arguments,
    save_checkpoint,
    write_run_arguments,
)
from .data import (
    DATA_BOX_FORMATS,
    IMAGE_COLUMN_CANDIDATES,
    EpochSpanningSampler,
    MapImageDataset,
    RunBatches,
    add_teacher_attention,
    collate,
    default_image_processor,
    load_images,
    make_stream_transform,
    normalize_pixels,
    one_line,
    vit_image_processor_class,
)
from .hub import HubPushError, add_hub_arguments, check_hub_arguments, push_folder
from .model_card import hub_id, public_name
from .pictures import save_image_grid

logger = logging.getLogger("automae.pretrain")


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="AutoMAE pretraining (learned masks from a frozen ViT teacher + adversarial box prior).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_data_arguments(parser.add_argument_group("data"))
    add_model_arguments(parser.add_argument_group("model"))
    add_training_arguments(parser.add_argument_group("training"))
    add_speed_arguments(parser.add_argument_group("speed"))
    logging_group = parser.add_argument_group("logging")
    logging_group.add_argument("--with_tracking", action="store_true", help="Log metrics through accelerate's trackers.")
    logging_group.add_argument("--report_to", default="tensorboard",
                               help="Tracker(s) for --with_tracking: tensorboard, wandb, all, ...")
    logging_group.add_argument("--logging_steps", type=int, default=1, help="Log metrics every N optimizer steps.")
    logging_group.add_argument("--image_log_steps", type=int, default=0,
                               help="Save a PNG grid every N steps (image, the strategy's guide: box patches / teacher "
                                    "attention / mask probability, the mask, the reconstruction); 0: off.")
    logging_group.add_argument("--debug_dump_weights", action="store_true", help=argparse.SUPPRESS)
    add_hub_arguments(parser)
    parser.add_argument("--push_teacher", action="store_true",
                        help="With --push_to_hub: also upload the frozen teacher's weights (by default the pushed "
                             "checkpoint names its teacher by Hub id and from_pretrained loads it from there).")
    return parser


def add_data_arguments(d) -> None:
    d.add_argument("--dataset_name", default=None,
                   help="A Hub data set id, a folder written by `save_to_disk` (e.g. the main job's "
                        "outputs/default/data), or an image-folder root with split sub-folders (train/, test/, each one "
                        "folder per class); docs/training.md, 'Data layout'.")
    d.add_argument("--dataset_config_name", default=None, help="Configuration name of the Hub data set.")
    d.add_argument("--dataset_split", default="train", help="Split to train on.")
    d.add_argument("--train_dir", default=None,
                   help="One split's image folder instead of --dataset_name (every image in it, any sub-folders).")
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


def add_model_arguments(m) -> None:
    m.add_argument("--allow_any_model_type", action="store_true",
                   help="Start from a --model_name_or_path whose model type is not automae / vit_mae / vit (its "
                        "matching weights are used, the rest initialised).")
    m.add_argument("--trust_remote_code", action="store_true",
                   help="Allow remote code when loading --model_name_or_path / --teacher_name_or_path configs.")
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


def add_training_arguments(t) -> None:
    t.add_argument("--output_dir", required=True,
                   help="Where checkpoints, images, logs and the final model go. Must be empty (or absent) unless "
                        "--overwrite_output_dir or --resume_from_checkpoint is given.")
    t.add_argument("--overwrite_output_dir", action="store_true",
                   help="Empty a non-empty --output_dir before training (as the HF examples' flag).")
    t.add_argument("--per_device_train_batch_size", type=int, default=64, help="Batch size per process.")
    t.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    t.add_argument("--num_train_epochs", type=float, default=800, help="Epochs (ignored when --max_train_steps is set).")
    t.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps (overrides epochs).")
    t.add_argument("--learning_rate", type=float, default=None,
                   help="Absolute peak learning rate; unset: base_learning_rate * effective batch / 256 (MAE's rule).")
    t.add_argument("--lr_scheduler_type", default="cosine",
                   help="Any `transformers.SchedulerType` (cosine, linear, constant_with_warmup, ...), stepped once per "
                        "optimizer step after the warm-up.")
    t.add_argument("--base_learning_rate", type=float, default=1.5e-4,
                   help="lr = base_learning_rate * per_device batch * accumulation * processes / 256.")
    t.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (not on biases/norms/tokens).")
    t.add_argument("--warmup_epochs", type=float, default=40,
                   help="Linear warm-up length in epochs, then cosine to 0 (MAE's 40 of 800). A warning names "
                        "--warmup_steps when it covers most of a short run.")
    t.add_argument("--warmup_steps", "--num_warmup_steps", dest="warmup_steps", type=int, default=None,
                   help="Warm-up in optimizer steps (overrides epochs; needed with --streaming).")
    t.add_argument("--adam_beta1", type=float, default=0.9)
    t.add_argument("--adam_beta2", type=float, default=0.95)
    t.add_argument("--seed", type=int, default=0, help="Random seed (data order, augmentation, masks, init).")
    t.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="Mixed precision (default: whatever `accelerate launch` / its config says).")
    t.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help=f"Keep only the newest N checkpoints under output_dir/{CHECKPOINTS_FOLDER} (as the HF examples).")
    t.add_argument("--checkpointing_steps", default=None,
                   help="Save the full training state every N optimizer steps, or 'epoch'. A final state is always saved.")
    t.add_argument("--resume_from_checkpoint", default=None,
                   help=f"A checkpoint folder, or '{LATEST_CHECKPOINT}' for the newest complete one under "
                        f"output_dir/{CHECKPOINTS_FOLDER}.")


def add_speed_arguments(s) -> None:
    """Flags that change how fast the same weights come out, not which (`NOT_RUN_ARGUMENTS`)."""
    s.add_argument("--optim", choices=("adamw_torch_fused", "adamw_torch"), default="adamw_torch_fused",
                   help="As TrainingArguments.optim: the fused kernels (default) or per-tensor AdamW (devices without "
                   "fused Adam, e.g. XLA). D's Adam follows.")
    s.add_argument("--activation_checkpointing", "--gradient_checkpointing", dest="gradient_checkpointing",
                   action="store_true",
                   help="Recompute the encoder and decoder blocks in the backward pass (less memory, more time).")
    s.add_argument("--torch_compile", action="store_true",
                   help="Regional torch.compile: each transformer layer (student, decoder, teacher) compiled once and "
                        "reused by its repeats, D and the score head on their own.")
    s.add_argument("--torch_compile_backend", default="inductor", help="Backend of --torch_compile.")
    s.add_argument("--no_cuda_graphs", action="store_true",
                   help="On CUDA, D and the score head run as CUDA graphs (torch.compile 'reduce-overhead') unless "
                        "this is given; --torch_compile compiles them instead.")


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


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    from automae_hf.configuration_automae import AUTOMAE_PRESETS

    return sorted(AUTOMAE_PRESETS)


STARTING_POINT_TYPES = ("automae", "vit_mae", "vit")  # checkpoints whose weights map onto the student


def _check_arguments(args, parser) -> None:
    """Everything that can be refused before any work starts, each with one line naming the flag."""
    if args.streaming and args.cache_teacher_attention:
        parser.error("--cache_teacher_attention needs a map-style data set, not --streaming")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps (a stream has no length)")
    if args.streaming and args.warmup_steps is None:
        parser.error("--streaming needs --warmup_steps (a stream has no epochs to count --warmup_epochs in)")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error(f"--max_train_steps must be a positive number of optimizer steps, got {args.max_train_steps}")
    if not args.num_train_epochs > 0:
        parser.error(f"--num_train_epochs must be > 0, got {args.num_train_epochs}")
    for flag in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        parser.error(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}")
    from transformers import SchedulerType

    if args.lr_scheduler_type not in {kind.value for kind in SchedulerType}:
        parser.error(f"--lr_scheduler_type must be one of {sorted(kind.value for kind in SchedulerType)}, "
                     f"got {args.lr_scheduler_type!r}")
    check_hub_arguments(args, parser)
    for flag in ("model_name_or_path", "config_name", "teacher_name_or_path", "image_processor_name"):
        value = getattr(args, flag)
        if value and value.lower() not in ("none", "self") and looks_like_a_local_path(value) and not os.path.isdir(value):
            parser.error(f"--{flag} {value!r}: no such folder")
    output_dir = Path(args.output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        parser.error(f"--output_dir {args.output_dir!r} is not empty: pass --overwrite_output_dir to empty it first, "
                     "or --resume_from_checkpoint latest to continue the run in it")
    if args.overwrite_output_dir and args.resume_from_checkpoint == LATEST_CHECKPOINT:
        parser.error("--overwrite_output_dir empties the folder that --resume_from_checkpoint latest resumes from: "
                     "give one")
    if args.overwrite_output_dir and Path.cwd().resolve().is_relative_to(output_dir.resolve()):
        parser.error(f"--overwrite_output_dir would empty {args.output_dir!r}, which holds the working directory")


FLAGS_OF_CONFIG_FIELDS = ("mask_ratio", "mask_factor", "adversarial_weight", "image_size", "attention_hint_ratio")


def config_values_of_flags(args) -> dict:
    """The config fields that explicit flags set; --config_overrides may not contradict them (`refuse_conflicts`)."""
    values = {name: getattr(args, name) for name in FLAGS_OF_CONFIG_FIELDS if getattr(args, name) is not None}
    if args.norm_pix_loss:
        values["norm_pix_loss"] = True
    if args.masking is not None:
        values["masking"] = args.masking
    return values


def refuse_conflicts(parser, from_flags: dict, written: dict, teacher: str | None) -> None:
    """A flag and --config_overrides that set one field to two values are refused, naming both (neither wins)."""
    from automae_hf.masking import MASKING_STRATEGIES

    for name, value in from_flags.items():
        if name in written and written[name] != value:
            parser.error(f"--{name} {value} conflicts with {name}={written[name]} in --config_overrides: give one")
    if teacher is not None and "teacher_name_or_path" in written and written["teacher_name_or_path"] != teacher:
        parser.error(f"--teacher_name_or_path {teacher} conflicts with teacher_name_or_path="
                     f"{written['teacher_name_or_path']} in --config_overrides: give one")
    masking = written.get("masking")
    if teacher is not None and teacher.lower() == "none" and masking in MASKING_STRATEGIES and (
            MASKING_STRATEGIES[masking].uses_teacher):
        parser.error(f"--teacher_name_or_path none conflicts with masking={masking} in --config_overrides (it needs a "
                     "teacher): give one")


def build_model(args, parser):
    """-> (the `AutoMAEForPreTraining` to train, its teacher mode: "teacher" (a frozen pretrained ViT), "self" (the
    student's own attention) or "none" (a strategy without teacher)). The teacher is loaded, never random."""
    from transformers import AutoConfig

    from automae_hf import AutoMAEConfig, AutoMAEForPreTraining
    from automae_hf.configuration_automae import AUTOMAE_PRESETS, TEACHER_SELF
    from automae_hf.masking import MASKING_STRATEGIES

    overrides = {}
    if args.preset is not None:
        if args.preset not in AUTOMAE_PRESETS:
            parser.error(f"--preset {args.preset!r}: expected one of {preset_names()}")
        overrides.update(AUTOMAE_PRESETS[args.preset])
    from_flags, written = config_values_of_flags(args), parse_overrides(args.config_overrides, parser)
    refuse_conflicts(parser, from_flags, written, args.teacher_name_or_path)
    overrides.update(written)
    overrides.update(from_flags)
    teacher = args.teacher_name_or_path
    if teacher is not None and teacher.lower() == "none":  # plain MAE, the baseline
        if args.masking is not None and MASKING_STRATEGIES[args.masking].uses_teacher:
            parser.error(f"--masking {args.masking} needs a teacher; --teacher_name_or_path none means random masking")
        overrides["masking"] = args.masking or written.get("masking") or "random"
        teacher = None
    elif args.masking is not None:
        overrides["masking"] = args.masking
        if not MASKING_STRATEGIES[args.masking].uses_teacher and teacher is not None:
            logger.warning("--masking %s uses no teacher: --teacher_name_or_path %s is ignored", args.masking, teacher)
            teacher = None
    loading = dict(cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)
    try:
        if args.model_name_or_path:
            source_type = AutoConfig.from_pretrained(args.model_name_or_path, **loading).model_type
            if source_type not in STARTING_POINT_TYPES and not args.allow_any_model_type:
                parser.error(f"--model_name_or_path {args.model_name_or_path!r} is a {source_type!r} checkpoint; "
                             f"expected one of {STARTING_POINT_TYPES} (pass --allow_any_model_type to start from "
                             "its matching weights anyway)")
        base_source = args.model_name_or_path or args.config_name
        base = AutoMAEConfig.from_pretrained(base_source, cache_dir=args.cache_dir) if base_source else AutoMAEConfig()
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
        uses_teacher = MASKING_STRATEGIES[values.get("masking", "learned")].uses_teacher
        if uses_teacher and teacher is None and not values.get("teacher_name_or_path") and not (
            args.model_name_or_path and values.get("teacher_config")
        ):
            logger.info("No --teacher_name_or_path: teacher-free, the student's own attention guides the mask")
            teacher = TEACHER_SELF
        if uses_teacher and teacher is not None and teacher.lower() == TEACHER_SELF:
            values["teacher_name_or_path"], values["teacher_config"] = TEACHER_SELF, None
            teacher = None
        elif uses_teacher and teacher is not None:
            # The score head is sized by the teacher's heads: build it from the teacher's own config.
            try:
                teacher_config = AutoConfig.from_pretrained(teacher, **loading).to_dict()
            except Exception as error:  # noqa: BLE001
                parser.error(f"--teacher_name_or_path {teacher!r}: {one_line(error)}")
            values["teacher_config"] = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
            values["teacher_name_or_path"] = teacher  # from_pretrained loads it when the checkpoint has none
        config = AutoMAEConfig(**{**values, "teacher_name_or_path": None} if teacher and not args.model_name_or_path
                               else values)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001
        parser.error(f"impossible model config: {one_line(error)}")
    try:
        if args.model_name_or_path:
            model, info = AutoMAEForPreTraining.from_pretrained(args.model_name_or_path, config=config,
                                                                output_loading_info=True, **loading)
            teacher_loaded = any(k.startswith("mask_generator.teacher.") for k in info["missing_keys"])
        else:
            model, teacher_loaded = AutoMAEForPreTraining(config), False
        if teacher is not None and not teacher_loaded:
            model.load_teacher(teacher, **loading)
    except Exception as error:  # noqa: BLE001
        what = f"--teacher_name_or_path {teacher!r}" if teacher else "cannot build the model"
        parser.error(f"{what}: {one_line(error)}")
    if model.mask_generator is None:
        return model, "none"
    return model, "self" if model.config.teacher_is_self else "teacher"


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------
def make_accelerator(args):
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(args.output_dir)
    kwargs = dict(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # Streaming: every process reads its own batches (undecodable images make them uneven). No seedable sampler:
        # map-style data is ordered by `EpochSpanningSampler`, seeded per epoch already.
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False if args.streaming else None),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    if args.mixed_precision is not None:
        kwargs["mixed_precision"] = args.mixed_precision
    if args.with_tracking:
        kwargs["log_with"] = args.report_to
    # `accelerate launch --multi_gpu --num_processes N` on a machine without GPUs: DDP over gloo on the CPU.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    ):
        kwargs["cpu"] = True
    return Accelerator(**kwargs)


def image_processor_for(args, parser, config):
    """-> (the image processor saved with the model, per-channel mean, per-channel std): --image_processor_name's
    (refused when it does not load), else the checkpoint's, else, for a checkpoint without one or a model from
    scratch, MAE's ImageNet normalisation (averaged over channels for grayscale)."""
    from transformers.utils import IMAGE_PROCESSOR_NAME, cached_file

    ViTImageProcessor = vit_image_processor_class()
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    processor = None
    for flag in ("image_processor_name", "model_name_or_path"):
        source = getattr(args, flag)
        if not source:
            continue
        if flag == "model_name_or_path" and cached_file(
            source, IMAGE_PROCESSOR_NAME, cache_dir=args.cache_dir, _raise_exceptions_for_missing_entries=False
        ) is None:
            continue  # a checkpoint without a processor: the default below
        try:
            processor = ViTImageProcessor.from_pretrained(source, cache_dir=args.cache_dir)
            break
        except Exception as error:  # noqa: BLE001
            parser.error(f"--{flag} {source!r}: no image processor loads from it ({one_line(error)})")
    if processor is None:
        processor = default_image_processor(config)
    processor.size = {"height": size, "width": size}

    def per_channel(values):
        values = list(values)
        return values[: config.num_channels] if len(values) >= config.num_channels else values[:1] * config.num_channels

    return processor, per_channel(processor.image_mean), per_channel(processor.image_std)


class TrainingData(NamedTuple):
    """What `build_training_data` builds. `sampler`: the run's `EpochSpanningSampler` (None when streaming)."""

    dataset: Any
    loader: Any
    box_column: str | None
    sampler: EpochSpanningSampler | None


def build_training_data(args, parser, accelerator, model, teacher_mode, mean, std) -> TrainingData:
    """The data set and its DataLoader. Map-style sets decode and augment in the loader's workers, and one
    `EpochSpanningSampler` orders the whole run (`RunBatches` cuts it into epochs); `--cache_teacher_attention` first
    adds the teacher's maps of every image as a column."""
    config = model.config
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    pil_mode = {1: "L", 3: "RGB"}.get(config.num_channels)
    if pil_mode is None:
        parser.error(f"num_channels={config.num_channels}: only 1 (grayscale) or 3 (RGB) images are supported")
    with accelerator.main_process_first():
        hf_data, column, box_column = load_images(args, parser, with_boxes=config.masking == "box_prior")
    if args.streaming:
        # uint8 pixels all the way to the device (a quarter of float32's bytes); normalised there (`normalize_pixels`)
        dataset = hf_data.map(make_stream_transform(column, size, None, None, pil_mode, box_column, args.box_format),
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
                teacher_key = json.dumps([config.teacher_name_or_path, config.teacher_config, config.teacher_image_size,
                                          config.patch_size, config.teacher_image_mean, config.teacher_image_std],
                                         sort_keys=True, default=str)
                hf_data = add_teacher_attention(hf_data, column, pil_mode, size, mean, std,
                                                generator_module.teacher_attention, 256, accelerator.device,
                                                teacher_key=teacher_key)
        dataset = MapImageDataset(hf_data, column, size, None, None, pil_mode, args.seed, box_column, args.box_format)
    sampler = None
    if not args.streaming:
        num_processes = accelerator.num_processes
        batches = batches_per_epoch(len(dataset), args.per_device_train_batch_size, num_processes)
        if batches == 0:  # drop_last: no incomplete batch
            parser.error(f"the training set ({len(dataset)} images) is smaller than one batch per process "
                         f"({args.per_device_train_batch_size} x {num_processes}): lower --per_device_train_batch_size")
        steps_per_epoch, max_train_steps = training_length(args, batches)
        sampler = EpochSpanningSampler(len(dataset), args.per_device_train_batch_size, num_processes, args.seed,
                                       num_epochs=math.ceil(max_train_steps / steps_per_epoch))
    loader_kwargs = dict(batch_size=args.per_device_train_batch_size, collate_fn=collate,
                         num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available())
    if args.dataloader_num_workers > 0:
        # 4 batches per worker in flight. Persistent for a stream's next pass; map-style data is one pass (RunBatches).
        loader_kwargs.update(persistent_workers=True, prefetch_factor=4)
    # drop_last, as MAE: every step averages a full batch (a last short batch would weigh its images more).
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, drop_last=True, **loader_kwargs)
    return TrainingData(dataset, loader, box_column, sampler)


def build_optimizers(args, model, effective_batch):
    """-> (lr, student AdamW, D's Adam or None). lr = base_learning_rate * effective batch / 256 unless
    --learning_rate is given; both optimizers fused unless --optim adamw_torch (the Trainer's default is fused)."""
    lr = args.learning_rate if args.learning_rate is not None else args.base_learning_rate * effective_batch / 256
    fused = args.optim == "adamw_torch_fused"
    betas = (args.adam_beta1, args.adam_beta2)
    # The score head's groups learn at lr * config.score_head_lr_scale (the follow_teacher preset: 0.1).
    student_optimizer = torch.optim.AdamW(model.optimizer_param_groups(args.weight_decay, lr), lr=lr, betas=betas,
                                          fused=fused)
    d_optimizer = None
    if model.discriminator is not None:  # D: Adam, no weight decay, the student's betas and schedule, as MAE's
        d_optimizer = torch.optim.Adam(model.discriminator_parameters(), lr=lr, betas=betas, fused=fused)
    return lr, student_optimizer, d_optimizer


@contextlib.contextmanager
def outside_the_student(model):
    """D and the frozen teacher leave the module tree while accelerate wraps the student, so DDP / FSDP / ZeRO never
    own, shard or sync them: the teacher stays whole on every rank, D averages its own gradients (`average_gradients`).
    Yields the detached modules; they are back in place afterwards. Kept because `accelerate.prepare` takes no list of
    modules to leave out, for DDP, FSDP2 or ZeRO alike (tests/test_distributed.py: D syncs once, teacher whole)."""
    owners = [(model, "discriminator")]
    if model.mask_generator is not None:
        owners.append((model.mask_generator, "teacher"))
    detached = [(owner, name, owner._modules[name]) for owner, name in owners if owner._modules.get(name) is not None]
    for owner, name, _ in detached:
        owner._modules[name] = None
    try:
        yield [module for *_, module in detached]
    finally:
        for owner, name, module in detached:
            owner._modules[name] = module


def prepare_student(accelerator, model, student_optimizer, train_dataloader):
    """accelerate.prepare for the student (encoder, decoder, score head) alone: one DDP / FSDP unit, wrapped once.
    D's optimizer is never prepared: D needs no loss scaling, so under fp16 the one GradScaler is the student's and
    updates once per iteration."""
    with outside_the_student(model) as outside:
        model, student_optimizer, train_dataloader = accelerator.prepare(model, student_optimizer, train_dataloader)
    for module in outside:  # replicated, full precision as built (D computes in float32)
        module.to(accelerator.device)
    return model, student_optimizer, train_dataloader


@contextlib.contextmanager
def student_parameters_gathered(model, every_unit: bool = True):
    """FSDP2 gathers a unit's parameters only in that unit's own forward: calls into the student's parts from outside
    it gather them here and free them after: the root unit (score head, tokens) for D's step, every unit for the
    student's attention as teacher "self" and for the picture grids. A no-op without FSDP (docs/pitfalls.md §22)."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in (model.modules() if every_unit else [model]) if isinstance(module, FSDPModule)]
    if isinstance(model, FSDPModule):  # what the root's first forward does; before it, a unit alone would claim root
        model._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def average_gradients(parameters, accelerator) -> None:
    """Mean of D's gradients over the processes in one all-reduce (D is outside the student's DDP / FSDP)."""
    if accelerator.num_processes == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in parameters if p.grad is not None]
    flat = accelerator.reduce(_flatten_dense_tensors(grads), reduction="mean")
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def warmup_length(args, steps_per_epoch: int | None, max_train_steps: int) -> int:
    """The warm-up in optimizer steps: --warmup_steps, else --warmup_epochs of `steps_per_epoch` (streaming needs the
    former, `_check_arguments`); capped at the run. Warns, naming --warmup_steps, where it takes most of the run:
    MAE's 40 epochs on a short run leave a learning rate that only climbs."""
    if args.warmup_steps is not None:
        steps, source = args.warmup_steps, f"--warmup_steps {args.warmup_steps}"
    else:
        steps = int(round(args.warmup_epochs * steps_per_epoch))
        source = f"--warmup_epochs {args.warmup_epochs:g} = {steps} steps"
    if steps > max_train_steps or (args.warmup_steps is None and steps > max_train_steps / 2):
        logger.warning("The warm-up (%s) covers %d of the run's %d steps: the learning rate climbs for most of the run "
                       "and barely decays (not at all when the warm-up reaches the end); set --warmup_steps to a "
                       "fraction of the run", source, min(steps, max_train_steps), max_train_steps)
    return min(steps, max_train_steps)


def make_schedule(args, optimizer, warmup_steps: int, max_train_steps: int):
    """Not prepared by accelerate: stepped by hand once per optimizer step (a prepared scheduler steps
    num_processes times)."""
    import transformers

    inner = getattr(optimizer, "optimizer", optimizer)
    return transformers.get_scheduler(args.lr_scheduler_type, inner, num_warmup_steps=warmup_steps,
                                      num_training_steps=max_train_steps)


@torch.no_grad()
def log_teacher_input(mask_generator, pixel_values: torch.Tensor) -> None:
    """Once, on the first batch: how the batch is normalised (config.image_mean / image_std), what the teacher
    expects (teacher_image_mean / teacher_image_std) and the per-channel mean / std of what it actually reads."""
    config = mask_generator.config
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    seen = mask_generator.teacher_input(pixel_values, grid).float()
    mean, std = seen.mean((0, 2, 3)).tolist(), seen.std((0, 2, 3)).tolist()
    expected = (f"its own mean {config.teacher_image_mean} / std {config.teacher_image_std}"
                if config.teacher_image_mean is not None else "nothing else (config.teacher_image_mean is unset)")
    logger.info("Teacher input: the batch normalised with mean %s / std %s, re-normalised to %s; on the first batch it "
                "reads per-channel means %s and stds %s", config.image_mean, config.image_std, expected,
                [round(v, 3) for v in mean], [round(v, 3) for v in std])


def note_nonfinite_loss(first_bad_step: torch.Tensor, metrics: dict, step: int) -> torch.Tensor:
    """`first_bad_step` (0-d int64 on the device; 0: none yet) becomes `step` at the first non-finite loss, the
    student's or D's. On the device: no host sync per step (`raise_on_nonfinite` reads it)."""
    loss = metrics["loss"] + metrics["d_loss"] if "d_loss" in metrics else metrics["loss"]
    return torch.where((first_bad_step == 0) & ~torch.isfinite(loss), step, first_bad_step)


def raise_on_nonfinite(accelerator, first_bad_step: torch.Tensor, model=None) -> None:
    """Stops the run (every process alike) when a loss went non-finite, and, given `model`, when a weight did. One
    host sync, at logging windows and before every save rather than every step (MAE checks every step): no
    non-finite weights are ever saved."""
    flags = [first_bad_step.to(torch.int64)]
    if model is not None:  # FSDP shards: each process checks its own
        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        flags.append((~torch.stack([torch.isfinite(t.detach()).all() for t in local]).all()).to(torch.int64))
    gathered = accelerator.gather(torch.stack(flags)[None]).reshape(-1, len(flags)).cpu()
    bad_steps = [int(step) for step in gathered[:, 0] if step > 0]
    if bad_steps:
        raise FloatingPointError(
            f"The loss is not finite (NaN or inf) at optimizer step {min(bad_steps)}: the run stops before saving "
            "weights from it. Lower --learning_rate / --base_learning_rate, lengthen --warmup_steps or train in "
            "float32 (--mixed_precision no), then resume from the last checkpoint.")
    if len(flags) > 1 and gathered[:, 1].any():
        raise FloatingPointError("A weight is not finite although every loss was: the run stops without saving it.")


def window_over_processes(accelerator, sums: dict, count: int, diagnostics: dict, counters: list[float]):
    """One all-reduce per logging window -> (each of `sums`' mean over all processes' `count` micro-batches, each
    diagnostic's mean over the processes, `counters` summed over the processes)."""
    device = accelerator.device
    values = [value.detach().to(device, torch.float64) for value in (*sums.values(), *diagnostics.values())]
    values.append(torch.tensor([count, *counters], dtype=torch.float64, device=device))
    total = accelerator.reduce(torch.cat([value.reshape(-1) for value in values]), reduction="sum").tolist()
    sums_total, diagnostics_total = total[: len(sums)], total[len(sums) : len(sums) + len(diagnostics)]
    all_count, counters_total = total[len(sums) + len(diagnostics)], total[len(sums) + len(diagnostics) + 1 :]
    means = {key: value / all_count for key, value in zip(sums, sums_total)}
    diagnostic_means = {key: value / accelerator.num_processes for key, value in zip(diagnostics, diagnostics_total)}
    return means, diagnostic_means, counters_total


def noise_seed(seed: int, rank: int, micro_batch: int) -> int:
    """The seed of one micro-batch's mask, Gumbel and box-prior noise: independent streams per (seed, rank,
    micro-batch) through `numpy.random.SeedSequence`, yet a pure function of them, so a resumed run redraws the same."""
    return int(np.random.SeedSequence([seed, rank, micro_batch]).generate_state(1, np.uint64)[0] >> 1)


def run_summary(args, config, teacher_mode, completed, total_skipped, effective_batch, lr, box_column) -> dict:
    """What the run folder says about itself (`train_summary.json`): Hub ids only, never local paths."""
    teacher = (args.teacher_name_or_path or config.teacher_name_or_path) if teacher_mode == "teacher" else teacher_mode
    return {"final_step": completed, "skipped_images": total_skipped, "teacher": teacher_mode,
            "teacher_name_or_path": public_name(teacher) if teacher_mode == "teacher" else teacher,  # as config.json
            "dataset_name": hub_id(args.dataset_name), "dataset_config_name": args.dataset_config_name,
            "effective_batch_size": effective_batch, "learning_rate": lr, "mask_ratio": config.mask_ratio,
            "mask_factor": config.mask_factor, "masking": config.masking,
            "box_column_name": box_column, "box_format": args.box_format if box_column else None}


@contextlib.contextmanager
def plain_class(model):
    """FSDP2 gives the model a generated subclass; `save_pretrained` would copy torch's FSDP sources next to the
    model's code. Saves under the model's own class (docs/pitfalls.md §23). Kept because torch offers no way to undo
    `fully_shard`'s class swap (tests/test_distributed.py: no `_fsdp*.py` beside the FSDP run's model)."""
    from torch.distributed.fsdp import FSDPModule

    original = type(model)
    model.__class__ = next(cls for cls in original.__mro__ if not issubclass(cls, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = original


def push_run(args, model, processor, output_dir: Path, state_dict: dict | None = None) -> None:
    """Uploads the run as a Hub checkpoint from `output_dir/hub`: the student, score head and D, the teacher only
    with --push_teacher (else the config names it by Hub id and `from_pretrained` fetches it), no local paths.
    `state_dict`: the gathered weights of a sharded model."""
    from .model_card import write_card

    push_dir = output_dir / "hub"
    shutil.rmtree(push_dir, ignore_errors=True)
    teacher = model.config.teacher_name_or_path
    state = dict(state_dict) if state_dict is not None else model.state_dict()
    if not args.push_teacher:
        state = {k: v for k, v in state.items() if not k.startswith("mask_generator.teacher.")}
        if teacher and not model.config.teacher_is_self and not hub_id(teacher):
            logger.warning("The teacher %s is a local folder: the pushed checkpoint names no teacher; pass "
                           "--push_teacher to include its weights", teacher)
    saved_name = model.config.teacher_name_or_path
    model.config.teacher_name_or_path = saved_name if model.config.teacher_is_self else hub_id(saved_name)
    try:
        with plain_class(model):
            model.save_pretrained(str(push_dir), state_dict=state)
    finally:
        model.config.teacher_name_or_path = saved_name
    processor.save_pretrained(str(push_dir))
    for name in ("train_summary.json", "train_log.jsonl"):
        if (output_dir / name).exists():
            shutil.copy(output_dir / name, push_dir / name)
    write_card("pretraining", push_dir, repo_id=args.hub_model_id, dataset_name=hub_id(args.dataset_name))
    try:
        push_folder(push_dir, args.hub_model_id, private=args.private, revision=args.revision, token=args.hub_token,
                    dry_run=args.dry_run)
    except HubPushError as error:
        logger.error("%s", error)
        raise SystemExit(1)


# Flags that leave the trained weights as they are (where the run goes, how it is logged, saved, pushed or sped up):
# outside the run's arguments, so changing them neither blocks a resume nor makes another run.
NOT_RUN_ARGUMENTS = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "cache_dir", "trust_remote_code",
    "dataloader_num_workers", "checkpointing_steps", "checkpoints_total_limit", "gradient_checkpointing", "optim",
    "torch_compile", "torch_compile_backend", "with_tracking", "report_to", "logging_steps", "image_log_steps",
    "push_to_hub", "hub_model_id", "private", "revision", "hub_token", "dry_run", "push_teacher",
    "debug_dump_weights", "no_cuda_graphs",
}
RUN_LENGTH_ARGUMENTS = ("max_train_steps", "num_train_epochs")


def run_arguments(args, num_processes: int, mixed_precision: str) -> dict:
    """The arguments that decide the trained weights, with the process count and the precision accelerate resolved:
    saved as `run_args.json` (with their `checkpointing.arguments_fingerprint`) in the run folder and each checkpoint.
    E.g. `run_arguments(build_parser().parse_args(argv), 1, "no")` for a one-process run of `argv`."""
    values = {name: value for name, value in vars(args).items() if name not in NOT_RUN_ARGUMENTS}
    return {**values, "num_processes": num_processes, "mixed_precision": mixed_precision}


def refuse_another_runs_arguments(parser, saved: dict | None, current: dict, where: str) -> None:
    """A resume continues the run whose arguments `saved` holds (read from `where`): any difference is refused by
    name, except the run's length (`RUN_LENGTH_ARGUMENTS`): a run may be continued to another length, its steps from
    the checkpoint on following that length's schedule (warned)."""
    if saved is None:
        logger.warning("%s holds no %s (an older run): cannot check that it was run with these arguments",
                       where, RUN_ARGUMENTS_FILE)
        return
    differing = differing_arguments(saved, current)
    other = [name for name in differing if name not in RUN_LENGTH_ARGUMENTS]
    if other:
        parser.error(f"--resume_from_checkpoint: {where} belongs to a run with other arguments ("
                     + "; ".join(f"--{name} {saved.get(name)!r} there, {current.get(name)!r} here" for name in other)
                     + "): resume with its arguments, or start this run in another --output_dir")
    if differing:
        logger.warning("Continuing the run of %s to %s: the steps from the checkpoint on follow the new length's "
                       "learning-rate schedule", ", ".join(f"--{n} {saved.get(n)}" for n in differing),
                       ", ".join(f"--{n} {current.get(n)}" for n in differing))


def checkpoint_to_resume(args, parser, arguments: dict) -> Path | None:
    """`--resume_from_checkpoint latest|PATH` -> the checkpoint folder to load (None: start fresh), refused when it,
    or the --output_dir it continues, belongs to a run with other `arguments`. Reads only: nothing is written yet."""
    if not args.resume_from_checkpoint:
        return None
    output_dir = Path(args.output_dir)
    if not args.overwrite_output_dir and (output_dir / RUN_ARGUMENTS_FILE).is_file():
        refuse_another_runs_arguments(parser, read_run_arguments(output_dir), arguments,
                                      f"--output_dir {str(output_dir)!r}")
    checkpoint_root = output_dir / CHECKPOINTS_FOLDER
    path = (latest_checkpoint(checkpoint_root) if args.resume_from_checkpoint == LATEST_CHECKPOINT
            else Path(args.resume_from_checkpoint))
    if path is None:
        logger.warning("--resume_from_checkpoint latest: no checkpoint under %s, starting fresh", checkpoint_root)
    elif not path.is_dir():
        parser.error(f"--resume_from_checkpoint {str(path)!r} is not a checkpoint folder")
    else:
        refuse_another_runs_arguments(parser, read_run_arguments(path), arguments, f"checkpoint {str(path)!r}")
    return path


def prepare_output_dir(args, accelerator, arguments: dict) -> None:
    """Once every refusal is behind: --overwrite_output_dir empties the folder, and the run's arguments go to
    `run_args.json` (a non-empty folder without --overwrite_output_dir or a resume was refused by `_check_arguments`)."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        if args.overwrite_output_dir and output_dir.is_dir():
            shutil.rmtree(output_dir)
        (output_dir / "images").mkdir(parents=True, exist_ok=True)
        checkpoint_root = output_dir / CHECKPOINTS_FOLDER
        for stale in checkpoint_root.glob(".tmp-step_*") if checkpoint_root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        write_run_arguments(output_dir, arguments)
    accelerator.wait_for_everyone()


def keep_log_until(log_path: Path, step: int) -> None:
    """A resumed run logs again the steps after its checkpoint: drop the killed run's rows for them."""
    if log_path.is_file():
        rows = [line for line in log_path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        log_path.write_text("".join(row + "\n" for row in rows))


def save_run(args, accelerator, model, unwrapped, processor, completed: int, total_skipped: int,
             summary: dict) -> None:
    """The model folder (weights gathered first under FSDP: a collective on every rank), processor, summary, push.
    `model`: as prepared; `unwrapped`: the `AutoMAEForPreTraining` inside it."""
    from accelerate.utils import DistributedType

    output_dir = Path(args.output_dir)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    state_dict = accelerator.get_state_dict(model) if sharded else None
    if args.debug_dump_weights and (accelerator.is_main_process or not sharded):
        torch.save({k: v.detach().cpu() for k, v in (state_dict or unwrapped.state_dict()).items()},
                   output_dir / f"weights_rank{accelerator.process_index}.pt")
    if not accelerator.is_main_process:
        return
    with plain_class(unwrapped):
        unwrapped.save_pretrained(str(output_dir), state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(str(output_dir))
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.print(f"Done: {completed} steps; skipped {total_skipped} undecodable image(s); model in {output_dir}")
    if args.push_to_hub:
        push_run(args, unwrapped, processor, output_dir, state_dict)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingHooks:
    """Points of the loop where a caller acts, each given the optimizer step; tests die there like a preempted job."""

    after_step: Callable[[int], None] | None = None  # after step N's log, picture and checkpoint
    before_checkpoint_commit: Callable[[int], None] | None = None  # step N's state written, not yet renamed


@dataclass
class LoggingWindow:
    """One logging window's sums: metrics summed on the device (no host sync until the window ends), images seen, and
    host time per micro-batch (perf_counter only, no sync): waiting for the loader, inside `train_step` (the model; on
    a GPU also waiting for a full launch queue) and the rest of the loop (logging, checkpoints included)."""

    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    micro_batches: int = 0
    sums: dict = field(default_factory=dict)
    host_ms: dict = field(default_factory=lambda: {"data_wait_ms": 0.0, "train_step_ms": 0.0})

    def timed(self, batches):
        """`batches`, counting the wait for each in `host_ms["data_wait_ms"]`."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            self.host_ms["data_wait_ms"] += 1000 * (time.perf_counter() - start)
            if batch is None:
                return
            yield batch

    def add(self, metrics: dict, images: int, step_seconds: float) -> None:
        self.host_ms["train_step_ms"] += 1000 * step_seconds
        self.images += images
        for key, value in metrics.items():
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.micro_batches += 1

    def host_times(self) -> dict:
        """Mean host milliseconds per micro-batch in each phase, this process's."""
        elapsed_ms = 1000 * (time.perf_counter() - self.start)
        times = {key: value / self.micro_batches for key, value in self.host_ms.items()}
        return {**times, "loop_other_ms": (elapsed_ms - sum(self.host_ms.values())) / self.micro_batches}

    def restart(self) -> None:
        self.start, self.images, self.micro_batches, self.sums = time.perf_counter(), 0, 0, {}
        self.host_ms = dict.fromkeys(self.host_ms, 0.0)


@dataclass
class PretrainingRun:
    """What the loop reads and advances, built once by `set_up`. `model`: as prepared (DDP / FSDP); `unwrapped`:
    the `AutoMAEForPreTraining` inside it; `discriminator`, `d_optimizer`, `d_scheduler`: None without a learned
    mask. `state.completed_steps` counts optimizer steps."""

    args: argparse.Namespace
    accelerator: Any
    model: Any
    unwrapped: Any
    discriminator: Any
    teacher_mode: str
    train_dataset: Any
    train_dataloader: Any
    student_optimizer: Any
    d_optimizer: Any
    student_scheduler: Any
    d_scheduler: Any
    state: TrainState
    max_train_steps: int
    steps_per_epoch: int | None
    arguments: dict
    image_mean: list
    image_std: list
    hooks: TrainingHooks
    noise_generator: torch.Generator
    diagnostics_generator: torch.Generator
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    first_nonfinite_step: torch.Tensor
    processor: Any  # saved with the model
    box_column: str | None
    effective_batch: int
    learning_rate: float
    cuda_graphs: bool = False  # D and the score head replay as CUDA graphs (`compile_for_speed`)
    start_step: int = 0
    micro_in_step: int = 0
    local_skipped: int = 0  # this process's undecodable images not yet folded into `state.skipped_images`
    last_saved: int | None = None
    window: LoggingWindow = field(default_factory=LoggingWindow)
    batches: RunBatches | None = None  # the run's one loader iterator, an epoch at a time (None when streaming)
    progress: Any = None
    log_file: Any = None

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.args.output_dir) / CHECKPOINTS_FOLDER

    @property
    def start_epoch(self) -> int:
        return self.start_step // self.steps_per_epoch if self.steps_per_epoch else 0

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.max_train_steps / self.steps_per_epoch) if self.steps_per_epoch else 10**9


def main(argv=None, hooks: TrainingHooks | None = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)  # one line per file saved otherwise
    logging.getLogger("accelerate.accelerator").setLevel(logging.WARNING)
    _check_arguments(args, parser)

    run = set_up(args, parser, hooks or TrainingHooks())
    from tqdm.auto import tqdm

    run.progress = tqdm(total=run.max_train_steps, initial=run.start_step, desc="pretrain", dynamic_ncols=True,
                        disable=not run.accelerator.is_local_main_process,
                        mininterval=0.1 if sys.stderr.isatty() else 10)
    run.log_file = open(Path(args.output_dir) / "train_log.jsonl", "a") if run.accelerator.is_main_process else None
    run.model.train()
    if run.discriminator is not None:
        run.discriminator.train()
    if run.start_step < run.max_train_steps:
        for epoch in range(run.start_epoch, run.num_epochs):
            if train_one_epoch(run, epoch):
                break
    run.progress.close()
    finish(run)


def set_up(args, parser, hooks: TrainingHooks) -> PretrainingRun:
    """Accelerator, model and teacher, data, optimizers, schedules, the resumed state and the output folder."""
    import transformers
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args)
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
        logger.setLevel(logging.ERROR)
    arguments = run_arguments(args, accelerator.num_processes, accelerator.mixed_precision)
    resume_path = checkpoint_to_resume(args, parser, arguments)
    set_seed(args.seed)
    model, teacher_mode = build_model(args, parser)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    config = model.config
    processor, mean, std = image_processor_for(args, parser, config)
    # How pixel_values are normalised, saved with the model: the teacher re-normalises from it to its own statistics.
    config.image_mean, config.image_std = list(mean), list(std)
    train_dataset, train_dataloader, box_column, sampler = build_training_data(args, parser, accelerator, model,
                                                                               teacher_mode, mean, std)
    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    lr, student_optimizer, d_optimizer = build_optimizers(args, model, effective_batch)
    discriminator = model.discriminator
    model, student_optimizer, train_dataloader = prepare_student(accelerator, model, student_optimizer,
                                                                 train_dataloader)
    unwrapped = accelerator.unwrap_model(model)
    cuda_graphs = compile_for_speed(args, unwrapped, accelerator.device)  # after prepare, in place
    steps_per_epoch, max_train_steps = training_length(args, sampler.batches_per_epoch if sampler else None)
    warmup_steps = warmup_length(args, steps_per_epoch, max_train_steps)
    student_scheduler = make_schedule(args, student_optimizer, warmup_steps, max_train_steps)
    d_scheduler = make_schedule(args, d_optimizer, warmup_steps, max_train_steps) if d_optimizer is not None else None
    device = accelerator.device
    run = PretrainingRun(
        args=args, accelerator=accelerator, model=model, unwrapped=unwrapped, discriminator=discriminator,
        teacher_mode=teacher_mode, train_dataset=train_dataset, train_dataloader=train_dataloader,
        student_optimizer=student_optimizer, d_optimizer=d_optimizer, student_scheduler=student_scheduler,
        d_scheduler=d_scheduler, state=TrainState(), max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch,
        arguments=arguments, image_mean=mean, image_std=std, hooks=hooks,
        # Mask / Gumbel / box-prior noise: reseeded from (seed, rank, micro-batch) before every micro-batch, so a
        # resumed run draws exactly what the uninterrupted one drew, on every rank, whatever the global RNG did.
        noise_generator=torch.Generator(device=device),
        # The random masks the logged region size is compared with: drawn apart, so logging changes no training draw.
        diagnostics_generator=torch.Generator(device=device).manual_seed(args.seed),
        pixel_mean=torch.tensor(mean, device=device), pixel_std=torch.tensor(std, device=device),
        first_nonfinite_step=torch.zeros((), dtype=torch.int64, device=device), processor=processor,
        box_column=box_column, effective_batch=effective_batch, learning_rate=lr, cuda_graphs=cuda_graphs)
    accelerator.register_for_checkpointing(run.state, student_scheduler)
    if d_scheduler is not None:
        accelerator.register_for_checkpointing(d_scheduler, d_optimizer)
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        if run.state.completed_steps > max_train_steps:
            parser.error(f"--resume_from_checkpoint: {str(resume_path)!r} is at step {run.state.completed_steps}, "
                         f"past the {max_train_steps} steps asked for (--max_train_steps / --num_train_epochs)")
    run.start_step = run.state.completed_steps
    if sampler is not None:  # one iterator for the run, from the resumed step's batch on
        skip = (run.start_step % steps_per_epoch) * args.gradient_accumulation_steps
        run.batches = RunBatches(train_dataloader, sampler, run.start_epoch, skip)
    prepare_output_dir(args, accelerator, arguments)
    if accelerator.is_main_process and args.resume_from_checkpoint:  # step 0 when no checkpoint was found
        keep_log_until(Path(args.output_dir) / "train_log.jsonl", run.start_step)
    if args.with_tracking:
        accelerator.init_trackers("automae_pretrain", {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                       for k, v in vars(args).items() if k != "hub_token"})
    teacher_name = {"none": "none", "self": "self (the student's own attention)"}.get(
        teacher_mode, args.teacher_name_or_path or config.teacher_name_or_path or "the checkpoint's")
    logger.info("AutoMAE pretraining: masking=%s, teacher=%s, %d examples/epoch, %d steps, lr %.3g (effective batch "
                "%d), %d processes", config.masking, teacher_name, len(train_dataset) if not args.streaming else -1,
                max_train_steps, lr, effective_batch, accelerator.num_processes)
    return run


def batches_per_epoch(num_images: int, per_device_batch_size: int, num_processes: int) -> int:
    """Full batches per epoch on each process (drop_last: an epoch's images that fill no batch on every process wait
    for the next epoch's shuffle)."""
    return num_images // (per_device_batch_size * num_processes)


def training_length(args, batches: int | None) -> tuple[int | None, int]:
    """`batches`: per epoch and process (None when streaming) -> (optimizer steps per epoch, None when streaming; the
    run's optimizer steps). An epoch's last step may hold fewer micro-batches than --gradient_accumulation_steps."""
    if args.streaming:
        return None, args.max_train_steps
    steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
    return steps_per_epoch, args.max_train_steps or math.ceil(args.num_train_epochs * steps_per_epoch)


def compile_for_speed(args, model, device: torch.device) -> bool:
    """In place, so state-dict keys, DDP and the optimizers keep the original parameters. -> whether D and the score
    head run as CUDA graphs.

    --torch_compile: regional compilation, each transformer layer (transformers' `GradientCheckpointingLayer`) compiled
    once and its code reused by the others (seconds where a whole-model graph takes a minute), and D and the score head on their own (the D step runs
    outside the model's forward). Otherwise, on CUDA unless --no_cuda_graphs: D and the score head alone, as CUDA
    graphs (torch.compile's "reduce-overhead"): their few hundred small kernels replayed in a few launches."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    score_head = getattr(model.mask_generator, "score_head", None)
    small_parts = [part for part in (model.discriminator, score_head) if part is not None]
    names = ", ".join(type(part).__name__ for part in small_parts) or "nothing else"
    if args.torch_compile:
        layers = [layer for layer in model.modules() if isinstance(layer, GradientCheckpointingLayer)]
        for part in layers + small_parts:
            part.compile(backend=args.torch_compile_backend)
        kinds = ", ".join(sorted({type(layer).__name__ for layer in layers})) or "none"
        logger.info("torch.compile (%s), by region: %d layers (%s), %s", args.torch_compile_backend, len(layers),
                    kinds, names)
        return False
    if device.type != "cuda" or args.no_cuda_graphs or not small_parts:
        return False
    for part in small_parts:
        part.compile(mode="reduce-overhead")
    logger.info("CUDA graphs (torch.compile reduce-overhead): %s; --no_cuda_graphs turns them off", names)
    return True


def train_one_epoch(run: PretrainingRun, epoch: int) -> bool:
    """One epoch (the resumed one from the checkpoint's batch on) -> whether the run is complete."""
    args, accelerator = run.args, run.accelerator
    if run.batches is not None:  # map-style: the epoch's slice of the run's one iterator
        batches, epoch_length = run.batches.epoch(epoch), run.batches.batches_in(epoch)
    else:  # streaming: one pass over the stream
        for owner in (run.train_dataset, run.train_dataloader):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(epoch)
        batches, epoch_length = run.train_dataloader, None
    for position, batch in enumerate(run.window.timed(batches)):
        ends_epoch = (position == epoch_length - 1 if epoch_length is not None
                      else accelerator.gradient_state.end_of_dataloader)
        run.local_skipped += int(batch["skipped"])
        if batch["pixel_values"] is None:  # only possible when streaming: a whole batch undecodable
            continue
        batch["pixel_values"] = normalize_pixels(batch["pixel_values"], run.pixel_mean, run.pixel_std)
        completed = run.state.completed_steps
        if (run.teacher_mode == "teacher" and completed == run.start_step and run.micro_in_step == 0
                and accelerator.is_main_process):
            log_teacher_input(run.unwrapped.mask_generator, batch["pixel_values"])
        micro_index = completed * args.gradient_accumulation_steps + run.micro_in_step
        run.noise_generator.manual_seed(noise_seed(args.seed, accelerator.process_index, micro_index))
        ends_step = run.micro_in_step == args.gradient_accumulation_steps - 1 or ends_epoch
        ends_window = ends_step and ((completed + 1) % args.logging_steps == 0 or completed + 1 == run.max_train_steps)
        step_start = time.perf_counter()
        with accumulation_ends_with(run, ends_epoch):
            output, metrics, diagnostics = train_step(run, batch, diagnose=ends_window)
        run.window.add(metrics, batch["pixel_values"].shape[0], time.perf_counter() - step_start)
        run.first_nonfinite_step = note_nonfinite_loss(run.first_nonfinite_step, metrics, completed + 1)
        run.micro_in_step += 1
        if not accelerator.sync_gradients:
            continue
        end_optimizer_step(run, epoch, batch, output, diagnostics)
        if run.state.completed_steps >= run.max_train_steps:
            return True
    if args.checkpointing_steps == "epoch":
        save_training_state(run)
    return False


@contextlib.contextmanager
def accumulation_ends_with(run: PretrainingRun, ends_epoch: bool):
    """An epoch's last micro-batch completes an optimizer step, as it did when every epoch was a loader of its own.
    accelerate's `accumulate` ends a cycle at its loader's end (`end_of_dataloader`), and the run's one loader ends
    only with the run, so its flag is raised for the epoch's last micro-batch and lowered again afterwards."""
    loader = run.batches.loader if run.batches is not None else None
    if not ends_epoch or loader is None or not hasattr(loader, "end_of_dataloader"):
        yield
        return
    was_the_end = loader.end_of_dataloader
    loader.end_of_dataloader = True
    try:
        yield
    finally:
        loader.end_of_dataloader = was_the_end


def train_step(run: PretrainingRun, batch: dict, diagnose: bool):
    """Teacher attention once (no grad) -> D step -> student + score-head step (docs/method.md §3).
    -> (output, metrics to sum over the logging window, diagnostics of this micro-batch when `diagnose`)."""
    accelerator, unwrapped, config = run.accelerator, run.unwrapped, run.unwrapped.config
    pixel_values = batch["pixel_values"]
    metrics = {}
    if run.cuda_graphs:  # a new iteration: the graphs' previous outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
    with accelerator.accumulate(run.model):
        attention = None
        if "teacher_attention" in batch:  # cached once, cropped and flipped with the image
            attention = batch["teacher_attention"].to(pixel_values.device, torch.float32)
        elif run.teacher_mode != "none":
            with accelerator.autocast(), student_parameters_gathered(unwrapped):
                attention = unwrapped.teacher_attention(pixel_values)
        if run.discriminator is not None:
            metrics.update(discriminator_step(run, attention))
        boxes = batch.get("boxes") if config.masking == "box_prior" else None
        box_kwargs = {"boxes": boxes, "box_format": "xyxy"} if boxes is not None else {}
        output = run.model(pixel_values, teacher_attention=attention, generator=run.noise_generator, **box_kwargs)
        accelerator.backward(output.loss)
        run.student_optimizer.step()
        run.student_optimizer.zero_grad(set_to_none=True)
    metrics.update(loss=output.loss.detach(), reconstruction_loss=output.reconstruction_loss.detach())
    if output.generator_loss is not None:
        metrics["generator_loss"] = output.generator_loss.detach()
    diagnostics = mask_diagnostics(run, output, attention) if diagnose else {}
    return output, metrics, diagnostics


def discriminator_step(run: PretrainingRun, attention: torch.Tensor) -> dict:
    """Real and fake masks through D in one call; a float32 loss, unscaled; D's gradients averaged over the processes
    once per optimizer step. -> D's metrics of this micro-batch, on the device."""
    unwrapped = run.unwrapped
    with student_parameters_gathered(unwrapped, every_unit=False):  # the score head draws the fake masks
        output = unwrapped.discriminator_loss(teacher_attention=attention, generator=run.noise_generator)
    (output.loss / run.args.gradient_accumulation_steps).backward()
    if run.accelerator.sync_gradients:
        average_gradients(run.discriminator.parameters(), run.accelerator)
        run.d_optimizer.step()
        run.d_optimizer.zero_grad(set_to_none=True)
    # Mean raw scores beside the accuracies: a least-squares D aims at 1 (real) and 0 (generated), and both
    # accuracies at 0.5 also read "everything scored low" (docs/method.md §5).
    return dict(d_loss=output.loss.detach(), d_real_accuracy=output.real_accuracy,
                d_fake_accuracy=output.fake_accuracy, d_real_score=output.real_scores.mean(),
                d_fake_score=output.fake_scores.mean())


def mask_diagnostics(run: PretrainingRun, output, attention: torch.Tensor | None) -> dict:
    """Dozens of small ops, so only on the micro-batch that ends a logging window: how compact the masked set is
    against random masks of the same count, the entropy of p and of the Gumbel sample that picked the top-K, and how
    much the scores decide."""
    from automae_hf.configuration_automae import num_visible_patches
    from automae_hf.masking import mask_entropy, mask_shape_statistics, mask_signal_statistics, sample_entropy

    config = run.unwrapped.config
    grid = tuple(attention.shape[-2:]) if attention is not None else config.grid_size
    diagnostics = dict(mask_shape_statistics(output.mask.detach(), grid, run.diagnostics_generator))
    if output.mask_logits is not None:
        diagnostics["mask_entropy"] = mask_entropy(output.mask_logits.detach())
        diagnostics["gumbel_sample_entropy"] = sample_entropy(output.mask_probs.detach())
    if output.mask_logits is not None and attention is not None:
        num_visible = num_visible_patches(output.mask.shape[1], config.mask_ratio)
        diagnostics.update(mask_signal_statistics(output.mask_logits, output.mask_probs, attention, num_visible,
                                                  config.gumbel_noise_scale))
    return diagnostics


def end_optimizer_step(run: PretrainingRun, epoch: int, batch: dict, output, diagnostics: dict) -> None:
    """After the micro-batch that completes an optimizer step: schedules, the log, a picture, a checkpoint, hooks."""
    from accelerate.utils import DistributedType

    args, accelerator = run.args, run.accelerator
    run.micro_in_step = 0
    run.student_scheduler.step()
    if run.d_scheduler is not None:
        run.d_scheduler.step()
    run.state.completed_steps += 1
    completed = run.state.completed_steps
    run.progress.update(1)
    if completed % args.logging_steps == 0 or completed == run.max_train_steps:
        write_log(run, epoch, diagnostics)
    if args.image_log_steps and completed % args.image_log_steps == 0 and (
            accelerator.is_main_process or accelerator.distributed_type == DistributedType.FSDP):
        # Under FSDP every rank takes part in the forward's all-gathers; the main one writes.
        with student_parameters_gathered(run.unwrapped):
            picture = Path(args.output_dir) / "images" / f"step_{completed:07d}.png"
            save_image_grid(picture if accelerator.is_main_process else None, run.unwrapped, batch["pixel_values"],
                            output, run.image_mean, run.image_std, boxes=batch.get("boxes"))
    if (args.checkpointing_steps not in (None, "epoch") and completed % int(args.checkpointing_steps) == 0
            and completed < run.max_train_steps):
        save_training_state(run)
    if run.hooks.after_step is not None:
        run.hooks.after_step(completed)


def write_log(run: PretrainingRun, epoch: int, diagnostics: dict) -> None:
    """The logging window's means over all processes: to train_log.jsonl, the trackers and the progress bar."""
    accelerator, state, window = run.accelerator, run.state, run.window
    raise_on_nonfinite(accelerator, run.first_nonfinite_step)
    means, diagnostic_means, (images, skipped) = window_over_processes(
        accelerator, window.sums, window.micro_batches, diagnostics, [window.images, run.local_skipped])
    state.skipped_images, run.local_skipped = state.skipped_images + int(skipped), 0
    elapsed = time.perf_counter() - window.start
    log = {**means, **diagnostic_means, **window.host_times()}  # host times: this process's
    log.update(lr=run.student_scheduler.get_last_lr()[0], images_per_second=images / max(elapsed, 1e-9),
               skipped_images=state.skipped_images, epoch=epoch, step=state.completed_steps)
    run.progress.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in log.items()
                              if k in ("loss", "d_loss", "images_per_second", "skipped_images")}, refresh=False)
    if run.args.with_tracking:
        accelerator.log(log, step=state.completed_steps)
    if run.log_file is not None:
        run.log_file.write(json.dumps(log) + "\n")
        run.log_file.flush()
    window.restart()


def settle_before_saving(run: PretrainingRun) -> None:
    """No non-finite weights saved; the skip count summed over the processes, as every rank reloads rank 0's copy."""
    accelerator = run.accelerator
    raise_on_nonfinite(accelerator, run.first_nonfinite_step, run.unwrapped)
    skipped = accelerator.reduce(torch.tensor([run.local_skipped], device=accelerator.device), reduction="sum")
    run.state.skipped_images += int(skipped[0])
    run.local_skipped = 0


def save_training_state(run: PretrainingRun) -> None:
    """A checkpoint of this step (`checkpointing.save_checkpoint`), once `settle_before_saving` passed."""
    settle_before_saving(run)
    step, commit_hook = run.state.completed_steps, run.hooks.before_checkpoint_commit
    save_checkpoint(run.accelerator, run.checkpoint_root, step, total_limit=run.args.checkpoints_total_limit,
                    run_arguments=run.arguments,
                    before_commit=(lambda: commit_hook(step)) if commit_hook is not None else None)
    run.last_saved = step


def finish(run: PretrainingRun) -> None:
    """The last checkpoint, the model folder, the summary, the push."""
    args, accelerator, completed = run.args, run.accelerator, run.state.completed_steps
    if run.last_saved != completed:
        save_training_state(run)
    else:
        settle_before_saving(run)
    accelerator.wait_for_everyone()
    summary = run_summary(args, run.unwrapped.config, run.teacher_mode, completed, run.state.skipped_images,
                          run.effective_batch, run.learning_rate, run.box_column)
    summary["run_fingerprint"] = arguments_fingerprint(run.arguments)
    save_run(args, accelerator, run.model, run.unwrapped, run.processor, completed, run.state.skipped_images, summary)
    if run.log_file is not None:
        run.log_file.close()
    if args.with_tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()

if __name__ == "__main__":
    main()

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
from pathlib import Path

import numpy as np
import torch


from ..configuration_automae import MASKING_STRATEGIES as MASKING_CHOICES
from ..teacher import looks_like_a_local_path
from .checkpointing import TrainState, latest_checkpoint, save_checkpoint
from .data import (
    DATA_BOX_FORMATS,
    IMAGE_COLUMN_CANDIDATES,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    MapImageDataset,
    add_teacher_attention,
    collate,
    load_images,
    make_stream_transform,
    normalize_pixels,
    one_line,
)
from .hub import HubPushError, add_hub_arguments, check_hub_arguments, push_folder
from .model_card import hub_id, public_name
from .pictures import save_image_grid

logger = logging.getLogger("automae.pretrain")

# What a --preset sets beyond the model config: follow_teacher's score head learns at a tenth of the student's rate.
# At the full rate the reconstruction loss flattens the scores after ~100 steps (spread 4.0 -> 0.85, sampled top-K in
# the teacher's top-K 82% -> 44% at step 300, Fashion-MNIST, DINOv2 teacher); at a tenth it keeps 67% (one seed).
PRESET_TRAINING_DEFAULTS = {"follow_teacher": {"score_head_lr_multiplier": 0.1}}


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="AutoMAE pretraining (learned masks from a frozen ViT teacher + adversarial box prior).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset_name", default=None,
                   help="Hub data set name, or a local folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.")
    d.add_argument("--dataset_config_name", default=None, help="Configuration name of the Hub data set.")
    d.add_argument("--dataset_split", default="train", help="Split to train on.")
    d.add_argument("--train_dir", default=None, help="A local image folder (loaded with the `imagefolder` builder).")
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

    m = p.add_argument_group("model")
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

    t = p.add_argument_group("training")
    t.add_argument("--output_dir", required=True, help="Where checkpoints, images, logs and the final model go.")
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
    t.add_argument("--warmup_epochs", type=float, default=40, help="Linear warm-up length in epochs, then cosine to 0.")
    t.add_argument("--warmup_steps", "--num_warmup_steps", dest="warmup_steps", type=int, default=None,
                   help="Warm-up in optimizer steps (overrides epochs).")
    t.add_argument("--score_head_lr_multiplier", type=float, default=None,
                   help="The score head's learning rate as a multiple of the student's (1: the reference, one AdamW "
                        "step for both; 0 freezes the head at its initialisation). Default: the --preset's "
                        f"({PRESET_TRAINING_DEFAULTS}), else 1.")
    t.add_argument("--adam_beta1", type=float, default=0.9)
    t.add_argument("--adam_beta2", type=float, default=0.95)
    t.add_argument("--optim", choices=("adamw_torch_fused", "adamw_torch"), default="adamw_torch_fused",
                   help="As TrainingArguments.optim: the fused kernels (default) or per-tensor AdamW (devices without "
                   "fused Adam, e.g. XLA). D's Adam follows.")
    t.add_argument("--seed", type=int, default=0, help="Random seed (data order, augmentation, masks, init).")
    t.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="Mixed precision (default: whatever `accelerate launch` / its config says).")
    t.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="Keep only the newest N checkpoints under output_dir/checkpoints (as the HF examples).")
    t.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute the encoder and decoder blocks in the backward pass (less memory, more time).")
    t.add_argument("--torch_compile", action="store_true",
                   help="torch.compile the pretraining model (the student + score-head step compiles without a "
                        "graph break).")
    t.add_argument("--torch_compile_backend", default="inductor", help="Backend of --torch_compile.")
    t.add_argument("--checkpointing_steps", default=None,
                   help="Save the full training state every N optimizer steps, or 'epoch'. A final state is always saved.")
    t.add_argument("--resume_from_checkpoint", default=None,
                   help="A checkpoint folder, or 'latest' for the newest complete one under output_dir/checkpoints.")

    lg = p.add_argument_group("logging")
    lg.add_argument("--with_tracking", action="store_true", help="Log metrics through accelerate's trackers.")
    lg.add_argument("--report_to", default="tensorboard", help="Tracker(s) for --with_tracking: tensorboard, wandb, all, ...")
    lg.add_argument("--logging_steps", type=int, default=1, help="Log metrics every N optimizer steps.")
    lg.add_argument("--image_log_steps", type=int, default=0,
                    help="Save a PNG grid every N steps (image, the strategy's guide: box patches / teacher attention / "
                         "mask probability, the mask, the reconstruction); 0: off.")
    add_hub_arguments(p)
    p.add_argument("--push_teacher", action="store_true",
                   help="With --push_to_hub: also upload the frozen teacher's weights (by default the pushed checkpoint "
                        "names its teacher by Hub id and from_pretrained loads it from there).")
    lg.add_argument("--debug_dump_weights", action="store_true", help=argparse.SUPPRESS)
    lg.add_argument("--debug_kill_after_step", type=int, default=None, help=argparse.SUPPRESS)
    lg.add_argument("--debug_kill_during_checkpoint", type=int, default=None, help=argparse.SUPPRESS)
    return p


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
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error(f"--max_train_steps must be a positive number of optimizer steps, got {args.max_train_steps}")
    if not args.num_train_epochs > 0:
        parser.error(f"--num_train_epochs must be > 0, got {args.num_train_epochs}")
    for flag in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.score_head_lr_multiplier is None:
        args.score_head_lr_multiplier = PRESET_TRAINING_DEFAULTS.get(args.preset, {}).get("score_head_lr_multiplier", 1.0)
    if not args.score_head_lr_multiplier >= 0:
        parser.error(f"--score_head_lr_multiplier must be >= 0, got {args.score_head_lr_multiplier}")
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
    for flag in ("model_name_or_path", "config_name", "teacher_name_or_path"):
        value = getattr(args, flag)
        if value and value.lower() not in ("none", "self") and looks_like_a_local_path(value) and not os.path.isdir(value):
            parser.error(f"--{flag} {value!r}: no such folder")


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
    overrides.update(parse_overrides(args.config_overrides, parser))
    for name in ("mask_ratio", "mask_factor", "adversarial_weight", "image_size", "attention_hint_ratio"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.norm_pix_loss:
        overrides["norm_pix_loss"] = True
    teacher = args.teacher_name_or_path
    if teacher is not None and teacher.lower() == "none":  # plain MAE, the baseline
        if args.masking is not None and MASKING_STRATEGIES[args.masking].uses_teacher:
            parser.error(f"--masking {args.masking} needs a teacher; --teacher_name_or_path none means random masking")
        overrides["masking"] = args.masking or "random"
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


def student_param_groups(model, weight_decay: float, score_head_lr: float | None = None):
    """AdamW groups: weight decay on matrices only (not on biases, norms, tokens, position tables), as MAE; the score
    head in its own group at `score_head_lr` when given (0 freezes it), the schedule scaling every group alike."""
    student_ids = {id(p) for p in model.student_parameters()}
    head_ids = set()
    if score_head_lr is not None and model.mask_generator is not None:
        head_ids = {id(p) for p in model.mask_generator.score_head.parameters()}
    groups = {(False, True): [], (False, False): [], (True, True): [], (True, False): []}  # (score head, decay)
    for name, param in model.named_parameters():
        if id(param) not in student_ids:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or "norm" in name.lower() or "token" in name
                     or "position" in name)
        groups[(id(param) in head_ids, decay)].append(param)
    out = []
    for (head, decay), params in groups.items():
        if params or not head:  # the two student groups always exist (checkpoints count on them)
            group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            out.append({**group, "lr": score_head_lr} if head else group)
    return out


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
        # Streaming: every process reads its own batches (undecodable images make them uneven).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                  dispatch_batches=False if args.streaming else None),
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


def image_processor_for(args, config):
    """-> (the image processor saved with the model, per-channel mean, per-channel std): the one named, the
    checkpoint's, else MAE's ImageNet normalisation (averaged over channels for grayscale)."""
    try:  # transformers 5.x: the torchvision-free processor (same fields, same saved format)
        from transformers import ViTImageProcessorPil as ViTImageProcessor
    except ImportError:
        from transformers import ViTImageProcessor

    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    processor = None
    for source in (args.image_processor_name, args.model_name_or_path):
        if source:
            try:
                processor = ViTImageProcessor.from_pretrained(source, cache_dir=args.cache_dir)
                break
            except Exception:  # noqa: BLE001  (a checkpoint without a processor: the default below)
                pass
    if processor is None:
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        if config.num_channels == 1:
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        processor = ViTImageProcessor(image_mean=list(mean), image_std=list(std), size={"height": size, "width": size})
    processor.size = {"height": size, "width": size}

    def per_channel(values):
        values = list(values)
        return values[: config.num_channels] if len(values) >= config.num_channels else values[:1] * config.num_channels

    return processor, per_channel(processor.image_mean), per_channel(processor.image_std)


def build_training_data(args, parser, accelerator, model, teacher_mode, mean, std):
    """-> (the training data set, its DataLoader). Map-style sets decode and augment in the loader's workers;
    `--cache_teacher_attention` first adds the teacher's maps of every image as a column."""
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
                                          config.patch_size], sort_keys=True, default=str)
                hf_data = add_teacher_attention(hf_data, column, pil_mode, size, mean, std,
                                                generator_module.teacher_attention, 256, accelerator.device,
                                                teacher_key=teacher_key)
        dataset = MapImageDataset(hf_data, column, size, None, None, pil_mode, args.seed, box_column, args.box_format)
    loader_kwargs = dict(batch_size=args.per_device_train_batch_size, collate_fn=collate,
                         num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available())
    if args.dataloader_num_workers > 0:
        # Workers outlive the epoch (MapImageDataset's epoch is in shared memory) and keep 4 batches each in flight.
        loader_kwargs.update(persistent_workers=True, prefetch_factor=4)
    loader = torch.utils.data.DataLoader(dataset, shuffle=not args.streaming, drop_last=False, **loader_kwargs)
    return dataset, loader, box_column


def build_optimizers(args, model, effective_batch):
    """-> (lr, student AdamW, D's Adam or None). lr = base_learning_rate * effective batch / 256 unless
    --learning_rate is given; both optimizers fused unless --optim adamw_torch (the Trainer's default is fused)."""
    lr = args.learning_rate if args.learning_rate is not None else args.base_learning_rate * effective_batch / 256
    fused = args.optim == "adamw_torch_fused"
    betas = (args.adam_beta1, args.adam_beta2)
    score_head_lr = None if args.score_head_lr_multiplier == 1.0 else lr * args.score_head_lr_multiplier
    student_optimizer = torch.optim.AdamW(student_param_groups(model, args.weight_decay, score_head_lr), lr=lr, betas=betas,
                                          fused=fused)
    d_optimizer = None
    if model.discriminator is not None:  # D: Adam, no weight decay, the student's betas and schedule, as MAE's
        d_optimizer = torch.optim.Adam(model.discriminator_parameters(), lr=lr, betas=betas, fused=fused)
    return lr, student_optimizer, d_optimizer


@contextlib.contextmanager
def outside_the_student(model):
    """D and the frozen teacher leave the module tree while accelerate wraps the student, so DDP / FSDP / ZeRO never
    own, shard or sync them: the teacher stays whole on every rank, D averages its own gradients (`average_gradients`).
    Yields the detached modules; they are back in place afterwards."""
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


def make_schedule(args, optimizer, warmup_steps: int, max_train_steps: int):
    """Not prepared by accelerate: stepped by hand once per optimizer step (a prepared scheduler steps
    num_processes times)."""
    import transformers

    inner = getattr(optimizer, "optimizer", optimizer)
    return transformers.get_scheduler(args.lr_scheduler_type, inner, num_warmup_steps=warmup_steps,
                                      num_training_steps=max_train_steps)


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
    model's code. Saves under the model's own class (docs/pitfalls.md §23)."""
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


def resume(args, parser, accelerator, checkpoint_root: Path) -> None:
    """`--resume_from_checkpoint latest|PATH`: accelerate's `load_state` (model, optimizers, schedules, step, RNG)."""
    path = (latest_checkpoint(checkpoint_root) if args.resume_from_checkpoint == "latest"
            else Path(args.resume_from_checkpoint))
    if path is None:
        logger.warning("--resume_from_checkpoint latest: no checkpoint under %s, starting fresh", checkpoint_root)
    elif not path.is_dir():
        parser.error(f"--resume_from_checkpoint {str(path)!r} is not a checkpoint folder")
    else:
        accelerator.print(f"Resuming from {path}")
        accelerator.load_state(str(path))


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
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)  # one line per file saved otherwise
    logging.getLogger("accelerate.accelerator").setLevel(logging.WARNING)
    _check_arguments(args, parser)
    import transformers
    from accelerate.utils import DistributedType, set_seed

    from automae_hf.configuration_automae import num_visible_patches
    from automae_hf.masking import mask_entropy, mask_signal_statistics

    # ---- set-up: accelerator, model and teacher, data, optimizers, schedules, resume ----------------------------
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args)
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
        logger.setLevel(logging.ERROR)
    set_seed(args.seed)
    model, teacher_mode = build_model(args, parser)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = model.config
    processor, mean, std = image_processor_for(args, config)
    train_dataset, train_dataloader, box_column = build_training_data(args, parser, accelerator, model, teacher_mode,
                                                                      mean, std)
    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    lr, student_optimizer, d_optimizer = build_optimizers(args, model, effective_batch)
    discriminator = model.discriminator
    model, student_optimizer, train_dataloader = prepare_student(accelerator, model, student_optimizer,
                                                                 train_dataloader)
    unwrapped = accelerator.unwrap_model(model)
    if args.torch_compile:  # after prepare: DDP and the optimizers see the original parameters
        model = torch.compile(model, backend=args.torch_compile_backend)
        # The D step runs outside the model's forward: D and the score head compile on their own (on a GPU their
        # dozens of small ops, the spectral norms' power iterations included, become a few kernels).
        compiled = [part for part in (discriminator, getattr(unwrapped.mask_generator, "score_head", None)) if part]
        for part in compiled:
            part.compile(backend=args.torch_compile_backend)
        logger.info("torch.compile (%s): the model's forward, %s", args.torch_compile_backend,
                    ", ".join(type(part).__name__ for part in compiled) or "nothing else")

    if args.streaming:
        steps_per_epoch, max_train_steps, num_epochs = None, args.max_train_steps, 10**9
    else:
        steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    if args.warmup_steps is not None:
        warmup_steps = args.warmup_steps
    else:
        warmup_steps = int(round(args.warmup_epochs * steps_per_epoch)) if steps_per_epoch else 0
    warmup_steps = min(warmup_steps, max_train_steps)
    student_scheduler = make_schedule(args, student_optimizer, warmup_steps, max_train_steps)
    d_scheduler = make_schedule(args, d_optimizer, warmup_steps, max_train_steps) if d_optimizer is not None else None

    # Mask / Gumbel / box-prior noise: reseeded from (seed, rank, micro-batch) before every micro-batch, so a resumed
    # run draws exactly what the uninterrupted one drew, on every rank, whatever the global RNG did meanwhile.
    noise_generator = torch.Generator(device=accelerator.device)
    pixel_mean, pixel_std = (torch.tensor(values, device=accelerator.device) for values in (mean, std))
    state = TrainState()
    accelerator.register_for_checkpointing(state, student_scheduler)
    if d_scheduler is not None:
        accelerator.register_for_checkpointing(d_scheduler, d_optimizer)
    checkpoint_root = output_dir / "checkpoints"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "images").mkdir(exist_ok=True)
        for stale in checkpoint_root.glob(".tmp-step_*") if checkpoint_root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
    if args.with_tracking:
        accelerator.init_trackers("automae_pretrain", {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                       for k, v in vars(args).items()})
    if args.resume_from_checkpoint:
        resume(args, parser, accelerator, checkpoint_root)
    start_step = state.completed_steps
    start_epoch = start_step // steps_per_epoch if steps_per_epoch else 0
    skip_batches = (start_step % steps_per_epoch) * args.gradient_accumulation_steps if steps_per_epoch else 0
    teacher_name = {"none": "none", "self": "self (the student's own attention)"}.get(
        teacher_mode, args.teacher_name_or_path or config.teacher_name_or_path or "the checkpoint's")
    logger.info("AutoMAE pretraining: masking=%s, teacher=%s, %d examples/epoch, %d steps, lr %.3g (effective batch "
                "%d), %d processes", config.masking, teacher_name, len(train_dataset) if not args.streaming else -1,
                max_train_steps, lr, effective_batch, accelerator.num_processes)

    # ---- the iteration: teacher attention once -> D step -> student + score-head step (docs/method.md §3) -------
    def discriminator_step(attention):
        """Real and fake through D in one call; a float32 loss, unscaled; gradients averaged over processes once per
        optimizer step."""
        with student_parameters_gathered(unwrapped, every_unit=False):  # the score head draws the fake masks
            output = unwrapped.discriminator_loss(teacher_attention=attention, generator=noise_generator)
        (output.loss / args.gradient_accumulation_steps).backward()
        if accelerator.sync_gradients:
            average_gradients(discriminator.parameters(), accelerator)
            d_optimizer.step()
            d_optimizer.zero_grad(set_to_none=True)
        return dict(d_loss=output.loss.detach(), d_real_accuracy=output.real_accuracy,
                    d_fake_accuracy=output.fake_accuracy)

    def train_step(batch, diagnose: bool):
        """-> (output, metrics summed over the logging window, diagnostics of this micro-batch when `diagnose`)."""
        pixel_values = batch["pixel_values"]
        metrics = {}
        with accelerator.accumulate(model):
            attention = None
            if "teacher_attention" in batch:  # cached once, cropped and flipped with the image
                attention = batch["teacher_attention"].to(pixel_values.device, torch.float32)
            elif teacher_mode != "none":
                with accelerator.autocast(), student_parameters_gathered(unwrapped):
                    attention = unwrapped.teacher_attention(pixel_values)
            if discriminator is not None:
                metrics.update(discriminator_step(attention))
            boxes = batch.get("boxes") if config.masking == "box_prior" else None
            box_kwargs = {"boxes": boxes, "box_format": "xyxy"} if boxes is not None else {}
            output = model(pixel_values, teacher_attention=attention, generator=noise_generator, **box_kwargs)
            accelerator.backward(output.loss)
            student_optimizer.step()
            student_optimizer.zero_grad(set_to_none=True)
        metrics.update(loss=output.loss.detach(), reconstruction_loss=output.reconstruction_loss.detach())
        if output.generator_loss is not None:
            metrics["generator_loss"] = output.generator_loss.detach()
        diagnostics = {}  # dozens of small ops: only on the micro-batch that ends a logging window
        if diagnose and output.mask_probs is not None:
            diagnostics["mask_entropy"] = mask_entropy(output.mask_probs.detach().float())
        if diagnose and output.mask_logits is not None and attention is not None:  # how much the scores decide
            num_visible = num_visible_patches(output.mask.shape[1], config.mask_ratio)
            diagnostics.update(mask_signal_statistics(output.mask_logits, output.mask_probs, attention, num_visible,
                                                      config.gumbel_noise_scale))
        return output, metrics, diagnostics

    from tqdm.auto import tqdm

    progress = tqdm(total=max_train_steps, initial=start_step, disable=not accelerator.is_local_main_process,
                    desc="pretrain", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10)
    log_file = open(output_dir / "train_log.jsonl", "a") if accelerator.is_main_process else None
    model.train()
    if discriminator is not None:
        discriminator.train()
    completed, micro_in_step, last_saved = start_step, 0, None
    window_images, window_start, sums, sum_count = 0, time.perf_counter(), {}, 0
    # Host time per micro-batch, logged: waiting for the loader, inside train_step (the model; on a GPU also waiting
    # for a full launch queue) and the rest of the loop (logging, checkpoints included). perf_counter only: no sync.
    host_ms = {"data_wait_ms": 0.0, "train_step_ms": 0.0}

    def timed(batches):
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            host_ms["data_wait_ms"] += 1000 * (time.perf_counter() - start)
            if batch is None:
                return
            yield batch

    done, epoch = completed >= max_train_steps, start_epoch
    while not done and epoch < num_epochs:
        for owner in (train_dataset, train_dataloader):
            if hasattr(owner, "set_epoch"):
                owner.set_epoch(epoch)
        loader = train_dataloader
        if epoch == start_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in timed(loader):
            state.skipped_images += int(batch["skipped"])
            if batch["pixel_values"] is None:  # only possible when streaming: a whole batch undecodable
                continue
            batch["pixel_values"] = normalize_pixels(batch["pixel_values"], pixel_mean, pixel_std)
            micro_index = completed * args.gradient_accumulation_steps + micro_in_step
            noise_generator.manual_seed(noise_seed(args.seed, accelerator.process_index, micro_index))
            step_start = time.perf_counter()
            ends_step = (micro_in_step == args.gradient_accumulation_steps - 1
                         or accelerator.gradient_state.end_of_dataloader)
            ends_window = ends_step and (
                (completed + 1) % args.logging_steps == 0 or completed + 1 == max_train_steps)
            output, metrics, diagnostics = train_step(batch, diagnose=ends_window)
            host_ms["train_step_ms"] += 1000 * (time.perf_counter() - step_start)
            window_images += batch["pixel_values"].shape[0]
            for key, value in metrics.items():  # summed on the device: no host sync outside logging steps
                value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
                sums[key] = sums[key] + value if key in sums else value
            sum_count += 1
            micro_in_step += 1
            if not accelerator.sync_gradients:
                continue
            micro_in_step = 0
            student_scheduler.step()
            if d_scheduler is not None:
                d_scheduler.step()
            completed += 1
            state.completed_steps = completed
            progress.update(1)

            if completed % args.logging_steps == 0 or completed == max_train_steps:
                stats = torch.tensor([window_images, state.skipped_images], device=accelerator.device, dtype=torch.float64)
                stats = accelerator.reduce(stats, reduction="sum")
                elapsed = time.perf_counter() - window_start
                log = {k: float(v) / sum_count for k, v in sums.items()}
                log.update({k: float(v) for k, v in diagnostics.items()})
                log.update({key: value / sum_count for key, value in host_ms.items()},
                           loop_other_ms=(1000 * elapsed - sum(host_ms.values())) / sum_count)
                log.update(lr=student_scheduler.get_last_lr()[0], images_per_second=float(stats[0]) / max(elapsed, 1e-9),
                           skipped_images=int(stats[1]), epoch=epoch, step=completed)
                progress.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in log.items()
                                      if k in ("loss", "d_loss", "images_per_second", "skipped_images")}, refresh=False)
                if args.with_tracking:
                    accelerator.log(log, step=completed)
                if log_file is not None:
                    log_file.write(json.dumps(log) + "\n")
                    log_file.flush()
                sums, sum_count, window_images, window_start = {}, 0, 0, time.perf_counter()
                host_ms = dict.fromkeys(host_ms, 0.0)
            if args.image_log_steps and completed % args.image_log_steps == 0 and (
                    accelerator.is_main_process or accelerator.distributed_type == DistributedType.FSDP):
                # Under FSDP every rank takes part in the forward's all-gathers; the main one writes.
                with student_parameters_gathered(unwrapped):
                    save_image_grid(output_dir / "images" / f"step_{completed:07d}.png" if accelerator.is_main_process
                                    else None, unwrapped, batch["pixel_values"], output, mean, std,
                                    boxes=batch.get("boxes"))
            if (args.checkpointing_steps not in (None, "epoch") and completed % int(args.checkpointing_steps) == 0
                    and completed < max_train_steps):
                save_checkpoint(accelerator, checkpoint_root, completed, total_limit=args.checkpoints_total_limit,
                                kill_before_commit=args.debug_kill_during_checkpoint == completed)
                last_saved = completed
            if args.debug_kill_after_step is not None and completed >= args.debug_kill_after_step:
                import signal  # tests: die like a preempted job (SIGKILL, no cleanup)

                os.kill(os.getpid(), signal.SIGKILL)
            if completed >= max_train_steps:
                done = True
                break
        if args.checkpointing_steps == "epoch" and not done:
            save_checkpoint(accelerator, checkpoint_root, completed, total_limit=args.checkpoints_total_limit)
            last_saved = completed
        epoch += 1
    progress.close()

    # ---- the end: last checkpoint, the model folder, the summary, the push -------------------------------------
    if last_saved != completed:
        save_checkpoint(accelerator, checkpoint_root, completed, total_limit=args.checkpoints_total_limit)
    accelerator.wait_for_everyone()
    total_skipped = int(accelerator.reduce(torch.tensor([state.skipped_images], device=accelerator.device), "sum")[0])
    save_run(args, accelerator, model, unwrapped, processor, completed, total_skipped,
             run_summary(args, config, teacher_mode, completed, total_skipped, effective_batch, lr, box_column))
    if log_file is not None:
        log_file.close()
    if args.with_tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()

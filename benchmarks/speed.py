"""What learning where to mask costs: training-step time and peak memory of AutoMAEForPreTraining against
transformers' ViTMAEForPreTraining with the same student config, interleaved in one process so every arm sees the
same machine state. Prints medians and ratios (and writes them to --output_json).

    python benchmarks/speed.py                                   # tiny 32 px model, batch 32 (CPU, ~1 min)
    python benchmarks/speed.py --size vit-s16 --batch_size 8     # ViT-S/16, 224 px, standard 512x8 decoder
    python benchmarks/speed.py --size vit-b16 --batch_size 4 --steps 5
    python benchmarks/speed.py --size vit-b16 --batch_size 64 --device cuda --bf16   # what benchmarks/gpu.sh runs

Arms: one MAE step; one AutoMAE iteration (teacher attention -> D step -> student + score-head step,
docs/method.md §3); the teacher's CLS attention alone; an AutoMAE iteration with cached teacher attention (the
`--cache_teacher_attention` mode of training/pretrain.py: the teacher costs nothing per step); and encoder inference
of `AutoMAEModel` against transformers' `ViTModel` (SDPA both). Peak memory (`--memory`): each training arm runs in
its own process, 3 steps; CUDA: `max_memory_allocated`, CPU: the peak resident set above the process after imports.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTMAEConfig, ViTMAEForPreTraining, ViTModel
from transformers.utils import logging

from automae_hf import AutoMAEConfig, AutoMAEForPreTraining, AutoMAEModel

logging.set_verbosity_error()

SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, image_size=32,
                 patch_size=4, decoder_hidden_size=64, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                 decoder_intermediate_size=256),
    # ViTMAEConfig's decoder defaults are the standard 512 wide x 8 blocks, 16 heads.
    "vit-s16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                    image_size=224, patch_size=16),
    "vit-b16": dict(image_size=224, patch_size=16),
}
MEMORY_ARMS = ("MAE", "AutoMAE", "AutoMAE cached")


# ---- one step of each arm ---------------------------------------------------------------------------------------
def automae_step(model, student_optimizer, d_optimizer, pixel_values, attention=None, autocast=nullcontext):
    """One iteration of docs/method.md §3: teacher attention once -> D step -> student + score-head step.
    `attention` given: the cached-teacher mode (maps computed once per image, `--cache_teacher_attention`)."""
    with autocast():
        if attention is None:
            attention = model.mask_generator.teacher_attention(pixel_values)
        d_loss = model.discriminator_loss(teacher_attention=attention).loss
    d_optimizer.zero_grad(set_to_none=True)
    d_loss.backward()
    d_optimizer.step()
    with autocast():
        loss = model(pixel_values, teacher_attention=attention).loss
    student_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    student_optimizer.step()


def mae_step(model, optimizer, pixel_values, autocast=nullcontext):
    with autocast():
        loss = model(pixel_values).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# ---- set-up -----------------------------------------------------------------------------------------------------
def build(args, which: tuple[str, ...]):
    kwargs = dict(SIZES[args.size], norm_pix_loss=True)
    device = torch.device(args.device)
    torch.manual_seed(0)
    built = {"pixel_values": torch.randn(args.batch_size, 3, kwargs["image_size"], kwargs["image_size"], device=device)}
    if "automae" in which:
        automae = AutoMAEForPreTraining(AutoMAEConfig(**kwargs)).to(device).train()
        built["automae"] = automae
        built["student_optimizer"] = torch.optim.AdamW(automae.student_parameters(), lr=1e-4, betas=(0.9, 0.95),
                                                       fused=True)  # as training/pretrain.py (--optim)
        built["d_optimizer"] = torch.optim.Adam(automae.discriminator_parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
        with torch.no_grad(), autocast_of(args)():
            built["cached"] = automae.mask_generator.teacher_attention(built["pixel_values"]).half()  # stored fp16
    if "mae" in which:
        mae = ViTMAEForPreTraining(ViTMAEConfig(**kwargs, attn_implementation="sdpa")).to(device).train()
        built["mae"] = mae
        built["mae_optimizer"] = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-4,
                                                   betas=(0.9, 0.95), fused=True)
    if "inference" in which:
        built["encoder"] = AutoMAEModel(AutoMAEConfig(**kwargs)).to(device).eval()
        vit_fields = {k: v for k, v in kwargs.items() if not k.startswith("decoder_") and k != "norm_pix_loss"}
        built["vit"] = ViTModel(ViTConfig(**vit_fields, attn_implementation="sdpa"),
                                add_pooling_layer=False).to(device).eval()
    return built


def autocast_of(args):
    if not args.bf16:
        return nullcontext
    return lambda: torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)


def synchronize(args):
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()


def training_arms(built, args) -> dict:
    autocast, x = autocast_of(args), built["pixel_values"]
    arms = {}
    if "mae" in built:
        arms["MAE"] = lambda: mae_step(built["mae"], built["mae_optimizer"], x, autocast)
    if "automae" in built:
        model, so, do = built["automae"], built["student_optimizer"], built["d_optimizer"]
        arms["AutoMAE"] = lambda: automae_step(model, so, do, x, None, autocast)
        arms["AutoMAE cached"] = lambda: automae_step(model, so, do, x, built["cached"].float(), autocast)
    return arms


# ---- time -------------------------------------------------------------------------------------------------------
def measure_time(args) -> dict:
    built = build(args, ("inference",) if args.inference_only else ("automae", "mae", "inference"))
    autocast, x = autocast_of(args), built["pixel_values"]

    def teacher():
        with torch.no_grad(), autocast():
            built["automae"].mask_generator.teacher_attention(x)

    def inference(model):
        with torch.no_grad(), autocast():
            model(x)

    arms = {"ViTModel inference": lambda: inference(built["vit"]),
            "AutoMAEModel inference": lambda: inference(built["encoder"])}
    if not args.inference_only:
        arms = {**training_arms(built, args), "teacher": teacher, **arms}
    times = {name: [] for name in arms}
    for _ in range(args.warmup):
        for run in arms.values():
            run()
    order = list(arms.items())
    for step in range(args.steps):
        # interleaved, so drift and turbo affect every arm alike; the order flips every step, so no arm always runs
        # right after the same neighbour (whose weights it would find in, or evicted from, the caches)
        for name, run in order if step % 2 == 0 else order[::-1]:
            synchronize(args)
            start = time.perf_counter()
            run()
            synchronize(args)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# ---- memory -----------------------------------------------------------------------------------------------------
def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_memory_of_arm(args, arm: str) -> float:
    """Peak training memory (MiB) of one arm, measured in this (fresh) process: models, optimizer states, gradients
    and activations. CUDA: the allocator's peak; CPU: the resident set polled every millisecond, above what the
    process held before building anything (ru_maxrss cannot serve: imports leave a higher high-water mark)."""
    which = ("mae",) if arm == "MAE" else ("automae",)
    cuda = torch.device(args.device).type == "cuda"
    warm = torch.randn(2, 4, 16, 8, device=args.device)  # load the kernels' lazy state before the baseline
    F.scaled_dot_product_attention(warm, warm, warm) @ warm.transpose(-1, -2)
    F.conv2d(warm[:, :3], torch.randn(4, 3, 3, 3, device=args.device))
    before = torch.cuda.memory_allocated() if cuda else current_rss()
    peak, done = [before], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(0.001)

    poller = None if cuda else threading.Thread(target=poll, daemon=True)
    if poller:
        poller.start()
    built = build(args, which)
    step = training_arms(built, args)[arm]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    synchronize(args)
    done.set()
    if poller:
        poller.join()
    return ((torch.cuda.max_memory_allocated() if cuda else peak[0]) - before) / 2**20


def measure_memory(args) -> dict:
    """Each arm in its own process, so that one arm's high-water mark cannot hide another's."""
    peaks = {}
    for arm in MEMORY_ARMS:
        command = [sys.executable, __file__, "--size", args.size, "--batch_size", str(args.batch_size),
                   "--device", args.device, "--_memory_arm", arm] + (["--bf16"] if args.bf16 else [])
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        peaks[arm] = float(result.stdout.strip().splitlines()[-1])
    return peaks


# ---- report -----------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the student's mixed precision)")
    parser.add_argument("--memory", action="store_true", help="also peak training memory, one process per arm")
    parser.add_argument("--inference_only", action="store_true",
                        help="only the encoder inference arms (AutoMAEModel against ViTModel), e.g. with more steps")
    parser.add_argument("--output_json", default=None, help="also write the figures here")
    parser.add_argument("--_memory_arm", choices=MEMORY_ARMS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.inference_only and args.memory:
        parser.error("--memory measures the training arms, which --inference_only leaves out: pass one of the two")
    if args._memory_arm:
        print(peak_memory_of_arm(args, args._memory_arm))
        return
    torch.backends.cuda.matmul.allow_tf32 = True

    t = measure_time(args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    figures = {
        "size": args.size, "batch_size": args.batch_size, "steps": args.steps, "device": name,
        "precision": "bf16 autocast" if args.bf16 else "fp32", "torch": torch.__version__,
        "ms": {arm: 1000 * value for arm, value in t.items()},
        "ratio inference AutoMAEModel / ViTModel": t["AutoMAEModel inference"] / t["ViTModel inference"],
    }
    if not args.inference_only:
        figures.update({
            "ratio AutoMAE / MAE": t["AutoMAE"] / t["MAE"],
            "floor 1 + t_teacher / t_MAE": 1 + t["teacher"] / t["MAE"],
            "overhead beyond the teacher": (t["AutoMAE"] - t["MAE"] - t["teacher"]) / t["MAE"],
            "ratio AutoMAE cached / MAE": t["AutoMAE cached"] / t["MAE"],
            "ratio teacher / ViTModel inference": t["teacher"] / t["ViTModel inference"],
        })
    if args.memory:
        peaks = measure_memory(args)
        figures["peak MiB"] = peaks
        figures["memory ratio AutoMAE / MAE"] = peaks["AutoMAE"] / peaks["MAE"]
        figures["memory ratio AutoMAE cached / MAE"] = peaks["AutoMAE cached"] / peaks["MAE"]
    print(f"size={args.size} batch={args.batch_size} steps={args.steps} device={name} precision={figures['precision']} "
          f"torch={torch.__version__}")
    for arm, value in figures["ms"].items():
        print(f"  {arm:45s} {value:9.1f} ms")
    for arm, value in figures.get("peak MiB", {}).items():
        print(f"  peak memory {arm:33s} {value:9.0f} MiB")
    for key, value in figures.items():
        if key.startswith(("ratio", "floor", "overhead", "memory ratio")):
            print(f"  {key:45s} {value:9.3f}")
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Where the cached-teacher AutoMAE iteration spends what an MAE step does not: torch.profiler over both, side by
side in one process (the arms of benchmarks/speed.py, same model sizes).

    python benchmarks/profile_step.py                                  # tiny 32 px model, batch 32
    python benchmarks/profile_step.py --size vit-b16 --batch_size 8    # ViT-B/16, 224 px
    python benchmarks/profile_step.py --device cuda --bf16 --size vit-b16 --batch_size 128 --compile

Prints per iteration, for each arm: wall time, operator calls, kernel launches on a GPU (the host's launch calls,
a CUDA graph's replay counting one, and the kernels the GPU ran; a step made of small ops pays per launch) and host
syncs (`aten::item`, `aten::_local_scalar_dense`, `aten::nonzero`,
outside the optimizers' step: CPU fused Adam reads its step counts there, CUDA's does not);
the cached arm's time and operator calls by phase (the D step, then the student step's score head, mask sampling,
encoder, decoder, D as the generator's critic, backward, optimizer); and the operators with the most extra calls.
`--compile` adds a third arm: the cached iteration with D and the score head compiled (`torch.compile`, as
`training/pretrain.py --torch_compile` does for the D step); its compiled kernels are counted as operator calls too.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import time
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile


def load_sibling(name: str):
    """A module of this folder by file (benchmarks/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speed = load_sibling("speed")  # the same arms and sizes as speed.py
SIZES, autocast_of, build, synchronize = speed.SIZES, speed.autocast_of, speed.build, speed.synchronize

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")
# Host calls that each put work on the GPU's queue; a CUDA graph's replay is one `cudaGraphLaunch` for all its kernels.
LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaGraphLaunch",
                "cudaMemcpyAsync", "cudaMemsetAsync")


def label_modules(model) -> list:
    """Profiler ranges around the student step's parts (forward only: backward is one phase); -> the hook handles."""
    parts = {"score head + sampling": model.mask_generator, "encoder": model.vit, "decoder": model.decoder,
             "D as critic": model.discriminator}
    handles = []
    for name, module in parts.items():
        ranges = []
        handles.append(module.register_forward_pre_hook(lambda *_, name=name, ranges=ranges: ranges.append(
            record_function(f"part: {name}").__enter__())))
        handles.append(module.register_forward_hook(lambda *_, ranges=ranges: ranges.pop().__exit__(None, None, None)))
    return handles


def cached_step(model, student_optimizer, d_optimizer, pixel_values, attention, autocast):
    with record_function("phase: D step"):
        with autocast():
            d_loss = model.discriminator_loss(teacher_attention=attention).loss
        d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optimizer.step()
    with record_function("phase: student forward"), autocast():
        loss = model(pixel_values, teacher_attention=attention).loss
    with record_function("phase: student backward"):
        student_optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("phase: student optimizer"):
        student_optimizer.step()


def mae_step(model, optimizer, pixel_values, autocast):
    with record_function("phase: MAE forward"), autocast():
        loss = model(pixel_values).loss
    with record_function("phase: MAE backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("phase: MAE optimizer"):
        optimizer.step()


def profile_arm(step, steps: int, args):
    for _ in range(2):  # warm-up: allocator, oneDNN / cuBLAS plans
        step()
    synchronize(args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(args)
    seconds = (time.perf_counter() - start) / steps
    events = prof.events()
    # Top-level operator calls only (an op's own aten sub-calls are not extra launches of the step).
    top = collections.Counter()
    ranges = {}
    for event in events:
        if event.name.startswith(("phase: ", "part: ")):
            ranges.setdefault(event.name, []).append(event)
    for event in events:
        if is_operator(event) and (event.cpu_parent is None or not is_operator(event.cpu_parent)):
            top[event.name] += 1
    by_range = {}
    for name, items in ranges.items():
        inner = sum(1 for item in items for child in _descendants(item) if is_operator(child)
                    and not is_operator(child.cpu_parent))
        by_range[name] = {"ms": sum(item.time_range.elapsed_us() for item in items) / 1000 / steps,
                          "ops": inner / steps}
    syncs = sum(1 for event in events if event.name in SYNC_OPS and not _inside(event, "Optimizer.step")) / steps
    launches = kernels = None  # the CPU launches no kernels: operator calls are its only count
    if args.device.startswith("cuda"):
        launches = sum(1 for event in events if event.name.startswith(LAUNCH_CALLS)) / steps
        kernels = sum(1 for event in events if event.device_type == torch.autograd.DeviceType.CUDA) / steps
    return {"ms": seconds * 1000, "ops": sum(top.values()) / steps, "syncs": syncs, "launches": launches,
            "kernels": kernels, "top": {k: v / steps for k, v in top.items()}, "ranges": by_range}


def is_operator(event) -> bool:
    """An aten operator, or a kernel that a compiled graph launches in their place (inductor's CPU / Triton kernels)."""
    return event.name.startswith(("aten::", "cpp_fused", "triton_", "graph_"))


def _inside(event, prefix: str) -> bool:
    while event.cpu_parent is not None:
        event = event.cpu_parent
        if event.name.startswith(prefix):
            return True
    return False


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="profiled iterations per arm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--top", type=int, default=12, help="operators listed by extra calls")
    parser.add_argument("--compile", action="store_true", help="also the cached arm with D and score head compiled")
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--compile_mode", default=None,
                        help="torch.compile mode of that arm: 'reduce-overhead' is CUDA graphs, pretraining's CUDA default")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)

    built = build(args, ("automae", "mae"))
    autocast, x = autocast_of(args), built["pixel_values"]
    model = built["automae"]
    labels = label_modules(model)
    attention = built["cached"].float()
    mae = profile_arm(lambda: mae_step(built["mae"], built["mae_optimizer"], x, autocast), args.steps, args)
    cached_arm = lambda: cached_step(model, built["student_optimizer"], built["d_optimizer"], x, attention, autocast)
    cached = profile_arm(cached_arm, args.steps, args)
    arms = {"MAE": mae, "AutoMAE cached": cached}
    if args.compile:
        for handle in labels:  # ranges opened in hooks do not survive tracing
            handle.remove()
        model.discriminator.compile(backend=args.compile_backend, mode=args.compile_mode)
        model.mask_generator.score_head.compile(backend=args.compile_backend, mode=args.compile_mode)
        start = time.perf_counter()
        cached_arm()  # compiles
        print(f"compiling D and the score head ({args.compile_backend}): {time.perf_counter() - start:.0f} s")
        arms["AutoMAE cached, D + score head compiled"] = profile_arm(cached_arm, args.steps, args)

    print(f"{args.size}, batch {args.batch_size}, {args.device}{', bf16' if args.bf16 else ''}, torch "
          f"{torch.__version__}; per iteration, {args.steps} profiled after 2 warm-up")
    if not args.device.startswith("cuda"):
        print("kernel launches: not measurable on the CPU (no kernels are launched); operator calls stand in")
    print("\n| arm | ms | / MAE | operator calls | extra calls | kernel launches | GPU kernels | host syncs |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, arm in arms.items():
        launches = f"{arm['launches']:.0f}" if arm["launches"] is not None else "-"
        kernels = f"{arm['kernels']:.0f}" if arm["kernels"] is not None else "-"
        print(f"| {name} | {arm['ms']:.1f} | {arm['ms'] / mae['ms']:.3f} | {arm['ops']:.0f} | "
              f"{arm['ops'] - mae['ops']:+.0f} | {launches} | {kernels} | {arm['syncs']:.0f} |")
    print("\n| range | MAE ms | MAE ops | cached ms | cached ops |\n|---|---|---|---|---|")
    for phase in ("forward", "backward", "optimizer"):
        m, c = mae["ranges"][f"phase: MAE {phase}"], cached["ranges"][f"phase: student {phase}"]
        print(f"| student {phase} | {m['ms']:.1f} | {m['ops']:.0f} | {c['ms']:.1f} | {c['ops']:.0f} |")
    for name, value in sorted(cached["ranges"].items()):
        if name.startswith("part: ") or name == "phase: D step":
            print(f"| {name.split(': ', 1)[1]} | - | - | {value['ms']:.1f} | {value['ops']:.0f} |")
    for name, arm in list(arms.items())[2:]:
        d_step = arm["ranges"].get("phase: D step", {})
        print(f"| D step, {name} | - | - | {d_step.get('ms', 0):.1f} | {d_step.get('ops', 0):.0f} |")
    extra = {op: cached["top"].get(op, 0) - mae["top"].get(op, 0) for op in set(cached["top"]) | set(mae["top"])}
    print("\n| operator | MAE calls | cached calls | extra |\n|---|---|---|---|")
    for op, more in sorted(extra.items(), key=lambda item: -item[1])[: args.top]:
        print(f"| {op} | {mae['top'].get(op, 0):.0f} | {cached['top'].get(op, 0):.0f} | {more:+.0f} |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"args": vars(args), **arms}, indent=1))


if __name__ == "__main__":
    main()

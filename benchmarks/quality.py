"""What the mask buys: masking strategies side by side on real Fashion-MNIST, same budget and seeds for every arm.

Arms (each through `training/pretrain.py`, tiny ViT 128x4 on 28x28 grayscale, patch 4 = 7x7 grid, batch 128):
  MAE N          random masks, N steps (also the teacher of `attention` and `AutoMAE`, as in the paper's recipe)
  MAE 2N         random masks, 2N steps (about the compute of MAE N + AutoMAE N)
  box prior      the paper's pilot: the garment's bounding box (from its non-zero pixels, an oracle) masked first
  attention      AttMask "high": the MAE N teacher's most-attended patches masked
  AutoMAE        learned masks, MAE N as frozen teacher
  AutoMAE (self) learned masks, teacher-free (the student's own attention)
and two references every learned arm must be read against: raw pixels and a randomly initialised encoder.

Scores: frozen-feature kNN (k=20) and linear probe on the held-out test images, with all training labels and with
10 per class (3 draws), and whole-encoder finetuning on 10 labels per class (`training/finetune.py`, HF Trainer,
40 epochs, fixed schedule, no model selection on the test split); mean +- std over seeds, and each arm's difference
to MAE N, starred where it exceeds both arms' seed std. Foreground focus: the share of masked patches on the
garment (a patch is garment when at least half its pixels are non-zero) against the garment's share of the grid
(what random masking gives); for learned masks also the learned top-K and the teacher's attention top-K.

`--ablation` runs the knobs one at a time away from the reference AutoMAE instead: gumbel_tau
(0.5, 0.3), box_prior_alpha (2, 3), adversarial_weight (0, 0.05, 1), mask_factor (0.25, 1), the teacher (MAE 2N
instead of MAE N; teacher-free is "AutoMAE (self)") and, beyond the reference's knobs, gumbel_noise_scale (0.1, 0:
how much the Gumbel noise, rather than the learned scores, decides the top-K); probes only. Runs go to
OUTPUT_DIR/{data}_N{steps}/seed{S}/{arm}. A finished pretraining run is reused only when the arguments it saved are
the ones asked for now (`default_job.plan_pretraining_run`; a killed one is resumed, another run in its folder refused
unless --overwrite_output_dir), and its probe and finetuning scores with it, cached under names that carry their own
settings (`probes_seed{S}_train{images}.json`, `finetune10_seed{S}_epochs{E}`), so a killed benchmark resumes and the
two modes share MAE N / AutoMAE.

    python benchmarks/quality.py --quick            # 1 seed, 20 steps, probes on 2k images: a smoke test (~4 min)
    python benchmarks/quality.py                    # 3 seeds, 300 steps on the embedded 10k subset (2 cores, 48 min:
                                                    # 33 min of pretraining two at a time, 9 min of few-shot
                                                    # finetuning, 5 min of probes; --no_finetune skips finetuning)
    python benchmarks/quality.py --ablation         # the knob ablation on the same data, seeds and budget
    python benchmarks/quality.py --data debian      # the full 60k/10k from Debian's dataset-fashion-mnist
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from automae_hf.training.default_job import MODEL, plan_pretraining_run  # the main job's tiny ViT
from automae_hf.training.probes import evaluate_features, extract_features

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
ARMS = ("MAE N", "MAE 2N", "box prior", "attention", "AutoMAE", "AutoMAE (self)")
# A real pretrained teacher (DINOv2 ViT-S/14, `training/build_dinov2_teacher.py`), read at its own patch grid, its maps
# computed once per image: the reference settings, and the `follow_teacher` preset. Run with --arms.
DINOV2_ARMS = {"AutoMAE DINOv2": ("reference", ""), "AutoMAE DINOv2 follow_teacher": ("follow_teacher", ""),
               # the preset with the learned top-K's noise raised more (0.5 is the reference's beta)
               "AutoMAE DINOv2 follow_teacher beta 0.25": ("follow_teacher", ",mask_factor=0.25"),
               "AutoMAE DINOv2 follow_teacher beta 0.5": ("follow_teacher", ",mask_factor=0.5")}
# The knob ablation: one knob at a time away from the reference AutoMAE (tau 1, alpha 0.5, lambda 0.2, beta 0.5, MAE N
# as teacher). arm -> (config overrides, teacher).
ABLATION = {
    "tau 0.5": (",gumbel_tau=0.5", "MAE_N"),
    "tau 0.3": (",gumbel_tau=0.3", "MAE_N"),
    "alpha 2": (",box_prior_alpha=2.0", "MAE_N"),
    "alpha 3": (",box_prior_alpha=3.0", "MAE_N"),
    "lambda 0": (",adversarial_weight=0.0", "MAE_N"),
    "lambda 0.05": (",adversarial_weight=0.05", "MAE_N"),
    "lambda 1": (",adversarial_weight=1.0", "MAE_N"),
    "beta 0.25": (",mask_factor=0.25", "MAE_N"),
    "beta 1": (",mask_factor=1.0", "MAE_N"),
    "teacher MAE 2N": ("", "MAE_2N"),
    # Not a reference knob: the Gumbel noise against the scores (gumbel_tau cannot change the hard top-K).
    "noise 0.1": (",gumbel_noise_scale=0.1", "MAE_N"),
    "noise 0": (",gumbel_noise_scale=0.0", "MAE_N"),
}
ABLATION_ARMS = ("MAE N", "AutoMAE", *ABLATION, "AutoMAE (self)")
TEACHER_OF = {"attention": "MAE N", "AutoMAE": "MAE N", "teacher MAE 2N": "MAE 2N",
              **{arm: "MAE N" for arm, (_, teacher) in ABLATION.items() if teacher == "MAE_N"}}


# ---- data -------------------------------------------------------------------------------------------------------
def load_arrays(source: str) -> dict:
    if source == "subset":
        return dict(np.load(ROOT / "training" / "data" / "fashion_mnist_subset.npz"))
    if not DEBIAN.is_dir():
        raise SystemExit("error: --data debian needs Debian's package: apt-get install dataset-fashion-mnist")

    def read(name, offset):
        with gzip.open(DEBIAN / name) as handle:
            return np.frombuffer(handle.read(), np.uint8, offset=offset)

    return {
        "train_images": read("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
        "train_labels": read("train-labels-idx1-ubyte.gz", 8),
        "test_images": read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
        "test_labels": read("t10k-labels-idx1-ubyte.gz", 8),
    }


def garment_box(image: np.ndarray) -> list[float]:
    """COCO xywh box (pixels) around the non-zero pixels."""
    rows, columns = np.nonzero(image)
    if len(rows) == 0:
        return [0.0, 0.0, float(image.shape[1]), float(image.shape[0])]
    return [float(columns.min()), float(rows.min()), float(columns.max() - columns.min() + 1),
            float(rows.max() - rows.min() + 1)]


def build_dataset(arrays: dict, target: Path) -> Path:
    """A `save_to_disk` folder: `image`, `label`, and `objects` = {"bbox": [[x, y, w, h]]} (the oracle box)."""
    from datasets import Dataset, Features, Image, Sequence, Value
    from PIL import Image as PILImage

    if (target / "dataset_info.json").exists():
        return target
    images = arrays["train_images"]
    features = Features({"image": Image(), "label": Value("int64"),
                         "objects": {"bbox": Sequence(Sequence(Value("float32"), length=4))}})
    data = {
        "image": [PILImage.fromarray(image, mode="L") for image in images],
        "label": arrays["train_labels"].astype(int).tolist(),
        "objects": [{"bbox": [garment_box(image)]} for image in images],
    }
    Dataset.from_dict(data, features).save_to_disk(str(target))
    return target


# ---- pretraining arms -------------------------------------------------------------------------------------------
def run_quietly(command: list[str], threads: int | None, hide_stderr: bool) -> None:
    """A training subprocess, stdout hidden, capped at `threads` torch threads when several run side by side."""
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL if hide_stderr else None, env=environment)


def threads_per_worker(workers: int) -> int | None:
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None


def pretrain(data: Path, output_dir: Path, steps: int, seed: int, extra: list[str], overrides: str = "",
             threads: int | None = None, overwrite: bool = False, teacher_retrained: bool = False) -> float | None:
    """One arm through `training/pretrain.py` -> its wall seconds, or None where a finished run with these arguments
    was reused."""
    arguments = ["--dataset_name", str(data), "--output_dir", str(output_dir), "--config_overrides", MODEL + overrides,
                 "--norm_pix_loss", "--per_device_train_batch_size", "128", "--max_train_steps", str(steps),
                 "--base_learning_rate", "1.5e-3", "--warmup_steps", str(max(1, steps // 10)),
                 "--dataloader_num_workers", "1", "--seed", str(seed), "--image_log_steps", str(steps)] + extra
    plan = plan_pretraining_run(arguments, overwrite, teacher_retrained)
    if plan is None:  # finished earlier with these arguments (a killed benchmark resumes)
        return None
    command = [sys.executable, str(ROOT / "training" / "pretrain.py"), *arguments, *plan]
    start = time.perf_counter()
    run_quietly(command, threads, hide_stderr=False)
    seconds = time.perf_counter() - start
    (output_dir / "seconds.json").write_text(json.dumps({"seconds": seconds, "threads": threads}))
    return seconds


def arm_arguments(arm: str, seed_dir: Path) -> tuple[list[str], str, int]:
    """pretrain.py arguments, config overrides (",key=value...") and the step multiplier of an arm."""
    mae_n, mae_2n = str(seed_dir / "MAE_N"), str(seed_dir / "MAE_2N")
    if arm in ABLATION:
        overrides, teacher = ABLATION[arm]
        return ["--teacher_name_or_path", teacher.replace("MAE_N", mae_n).replace("MAE_2N", mae_2n)], overrides, 1
    return {
        "MAE N": (["--teacher_name_or_path", "none"], "", 1),
        "MAE 2N": (["--teacher_name_or_path", "none"], "", 2),
        "box prior": (["--masking", "box_prior", "--box_column_name", "objects", "--box_format", "xywh"], "", 1),
        "attention": (["--masking", "attention", "--teacher_name_or_path", mae_n], "", 1),
        "AutoMAE": (["--teacher_name_or_path", mae_n], "", 1),
        "AutoMAE (self)": (["--teacher_name_or_path", "self"], "", 1),
        **{name: (["--teacher_name_or_path", str(dinov2_folder()), "--cache_teacher_attention", "--preset", preset],
                  ",teacher_image_size=match_grid" + overrides, 1)
          for name, (preset, overrides) in DINOV2_ARMS.items() if name == arm},
    }[arm]


def dinov2_folder() -> Path:
    from automae_hf.training.dinov2_teacher import dinov2_teacher_path

    return dinov2_teacher_path(build=True)


def arm_folder(arm: str) -> str:
    return arm.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")


def pretrain_arms(arms: list[str], data: Path, output_dir: Path, steps: int, seeds: int, workers: int,
                  overwrite: bool = False) -> dict:
    """Trains every (seed, arm), teachers (MAE N, MAE 2N) first, an arm again where its teacher was; `workers` runs
    side by side, 1 thread each when > 1.

    Returns {arm: [seconds per seed]}.
    """
    from concurrent.futures import ThreadPoolExecutor

    threads = threads_per_worker(workers)
    seconds: dict[str, dict[int, float]] = {}
    trained: set[tuple[int, str]] = set()  # (seed, arm) trained by this call, not reused

    def run(job):
        seed, arm = job
        extra, overrides, multiplier = arm_arguments(arm, output_dir / f"seed{seed}")
        print(f"seed {seed}: {arm} ({multiplier * steps} steps)", flush=True)
        run_dir = output_dir / f"seed{seed}" / arm_folder(arm)
        teacher_retrained = (seed, TEACHER_OF.get(arm)) in trained
        spent = pretrain(data, run_dir, multiplier * steps, seed, extra, overrides, threads, overwrite, teacher_retrained)
        if spent is None:
            spent = float(json.loads((run_dir / "seconds.json").read_text())["seconds"])
        else:
            trained.add((seed, arm))
        seconds.setdefault(arm, {})[seed] = spent

    teachers = [arm for arm in ("MAE N", "MAE 2N") if arm in arms or any(TEACHER_OF.get(a) == arm for a in arms)]
    with ThreadPoolExecutor(workers) as pool:
        for phase in (teachers, [arm for arm in arms if arm not in teachers]):
            list(pool.map(run, [(seed, arm) for seed in range(seeds) for arm in phase]))
    return {arm: [by_seed[seed] for seed in sorted(by_seed)] for arm, by_seed in seconds.items()}


# ---- evaluation -------------------------------------------------------------------------------------------------
def garment_patches(images: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """`[N, L]` bool: at least half of the patch's pixels are non-zero."""
    nonzero = (images > 0).float()
    return torch.nn.functional.avg_pool2d(nonzero, patch).flatten(1) >= 0.5


@torch.no_grad()
def foreground_focus(model_dir: Path, images: torch.Tensor, mean: float, std: float, seed: int) -> dict:
    """Share of masked patches on the garment; for learned masks also the learned top-K and the teacher's top-K, and
    how much the scores alone decide the mask: "score top-K", the garment share of the scores' noise-free top-K, and
    "top-K agreement", the share of the sampled (Gumbel-noised) top-K that is also in it (chance: K / L)."""
    from automae_hf import AutoMAEForPreTraining

    model = AutoMAEForPreTraining.from_pretrained(model_dir).eval()
    on_garment = garment_patches(images)
    pixel_values = (images - mean) / std
    generator = torch.Generator().manual_seed(seed)
    kwargs = {}
    if model.config.masking == "box_prior":
        kwargs = dict(boxes=[torch.tensor([garment_box(image[0].numpy())]) for image in images], box_format="xywh")
    if model.mask_generator is not None:  # the teacher the run trained with (the student itself for "self")
        kwargs["teacher_attention"] = model.teacher_attention(pixel_values)
    output = model(pixel_values, generator=generator, **kwargs)
    masked = output.mask.bool()
    result = {"masked": (masked & on_garment).sum().item() / masked.sum().item(),
              "grid": on_garment.float().mean().item()}
    if "teacher_attention" in kwargs:
        num_masked = int(masked[0].sum())
        teacher_top = kwargs["teacher_attention"].mean(1).flatten(1).topk(num_masked, dim=1).indices
        result["teacher top"] = on_garment.gather(1, teacher_top).float().mean().item()
    if model.config.masking == "learned":
        num_visible = output.mask.shape[1] - int(masked[0].sum())
        learned_top = output.mask_probs.topk(num_visible, dim=1).indices
        result["learned top-K"] = on_garment.gather(1, learned_top).float().mean().item()
        score_top = model.mask_generator.scores(kwargs["teacher_attention"]).topk(num_visible, dim=1).indices
        result["score top-K"] = on_garment.gather(1, score_top).float().mean().item()
        result["top-K agreement"] = (learned_top.unsqueeze(2) == score_top.unsqueeze(1)).any(2).float().mean().item()
        teacher_top_k = kwargs["teacher_attention"].mean(1).flatten(1).topk(num_visible, dim=1).indices
        result["top-K in teacher top-K"] = (learned_top.unsqueeze(2) == teacher_top_k.unsqueeze(1)).any(2).float().mean().item()
        result["chance"] = num_visible / output.mask.shape[1]
    return result


def features_of(model_dir: Path, images: torch.Tensor, mean: float, std: float):
    from automae_hf import AutoMAEModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return extract_features(AutoMAEModel.from_pretrained(model_dir).to(device), (images - mean) / std)


def summarise(values: list[float]) -> tuple[float, float]:
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def build_classification_dataset(arrays: dict, target: Path) -> Path:
    """`save_to_disk` DatasetDict (train / test) with a ClassLabel column, for `training/finetune.py`."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    if (target / "dataset_dict.json").exists():
        return target
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    DatasetDict({
        split: Dataset.from_dict({"image": [PILImage.fromarray(image, mode="L") for image in arrays[f"{split}_images"]],
                                  "label": arrays[f"{split}_labels"].astype(int).tolist()}, features)
        for split in ("train", "test")
    }).save_to_disk(str(target))
    return target


def finetune_few_shot(model_dir: Path, data: Path, seed: int, per_class: int = 10, threads: int | None = None,
                      epochs: int = 40) -> float:
    """Whole-encoder finetuning on `per_class` labels per class (HF Trainer, fixed schedule, no model selection on
    the test split); returns test accuracy. Cached in `model_dir/finetune{per_class}_seed{seed}_epochs{epochs}`."""
    output = model_dir / f"finetune{per_class}_seed{seed}_epochs{epochs}"
    results = output / "all_results.json"
    if not results.exists():
        command = [sys.executable, str(ROOT / "training" / "finetune.py"), "--model_name_or_path", str(model_dir),
                   "--dataset_name", str(data), "--output_dir", str(output), "--train_samples_per_class", str(per_class),
                   "--num_train_epochs", str(epochs), "--per_device_train_batch_size", "20", "--learning_rate", "1e-3",
                   "--layer_decay", "0.75", "--no_augmentation", "--eval_strategy", "no", "--seed", str(seed),
                   "--dataloader_num_workers", "0", "--logging_steps", "50", "--report_to", "none"]
        run_quietly(command, threads, hide_stderr=True)
        for leftover in output.glob("*.safetensors"):  # only the number is needed; keep the folder small
            leftover.unlink()
    return float(json.loads(results.read_text())["eval_accuracy"])


def save_random_encoder(target: Path, mae_dir: Path, seed: int) -> None:
    """MAE N's architecture with fresh weights (the "random init" reference), saved like any other encoder."""
    if (target / "model.safetensors").exists():
        return
    from transformers import AutoImageProcessor

    from automae_hf import AutoMAEConfig, AutoMAEModel

    torch.manual_seed(seed)
    AutoMAEModel(AutoMAEConfig.from_pretrained(mae_dir)).save_pretrained(target)
    AutoImageProcessor.from_pretrained(mae_dir).save_pretrained(target)


def probe(model_dir: Path | None, seed: int, train_x, train_y, test_x, test_y, mean: float, std: float) -> dict:
    """kNN and linear probes (all labels; 10 per class, 3 draws) and foreground focus of one encoder, cached in
    `model_dir/probes_seed{seed}_train{N}.json` (N training images: --quick probes fewer); `model_dir=None`: raw
    pixels."""
    cache = model_dir / f"probes_seed{seed}_train{len(train_x)}.json" if model_dir is not None else None
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    if model_dir is None:
        train_f, test_f = train_x.flatten(1), test_x.flatten(1)
    else:
        train_f, test_f = (features_of(model_dir, x, mean, std) for x in (train_x, test_x))
    full = evaluate_features(train_f, train_y, test_f, test_y)
    few = evaluate_features(train_f, train_y, test_f, test_y, 10, seeds=range(seed * 3, seed * 3 + 3))
    result = {"knn": full["knn"], "linear": full["linear"], "knn@10": few["knn"], "linear@10": few["linear"]}
    if model_dir is not None and (model_dir / "train_summary.json").exists():  # pretrained (not random init)
        result["focus"] = foreground_focus(model_dir, test_x[:1000], mean, std, seed)
        for key in ("top-K agreement", "top-K in teacher top-K", "chance"):  # not garment shares
            if key in result["focus"]:
                result[key] = result["focus"].pop(key)
    if cache is not None:
        cache.write_text(json.dumps(result))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 seed, 20 steps, probes on 2,000 training images, 4 finetuning epochs")
    parser.add_argument("--ablation", action="store_true",
                        help="the knob ablation (tau, alpha, lambda, beta, teacher) instead of the arms")
    parser.add_argument("--arms", default=None, help="comma-separated subset of the arms to run (default: all)")
    parser.add_argument("--steps", type=int, default=300, help="N, the steps of the 1x arms")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="pretraining and finetuning runs side by side (1 thread each when > 1)")
    parser.add_argument("--no_finetune", dest="finetune", action="store_false",
                        help="skip few-shot finetuning (default: on, except with --ablation)")
    parser.add_argument("--data", choices=["subset", "debian"], default="subset")
    parser.add_argument("--output_dir", default="outputs/quality")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="train an arm again where its folder holds a run with other arguments (default: refused)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 20, 1
    if args.ablation:
        args.finetune = False
    arms = list(ABLATION_ARMS if args.ablation else ARMS)
    if args.arms:
        chosen = [arm.strip() for arm in args.arms.split(",")]
        unknown = [arm for arm in chosen if arm not in (*ARMS, *ABLATION, *DINOV2_ARMS)]
        if unknown:
            parser.error(f"--arms: unknown {unknown}; expected among {[*ARMS, *ABLATION, *DINOV2_ARMS]}")
        arms = chosen
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    output_dir = Path(args.output_dir) / f"{args.data}_N{args.steps}"
    output_dir.mkdir(parents=True, exist_ok=True)
    arrays = load_arrays(args.data)
    data = build_dataset(arrays, output_dir / "data")
    labelled = build_classification_dataset(arrays, output_dir / "data_classification")
    train_x = torch.tensor(arrays["train_images"]).float().unsqueeze(1) / 255.0
    test_x = torch.tensor(arrays["test_images"]).float().unsqueeze(1) / 255.0
    train_y, test_y = torch.tensor(arrays["train_labels"]).long(), torch.tensor(arrays["test_labels"]).long()
    if args.quick:  # a smoke test: probes on 2,000 training images, short finetuning
        train_x, train_y = train_x[:2000], train_y[:2000]
    finetune_epochs = 4 if args.quick else 40

    start = time.perf_counter()
    seconds = pretrain_arms(arms, data, output_dir, args.steps, args.seeds, args.workers, args.overwrite_output_dir)
    metric_names = ("kNN", "linear", "kNN@10", "linear@10") + (("finetune@10",) if args.finetune else ())
    encoders = {seed: {"raw pixels": None, "random init": output_dir / f"seed{seed}" / "random_init",
                       **{arm: output_dir / f"seed{seed}" / arm_folder(arm) for arm in arms}}
                for seed in range(args.seeds)}
    for seed in range(args.seeds):
        save_random_encoder(encoders[seed]["random init"], output_dir / f"seed{seed}" / "MAE_N", seed)
    finetuned = {}
    if args.finetune:  # every (seed, encoder) side by side first: tiny jobs, dominated by start-up
        print(f"few-shot finetuning {args.seeds} x {len(encoders[0]) - 1} encoders", flush=True)
        jobs = [(seed, name, path) for seed in range(args.seeds) for name, path in encoders[seed].items() if path]
        threads = threads_per_worker(args.workers)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(args.workers) as pool:
            accuracies = pool.map(lambda job: finetune_few_shot(job[2], labelled, job[0], threads=threads,
                                                                     epochs=finetune_epochs), jobs)
            finetuned = {(seed, name): accuracy for (seed, name, _), accuracy in zip(jobs, accuracies)}
    scores: dict[str, dict[str, list[float]]] = {}
    focus: dict[str, dict[str, list[float]]] = {}
    agreement: dict[str, list[float]] = {}
    in_teacher: dict[str, list[float]] = {}  # share of the sampled top-K inside the teacher's own top-K
    chance = None
    for seed in range(args.seeds):
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(output_dir / f"seed{seed}" / "MAE_N")
        mean, std = float(processor.image_mean[0]), float(processor.image_std[0])
        print(f"seed {seed}: probing {len(encoders[seed])} encoders", flush=True)
        for name, model_dir in encoders[seed].items():
            probes = probe(model_dir, seed, train_x, train_y, test_x, test_y, mean, std)
            values = [probes[key] for key in ("knn", "linear", "knn@10", "linear@10")]
            values.append(finetuned.get((seed, name)))
            for metric, value in zip(metric_names, values):
                if value is not None:
                    scores.setdefault(name, {}).setdefault(metric, []).append(100 * value)
            for key, value in probes.get("focus", {}).items():
                focus.setdefault(name, {}).setdefault(key, []).append(100 * value)
            if "top-K agreement" in probes:
                agreement.setdefault(name, []).append(100 * probes["top-K agreement"])
                in_teacher.setdefault(name, []).append(100 * probes["top-K in teacher top-K"])
                chance = 100 * probes["chance"]
        (output_dir / "partial.json").write_text(json.dumps({"scores": scores, "focus": focus}, indent=1))
    report = make_report(args, scores, focus, agreement, in_teacher, chance, seconds, len(train_x), len(test_x),
                         metric_names, time.perf_counter() - start)
    name = "ablation" if args.ablation else "report"
    (output_dir / f"{name}.md").write_text(report + "\n")
    (output_dir / f"{name}.json").write_text(json.dumps({"scores": scores, "focus": focus, "top-K agreement": agreement,
                                                           "top-K in teacher top-K": in_teacher, "seconds": seconds},
                                                          indent=1))
    print(report)


# ---- report -----------------------------------------------------------------------------------------------------
def make_report(args, scores, focus, agreement, in_teacher, chance, seconds, num_train, num_test, metric_names,
                wall_seconds) -> str:
    lines = [f"Fashion-MNIST ({args.data}: {num_train} train / {num_test} test), N = {args.steps} steps of 128, "
             f"{args.seeds} seed(s); test accuracy % (mean +- std over seeds), difference to MAE N in brackets "
             f"(* where it exceeds both arms' seed std)", ""]
    header = ("| encoder | " + " | ".join(metric_names) + " | masked on garment % | learned top-K on garment % | "
              "sampled top-K = scores' top-K % | sampled top-K in teacher's top-K % | pretrain s |")
    lines += [header, "|" + "---|" * (len(metric_names) + 6)]
    baseline = {m: summarise(scores["MAE N"][m]) for m in metric_names}
    for name, by_metric in scores.items():
        cells = []
        for metric in metric_names:
            if metric not in by_metric:
                cells.append("-")
                continue
            mean_value, std_value = summarise(by_metric[metric])
            delta = mean_value - baseline[metric][0]
            beyond = "*" if args.seeds > 1 and abs(delta) > max(std_value, baseline[metric][1]) else ""
            tail = "" if name in ("raw pixels", "random init", "MAE N") else f" ({delta:+.1f}{beyond})"
            cells.append(f"{mean_value:.1f} +- {std_value:.1f}{tail}")
        garment, top = focus.get(name, {}).get("masked"), focus.get(name, {}).get("learned top-K")
        time_cell = f"{statistics.mean(seconds[name]):.0f}" if name in seconds else "-"
        garment_cell = f"{summarise(garment)[0]:.1f}" if garment else "-"
        top_cell = f"{summarise(top)[0]:.1f}" if top else "-"
        agreement_cell = f"{summarise(agreement[name])[0]:.0f}" if name in agreement else "-"
        teacher_cell = f"{summarise(in_teacher[name])[0]:.0f}" if name in in_teacher else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {garment_cell} | {top_cell} | {agreement_cell} | "
                     f"{teacher_cell} | {time_cell} |")
    grid_share = statistics.mean(v for arm in focus.values() for v in arm["grid"])
    lines += ["", f"Garment share of the grid (random masking's expected share): {grid_share:.1f}%."]
    if chance is not None:
        lines.append(f"Sampled top-K = scores' top-K: share of the Gumbel-sampled top-K that is also in the scores' "
                     f"noise-free top-K (chance {chance:.0f}%; 100 = the scores alone decide).")
    for name, by_key in focus.items():
        if "teacher top" in by_key:
            parts = [f"{key} {summarise(values)[0]:.1f}%" for key, values in by_key.items() if key != "grid"]
            decided = (f"; sampled top-K agreeing with the scores' own top-K {summarise(agreement[name])[0]:.0f}% "
                       f"(chance {chance:.0f}%)" if name in agreement else "")
            lines.append(f"{name}: on garment: " + ", ".join(parts) + decided)
    lines.append(f"\nTotal wall time {wall_seconds:.0f} s ({args.workers} pretraining worker(s)); torch "
                 f"{torch.__version__}, {torch.get_num_threads()} threads.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

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
40 epochs, fixed schedule, no model selection; its test-split accuracy); mean +- std over seeds, and each arm's
difference to MAE N, starred where it exceeds both arms' seed std. Foreground focus: the share of masked patches on the
garment (a patch is garment when at least half its pixels are non-zero) against the garment's share of the grid
(what random masking gives); for learned masks also the learned top-K and the teacher's attention top-K.

`--data cluttered` asks where the mask falls: on plain Fashion-MNIST the garment covers half the grid and no probe
tells a good mask from a random one. Each garment sits at a random place on a 64-px canvas among fragments of other
garments (`automae_hf/training/cluttered.py`; `--canvas`, `--object_scale`, `--fragments`, `--noise`,
`--background_noise`), its box
recorded (the box prior's oracle); the same tiny ViT at 64 px, patch 8 (8x8 grid). A validation split (1,000 images
held out of train, never pretrained on) carries every choice: the box prior runs at each of `--box_mask_factors`
(default 0.05, 0.1, 0.25, 0.5), the one best on validation `--select_metric` is marked, and every score is reported
on test beside a validation table. Foreground focus there counts a patch as the object's when its centre lies in the
box (the box prior's own rule), against `box_patch_share`, the box's share of the grid. `--pooling mean` probes the
mean of the patch tokens instead of the CLS token.

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
    python benchmarks/quality.py --data cluttered --quick   # smoke test: MAE N, box prior 0.1 / 0.5, AutoMAE
    python benchmarks/quality.py --data cluttered --arms "MAE N,box prior" --box_mask_factors 0.1,0.5 --no_finetune
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

from automae_hf.configuration_automae import AUTOMAE_PRESETS
from automae_hf.training.cluttered import ClutterSettings, box_patch_share, make_cluttered_splits
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
# The named presets (`AUTOMAE_PRESETS`) beside the reference, MAE N as teacher. Run with --arms.
PRESET_ARMS = {f"AutoMAE {name}": name for name in AUTOMAE_PRESETS if name != "reference"}
# Cluttered data: the box prior at each of `--box_mask_factors` ("box prior beta 0.1", ...), the one with the best
# validation score (`--select_metric`) reported on test; plain data keeps the single "box prior" (mask_factor 0.5).
BOX_PRIOR_SWEEP = "box prior beta "
CLUTTERED_MASK_FACTORS = (0.05, 0.1, 0.25, 0.5)
CLUTTERED_QUICK_ARMS, CLUTTERED_QUICK_MASK_FACTORS = ("MAE N", "box prior", "AutoMAE"), (0.1, 0.5)
PICTURED_IMAGES = 6  # test images drawn per learned arm (cluttered data)
CLUTTERED_PATCH = 8  # 64-px canvas -> 8x8 grid: about the tiny ViT's 7x7 on 28 px
LEARNED_ARMS = ("AutoMAE", "AutoMAE (self)", *ABLATION, *DINOV2_ARMS, *PRESET_ARMS)
TEACHER_OF = {"attention": "MAE N", "AutoMAE": "MAE N", "teacher MAE 2N": "MAE 2N",
              **{arm: "MAE N" for arm, (_, teacher) in ABLATION.items() if teacher == "MAE_N"},
              **{arm: "MAE N" for arm in PRESET_ARMS}}


# ---- data -------------------------------------------------------------------------------------------------------
def load_arrays(source: str, clutter: ClutterSettings | None = None) -> dict:
    """`{split}_images` uint8 `[N, H, W]` and `{split}_labels` `[N]` for train and test; "cluttered" also has a
    validation split and `{split}_boxes` `[N, 4]` (COCO xywh, pixels)."""
    if source in ("subset", "cluttered"):
        arrays = dict(np.load(ROOT / "training" / "data" / "fashion_mnist_subset.npz"))
        return make_cluttered_splits(arrays, clutter or ClutterSettings()) if source == "cluttered" else arrays
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
    """A `save_to_disk` folder of the training split only: `image`, `label`, and `objects` = {"bbox": [[x, y, w, h]]}
    (the oracle box: `train_boxes` where the arrays record it, else the garment's non-zero pixels)."""
    from datasets import Dataset, Features, Image, Sequence, Value
    from PIL import Image as PILImage

    if (target / "dataset_info.json").exists():
        return target
    images = arrays["train_images"]
    features = Features({"image": Image(), "label": Value("int64"),
                         "objects": {"bbox": Sequence(Sequence(Value("float32"), length=4))}})
    boxes = arrays["train_boxes"].tolist() if "train_boxes" in arrays else [garment_box(image) for image in images]
    data = {
        "image": [PILImage.fromarray(image, mode="L") for image in images],
        "label": arrays["train_labels"].astype(int).tolist(),
        "objects": [{"bbox": [box]} for box in boxes],
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
             threads: int | None = None, overwrite: bool = False, teacher_retrained: bool = False,
             model: str = MODEL) -> float | None:
    """One arm through `training/pretrain.py` (`model`: its config overrides) -> its wall seconds, or None where a
    finished run with these arguments was reused."""
    arguments = ["--dataset_name", str(data), "--output_dir", str(output_dir), "--config_overrides", model + overrides,
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
    box_prior = ["--masking", "box_prior", "--box_column_name", "objects", "--box_format", "xywh"]
    if arm in ABLATION:
        overrides, teacher = ABLATION[arm]
        return ["--teacher_name_or_path", teacher.replace("MAE_N", mae_n).replace("MAE_2N", mae_2n)], overrides, 1
    if arm.startswith(BOX_PRIOR_SWEEP):
        return box_prior, f",mask_factor={float(arm[len(BOX_PRIOR_SWEEP):])}", 1
    return {
        "MAE N": (["--teacher_name_or_path", "none"], "", 1),
        "MAE 2N": (["--teacher_name_or_path", "none"], "", 2),
        "box prior": (box_prior, "", 1),
        "attention": (["--masking", "attention", "--teacher_name_or_path", mae_n], "", 1),
        "AutoMAE": (["--teacher_name_or_path", mae_n], "", 1),
        "AutoMAE (self)": (["--teacher_name_or_path", "self"], "", 1),
        **{name: (["--teacher_name_or_path", mae_n, "--preset", preset], "", 1)
           for name, preset in PRESET_ARMS.items() if name == arm},
        **{name: (["--teacher_name_or_path", str(dinov2_folder()), "--cache_teacher_attention", "--preset", preset],
                  ",teacher_image_size=match_grid" + overrides, 1)
          for name, (preset, overrides) in DINOV2_ARMS.items() if name == arm},
    }[arm]


def dinov2_folder() -> Path:
    from automae_hf.tools.dinov2_teacher import dinov2_teacher_path

    return dinov2_teacher_path(build=True)


def arm_folder(arm: str) -> str:
    return arm.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")


def pretrain_arms(arms: list[str], data: Path, output_dir: Path, steps: int, seeds: int, workers: int,
                  overwrite: bool = False, model: str = MODEL) -> dict:
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
        spent = pretrain(data, run_dir, multiplier * steps, seed, extra, overrides, threads, overwrite,
                         teacher_retrained, model)
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


def object_patches(images: torch.Tensor, boxes: np.ndarray | None, patch: int) -> tuple[np.ndarray, torch.Tensor]:
    """The object of each image `[N, 1, H, W]` (0-1): -> its xywh box `[N, 4]` and its patches `[N, L]` bool.

    With recorded `boxes` (cluttered data; the pixels there include clutter) a patch is the object's when its centre
    lies in the box, the box prior's own rule (`masking.boxes_to_patch_mask`); without, the garment is the non-zero
    pixels (`garment_box`, `garment_patches`)."""
    from automae_hf.masking import boxes_to_patch_mask

    if boxes is None:
        return np.array([garment_box(image[0].numpy()) for image in images]), garment_patches(images, patch)
    height, width = images.shape[-2:]
    inside = boxes_to_patch_mask(torch.as_tensor(boxes).unsqueeze(1), (height // patch, width // patch),
                                 (height, width), "xywh")
    return boxes, inside.bool()


@torch.no_grad()
def foreground_focus(model_dir: Path, images: torch.Tensor, mean: float, std: float, seed: int,
                     boxes: np.ndarray | None = None) -> dict:
    """Share of masked patches on the object (`object_patches`; `boxes` `[N, 4]` xywh where recorded) and the object's
    share of the grid ("grid": what random masking gives); for learned masks also the learned top-K and the teacher's
    top-K, and how much the scores alone decide the mask: "score top-K", the object share of the scores' noise-free
    top-K, and "top-K agreement", the share of the sampled (Gumbel-noised) top-K that is also in it (chance: K / L)."""
    from automae_hf import AutoMAEForPreTraining

    model = AutoMAEForPreTraining.from_pretrained(model_dir).eval()
    boxes, on_garment = object_patches(images, boxes, model.config.patch_size)
    pixel_values = (images - mean) / std
    generator = torch.Generator().manual_seed(seed)
    kwargs = {}
    if model.config.masking == "box_prior":
        kwargs = dict(boxes=torch.as_tensor(np.asarray(boxes, dtype=np.float32)).unsqueeze(1), box_format="xywh")
    if model.mask_generator is not None:  # the teacher the run trained with (the student itself for "self")
        kwargs["teacher_attention"] = model.teacher_attention(pixel_values)
    output = model(pixel_values, generator=generator, **kwargs)
    masked = output.mask.bool()
    result = {"masked": (masked & on_garment).sum().item() / masked.sum().item(),
              "grid": on_garment.float().mean().item(),
              # how much of the object the encoder loses (random masking: the mask ratio)
              "object masked": (masked & on_garment).sum().item() / on_garment.sum().item()}
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


@torch.no_grad()
def save_cluttered_pictures(path: Path, run_dirs: dict[str, Path], images: torch.Tensor, boxes: np.ndarray, mean: float,
                            std: float, seed: int = 0) -> Path:
    """One PNG, one row per image `[n, 1, H, W]` (0-1): the image with its object's box (`boxes` `[n, 4]` xywh) in
    red, then for each learned-mask run of `run_dirs` ({label: folder}) its teacher's attention, p, the sampled mask
    and the reconstruction, titled with the label; the same seed draws every run's Gumbel noise."""
    from automae_hf import AutoMAEForPreTraining
    from automae_hf.training.pictures import picture_arrays, picture_columns, render_grid

    pixel_values = (images - mean) / std
    xyxy = [np.array([[x, y, x + w - 1, y + h - 1]], np.float32) for x, y, w, h in boxes]
    columns = []
    for label, run_dir in run_dirs.items():
        model = AutoMAEForPreTraining.from_pretrained(run_dir).eval()
        if model.config.masking != "learned":
            raise ValueError(f"{run_dir}: pictures are drawn for learned masks, got masking={model.config.masking!r}")
        output = model(pixel_values, teacher_attention=model.teacher_attention(pixel_values),
                       generator=torch.Generator().manual_seed(seed))
        arm_columns = picture_columns(picture_arrays(model, pixel_values, output, [mean], [std]), "learned", xyxy)
        columns += ([arm_columns[0]] if not columns else []) + [
            column._replace(title=f"{label}: {column.title}") for column in arm_columns[1:]]
    path.parent.mkdir(parents=True, exist_ok=True)
    render_grid(columns).save(path)
    return path


def features_of(model_dir: Path, images: torch.Tensor, mean: float, std: float, pooling: str = "cls"):
    from automae_hf import AutoMAEModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return extract_features(AutoMAEModel.from_pretrained(model_dir).to(device), (images - mean) / std, pooling=pooling)


def summarise(values: list[float]) -> tuple[float, float]:
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def build_classification_dataset(arrays: dict, target: Path) -> Path:
    """`save_to_disk` DatasetDict (train, validation where the arrays have one, test) with a ClassLabel column, for
    `training/finetune.py` (which reports the test split apart from the one it evaluates on)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    if (target / "dataset_dict.json").exists():
        return target
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    DatasetDict({
        split: Dataset.from_dict({"image": [PILImage.fromarray(image, mode="L") for image in arrays[f"{split}_images"]],
                                  "label": arrays[f"{split}_labels"].astype(int).tolist()}, features)
        for split in ("train", "validation", "test") if f"{split}_images" in arrays
    }).save_to_disk(str(target))
    return target


def finetune_few_shot(model_dir: Path, data: Path, seed: int, per_class: int = 10, threads: int | None = None,
                      epochs: int = 40) -> dict:
    """Whole-encoder finetuning on `per_class` labels per class (HF Trainer, fixed schedule, no model selection);
    -> {"test": accuracy on the test split, "validation": on the validation split, or None where the data has none
    (finetune.py then evaluates on a share of train)}. Cached in
    `model_dir/finetune{per_class}_seed{seed}_epochs{epochs}`."""
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
    metrics = json.loads(results.read_text())
    if metrics.get("test_split") != "test":  # eval_accuracy is a held-out share of train or a validation split
        raise SystemExit(f"error: {results} has no test-split accuracy (test_split={metrics.get('test_split')!r}); "
                         f"remove {output} and run again")
    return {"test": float(metrics["test_accuracy"]),
            "validation": float(metrics["eval_accuracy"]) if metrics.get("eval_split") == "validation" else None}


def save_random_encoder(target: Path, mae_dir: Path, seed: int) -> None:
    """MAE N's architecture with fresh weights (the "random init" reference), saved like any other encoder."""
    if (target / "model.safetensors").exists():
        return
    from transformers import AutoImageProcessor

    from automae_hf import AutoMAEConfig, AutoMAEModel

    torch.manual_seed(seed)
    AutoMAEModel(AutoMAEConfig.from_pretrained(mae_dir)).save_pretrained(target)
    AutoImageProcessor.from_pretrained(mae_dir).save_pretrained(target)


PROBE_KEYS = ("knn", "linear", "knn@10", "linear@10")


def probe(model_dir: Path | None, seed: int, train_x, train_y, evaluated: dict, mean: float, std: float,
          test_boxes: np.ndarray | None = None, pooling: str = "cls") -> dict:
    """kNN and linear probes (all labels; 10 per class, 3 draws) and foreground focus (on the first 1,000 test images;
    `test_boxes` `[N, 4]` xywh where recorded) of one encoder. `evaluated`: {"test": (x, y)} and optionally
    {"validation": (x, y)}, images `[N, 1, H, W]` in 0-1; -> test scores under `PROBE_KEYS`, validation scores under
    "validation {key}", "focus". Cached in `model_dir/probes_seed{seed}_train{N}[_validation{V}][_mean].json`;
    `model_dir=None`: raw pixels."""
    validation = evaluated.get("validation")
    name = (f"probes_seed{seed}_train{len(train_x)}" + (f"_validation{len(validation[0])}" if validation else "")
            + ("" if pooling == "cls" else f"_{pooling}") + ".json")
    cache = model_dir / name if model_dir is not None else None
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())

    def features(x):
        return x.flatten(1) if model_dir is None else features_of(model_dir, x, mean, std, pooling)

    train_f = features(train_x)
    result = {}
    for split, (x, y) in evaluated.items():
        split_f = features(x)
        full = evaluate_features(train_f, train_y, split_f, y)
        few = evaluate_features(train_f, train_y, split_f, y, 10, seeds=range(seed * 3, seed * 3 + 3))
        prefix = "" if split == "test" else f"{split} "
        result.update({f"{prefix}knn": full["knn"], f"{prefix}linear": full["linear"], f"{prefix}knn@10": few["knn"],
                       f"{prefix}linear@10": few["linear"]})
    if model_dir is not None and (model_dir / "train_summary.json").exists():  # pretrained (not random init)
        boxes = test_boxes[:1000] if test_boxes is not None else None
        result["focus"] = foreground_focus(model_dir, evaluated["test"][0][:1000], mean, std, seed, boxes)
        for key in ("top-K agreement", "top-K in teacher top-K", "chance"):  # not garment shares
            if key in result["focus"]:
                result[key] = result["focus"].pop(key)
    if cache is not None:
        cache.write_text(json.dumps(result))
    return result


def select_on_validation(validation: dict[str, dict[str, list[float]]], candidates: list[str], metric: str) -> str:
    """The candidate arm with the highest mean `metric` over seeds on the validation split (the test split is only
    reported). `validation`: {arm: {metric: [score per seed]}}."""
    missing = [arm for arm in candidates if metric not in validation.get(arm, {})]
    if missing:
        raise ValueError(f"no validation {metric} for {missing}")
    return max(candidates, key=lambda arm: statistics.mean(validation[arm][metric]))


METRICS = {"kNN": "knn", "linear": "linear", "kNN@10": "knn@10", "linear@10": "linear@10"}  # column -> probe key
CLUTTER_FLAGS = ("canvas", "object_scale", "fragments", "noise", "background_noise", "box_mask_factors", "select_metric")


def parse_args(argv=None) -> argparse.Namespace:
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
    parser.add_argument("--data", choices=["subset", "debian", "cluttered"], default="subset",
                        help="cluttered: one garment per 64-px canvas among fragments of others "
                             "(automae_hf/training/cluttered.py), with a validation split; the flags below shape it")
    defaults = ClutterSettings()
    parser.add_argument("--canvas", type=int, default=None,
                        help=f"cluttered: canvas side in pixels, a multiple of {CLUTTERED_PATCH} "
                             f"(default {defaults.canvas})")
    parser.add_argument("--object_scale", type=float, default=None,
                        help=f"cluttered: the garment's resize factor (default {defaults.object_scale})")
    parser.add_argument("--fragments", type=int, default=None,
                        help=f"cluttered: clutter fragments per canvas (default {defaults.fragments})")
    parser.add_argument("--noise", type=float, default=None,
                        help=f"cluttered: uniform pixel-noise amplitude, 0-255 (default {defaults.noise})")
    parser.add_argument("--background_noise", type=float, default=None,
                        help="cluttered: uniform noise amplitude, 0-255, on every pixel but the garment's "
                             f"(default {defaults.background_noise})")
    parser.add_argument("--box_mask_factors", default=None,
                        help="cluttered: the box prior's mask_factor values swept, comma-separated (default "
                             f"{','.join(map(str, CLUTTERED_MASK_FACTORS))}); the best on validation is marked. A negative "
                             "factor keeps the box visible first, a control (write --box_mask_factors=-0.1,0.1)")
    parser.add_argument("--select_metric", choices=list(METRICS), default=None,
                        help="cluttered: the validation score choices are made on (default linear)")
    parser.add_argument("--pooling", choices=["cls", "mean"], default="cls",
                        help="probe features: the CLS token (MAE's recipe) or the mean of the patch tokens")
    parser.add_argument("--print_run_folder", action="store_true",
                        help="print the run folder these arguments use under --output_dir, and exit")
    parser.add_argument("--output_dir", default="outputs/quality")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="train an arm again where its folder holds a run with other arguments (default: refused)")
    args = parser.parse_args(argv)
    given = [f"--{name}" for name in CLUTTER_FLAGS if getattr(args, name) is not None]
    if args.data != "cluttered":
        if given:
            parser.error(f"{', '.join(given)} shape(s) the cluttered data set: add --data cluttered")
        args.clutter, args.mask_factors = None, ()
    else:
        if args.ablation:
            parser.error("--ablation runs on plain Fashion-MNIST; drop --data cluttered")
        settings = {name: getattr(args, name) for name in ("canvas", "object_scale", "fragments", "noise", "background_noise")}
        args.clutter = ClutterSettings(**{k: v for k, v in settings.items() if v is not None})
        if args.clutter.canvas % CLUTTERED_PATCH:
            parser.error(f"--canvas must be a multiple of the patch size {CLUTTERED_PATCH}, got {args.clutter.canvas}")
        try:
            args.mask_factors = tuple(float(v) for v in args.box_mask_factors.split(",")) if args.box_mask_factors \
                else CLUTTERED_MASK_FACTORS
        except ValueError:
            parser.error(f"--box_mask_factors: expected comma-separated numbers, got {args.box_mask_factors!r}")
        args.select_metric = args.select_metric or "linear"
    if args.quick:
        args.steps, args.seeds = 20, 1
    if args.ablation:
        args.finetune = False
    arms = list(ABLATION_ARMS if args.ablation else ARMS)
    if args.quick and args.clutter is not None:  # 64-px canvases cost more: the smoke test keeps to 5 minutes
        arms = list(CLUTTERED_QUICK_ARMS)
        args.mask_factors = args.mask_factors if args.box_mask_factors else CLUTTERED_QUICK_MASK_FACTORS
    if args.arms:
        chosen = [arm.strip() for arm in args.arms.split(",")]
        unknown = [arm for arm in chosen if arm not in (*ARMS, *ABLATION, *DINOV2_ARMS, *PRESET_ARMS)]
        if unknown:
            parser.error(f"--arms: unknown {unknown}; expected among {[*ARMS, *ABLATION, *DINOV2_ARMS, *PRESET_ARMS]}")
        arms = chosen
    if args.mask_factors and "box prior" in arms:  # the sweep stands in for the single box prior
        at = arms.index("box prior")
        arms[at : at + 1] = [f"{BOX_PRIOR_SWEEP}{factor:g}" for factor in args.mask_factors]
    args.arm_list = arms
    return args


def run_folder(args) -> str:
    """OUTPUT_DIR's sub-folder: the data (with the cluttered settings, which change the images) and N."""
    if args.clutter is None:
        return f"{args.data}_N{args.steps}"
    c = args.clutter
    background = f"_background{c.background_noise:g}" if c.background_noise else ""  # keeps older folders' names
    return (f"cluttered_canvas{c.canvas}_scale{c.object_scale:g}_fragments{c.fragments}_noise{c.noise:g}{background}"
            f"_N{args.steps}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.print_run_folder:
        print(run_folder(args))
        return
    arms = args.arm_list
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    output_dir = Path(args.output_dir) / run_folder(args)
    output_dir.mkdir(parents=True, exist_ok=True)
    arrays = load_arrays(args.data, args.clutter)
    model = MODEL if args.clutter is None else MODEL + f",image_size={args.clutter.canvas},patch_size={CLUTTERED_PATCH}"
    data = build_dataset(arrays, output_dir / "data")
    labelled = build_classification_dataset(arrays, output_dir / "data_classification")

    def split(name):
        return (torch.tensor(arrays[f"{name}_images"]).float().unsqueeze(1) / 255.0,
                torch.tensor(arrays[f"{name}_labels"]).long())

    train_x, train_y = split("train")
    evaluated = {name: split(name) for name in ("validation", "test") if f"{name}_images" in arrays}
    test_boxes = arrays.get("test_boxes")
    if args.quick:  # a smoke test: probes on 2,000 training images, short finetuning
        train_x, train_y = train_x[:2000], train_y[:2000]
    finetune_epochs = 4 if args.quick else 40

    start = time.perf_counter()
    seconds = pretrain_arms(arms, data, output_dir, args.steps, args.seeds, args.workers, args.overwrite_output_dir,
                            model)
    metric_names = tuple(METRICS) + (("finetune@10",) if args.finetune else ())
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
    validation: dict[str, dict[str, list[float]]] = {}  # the same, on the validation split (cluttered data)
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
            probes = probe(model_dir, seed, train_x, train_y, evaluated, mean, std, test_boxes, args.pooling)
            finetune = finetuned.get((seed, name), {})
            for split_name, table in (("test", scores), ("validation", validation)):
                prefix = "" if split_name == "test" else f"{split_name} "
                for metric, key in METRICS.items():
                    if f"{prefix}{key}" in probes:
                        table.setdefault(name, {}).setdefault(metric, []).append(100 * probes[f"{prefix}{key}"])
                if finetune.get(split_name) is not None:
                    table.setdefault(name, {}).setdefault("finetune@10", []).append(100 * finetune[split_name])
            for key, value in probes.get("focus", {}).items():
                focus.setdefault(name, {}).setdefault(key, []).append(100 * value)
            if "top-K agreement" in probes:
                agreement.setdefault(name, []).append(100 * probes["top-K agreement"])
                in_teacher.setdefault(name, []).append(100 * probes["top-K in teacher top-K"])
                chance = 100 * probes["chance"]
        (output_dir / "partial.json").write_text(json.dumps({"scores": scores, "validation": validation,
                                                             "focus": focus}, indent=1))
    sweep = [arm for arm in arms if arm.startswith(BOX_PRIOR_SWEEP)]
    chosen = select_on_validation(validation, sweep, args.select_metric) if sweep else None
    report = make_report(args, scores, focus, agreement, in_teacher, chance, seconds, len(train_x),
                         {name: len(x) for name, (x, _) in evaluated.items()}, metric_names,
                         time.perf_counter() - start, validation, chosen, test_boxes)
    name = ("ablation" if args.ablation else "report") + ("" if args.pooling == "cls" else f"_{args.pooling}")
    (output_dir / f"{name}.md").write_text(report + "\n")
    (output_dir / f"{name}.json").write_text(json.dumps({"scores": scores, "validation": validation, "focus": focus,
                                                           "top-K agreement": agreement,
                                                           "top-K in teacher top-K": in_teacher, "seconds": seconds,
                                                           "chosen on validation": chosen,
                                                           "clutter": args.clutter and args.clutter.fingerprint()},
                                                          indent=1))
    print(report)
    learned = {arm: encoders[0][arm] for arm in arms if arm in LEARNED_ARMS}
    if args.clutter is not None and learned:  # where each learned arm puts its masks, on the first test images
        test_x = evaluated["test"][0][:PICTURED_IMAGES]
        path = save_cluttered_pictures(output_dir / "pictures_seed0.png", learned, test_x,
                                       test_boxes[:PICTURED_IMAGES], mean, std)
        print(f"pictures: {path}")


# ---- report -----------------------------------------------------------------------------------------------------
def score_table(scores, metric_names, seeds: int, label=lambda name: name) -> list[str]:
    """Markdown rows `| encoder | metric cells |`: mean +- std over seeds, the difference to MAE N in brackets."""
    baseline = {m: summarise(scores["MAE N"][m]) for m in metric_names if m in scores.get("MAE N", {})}
    rows = []
    for name, by_metric in scores.items():
        cells = []
        for metric in metric_names:
            if metric not in by_metric:
                cells.append("-")
                continue
            mean_value, std_value = summarise(by_metric[metric])
            cell = f"{mean_value:.1f} +- {std_value:.1f}"
            if metric in baseline and name not in ("raw pixels", "random init", "MAE N"):
                delta = mean_value - baseline[metric][0]
                beyond = "*" if seeds > 1 and abs(delta) > max(std_value, baseline[metric][1]) else ""
                cell += f" ({delta:+.1f}{beyond})"
            cells.append(cell)
        rows.append(f"| {label(name)} | " + " | ".join(cells))
    return rows


def make_report(args, scores, focus, agreement, in_teacher, chance, seconds, num_train, num_evaluated: dict,
                metric_names, wall_seconds, validation=None, chosen=None, test_boxes=None) -> str:
    cluttered = args.clutter is not None
    region = "in box" if cluttered else "on garment"
    data = (f"cluttered Fashion-MNIST ({args.clutter.fingerprint()})" if cluttered else f"Fashion-MNIST ({args.data})")
    sizes = " / ".join(f"{count} {name}" for name, count in num_evaluated.items())
    lines = [f"{data}: {num_train} train / {sizes}, N = {args.steps} steps of 128, {args.seeds} seed(s), probe "
             f"features {args.pooling}; test accuracy % (mean +- std over seeds), difference to MAE N in brackets "
             f"(* where it exceeds both arms' seed std)", ""]
    object_column = " object patches masked % |" if cluttered else ""  # how much of the object the encoder loses
    header = ("| encoder | " + " | ".join(metric_names) + f" | masked {region} % |{object_column} learned top-K "
              f"{region} % | sampled top-K = scores' top-K % | sampled top-K in teacher's top-K % | pretrain s |")
    lines += [header, "|" + "---|" * (len(metric_names) + 6 + cluttered)]

    def label(name):
        return f"{name} (chosen on validation)" if name == chosen else name

    for name, row in zip(scores, score_table(scores, metric_names, args.seeds, label)):
        garment, top = focus.get(name, {}).get("masked"), focus.get(name, {}).get("learned top-K")
        time_cell = f"{statistics.mean(seconds[name]):.0f}" if name in seconds else "-"
        garment_cell = f"{summarise(garment)[0]:.1f}" if garment else "-"
        top_cell = f"{summarise(top)[0]:.1f}" if top else "-"
        agreement_cell = f"{summarise(agreement[name])[0]:.0f}" if name in agreement else "-"
        teacher_cell = f"{summarise(in_teacher[name])[0]:.0f}" if name in in_teacher else "-"
        hidden = focus.get(name, {}).get("object masked")
        object_cell = (f" {summarise(hidden)[0]:.1f} |" if hidden else " - |") if cluttered else ""
        lines.append(f"{row} | {garment_cell} |{object_cell} {top_cell} | {agreement_cell} | {teacher_cell} | "
                     f"{time_cell} |")
    if cluttered:
        grid_share = 100 * box_patch_share(test_boxes, args.clutter.canvas, CLUTTERED_PATCH)
        lines += ["", f"Object box's share of the grid (random masking's expected share, all test images): "
                      f"{grid_share:.1f}%."]
    else:
        grid_share = statistics.mean(v for arm in focus.values() for v in arm["grid"])
        lines += ["", f"Garment share of the grid (random masking's expected share): {grid_share:.1f}%."]
    if validation:
        lines += ["", f"Validation split (held out of train; the split choices are made on), accuracy %:", "",
                  "| encoder | " + " | ".join(metric_names) + " |", "|" + "---|" * (len(metric_names) + 1)]
        lines += [f"{row} |" for row in score_table(validation, metric_names, args.seeds, label)]
    if chosen:
        lines.append(f"\nBox prior mask_factor chosen on validation {args.select_metric}: "
                     f"{chosen[len(BOX_PRIOR_SWEEP):]} (of {', '.join(f'{v:g}' for v in args.mask_factors)}).")
    if chance is not None:
        lines.append(f"Sampled top-K = scores' top-K: share of the Gumbel-sampled top-K that is also in the scores' "
                     f"noise-free top-K (chance {chance:.0f}%; 100 = the scores alone decide).")
    for name, by_key in focus.items():
        if "teacher top" in by_key:
            parts = [f"{key} {summarise(values)[0]:.1f}%" for key, values in by_key.items()
                     if key not in ("grid", "object masked")]
            decided = (f"; sampled top-K agreeing with the scores' own top-K {summarise(agreement[name])[0]:.0f}% "
                       f"(chance {chance:.0f}%)" if name in agreement else "")
            lines.append(f"{name}: {region}: " + ", ".join(parts) + decided)
    lines.append(f"\nTotal wall time {wall_seconds:.0f} s ({args.workers} pretraining worker(s)); torch "
                 f"{torch.__version__}, {torch.get_num_threads()} threads.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""benchmarks/quality.py --data cluttered: the data it pretrains on, where it counts the mask, what it chooses on, and
which split its few-shot finetuning reports."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, make_tiny_config

from automae_hf import AutoMAEForPreTraining
from automae_hf.configuration_automae import num_visible_patches
from automae_hf.training.cluttered import ClutterSettings, box_patch_share, make_cluttered_splits

spec = importlib.util.spec_from_file_location("quality", REPO_ROOT / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)

SETTINGS = ClutterSettings(canvas=64, fragments=8, validation_size=10)


@pytest.fixture(scope="module")
def arrays():
    subset = np.load(REPO_ROOT / "training" / "data" / "fashion_mnist_subset.npz")
    small = {"train_images": subset["train_images"][:40], "train_labels": subset["train_labels"][:40],
             "test_images": subset["test_images"][:24], "test_labels": subset["test_labels"][:24]}
    return make_cluttered_splits(small, SETTINGS)


def test_pretraining_data_is_the_train_split_with_the_recorded_boxes(arrays, tmp_path):
    """The box prior's oracle is the garment's recorded box (its non-zero pixels include clutter), and the validation
    images never enter pretraining."""
    from datasets import load_from_disk

    data = load_from_disk(str(quality.build_dataset(arrays, tmp_path / "data")))
    assert len(data) == 30  # 40 training images, 10 held out for validation
    np.testing.assert_allclose([row["bbox"][0] for row in data["objects"]], arrays["train_boxes"])
    assert data[0]["image"].size == (64, 64)
    pixel_box = quality.garment_box(arrays["train_images"][0])  # what the plain-data path would have recorded
    assert pixel_box != arrays["train_boxes"][0].tolist()
    labelled = load_from_disk(str(quality.build_classification_dataset(arrays, tmp_path / "labelled")))
    assert {name: len(split) for name, split in labelled.items()} == {"train": 30, "validation": 10, "test": 24}


def box_prior_focus(arrays, folder, mask_factor: float):
    """`foreground_focus` of an untrained box-prior model on the test canvases -> (focus, box patches per image
    `[N]`, masked patches per image)."""
    config = make_tiny_config(image_size=64, patch_size=8, num_channels=1, masking="box_prior", mask_factor=mask_factor)
    AutoMAEForPreTraining(config).save_pretrained(folder)
    images = torch.tensor(arrays["test_images"]).float().unsqueeze(1) / 255
    focus = quality.foreground_focus(folder, images, 0.5, 0.5, seed=0, boxes=arrays["test_boxes"])
    _, inside = quality.object_patches(images, arrays["test_boxes"], patch=8)
    return focus, inside.sum(1).numpy(), 64 - num_visible_patches(64, config.mask_ratio)


def test_focus_counts_the_mask_inside_the_recorded_box(arrays, tmp_path):
    """mask_factor 1 masks every box patch first: the masked share in the box is min(box patches, masked) / masked,
    read on the box (centre rule), not on the non-zero pixels; the grid share is `box_patch_share`."""
    focus, box_patches, masked = box_prior_focus(arrays, tmp_path / "box_prior", 1.0)
    assert focus["masked"] == pytest.approx(np.minimum(box_patches, masked).mean() / masked)
    assert focus["grid"] == pytest.approx(box_patch_share(arrays["test_boxes"], canvas=64, patch=8))
    assert focus["grid"] < focus["masked"]  # the object covers a minority of the grid: every box patch is masked
    assert focus["object masked"] == pytest.approx(1.0)


def test_a_negative_box_factor_keeps_the_box_visible_first(arrays, tmp_path):
    """mask_factor -1 masks every outside patch first: the box is masked only where the outside has too few patches,
    so the masked share in the box is max(0, masked - outside patches) / masked. The learned top-K refuses it."""
    focus, box_patches, masked = box_prior_focus(arrays, tmp_path / "box_spared", -1.0)
    assert focus["masked"] == pytest.approx(np.maximum(masked - (64 - box_patches), 0).mean() / masked)
    assert focus["masked"] < focus["grid"]
    with pytest.raises(ValueError, match="`mask_factor`.*only 'box_prior'"):
        make_tiny_config(masking="learned", mask_factor=-0.1)


def test_the_box_prior_sweep_is_chosen_on_validation_and_the_report_says_so():
    validation = {"box prior beta 0.1": {"linear": [60.0]}, "box prior beta 0.5": {"linear": [50.0]}}
    test = {"MAE N": {"linear": [40.0]}, "box prior beta 0.1": {"linear": [45.0]},
            "box prior beta 0.5": {"linear": [70.0]}}
    chosen = quality.select_on_validation(validation, ["box prior beta 0.1", "box prior beta 0.5"], "linear")
    assert chosen == "box prior beta 0.1"  # the test split would have picked 0.5
    args = quality.parse_args(["--data", "cluttered", "--box_mask_factors", "0.1,0.5", "--seeds", "1"])
    report = quality.make_report(args, test, {}, {}, {}, None, {}, 30, {"validation": 10, "test": 24},
                                 ("linear",), 1.0, {**validation, "MAE N": {"linear": [41.0]}}, chosen,
                                 np.array([[0, 0, 16, 16]], dtype=np.float32))
    assert "| box prior beta 0.1 (chosen on validation) | 45.0 +- 0.0 (+5.0)" in report
    assert "Validation split" in report and "| masked in box % | object patches masked % |" in report
    assert "chosen on validation linear: 0.1 (of 0.1, 0.5)" in report
    assert "Object box's share of the grid (random masking's expected share, all test images): 6.2%" in report


def test_cluttered_flags_shape_the_runs_and_are_refused_without_cluttered_data():
    args = quality.parse_args(["--data", "cluttered", "--canvas", "48", "--noise", "20", "--steps", "7",
                               "--arms", "MAE N,box prior,AutoMAE", "--box_mask_factors", "0.05,0.25"])
    assert args.clutter == ClutterSettings(canvas=48, noise=20.0)
    assert args.arm_list == ["MAE N", "box prior beta 0.05", "box prior beta 0.25", "AutoMAE"]
    assert quality.run_folder(args) == "cluttered_canvas48_scale1_fragments8_noise20_N7"
    extra, overrides, _ = quality.arm_arguments("box prior beta 0.05", REPO_ROOT)
    assert "box_prior" in extra and overrides == ",mask_factor=0.05"
    assert quality.parse_args(["--data", "cluttered"]).arm_list.count("box prior") == 0
    for argv in (["--canvas", "48"], ["--box_mask_factors", "0.1"], ["--data", "cluttered", "--canvas", "60"]):
        with pytest.raises(SystemExit):
            quality.parse_args(argv)


def test_few_shot_finetuning_reports_the_test_split(tmp_path, monkeypatch):
    """finetune.py evaluates on a validation split, or 10% of train held out where there is none; the benchmark's
    number is its test split's."""
    def fake_finetune(metrics):
        def run(command, threads, hide_stderr):
            output = tmp_path / command[command.index("--output_dir") + 1]
            output.mkdir(parents=True)
            (output / "all_results.json").write_text(json.dumps(metrics))
        return run

    monkeypatch.setattr(quality, "run_quietly", fake_finetune(
        {"eval_accuracy": 0.9, "eval_split": "train (held out)", "test_accuracy": 0.5, "test_split": "test"}))
    assert quality.finetune_few_shot(tmp_path / "a", tmp_path, seed=0) == {"test": 0.5, "validation": None}
    monkeypatch.setattr(quality, "run_quietly", fake_finetune(
        {"eval_accuracy": 0.7, "eval_split": "validation", "test_accuracy": 0.6, "test_split": "test"}))
    assert quality.finetune_few_shot(tmp_path / "b", tmp_path, seed=0) == {"test": 0.6, "validation": 0.7}
    monkeypatch.setattr(quality, "run_quietly", fake_finetune({"eval_accuracy": 0.9, "eval_split": "validation"}))
    with pytest.raises(SystemExit, match="no test-split accuracy"):
        quality.finetune_few_shot(tmp_path / "c", tmp_path, seed=0)


def test_quick_keeps_the_cluttered_smoke_test_small():
    args = quality.parse_args(["--data", "cluttered", "--quick"])
    assert args.arm_list == ["MAE N", "box prior beta 0.1", "box prior beta 0.5", "AutoMAE"] and args.steps == 20
    assert quality.parse_args(["--data", "cluttered", "--quick", "--box_mask_factors", "0.25"]).arm_list[1] == \
        "box prior beta 0.25"


def test_pictures_outline_the_box_and_show_each_learned_arm_side_by_side(arrays, tmp_path):
    """One row per image; the image column once (its box outlined in red), then each arm's four columns: the PNG's
    width grows by exactly four tiles per arm, and a box-prior run is refused (it has no learned scores)."""
    from PIL import Image

    config = make_tiny_config(image_size=64, patch_size=8, num_channels=1, masking="learned", teacher_name_or_path=None)
    AutoMAEForPreTraining(config).save_pretrained(tmp_path / "learned")
    images = torch.tensor(arrays["test_images"][:3]).float().unsqueeze(1) / 255
    boxes = arrays["test_boxes"][:3]
    one = Image.open(quality.save_cluttered_pictures(tmp_path / "one.png", {"a": tmp_path / "learned"}, images,
                                                     boxes, 0.5, 0.5))
    two = Image.open(quality.save_cluttered_pictures(tmp_path / "two.png", {"a": tmp_path / "learned",
                                                                            "b": tmp_path / "learned"},
                                                     images, boxes, 0.5, 0.5))
    tile = (two.width - one.width) / 4  # tile + separator, scaled
    assert tile > 0 and one.width == pytest.approx(5 * tile, abs=tile)  # image + 4 columns (less one separator)
    pixels = np.asarray(two.convert("RGB"))
    assert ((pixels[..., 0] == 255) & (pixels[..., 1] == 0) & (pixels[..., 2] == 0)).any()  # the red box

    box_config = make_tiny_config(image_size=64, patch_size=8, num_channels=1, masking="box_prior")
    AutoMAEForPreTraining(box_config).save_pretrained(tmp_path / "box")
    with pytest.raises(ValueError, match="learned masks"):
        quality.save_cluttered_pictures(tmp_path / "box.png", {"box": tmp_path / "box"}, images, boxes, 0.5, 0.5)

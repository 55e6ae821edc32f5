"""The four masking strategies (docs/method.md §7): random, box_prior, attention, learned. Their defining properties
on 7x7, 8x8 and 14x14 patch grids, save/load, and pretrain.py runs (CPU, tiny models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers.utils import logging

from automae_hf import AutoMAEConfig, AutoMAEForPreTraining
from automae_hf.configuration_automae import num_visible_patches
from automae_hf.masking import attention_masking, boxes_to_patch_mask
from conftest import assert_box_frames_the_bright_square, common, pretrain_in_process

logging.set_verbosity_error()

STRATEGIES = ("random", "box_prior", "attention", "learned")
GRIDS = {"7x7": 28, "8x8": 32, "14x14": 56}  # image size with 4-pixel patches


def tiny_model(masking, image_size=32, seed=0, **overrides):
    torch.manual_seed(seed)
    config = AutoMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=image_size,
        patch_size=4, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, masking=masking, **overrides,
    )
    return AutoMAEForPreTraining(config).eval()


def images(batch, image_size, seed=1):
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def corner_boxes(batch, image_size):
    """One or two boxes per image (pixels, xyxy), the second image with none."""
    boxes = []
    for i in range(batch):
        if i % 3 == 1:
            boxes.append(torch.zeros(0, 4))
        else:
            boxes.append(torch.tensor([[0.0, 0.0, 9.0, 9.0], [image_size - 5.0, image_size - 9.0, image_size, image_size]]))
    return boxes


def run_model(model, pixel_values, masking, noise=None, **kwargs):
    if masking == "box_prior":
        kwargs.setdefault("boxes", corner_boxes(pixel_values.shape[0], pixel_values.shape[-1]))
    with torch.no_grad():
        return model(pixel_values, noise=noise, **kwargs)


# ---- every strategy: exact visible count on every grid ----------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("masking", STRATEGIES)
def test_exact_visible_count(masking, grid):
    image_size = GRIDS[grid]
    model = tiny_model(masking, image_size, attention_hint_ratio=0.3 if masking == "attention" else 0.0)
    num_patches = (image_size // 4) ** 2
    num_visible = num_visible_patches(num_patches, model.config.mask_ratio)
    output = run_model(model, images(3, image_size), masking)
    assert output.mask.shape == (3, num_patches)
    assert torch.equal(output.mask.sum(1), torch.full((3,), float(num_patches - num_visible)))
    assert torch.equal(output.ids_restore.sort(1).values, torch.arange(num_patches).expand(3, -1))
    assert torch.isfinite(output.loss)
    assert (model.discriminator is not None) == (masking == "learned")
    assert (output.generator_loss is not None) == (masking == "learned")


# ---- box_prior -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
def test_box_prior_masks_box_patches_first(grid):
    image_size = GRIDS[grid]
    rows = image_size // 4
    model = tiny_model("box_prior", image_size, mask_factor=0.5)
    num_patches = rows * rows
    num_masked = num_patches - num_visible_patches(num_patches, 0.75)
    # A box over the patch block [1, 1 + side) x [2, 2 + side), fewer patches than the masked count.
    side = max(2, rows // 4)
    box = torch.tensor([[2 * 4.0, 1 * 4.0, (2 + side) * 4.0 - 1, (1 + side) * 4.0 - 1]])
    expected = torch.zeros(rows, rows)
    expected[1 : 1 + side, 2 : 2 + side] = 1
    draws = 64
    pixel_values = images(draws, image_size)
    noise = torch.rand(draws, num_patches, generator=torch.Generator().manual_seed(5))
    output = run_model(model, pixel_values, "box_prior", noise=noise, boxes=[box] * draws)
    assert expected.sum() < num_masked
    assert torch.equal(output.box_patches, expected.flatten().expand(draws, -1))
    inside = expected.flatten().bool()
    assert bool((output.mask[:, inside] == 1).all()), "every box patch is masked in every draw"
    # Without boxes the same noise masks box patches only by chance.
    plain = run_model(model, pixel_values, "box_prior", noise=noise, boxes=[torch.zeros(0, 4)] * draws)
    assert not bool((plain.mask[:, inside] == 1).all())
    # The same boxes in all three formats give the same mask.
    xywh = torch.cat([box[:, :2], box[:, 2:] - box[:, :2]], dim=1)
    for boxes, box_format in ((box / image_size, "xyxy_normalized"), (xywh, "xywh")):
        other = run_model(model, pixel_values, "box_prior", noise=noise, boxes=[boxes] * draws, box_format=box_format)
        assert torch.equal(other.mask, output.mask), box_format
    normalised = tiny_model("box_prior", image_size, box_format="xyxy_normalized")
    assert torch.equal(run_model(normalised, pixel_values, "box_prior", noise=noise, boxes=[box / image_size] * draws).mask,
                       output.mask)


def test_box_patch_rule_is_centre_inside_any_box():
    # 8x8 grid of 4-pixel patches: centres at 2, 6, 10, ...
    boxes = [torch.tensor([[2.0, 2.0, 6.0, 2.0], [29.0, 29.0, 31.0, 31.0]]), torch.tensor([[3.0, 3.0, 5.0, 5.0]])]
    inside = boxes_to_patch_mask(boxes, (8, 8), (32, 32)).view(2, 8, 8)
    expected = torch.zeros(2, 8, 8)
    expected[0, 0, 0] = expected[0, 0, 1] = expected[0, 7, 7] = 1  # borders count; several boxes per image
    assert torch.equal(inside, expected)  # a box covering no centre marks nothing


@pytest.mark.parametrize("box_format", ["xyxy", "xywh", "xyxy_normalized"])
def test_boxes_of_a_batch_are_tested_at_once_padded_or_listed(box_format):
    """The loader pads an image's boxes with NaN rows into one [B, n, 4] tensor; listed, padded or one image at a
    time, the patches inside are the same."""
    from automae_hf.masking import pad_boxes
    from automae_hf.training.data import collate

    generator = torch.Generator().manual_seed(0)
    boxes = [torch.rand(count, 4, generator=generator) * 16 for count in (3, 0, 1, 5)]
    boxes = [torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1) if box_format != "xywh" else b for b in boxes]
    scale = 1 / 32 if box_format == "xyxy_normalized" else 1
    boxes = [b * scale for b in boxes]
    one_by_one = torch.cat([boxes_to_patch_mask([b], (8, 8), (32, 32), box_format) for b in boxes])
    assert one_by_one.sum() > 0
    assert torch.equal(boxes_to_patch_mask(boxes, (8, 8), (32, 32), box_format), one_by_one)
    padded = pad_boxes(boxes)
    assert padded.shape == (4, 5, 4) and padded[1].isnan().all()
    assert torch.equal(boxes_to_patch_mask(padded, (8, 8), (32, 32), box_format), one_by_one)
    batch = collate([{"pixel_values": torch.zeros(3, 32, 32, dtype=torch.uint8), "skipped": 0, "boxes": b.numpy()}
                     for b in boxes])
    assert torch.allclose(batch["boxes"], padded, equal_nan=True)


def test_boxes_need_box_prior():
    with pytest.raises(ValueError, match="box_prior"):
        run_model(tiny_model("random"), images(1, 32), "random", boxes=[torch.zeros(0, 4)])


# ---- attention ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
def test_attention_masks_the_teachers_top_patches(grid):
    image_size = GRIDS[grid]
    model = tiny_model("attention", image_size)
    pixel_values = images(4, image_size)
    num_patches = (image_size // 4) ** 2
    num_masked = num_patches - num_visible_patches(num_patches, 0.75)
    output = run_model(model, pixel_values, "attention")
    teacher_attention = model.mask_generator.teacher_attention(pixel_values)
    torch.testing.assert_close(output.teacher_attention, teacher_attention)
    top = teacher_attention.mean(1).flatten(1).argsort(dim=1, descending=True)[:, :num_masked]
    expected = torch.zeros(4, num_patches).scatter_(1, top, 1.0)
    assert torch.equal(output.mask, expected)
    # Cached maps give the same mask; hints keep the count and reveal the asked share of the top patches.
    assert torch.equal(run_model(model, pixel_values, "attention", teacher_attention=teacher_attention).mask, expected)
    hinted = tiny_model("attention", image_size, attention_hint_ratio=0.25)
    hinted.load_state_dict(model.state_dict())
    output = run_model(hinted, pixel_values, "attention")
    num_hints = round(0.25 * num_masked)
    assert torch.equal(output.mask.sum(1), torch.full((4,), float(num_masked)))
    assert torch.equal((output.mask * expected).sum(1), torch.full((4,), float(num_masked - num_hints)))


def test_attention_masking_hints_are_random_swaps():
    attention = torch.arange(16.0).view(1, 16)  # patch 15 most attended
    draws = [attention_masking(attention, 4, 0.25, generator=torch.Generator().manual_seed(s))[1] for s in range(8)]
    for mask in draws:
        assert mask.sum() == 12 and mask[0, 4:].sum() == 9 and mask[0, :4].sum() == 3  # 3 hints, 3 swaps
    assert len({tuple(m.flatten().tolist()) for m in draws}) > 1
    capped = attention_masking(attention, 4, 0.5, generator=torch.Generator().manual_seed(0))[1]
    assert capped.sum() == 12 and capped[0, :4].sum() == 4  # 6 hints asked, capped at the 4 non-top patches


# ---- what each strategy builds ------------------------------------------------------------------------------------
def test_only_teacher_strategies_build_a_teacher():
    for masking in ("random", "box_prior"):
        model = tiny_model(masking)
        assert model.mask_generator is None and model.discriminator is None
        assert not any(name.startswith(("mask_generator.", "discriminator.")) for name in model.state_dict())
        with pytest.raises(ValueError, match="teacher"):
            model.load_teacher("/nonexistent")
        with pytest.raises(ValueError, match="discriminator"):
            model.discriminator_loss(images(1, 32))
    attention = tiny_model("attention")
    assert attention.mask_generator is not None and attention.discriminator is None
    assert not any(p.requires_grad for p in attention.mask_generator.parameters())
    student = {id(p) for p in attention.student_parameters()}
    assert not any(id(p) in student for p in attention.mask_generator.parameters())
    learned = tiny_model("learned")
    assert learned.discriminator is not None
    assert any(p.requires_grad for p in learned.mask_generator.score_head.parameters())


def test_config_validation_names_the_field():
    for field, value in (("masking", "boxes"), ("box_format", "cxcywh"), ("attention_hint_ratio", 1.0)):
        with pytest.raises(ValueError, match=field):
            AutoMAEConfig(**{field: value})


# ---- save / load ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masking", STRATEGIES)
def test_save_load_round_trip(masking, tmp_path):
    model = tiny_model(masking, 28, attention_hint_ratio=0.2 if masking == "attention" else 0.0)
    model.save_pretrained(tmp_path)
    loaded, info = AutoMAEForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.masking == masking and loaded.config.attention_hint_ratio == model.config.attention_hint_ratio
    assert model.state_dict().keys() == loaded.state_dict().keys()
    pixel_values, noise = images(2, 28), torch.rand(2, 49, generator=torch.Generator().manual_seed(3))
    kwargs = {"gumbel_noise": torch.zeros(2, 49)} if masking == "learned" else {}
    expected = run_model(model, pixel_values, masking, noise=noise.clone(), **kwargs)
    actual = run_model(loaded, pixel_values, masking, noise=noise.clone(), **kwargs)
    assert torch.equal(expected.mask, actual.mask)
    torch.testing.assert_close(expected.loss, actual.loss)
    if masking == "attention":
        assert not any(p.requires_grad for p in loaded.mask_generator.parameters())


# ---- pretrain.py: boxes follow the augmentation; box_prior and attention runs ---------------------------------------
def test_boxes_follow_crop_and_flip():
    from PIL import Image

    from automae_hf.training.data import augment, read_boxes

    array = np.zeros((60, 80, 3), np.uint8)
    array[10:40, 30:70] = 255  # x 30..70, y 10..40
    image = Image.fromarray(array)
    boxes = read_boxes({"bbox": [[30, 10, 40, 30]], "category": [0]}, "xywh", 80, 60)
    assert np.allclose(boxes, [[30, 10, 70, 40]])
    assert np.allclose(read_boxes([{"bbox": [30 / 80, 10 / 60, 70 / 80, 40 / 60]}], "xyxy_normalized", 80, 60), boxes)
    mean, std = np.zeros(3, np.float32), np.ones(3, np.float32)
    flips, checked = set(), 0
    for seed in range(40):
        result = augment(image, 32, mean, std, np.random.default_rng(seed), boxes=boxes)
        again = augment(image, 32, mean, std, np.random.default_rng(seed), boxes=boxes)
        assert torch.equal(result["pixel_values"], again["pixel_values"])
        assert torch.equal(result["boxes"], again["boxes"])
        out, moved, geometry = result["pixel_values"].numpy(), result["boxes"].numpy(), result["geometry"]
        bright = out[0] > 0.5
        if len(moved) == 0:
            assert bright.mean() < 0.05
            continue
        flips.add(geometry.flipped)
        x0, y0, x1, y1 = moved[0]
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        assert_box_frames_the_bright_square(bright, (x0, y0, x1, y1), seed)
        checked += 1
    assert checked > 20 and flips == {True, False}


@pytest.fixture(scope="module")
def box_data(tmp_path_factory):
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("box_data")
    rng = np.random.default_rng(0)
    pictures, bboxes = [], []
    for i in range(8):
        width, height = int(rng.integers(24, 48)), int(rng.integers(24, 48))
        pictures.append(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))
        boxes = [[2.0, 3.0, width / 2, height / 3]] + ([[width / 2, height / 2, width / 3, height / 3]] if i % 2 else [])
        bboxes.append(boxes if i != 3 else [])  # COCO xywh pixels; one image without boxes
    data = datasets.Dataset.from_dict({"image": pictures, "bbox": bboxes}).cast_column("image", datasets.Image())
    data.save_to_disk(str(root / "boxes"))
    return root / "boxes"


@pytest.mark.parametrize("masking", ["box_prior", "attention"])
def test_pretrain_runs_each_strategy(masking, box_data, tmp_path, capsys):
    args = common(box_data, tmp_path, 2, "--masking", masking, "--image_log_steps", 2, "--per_device_train_batch_size", 4)
    if masking == "attention":
        args += ["--attention_hint_ratio", 0.1]
    printed = pretrain_in_process(args, capsys)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["masking"] == masking
    log = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])
    assert log["step"] == 2 and "d_loss" not in log and log["loss"] == pytest.approx(log["reconstruction_loss"])
    assert (tmp_path / "images" / "step_0000002.png").is_file()
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["masking"] == masking
    if masking == "box_prior":
        assert summary["box_column_name"] == "bbox" and summary["teacher"] == "none"
        assert not any(k.startswith("mask_generator.") for k in _keys(tmp_path))
    else:  # no --teacher_name_or_path: the student's own attention, so no teacher is built or saved
        assert config["attention_hint_ratio"] == 0.1 and config["teacher_name_or_path"] == "self"
        assert summary["teacher"] == "self" and not any(k.startswith("mask_generator.teacher.") for k in _keys(tmp_path))
    assert "Done: 2 steps" in printed


def _keys(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return list(handle.keys())


def test_pretrain_teacher_none_conflicts_with_attention(box_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        pretrain_in_process(common(box_data, tmp_path, 1, "--masking", "attention", "--teacher_name_or_path", "none"),
                            capsys)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert raised.value.code != 0 and len(errors) == 1 and "--masking attention" in errors[0], errors


def test_a_new_strategy_is_one_registration():
    """The registry is the only place a strategy lives: the config accepts it and the model runs it."""
    from automae_hf import masking

    def choose_first_patches(inputs):  # keeps the first K patches in patch order
        noise = torch.arange(inputs.grid[0] * inputs.grid[1], dtype=torch.float32).expand(inputs.pixel_values.shape[0], -1)
        ids_keep, mask, ids_restore = masking.argsort_masking(noise, inputs.num_visible)
        return dict(mask=mask, ids_restore=ids_restore, ids_keep=ids_keep)

    masking.register_masking_strategy("first_patches", choose_first_patches, description="test only")
    try:
        model = tiny_model("first_patches")
        assert model.mask_generator is None and model.discriminator is None
        output = model(images(2, 32))
        num_visible = num_visible_patches(64, model.config.mask_ratio)
        assert torch.equal(output.mask[:, :num_visible], torch.zeros(2, num_visible))
    finally:
        del masking.MASKING_STRATEGIES["first_patches"]

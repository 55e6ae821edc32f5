"""Picture grids (training-time and `training/visualize.py`) and one image decoder for every entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_config

from automae_hf import AutoMAEForPreTraining
from automae_hf.training import pictures as pics
from automae_hf.training import visualization
from automae_hf.training.data import MapImageDataset, decode_image

LEARNED_TITLES = ["image", "teacher attention (mean over heads)", "learned p = softmax(mask_logits)",
                  "sampled mask (black = masked)", "reconstruction (visible patches pasted back)"]


# ---- a transparent PNG through every entry point ---------------------------------------------------------------
def transparent_png(path, mode: str = "RGBA"):
    """32x32: the left half transparent over pure red (or black, for LA), the right half opaque blue (or grey)."""
    if mode == "RGBA":
        array = np.zeros((32, 32, 4), np.uint8)
        array[:, :16] = (255, 0, 0, 0)
        array[:, 16:] = (0, 0, 255, 255)
        image = Image.fromarray(array, "RGBA")
    elif mode == "LA":
        array = np.zeros((32, 32, 2), np.uint8)
        array[:, 16:] = (100, 255)
        image = Image.fromarray(array, "LA")
    else:  # a palette image whose index 0 (red) is the transparent one
        image = Image.fromarray(np.where(np.arange(32) < 16, 0, 1).astype(np.uint8)[None].repeat(32, 0), "P")
        image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        image.info["transparency"] = 0
    image.save(path)
    return path


def assert_white_left_blue_right(rgb: np.ndarray):
    """`[H, W, 3]` in [0, 1] of the 32x32 test picture (not resized)."""
    np.testing.assert_allclose(rgb[:, :16], 1.0, atol=1e-6)  # white, not the red under alpha 0
    np.testing.assert_allclose(rgb[:, 16:], np.broadcast_to([0.0, 0.0, 1.0], rgb[:, 16:].shape), atol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_decode_image_composites_transparent_pixels_on_white(mode, tmp_path):
    path = transparent_png(tmp_path / "t.png", mode)
    with Image.open(path) as opened:
        assert opened.mode == mode and (mode != "P" or "transparency" in opened.info)
    rgb = np.asarray(decode_image(str(path), "RGB"), np.float32) / 255
    if mode == "RGBA":
        assert_white_left_blue_right(rgb)
    else:
        assert np.all(rgb[:, :16] == 1.0)
    assert np.all(np.asarray(decode_image(str(path), "L"))[:, :16] == 255)
    # Plain `convert` shows what is under the transparent pixels: what every entry point must not do.
    assert Image.open(path).convert("RGB").getpixel((0, 0)) != (255, 255, 255)


def plain_processor(size: int = 32):
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=False, do_normalize=False, size={"height": size, "width": size})


def test_linear_probe_loads_transparent_images_on_white(tmp_path):
    import datasets

    from automae_hf.training.probes import _load_split

    path = transparent_png(tmp_path / "t.png")
    data = datasets.Dataset.from_dict({"image": [str(path)], "label": [0]}).cast_column("image", datasets.Image())
    assert data[0]["image"].mode == "RGBA"
    pixel_values, labels = _load_split(data, "image", "label", plain_processor(), 3)
    assert pixel_values.shape == (1, 3, 32, 32) and labels.tolist() == [0]
    assert_white_left_blue_right(pixel_values[0].permute(1, 2, 0).numpy())


def test_visualize_loads_transparent_images_on_white(tmp_path):
    path = transparent_png(tmp_path / "t.png")
    for item in (path, str(path), Image.open(path)):
        pixel_values = visualization.load_pixel_values(item, plain_processor(), 3)
        assert pixel_values.shape == (1, 3, 32, 32)
        assert_white_left_blue_right(pixel_values[0].permute(1, 2, 0).numpy())


def test_pretraining_dataset_sees_transparent_pixels_on_white(tmp_path):
    import datasets

    path = transparent_png(tmp_path / "t.png")
    data = datasets.Dataset.from_dict({"image": [str(path)]}).cast_column("image", datasets.Image(decode=False))
    dataset = MapImageDataset(data, "image", 16, mean=[0, 0, 0], std=[1, 1, 1], mode="RGB", seed=0)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        x = dataset[0]["pixel_values"]
        # White and blue share red = green, so any resampling of them does too; the hidden red would not.
        torch.testing.assert_close(x[0], x[1], atol=1e-5, rtol=0)
        assert float(x[0].max()) > 0.5


# ---- grids -----------------------------------------------------------------------------------------------------
def tiny_model(masking: str = "learned", **overrides):
    torch.manual_seed(0)
    return AutoMAEForPreTraining(make_tiny_config(masking=masking, **overrides)).eval()


def batch(count: int = 3):
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def without_scale(title: str) -> str:
    return title.split(" (scale")[0]


def dark_pixels(image: Image.Image) -> int:
    return int((np.asarray(image.convert("L")) < 100).sum())


def test_learned_columns_show_softmax_of_mask_logits_not_the_gumbel_sample():
    model, x = tiny_model(), batch()
    with torch.no_grad():
        output = model(x, generator=torch.Generator().manual_seed(1))
    pictures = pics.picture_arrays(model, x, output, [0] * 3, [1] * 3, max_images=2)
    p = output.mask_logits[:2].float().softmax(-1).view(2, 8, 8).numpy()
    np.testing.assert_allclose(pictures["learned_p"], p, atol=1e-6)
    np.testing.assert_allclose(pictures["learned_p"].sum(axis=(1, 2)), 1, atol=1e-5)
    assert not np.allclose(pictures["mask_probs"], pictures["learned_p"], atol=1e-3)  # the sample is another thing
    np.testing.assert_allclose(pictures["teacher_attention"], output.teacher_attention[:2].mean(1).numpy(), atol=1e-6)
    columns = pics.picture_columns(pictures, "learned")
    assert [without_scale(c.title) for c in columns] == LEARNED_TITLES
    assert all(c.tiles.shape == (2, 32, 32, 3) and c.tiles.dtype == np.uint8 for c in columns)
    learned = {c.key: c for c in columns}["learned_p"].tiles
    expected = pics.to_uint8(pics.upsample(pics.heatmap(p[1], 0.0, float(p.max())), (32, 32)))  # one scale, 2 rows
    np.testing.assert_array_equal(learned[1], expected)
    mask = {c.key: c for c in columns}["mask"].tiles
    masked = np.kron(output.mask[0].view(8, 8).numpy(), np.ones((4, 4))).astype(bool)
    assert (mask[0][masked] == 0).all() and (mask[0][~masked] == 255).all()  # black = masked


def test_a_uniform_p_is_drawn_flat_on_one_absolute_scale():
    uniform = np.full((8, 8), 1 / 64, np.float32)
    centred = uniform.copy()  # a centred square holding a little more: L1 distance 0.001 to uniform
    centred[2:6, 2:6] += 0.0005 / 16
    centred[~np.pad(np.ones((4, 4), bool), 2)] -= 0.0005 / 48
    peaked = np.full((8, 8), 0.5 / 63, np.float32)
    peaked[0, 0] = 0.5
    flat = np.zeros((3, 32, 32, 3), np.float32)
    pictures = {"image": flat, "reconstruction": flat, "mask": np.zeros((3, 8, 8), np.float32),
                "learned_p": np.stack([uniform, centred, peaked])}
    [column] = [c for c in pics.picture_columns(pictures, "learned") if c.key == "learned_p"]
    assert column.title == "learned p = softmax(mask_logits) (scale 0 to 0.5; uniform 0.016)"
    for tile in column.tiles[:2]:  # flat (within 2 of 255 levels), and dark next to the peaked row's 0.5
        assert np.ptp(tile.reshape(-1, 3).astype(int), axis=0).max() <= 2 and tile.mean() < 0.1 * 255
    assert (column.tiles[2, :4, :4] == 255).all()  # the peak is white


@pytest.mark.parametrize("masking,keys", [
    ("attention", ["image", "teacher_attention", "mask", "reconstruction"]),
    ("box_prior", ["image", "box_patches", "mask", "reconstruction"]),
    ("random", ["image", "mask", "reconstruction"]),
])
def test_other_strategies_keep_their_columns(masking, keys):
    model, x = tiny_model(masking), batch(2)
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 28.0]]), torch.zeros(0, 4)] if masking == "box_prior" else None
    with torch.no_grad():
        output = model(x, **({"boxes": boxes, "box_format": "xyxy"} if boxes else {}))
    columns = pics.picture_columns(pics.picture_arrays(model, x, output, [0] * 3, [1] * 3), masking, boxes)
    assert [c.key for c in columns] == keys and all(c.title for c in columns)
    if masking == "box_prior":
        assert columns[0].title == "image, boxes in red" and (columns[0].tiles[0] == (255, 0, 0)).all(-1).any()


def test_grid_has_a_titled_header_over_every_column_and_a_legend(tmp_path):
    model, x = tiny_model(), batch()
    with torch.no_grad():
        output = model(x)
    path = tmp_path / "images" / "step_0000001.png"
    grid = pics.save_image_grid(path, model, x, output, [0] * 3, [1] * 3, max_images=2)
    saved = Image.open(path)
    assert saved.size == grid.size and saved.mode == "RGB"
    scale = 128 // 32
    body_width, body_height = 5 * 32 * scale + 4 * 2 * scale, 2 * 32 * scale + 3 * 2 * scale  # grey bands
    assert grid.width == body_width and grid.height > body_height + 40  # header and legend
    # Without a legend the header is all that is above the tiles: every column has dark title text over it.
    columns = pics.picture_columns(pics.picture_arrays(model, x, output, [0] * 3, [1] * 3, 2), "learned")
    bare = pics.render_grid(columns, legend=[], scale=scale)
    header_height = bare.height - body_height
    assert header_height > 10 and bare.width == body_width
    for c in range(5):
        left = c * (32 + 2) * scale
        header = bare.crop((left, 0, left + 32 * scale, header_height))
        assert dark_pixels(header) > 20, LEARNED_TITLES[c]
    assert len(np.unique(np.asarray(bare.crop((0, 0, body_width, header_height))).reshape(-1, 3), axis=0)) > 2
    # The legend: text under the tiles, including the heatmap colour bar.
    legend = grid.crop((0, header_height + body_height, grid.width, grid.height))
    assert dark_pixels(legend) > 200
    r, g, b = np.asarray(legend).reshape(-1, 3).astype(int).T
    assert ((r > 200) & (g > 50) & (g < 200) & (b < 30)).any()  # the bar's orange


def test_fonts_render_without_downloads():
    face = pics.font(13)
    image = Image.new("RGB", (200, 30), "white")
    from PIL import ImageDraw

    ImageDraw.Draw(image).text((2, 2), "teacher attention", fill=(0, 0, 0), font=face)
    assert dark_pixels(image) > 50


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import ViTImageProcessor

    folder = tmp_path_factory.mktemp("checkpoint")
    tiny_model().save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    processor.save_pretrained(folder)
    return folder


def test_visualize_draws_the_teacher_column_of_the_teacher_pretraining_used(checkpoint, tmp_path, monkeypatch):
    from automae_hf.teacher import resize_attention, teacher_cls_attention

    model = AutoMAEForPreTraining.from_pretrained(str(checkpoint)).eval()
    x = batch(1) * 4 - 2
    with torch.no_grad():
        own = resize_attention(teacher_cls_attention(model.vit, x), (8, 8)).mean(1).numpy()
        teacher = model.mask_generator.teacher_attention(x).mean(1).numpy()
    by_self = visualization.mask_pictures(model, x, [0.5] * 3, [0.25] * 3, teacher="self")
    by_checkpoint = visualization.mask_pictures(model, x, [0.5] * 3, [0.25] * 3, teacher="checkpoint")
    np.testing.assert_allclose(by_self["teacher_attention"], own, atol=1e-5)
    np.testing.assert_allclose(by_checkpoint["teacher_attention"], teacher, atol=1e-5)
    columns = visualization.picture_columns(by_self, "learned", prediction=True)
    assert [without_scale(c.title) for c in columns] == LEARNED_TITLES + ["prediction (every patch)"]

    image = tmp_path / "t.png"
    transparent_png(image)
    seen = []
    original = visualization.mask_pictures
    monkeypatch.setattr(visualization, "mask_pictures", lambda *a: seen.append(a[4]) or original(*a))
    (checkpoint / "train_summary.json").write_text(json.dumps({"teacher": "self"}))
    try:
        [written] = visualization.save_mask_pictures(checkpoint, [image], tmp_path / "out")
    finally:
        (checkpoint / "train_summary.json").unlink()
    visualization.save_mask_pictures(checkpoint, [image], tmp_path / "out2")
    assert seen == ["self", "checkpoint"]
    picture = Image.open(written)
    assert picture.width == 6 * 32 * 4 + 5 * 2 * 4 and picture.height > 32 * 4 + 40


def test_visualize_a_teacher_free_checkpoint_draws_the_students_own_attention(tmp_path):
    from transformers import ViTImageProcessor

    from automae_hf.teacher import teacher_cls_attention

    folder = tmp_path / "self"
    model = tiny_model(teacher_name_or_path="self")
    assert model.mask_generator.teacher is None
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    (folder / "train_summary.json").write_text(json.dumps({"teacher": "self"}))
    x = batch(1)
    with torch.no_grad():
        own = teacher_cls_attention(model.vit, x).mean(1).numpy()
    for mode in ("self", "checkpoint"):
        pictures = visualization.mask_pictures(model, x, [0.5] * 3, [0.5] * 3, teacher=mode)
        np.testing.assert_allclose(pictures["teacher_attention"], own, atol=1e-5)
    [written] = visualization.save_mask_pictures(folder, [transparent_png(tmp_path / "t.png")], tmp_path / "out")
    assert Image.open(written).width == 6 * 32 * 4 + 5 * 2 * 4


@pytest.mark.parametrize("fmt", ["automae", "vit"])
def test_visualize_refuses_an_exported_encoder(checkpoint, tmp_path, fmt, capsys):
    from automae_hf.training.export import export_encoder

    encoder = export_encoder(str(checkpoint), tmp_path / "encoder", fmt)
    with pytest.raises(SystemExit) as exit_info:
        visualization.main(["--model_name_or_path", str(encoder), "--images", str(transparent_png(tmp_path / "t.png")),
                            "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and not list((tmp_path / "out").glob("*.png"))
    assert "has no decoder / score head / teacher weights" in capsys.readouterr().err


def test_visualize_refuses_a_random_teacher_unless_asked_for_the_students_own(tmp_path):
    from transformers import ViTImageProcessor

    model = tiny_model()
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("mask_generator.teacher.")}
    model.save_pretrained(tmp_path / "no_teacher", state_dict=weights)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "no_teacher")
    image = transparent_png(tmp_path / "t.png")
    with pytest.raises(ValueError, match=r"has no teacher weights .*--teacher self"):
        visualization.save_mask_pictures(tmp_path / "no_teacher", [image], tmp_path / "out")
    assert visualization.save_mask_pictures(tmp_path / "no_teacher", [image], tmp_path / "out", teacher="self")


def test_visualize_draws_from_a_saved_data_set(checkpoint, tmp_path, capsys):
    import datasets

    images = [Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)) for i in range(4)]
    split = datasets.Dataset.from_dict({"picture": images}, features=datasets.Features({"picture": datasets.Image()}))
    datasets.DatasetDict({"train": split, "test": split.select(range(3))}).save_to_disk(str(tmp_path / "data"))
    common = ["--model_name_or_path", str(checkpoint), "--dataset_name", str(tmp_path / "data")]
    visualization.main([*common, "--num_images", "2", "--output_dir", str(tmp_path / "a")])
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == ["test_00000.png", "test_00001.png"]
    visualization.main([*common, "--dataset_split", "train", "--image_column_name", "picture", "--output_dir",
                        str(tmp_path / "b")])
    assert len(list((tmp_path / "b").glob("train_*.png"))) == 4  # fewer images than --num_images' default 8
    with pytest.raises(SystemExit):
        visualization.main([*common, "--dataset_split", "val", "--output_dir", str(tmp_path / "c")])
    assert "--dataset_split 'val' not in the data set's splits ['train', 'test']" in capsys.readouterr().err
    image_file = tmp_path / "one.png"
    images[0].save(image_file)
    with pytest.raises(SystemExit):  # data-set flags beside image files would be ignored: refused instead
        visualization.main(["--model_name_or_path", str(checkpoint), "--images", str(image_file), "--num_images", "2",
                            "--output_dir", str(tmp_path / "d")])
    assert "--num_images only apply with --dataset_name" in capsys.readouterr().err

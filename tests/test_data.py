"""MAE's augmentation on both backends (torchvision.transforms.v2 and the PIL/numpy fallback): one geometry, boxes and
teacher maps that follow the pixels, and items that are a pure function of (seed, epoch, index)."""

import numpy as np
import pytest
import torch
from PIL import Image

from automae_hf.training import data
from automae_hf.training.data import MapImageDataset, augment, available_backends, resolve_backend
from conftest import assert_box_frames_the_bright_square

needs_torchvision = pytest.mark.skipif("torchvision" not in available_backends(),
                                       reason="torchvision does not import here: only the fallback is tested")


def smooth_image(mode: str, width: int = 96, height: int = 72) -> Image.Image:
    """A smooth colour ramp with a bright square (x 40..70, y 20..50) on it: resampling it is well conditioned."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    array = np.stack([x / width * 120, y / height * 120, (x + y) / (width + height) * 120], axis=-1)
    array[20:50, 40:70] = 255
    image = Image.fromarray(array.round().astype(np.uint8), "RGB")
    return image if mode == "RGB" else image.convert("L")


SQUARE = np.array([[40, 20, 70, 50]], np.float32)


def square_map(width: int = 96, height: int = 72, g: int = 12) -> np.ndarray:
    """`[2, g, g]` float16: head 0 is the square's coverage of each cell of the whole image, head 1 a column ramp."""
    cover = np.zeros((height, width), np.float32)
    cover[20:50, 40:70] = 1
    cells = Image.fromarray(cover).resize((g, g), Image.BOX)
    return np.stack([np.asarray(cells), np.tile(np.arange(g, dtype=np.float32), (g, 1))]).astype(np.float16)


@needs_torchvision
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_backends_agree_on_the_geometry_and_nearly_on_the_pixels(mode):
    image, channels = smooth_image(mode), 3 if mode == "RGB" else 1
    mean, std = [0.0] * channels, [1.0] * channels
    boxes = np.concatenate([SQUARE, [[0, 0, 3, 2], [95, 70, 96, 72]]]).astype(np.float32)
    for seed in range(30):
        pil, tv = (augment(image, 32, mean, std, np.random.default_rng(seed), boxes, square_map(), backend=backend)
                   for backend in ("pil", "torchvision"))
        assert pil["geometry"] == tv["geometry"]
        assert tv["pixel_values"].shape == (channels, 32, 32) and tv["pixel_values"].dtype == torch.float32
        difference = (pil["pixel_values"] - tv["pixel_values"]).abs() * 255
        # Inside, both are bicubic with antialiasing, rounded to uint8; at the edges PIL also reads past the crop.
        assert float(difference[:, 3:-3, 3:-3].max()) <= 1.0 + 1e-3, seed
        assert float(difference.mean()) < 1.0, seed
        assert pil["boxes"].shape == tv["boxes"].shape, seed
        torch.testing.assert_close(tv["boxes"], pil["boxes"], atol=1e-4, rtol=0)
        assert tv["teacher_attention"].shape == (2, 12, 12) and tv["teacher_attention"].dtype == torch.float32
        torch.testing.assert_close(tv["teacher_attention"], pil["teacher_attention"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_boxes_and_map_follow_the_crop_and_flip(backend):
    if backend not in available_backends():
        pytest.skip("torchvision does not import here")
    image, g = smooth_image("RGB"), 12
    flips, checked = set(), 0
    for seed in range(40):
        out = augment(image, 48, [0, 0, 0], [1, 1, 1], np.random.default_rng(seed), SQUARE, square_map(g=g),
                      backend=backend)
        bright = out["pixel_values"].min(0).values.numpy() > 0.75  # only the square is bright in all channels
        moved, maps = out["boxes"].numpy(), out["teacher_attention"].numpy()
        if len(moved) == 0:
            assert bright.mean() < 0.02 and maps[0].max() < 0.6, seed
            continue
        flips.add(out["geometry"].flipped)
        x0, y0, x1, y1 = moved[0]
        assert_box_frames_the_bright_square(bright, (x0, y0, x1, y1), seed)
        # The map's cells (4 x 4 pixels of the output) where the square is: high where the pixels are bright.
        cell_bright = bright.reshape(g, 4, g, 4).mean((1, 3))
        if 0 < cell_bright.mean() < 1:
            assert np.corrcoef(cell_bright.ravel(), maps[0].ravel())[0, 1] > 0.8, seed
        # Head 1 was a left-to-right ramp of the whole image: it still increases left to right unless flipped.
        slope = np.sign(np.diff(maps[1].mean(0)).sum())
        assert slope == (-1 if out["geometry"].flipped else 1), seed
        checked += 1
    assert checked > 20 and flips == {True, False}


@pytest.fixture()
def box_and_map_data(tmp_path):
    import datasets

    paths = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        smooth_image("RGB", 96 - 8 * i, 72).save(path)
        paths.append(str(path))
    table = {"image": paths, "objects": [{"bbox": [[40, 20, 30, 30]]}] * 3,
             "teacher_attention": [square_map(96 - 8 * i) for i in range(3)]}
    return datasets.Dataset.from_dict(table).cast_column("image", datasets.Image(decode=False))


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_items_are_a_function_of_seed_epoch_and_index(box_and_map_data, backend):
    if backend not in available_backends():
        pytest.skip("torchvision does not import here")

    def items(seed, epoch):
        dataset = MapImageDataset(box_and_map_data, "image", 32, [0.5] * 3, [0.25] * 3, "RGB", seed,
                                  box_column="objects", backend=backend)
        dataset.set_epoch(epoch)
        return [dataset[i] for i in range(len(dataset))]

    first, again = items(7, 2), items(7, 2)
    for a, b in zip(first, again):
        assert a.keys() == b.keys() == {"pixel_values", "skipped", "boxes", "teacher_attention"}
        for key in ("pixel_values", "boxes", "teacher_attention"):
            assert torch.equal(a[key], b[key]), key
        assert a["pixel_values"].shape == (3, 32, 32) and a["teacher_attention"].shape == (2, 12, 12)
    torch.manual_seed(123)  # torch's global RNG plays no part
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, items(7, 2)))
    others = items(7, 3) + items(8, 2)
    assert not all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first * 2, others))


def test_without_torchvision_auto_falls_back_and_torchvision_names_the_extra(monkeypatch):
    monkeypatch.setattr(data, "_torchvision", lambda: "torchvision does not import (No module named 'torchvision')")
    assert resolve_backend("auto") == "pil" and available_backends() == ("pil",)
    with pytest.raises(ImportError, match=r"pip install automae-hf\[training\]"):
        resolve_backend("torchvision")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("opencv")
    out = augment(smooth_image("L"), 16, [0.5], [0.5], np.random.default_rng(0))
    assert out["pixel_values"].shape == (1, 16, 16) and out["pixel_values"].dtype == torch.float32


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_uint8_items_normalised_on_the_device_equal_the_loaders_normalisation(backend, mode):
    """Pretraining ships uint8 pixels to the device and normalises there: the values equal the loader's own."""
    from automae_hf.training.data import collate, normalize_pixels

    channels = 3 if mode == "RGB" else 1
    mean, std = [0.485, 0.456, 0.406][:channels], [0.229, 0.224, 0.225][:channels]
    items = [{"image": smooth_image(mode)}, {"image": smooth_image(mode, 64, 80)}]
    as_float = MapImageDataset(items, "image", 32, mean, std, mode, seed=5, backend=backend)
    as_uint8 = MapImageDataset(items, "image", 32, None, None, mode, seed=5, backend=backend)
    floats = collate([as_float[i] for i in range(2)])
    raw = collate([as_uint8[i] for i in range(2)])
    assert raw["pixel_values"].dtype == torch.uint8 and raw["skipped"] == 0 and isinstance(raw["skipped"], int)
    normalised = normalize_pixels(raw["pixel_values"], torch.tensor(mean), torch.tensor(std))
    assert normalised.dtype == torch.float32
    assert torch.equal(normalised, floats["pixel_values"])
    assert normalize_pixels(floats["pixel_values"], mean, std) is floats["pixel_values"]  # already normalised


@pytest.fixture()
def image_folder_root(tmp_path):
    """An image-folder root: train/ (6 images) and test/ (4), each with one folder per class."""
    for split, count in (("train", 6), ("test", 4)):
        for index in range(count):
            folder = tmp_path / "images" / split / ("dark", "bright")[index % 2]
            folder.mkdir(parents=True, exist_ok=True)
            smooth_image("L", 20, 16).save(folder / f"{index}.png")
    return tmp_path / "images"


def test_every_command_line_reads_a_folder_by_one_rule(image_folder_root, tmp_path, capsys):
    """pretrain.py's `load_images` takes an image-folder root as --dataset_name (its train/ split) and one split's
    folder as --train_dir; a `save_to_disk` folder of the same images reads alike; a folder it cannot read names the
    layout the flags accept."""
    import datasets

    from automae_hf.training.data import load_image_dataset, load_images
    from automae_hf.training.pretraining import build_parser

    parser = build_parser()

    def pretraining_images(*flags):
        args = parser.parse_args(["--output_dir", str(tmp_path / "out"), *flags])
        return load_images(args, parser)

    root, _, _ = pretraining_images("--dataset_name", str(image_folder_root))
    one_split, _, _ = pretraining_images("--train_dir", str(image_folder_root / "train"))
    test_split, _, _ = pretraining_images("--dataset_name", str(image_folder_root), "--dataset_split", "test")
    assert (len(root), len(one_split), len(test_split)) == (6, 6, 4)
    saved = tmp_path / "saved"
    load_image_dataset(parser, str(image_folder_root)).save_to_disk(str(saved))
    from_disk, column, _ = pretraining_images("--dataset_name", str(saved))
    assert len(from_disk) == 6 and column == "image"
    assert isinstance(load_image_dataset(parser, str(image_folder_root)), datasets.DatasetDict)
    from automae_hf.training import finetuning

    finetune_parser, _, data_args, _ = finetuning.parse_arguments(
        ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "ft"), "--dataset_name", str(image_folder_root),
         "--validation_split_percentage", "40"])
    splits = finetuning.load_splits(data_args, finetune_parser, seed=0)
    assert (len(splits.train) + len(splits.evaluation), len(splits.test)) == (6, 4)  # root: train/ and test/

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        pretraining_images("--dataset_name", str(tmp_path / "empty"))
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and "image-folder root" in error[0] and "--train_dir" in error[0], error


def test_every_command_line_finds_the_same_columns(tmp_path, capsys):
    """Pretraining, finetuning and the probe detect the image column among `IMAGE_COLUMN_CANDIDATES` and the label
    column (a `ClassLabel` first) by one rule, and refuse a named column the data set lacks with the same line."""
    import datasets

    from automae_hf.training import finetuning, probes
    from automae_hf.training.pretraining import build_parser

    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string"),
                                  "target": datasets.ClassLabel(names=["dark", "bright"])})
    images = [smooth_image("L", 20, 16) for _ in range(6)]
    split = datasets.Dataset.from_dict({"picture": images, "caption": ["x"] * 6, "target": [0, 1] * 3}, features)
    datasets.DatasetDict({"train": split, "validation": split, "test": split}).save_to_disk(str(tmp_path / "data"))
    dataset_flags = ["--dataset_name", str(tmp_path / "data")]

    parser = build_parser()
    _, column, _ = data.load_images(parser.parse_args(["--output_dir", str(tmp_path / "out"), *dataset_flags]), parser)
    finetune_parser, _, data_args, _ = finetuning.parse_arguments(
        ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "ft"), *dataset_flags])
    splits = finetuning.load_splits(data_args, finetune_parser, seed=0)
    assert column == splits.image_column == "picture" and splits.label_column == "target"
    with pytest.raises(SystemExit):  # the columns are found: the probe goes on to the (missing) model
        probes.main(["--model_name_or_path", str(tmp_path / "no_model"), *dataset_flags])
    assert "--model_name_or_path" in capsys.readouterr().err

    refusals = []
    for run in (lambda flags: data.load_images(parser.parse_args(["--output_dir", str(tmp_path / "o"), *flags]), parser),
                lambda flags: finetuning.load_splits(finetuning.parse_arguments(
                    ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), *flags])[2], finetune_parser, 0),
                lambda flags: probes.main(["--model_name_or_path", "m", *flags])):
        with pytest.raises(SystemExit):
            run([*dataset_flags, "--image_column_name", "pixels"])
        refusals.append([line.split("error: ")[-1] for line in capsys.readouterr().err.splitlines() if "error:" in line])
    expected = "--image_column_name 'pixels' is not a column of the data set ['picture', 'caption', 'target']"
    assert refusals == [[expected]] * 3
    with pytest.raises(SystemExit):
        probes.main(["--model_name_or_path", "m", *dataset_flags, "--label_column_name", "caption_id"])
    assert "--label_column_name 'caption_id' is not a column" in capsys.readouterr().err

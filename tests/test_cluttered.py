"""The cluttered Fashion-MNIST generator: deterministic, and the recorded box frames the garment in every split."""

from pathlib import Path

import numpy as np
import pytest

from automae_hf.training.cluttered import ClutterSettings, box_patch_share, make_cluttered_splits, tight_crop

DATA = Path(__file__).resolve().parents[1] / "training" / "data" / "fashion_mnist_subset.npz"


@pytest.fixture(scope="module")
def small_arrays():
    arrays = np.load(DATA)
    return {"train_images": arrays["train_images"][:60], "train_labels": arrays["train_labels"][:60],
            "test_images": arrays["test_images"][:20], "test_labels": arrays["test_labels"][:20]}


SETTINGS = ClutterSettings(canvas=48, fragments=6, validation_size=20)


def test_same_settings_same_canvases_other_seed_other_canvases(small_arrays):
    first, second = make_cluttered_splits(small_arrays, SETTINGS), make_cluttered_splits(small_arrays, SETTINGS)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    other = make_cluttered_splits(small_arrays, ClutterSettings(canvas=48, fragments=6, validation_size=20, seed=1))
    assert not np.array_equal(first["train_images"], other["train_images"])


@pytest.mark.parametrize("split", ["train", "validation", "test"])
@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_the_box_frames_the_garment_and_nothing_else(small_arrays, split, scale):
    settings = ClutterSettings(canvas=48, fragments=6, validation_size=20, object_scale=scale)
    out = make_cluttered_splits(small_arrays, settings)
    sources = {"train": small_arrays["train_images"][:-20], "validation": small_arrays["train_images"][-20:],
               "test": small_arrays["test_images"]}[split]
    np.testing.assert_array_equal(out[f"{split}_labels"], {"train": small_arrays["train_labels"][:-20],
                                                           "validation": small_arrays["train_labels"][-20:],
                                                           "test": small_arrays["test_labels"]}[split])
    assert out[f"{split}_images"].shape == (len(sources), 48, 48)
    cluttered = []
    for image, box, garment in zip(out[f"{split}_images"], out[f"{split}_boxes"], sources):
        x, y, w, h = (int(v) for v in box)
        crop = image[y : y + h, x : x + w]
        assert crop.shape == tight_crop(garment).shape if scale == 1.0 else crop.shape == (h, w)
        # Tight: the garment touches all four sides of its box.
        assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
        if scale == 1.0:  # the garment itself, unchanged, inside its box (clutter never enters the box)
            np.testing.assert_array_equal(crop, tight_crop(garment))
        outside = image.copy()
        outside[y : y + h, x : x + w] = 0
        cluttered.append(outside.sum() > 0)
    assert np.mean(cluttered) > 0.5  # clutter lies outside the box (a large garment can leave no room for it)


def test_the_object_covers_a_minority_of_the_grid(small_arrays):
    out = make_cluttered_splits(small_arrays, ClutterSettings(canvas=64, validation_size=20))
    share = box_patch_share(out["test_boxes"], canvas=64, patch=8)
    assert 0.05 < share < 0.5


def test_too_large_an_object_is_refused(small_arrays):
    with pytest.raises(ValueError, match="object_scale"):
        make_cluttered_splits(small_arrays, ClutterSettings(canvas=32, object_scale=2.0, validation_size=20))


def test_background_noise_leaves_the_garments_pixels_and_box_alone(small_arrays):
    plain = make_cluttered_splits(small_arrays, SETTINGS)
    noisy = make_cluttered_splits(small_arrays, ClutterSettings(canvas=48, fragments=6, validation_size=20,
                                                                background_noise=128))
    np.testing.assert_array_equal(plain["test_boxes"], noisy["test_boxes"])
    for image, noisy_image, (x, y, w, h), garment in zip(plain["test_images"], noisy["test_images"],
                                                         plain["test_boxes"], small_arrays["test_images"]):
        crop = tight_crop(garment)
        x, y, w, h = (int(v) for v in (x, y, w, h))
        inside = crop > 0
        np.testing.assert_array_equal(noisy_image[y : y + h, x : x + w][inside], image[y : y + h, x : x + w][inside])
        background = image == 0
        assert noisy_image[background].mean() > 40  # uniform(0, 128): mean 64 where the plain canvas is empty

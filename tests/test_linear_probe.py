"""training/linear_probe.py: kNN and the linear probe from Python and from the command line."""

import json

import numpy as np
import pytest
import torch

from automae_hf.training import probes
from automae_hf.training.probes import (
    balanced_accuracy,
    evaluate_features,
    extract_features,
    few_shot_indices,
    knn_accuracy,
    linear_probe_accuracy,
    main,
)

from automae_hf import AutoMAEConfig, AutoMAEModel  # noqa: E402


def clusters(n_per_class=40, classes=4, dim=16, spread=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def test_knn_and_linear_probe_separate_clusters_and_stay_at_chance_on_noise():
    train_x, train_y = clusters(seed=0)
    test_x, test_y = clusters(seed=0)[0] + 0.1 * torch.randn(160, 16), clusters(seed=0)[1]
    assert knn_accuracy(train_x, train_y, test_x, test_y) == 1.0
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y, epochs=30) == 1.0
    noise = torch.randn(400, 16, generator=torch.Generator().manual_seed(1))
    random_labels = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(2))
    chance = knn_accuracy(noise[:200], random_labels[:200], noise[200:], random_labels[200:])
    assert chance < 0.45


def test_few_shot_subsets_take_n_per_class_and_depend_on_the_seed():
    _, labels = clusters(n_per_class=30)
    first, again, other = few_shot_indices(labels, 5, 0), few_shot_indices(labels, 5, 0), few_shot_indices(labels, 5, 1)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.bincount(labels[first]).tolist() == [5, 5, 5, 5]
    result = evaluate_features(*clusters(), *clusters(seed=0), samples_per_class=5, seeds=range(2), probe_epochs=20)
    assert set(result) == {"knn", "linear", "knn_balanced", "linear_balanced", "knn_std", "linear_std",
                           "samples_per_class", "seeds", "probe_epochs"}
    assert result["knn"] > 0.9 and result["seeds"] == [0, 1] and result["samples_per_class"] == 5
    assert result["probe_epochs"] == 20 and result["knn_std"] >= 0


def test_imbalanced_test_classes_get_a_balanced_accuracy_beside_the_plain_one():
    """90 test images of class 0 and 10 of class 1 that look like class 0: 90% accurate, 50% balanced."""
    assert balanced_accuracy(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1])) == 0.75
    train_x, train_y = clusters(n_per_class=40, classes=2)
    class_0 = train_x[train_y == 0]
    test_x = class_0[torch.arange(100) % 40] + 0.01 * torch.randn(100, 16, generator=torch.Generator().manual_seed(3))
    test_y = (torch.arange(100) >= 90).long()
    result = evaluate_features(train_x, train_y, test_x, test_y, probe_epochs=10)
    for probe in ("knn", "linear"):
        assert result[probe] == pytest.approx(0.9) and result[f"{probe}_balanced"] == pytest.approx(0.5), probe
    assert result["knn_std"] == 0.0 and result["seeds"] == [0] and result["samples_per_class"] is None


def test_command_line_probes_as_the_main_job_and_records_what_it_ran(encoder_and_folders, monkeypatch, capsys):
    """No flags: the main job's probe settings (30 epochs on all labels; 100 epochs and 3 draws few-shot), and the
    JSON names them."""
    epochs_run = []
    real = probes.linear_probe_predict
    monkeypatch.setattr(probes, "linear_probe_predict",
                        lambda *args, **kwargs: epochs_run.append(kwargs["epochs"]) or real(*args, **kwargs))
    encoder, images = encoder_and_folders
    for extra, epochs, seeds in (([], [30], [0]), (["--samples_per_class", "2"], [100] * 3, [0, 1, 2])):
        epochs_run.clear()
        main(["--model_name_or_path", str(encoder), "--dataset_name", str(images), *extra])
        printed = capsys.readouterr().out
        report = json.loads(printed[printed.index("{"):])
        assert epochs_run == epochs and report["probe_epochs"] == epochs[0] and report["seeds"] == seeds
        assert report["samples_per_class"] == (2 if extra else None)
        assert {"knn_balanced", "linear_balanced", "knn_std", "linear_std"} <= set(report)
    assert (probes.PROBE_EPOCHS, probes.FEW_SHOT_PROBE_EPOCHS, probes.FEW_SHOT_DRAWS) == (30, 100, 3)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_extract_features_is_frozen_and_pooled(pooling):
    torch.manual_seed(0)
    config = AutoMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=16, patch_size=4, num_channels=1)
    encoder = AutoMAEModel(config).train()
    images = torch.randn(10, 1, 16, 16)
    features = extract_features(encoder, images, batch_size=4, pooling=pooling)
    assert encoder.training, "the encoder's mode is restored"
    hidden = encoder.eval()(images).last_hidden_state
    expected = hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(1)
    torch.testing.assert_close(features, expected)
    assert not features.requires_grad
    with pytest.raises(ValueError, match="pooling"):
        extract_features(encoder, images, pooling="max")


def save_tiny_encoder(folder):
    """A random grayscale 16-px encoder with its image processor."""
    from transformers import ViTImageProcessor

    torch.manual_seed(0)
    config = AutoMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=16, patch_size=4, num_channels=1)
    AutoMAEModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(folder)


def test_command_line_on_a_saved_dataset(tmp_path, capsys):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    save_tiny_encoder(tmp_path / "encoder")
    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": ClassLabel(names=["dark", "bright"])})

    def split(n):
        labels = [i % 2 for i in range(n)]
        images = [PILImage.fromarray((rng.random((16, 16)) * 100 + 150 * y).astype(np.uint8), mode="L") for y in labels]
        return Dataset.from_dict({"image": images, "label": labels}, features)

    DatasetDict({"train": split(24), "test": split(10)}).save_to_disk(str(tmp_path / "data"))
    main(["--model_name_or_path", str(tmp_path / "encoder"), "--dataset_name", str(tmp_path / "data"),
          "--probe_epochs", "5"])
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{"):])
    assert result["knn"] == 1.0 and 0.0 <= result["linear"] <= 1.0


@pytest.fixture
def encoder_and_folders(tmp_path):
    """A tiny grayscale encoder and the same two-class data as image folders (train/ and test/, class sub-folders)."""
    from PIL import Image as PILImage
    save_tiny_encoder(tmp_path / "encoder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for i in range(n):
            label = ("dark", "bright")[i % 2]
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (rng.random((16, 16)) * 100 + 150 * (i % 2)).astype(np.uint8)
            PILImage.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return tmp_path / "encoder", tmp_path / "images"


def test_image_folders_and_the_random_init_baseline(encoder_and_folders, capsys):
    encoder, images = encoder_and_folders
    main(["--model_name_or_path", str(encoder), "--train_dir", str(images / "train"), "--eval_dir",
          str(images / "test"), "--probe_epochs", "5", "--random_init"])
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{"):])
    assert result["knn"] == 1.0 and {"knn", "linear", "knn_balanced"} <= set(result["random init"])
    main(["--model_name_or_path", str(encoder), "--dataset_name", str(images), "--probe_epochs", "5"])  # as folder
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["knn"] == 1.0


@pytest.mark.parametrize("extra, needle", [
    (["--dataset_name", "./no/such/data"], "no such folder"),
    (["--train_dir", "IMAGES/train"], "--train_dir needs --eval_dir"),
    (["--dataset_name", "IMAGES", "--eval_split", "validation"], "split 'validation' not in"),
])
def test_bad_data_arguments_give_one_line_errors(encoder_and_folders, capsys, extra, needle):
    encoder, images = encoder_and_folders
    extra = [value.replace("IMAGES", str(images)) for value in extra]
    with pytest.raises(SystemExit):
        main(["--model_name_or_path", str(encoder), *extra])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], errors

"""The pretraining DataLoader: persistent workers that still see each epoch's augmentation (CPU, seconds)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from automae_hf.training import pretraining
from automae_hf.training.data import MapImageDataset
from conftest import synthetic_images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("loader_data") / "data"
    datasets.Dataset.from_dict({"img": synthetic_images(12)}).cast_column("img", datasets.Image()).save_to_disk(str(root))
    return root


def build_loader(data, tmp_path, workers=2):
    """The DataLoader as `training/pretrain.py` builds and prepares it (seedable sampler), with a stand-in model."""
    parser = pretraining.build_parser()
    args = parser.parse_args(["--dataset_name", str(data), "--output_dir", str(tmp_path), "--seed", "5",
                              "--per_device_train_batch_size", "4", "--dataloader_num_workers", str(workers)])
    accelerator = pretraining.make_accelerator(args)
    model = SimpleNamespace(config=SimpleNamespace(image_size=32, num_channels=3, masking="random"))
    dataset, loader, _ = pretraining.build_training_data(args, parser, accelerator, model, "none",
                                                         [0.5] * 3, [0.25] * 3)
    return dataset, accelerator.prepare(loader)


def one_epoch(dataset, loader, epoch):
    for owner in (dataset, loader):  # as the training loop does at the start of every epoch
        owner.set_epoch(epoch)
    return torch.cat([batch["pixel_values"] for batch in loader])


def crops(pixel_values) -> set:
    return {image.numpy().tobytes() for image in pixel_values}


def test_persistent_workers_see_each_epoch(image_folder, tmp_path):
    dataset, loader = build_loader(image_folder, tmp_path)
    assert loader.persistent_workers and loader.prefetch_factor == 4
    epoch0 = one_epoch(dataset, loader, 0)
    workers = [w.pid for w in loader._iterator._workers]  # private, but the one place that names the processes
    epoch1 = one_epoch(dataset, loader, 1)
    assert [w.pid for w in loader._iterator._workers] == workers  # the same processes served both epochs
    assert epoch0.shape == epoch1.shape == (12, 3, 32, 32)
    assert crops(epoch0).isdisjoint(crops(epoch1))  # other crops in epoch 1 (whatever the order) ...
    fresh_dataset, fresh_loader = build_loader(image_folder, tmp_path)
    assert torch.equal(one_epoch(fresh_dataset, fresh_loader, 1), epoch1)  # ... the very ones a fresh loader draws
    assert torch.equal(one_epoch(fresh_dataset, fresh_loader, 0), epoch0)  # and back: the epoch, not the history


def test_no_workers_means_no_persistent_workers(image_folder, tmp_path):
    dataset, loader = build_loader(image_folder, tmp_path, workers=0)
    assert not loader.persistent_workers
    assert torch.equal(one_epoch(dataset, loader, 3), one_epoch(*build_loader(image_folder, tmp_path, 2), 3))


def test_epoch_survives_copies():
    dataset = MapImageDataset([{"image": image} for image in synthetic_images(2)], "image", 16, [0.5] * 3, [0.25] * 3,
                              "RGB", seed=0)
    dataset.set_epoch(7)
    twin = copy.deepcopy(dataset)
    assert dataset.epoch == twin.epoch == 7
    assert torch.equal(dataset[1]["pixel_values"], twin[1]["pixel_values"])

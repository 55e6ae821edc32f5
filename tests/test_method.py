"""The method's properties (docs/method.md §4), pinned on 7x7, 8x8 and 14x14 patch grids with tiny models."""

import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining
from transformers.utils import logging

from automae_hf import AutoMAEConfig, AutoMAEForPreTraining, AutoMAEModel
from automae_hf.masking import argsort_masking, sample_box_prior, straight_through_topk
from automae_hf.modeling_automae import AutoMAEDiscriminator

logging.set_verbosity_error()

GRIDS = {"7x7": 28, "8x8": 32, "14x14": 56}  # image size with 4-pixel patches


def tiny_kwargs(image_size=32, **overrides):
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=4,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        norm_pix_loss=True,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_model(image_size=32, seed=0, **overrides):
    torch.manual_seed(seed)
    return AutoMAEForPreTraining(AutoMAEConfig(**tiny_kwargs(image_size, **overrides)))


def images(batch, image_size, seed=1):
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


# ---- beta = 0 is MAE ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
def test_mask_factor_zero_equals_transformers_vitmae(grid, tmp_path):
    image_size = GRIDS[grid]
    kwargs = tiny_kwargs(image_size)
    torch.manual_seed(0)
    reference = ViTMAEForPreTraining(ViTMAEConfig(**kwargs)).eval()
    reference.save_pretrained(tmp_path)
    model = AutoMAEForPreTraining.from_pretrained(tmp_path, mask_factor=0.0).eval()
    pixel_values = images(3, image_size)
    noise = torch.rand(3, (image_size // 4) ** 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(pixel_values, noise=noise)
        actual = model(pixel_values, noise=noise)
    assert torch.equal(actual.mask, expected.mask)
    assert torch.equal(actual.ids_restore, expected.ids_restore)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.reconstruction_loss, expected.loss, atol=1e-5, rtol=1e-5)


def _mae_reference_sincos(grid, dim):
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed, in numpy, with a CLS row."""
    import numpy as np

    def one_dim(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h, grid_w = np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid, grid)
    table = np.concatenate([one_dim(dim // 2, mesh[0]), one_dim(dim // 2, mesh[1])], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros([1, dim]), table], axis=0)).float()


@pytest.mark.parametrize("grid", [7, 8, 14])
def test_positional_tables_equal_the_mae_reference(grid):
    model = tiny_model(grid * 4)
    expected = _mae_reference_sincos(grid, 32)
    torch.testing.assert_close(model.vit.embeddings.position_embeddings[0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.decoder.decoder_pos_embed[0], _mae_reference_sincos(grid, 16), atol=1e-6, rtol=0)
    assert not model.vit.embeddings.position_embeddings.requires_grad


@pytest.mark.parametrize("image_size", [28, (16, 24)])
def test_positional_tables_are_transformers_sincos_table_as_vitmae_lays_it_out(image_size):
    """Both tables are transformers' `build_2d_sinusoidal_position_embedding` with its [row | column] halves swapped,
    as `ViTMAEEmbeddings.initialize_weights` does, bit for bit (checkpoints hold these tables), on rectangular grids."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    model = tiny_model(image_size)
    rows, columns = model.config.grid_size
    for table, dim in ((model.vit.embeddings.position_embeddings, 32), (model.decoder.decoder_pos_embed, 16)):
        built = build_2d_sinusoidal_position_embedding(rows, columns, embed_dim=dim, cls_token=True)
        assert torch.equal(table[0], torch.cat([built[:, dim // 2:], built[:, : dim // 2]], dim=1))


# ---- the learned top-K is masked ---------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
def test_topk_patches_masked_almost_always(grid):
    image_size = GRIDS[grid]
    model = tiny_model(image_size).eval()
    num_patches = (image_size // 4) ** 2
    num_visible = int(num_patches * 0.25)
    generator = torch.Generator().manual_seed(0)
    masked = total = 0
    with torch.no_grad():
        attention = model.mask_generator.teacher_attention(images(1, image_size).expand(256, -1, -1, -1))
        for _ in range(30):
            sample = model.mask_generator(teacher_attention=attention, generator=generator)
            top = sample.mask_probs.topk(num_visible, dim=-1).indices
            masked += sample.mask.gather(1, top).sum().item()
            total += top.numel()
    assert masked / total > 0.999


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9])
def test_exact_masked_count(grid, mask_ratio):
    image_size = GRIDS[grid]
    num_patches = (image_size // 4) ** 2
    num_visible = int(num_patches * (1 - mask_ratio))
    if num_visible < 1:
        pytest.skip("no visible patch at this ratio")
    model = tiny_model(image_size, mask_ratio=mask_ratio)
    output = model(images(4, image_size))
    assert output.mask.shape == (4, num_patches)
    assert torch.all(output.mask.sum(dim=1) == num_patches - num_visible)
    assert set(output.mask.unique().tolist()) <= {0.0, 1.0}
    # visible set = the lowest raised noise, and the mask agrees with ids_restore
    ids_keep, mask, ids_restore = argsort_masking(torch.rand(4, num_patches), num_visible)
    assert torch.all(mask.sum(1) == num_patches - num_visible)
    assert torch.all(mask.gather(1, ids_keep) == 0)


def test_straight_through_topk_is_exact_one_hot_with_identity_gradient():
    probs = torch.softmax(torch.randn(3, 49), -1).requires_grad_()
    hard = straight_through_topk(probs, 12)
    assert set(hard.detach().unique().tolist()) == {0.0, 1.0}
    assert torch.all(hard.detach().sum(-1) == 12)
    weights = torch.randn(3, 49)
    (hard * weights).sum().backward()
    torch.testing.assert_close(probs.grad, weights)


# ---- the raised-noise gradient trick ---------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
def test_raised_noise_gate_forward_is_bit_identical(grid):
    image_size = GRIDS[grid]
    torch.manual_seed(0)
    encoder = AutoMAEModel(AutoMAEConfig(**tiny_kwargs(image_size))).eval()
    pixel_values = images(2, image_size)
    num_patches = (image_size // 4) ** 2
    raised_noise = (torch.rand(2, num_patches) + 0.5 * torch.rand(2, num_patches)).requires_grad_()
    visible = torch.argsort(torch.rand(2, num_patches), dim=1)[:, : num_patches // 4]
    plain = encoder(pixel_values, visible_ids=visible).last_hidden_state
    gated = encoder(pixel_values, visible_ids=visible, raised_noise=raised_noise).last_hidden_state
    assert torch.equal(plain, gated)


def test_raised_noise_gradient_is_token_dot_upstream_and_zero_on_masked_patches():
    """Through the model's own gate (`AutoMAEModel(raised_noise=...)`): dL/dr_i = <dL/dz'_i, z_i> on visible patches,
    sign and magnitude, and 0 on masked ones."""
    model = tiny_model(28).eval()
    pixel_values = images(2, 28)
    sample = model.mask_generator(pixel_values)
    raised_noise = sample.raised_noise.detach().clone().requires_grad_()
    captured = {}

    def leaf_patches(module, args, output):  # make the embeddings' patch tokens z a leaf whose gradient we read
        patches, cls_token = output
        captured["z"] = patches.detach().requires_grad_()
        return captured["z"], cls_token

    handle = model.vit.embeddings.register_forward_hook(leaf_patches)
    try:
        encoded = model.vit(pixel_values, visible_ids=sample.ids_keep, raised_noise=raised_noise)
    finally:
        handle.remove()
    logits = model.decoder(encoded.last_hidden_state, sample.ids_restore)
    loss = model.forward_loss(pixel_values, logits, sample.mask)
    token_grad, gate_grad = torch.autograd.grad(loss, [captured["z"], raised_noise])
    masked = sample.mask.bool()
    assert torch.all(gate_grad[masked] == 0), "masked patches must not contribute to the generator's gradient"
    assert torch.all(gate_grad[~masked] != 0)
    # z' = z + (r - sg(r)) z has dz'/dz = 1 at this point, so dL/dz = dL/dz' and dL/dr = <dL/dz', z>
    # (docs/method.md §2.5)
    expected = (token_grad * captured["z"].detach()).sum(-1)
    torch.testing.assert_close(gate_grad[~masked], expected[~masked], atol=1e-7, rtol=1e-4)


# ---- gradients reaching the score head ------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
def test_score_head_gets_gradient_from_each_loss_alone(grid):
    image_size = GRIDS[grid]
    pixel_values = images(4, image_size)
    for loss_name in ("reconstruction_loss", "generator_loss"):
        model = tiny_model(image_size).train()
        output = model(pixel_values, generator=torch.Generator().manual_seed(0))
        getattr(output, loss_name).backward()
        grads = [p.grad for p in model.mask_generator.score_head.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), loss_name
        assert sum(g.abs().sum().item() for g in grads) > 0, f"no gradient from {loss_name}"
        assert all(p.grad is None for p in model.mask_generator.teacher.parameters())
        assert all(p.grad is None for p in model.discriminator.parameters()), "L_G must not reach D's weights"


# ---- the two optimizer steps touch disjoint parameters ---------------------------------------------------------------
def _snapshot(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def test_student_step_leaves_discriminator_and_teacher_unchanged():
    model = tiny_model(56).train()
    discriminator, teacher = _snapshot(model.discriminator), _snapshot(model.mask_generator.teacher)
    student_before = _snapshot(model.vit)
    optimizer = torch.optim.AdamW(model.student_parameters(), lr=1e-2)
    names = {n for n, p in model.named_parameters() if any(p is q for q in model.student_parameters())}
    assert not any(n.startswith(("discriminator.", "mask_generator.teacher.")) for n in names)
    assert any(n.startswith("mask_generator.score_head.") for n in names)
    model(images(2, 56)).loss.backward()
    optimizer.step()
    for name, value in _snapshot(model.discriminator).items():
        if not name.endswith(("._u", "._v")):  # power-iteration vectors are buffers, not weights
            assert torch.equal(value, discriminator[name]), name
    assert all(torch.equal(v, teacher[k]) for k, v in _snapshot(model.mask_generator.teacher).items())
    assert any(not torch.equal(v, student_before[k]) for k, v in _snapshot(model.vit).items())


def test_discriminator_step_leaves_student_unchanged():
    model = tiny_model(56).train()
    before = _snapshot(model)
    optimizer = torch.optim.Adam(model.discriminator_parameters(), lr=1e-2)
    output = model.discriminator_loss(images(4, 56), generator=torch.Generator().manual_seed(0))
    output.loss.backward()
    for name, parameter in model.named_parameters():
        if not name.startswith("discriminator."):
            assert parameter.grad is None, name
    assert all(p.grad is not None for p in model.discriminator.parameters())
    optimizer.step()
    after = _snapshot(model)
    for name in before:
        if not name.startswith("discriminator."):
            assert torch.equal(before[name], after[name]), name
    assert 0 <= output.real_accuracy <= 1 and 0 <= output.fake_accuracy <= 1


def test_loss_combines_reconstruction_and_weighted_generator_loss():
    model = tiny_model(32, adversarial_weight=0.3)
    output = model(images(2, 32))
    torch.testing.assert_close(output.loss, output.reconstruction_loss + 0.3 * output.generator_loss)
    assert output.mask_probs.shape == (2, 64)
    torch.testing.assert_close(output.mask_probs.sum(-1), torch.ones(2))


def test_injected_randomness_makes_steps_reproducible():
    model = tiny_model(32).eval()
    pixel_values = images(2, 32)
    first = model(pixel_values, generator=torch.Generator().manual_seed(5))
    second = model(pixel_values, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.mask, second.mask) and torch.equal(first.loss, second.loss)
    noise, gumbel = torch.rand(2, 64), -torch.log(-torch.log(torch.rand(2, 64)))
    a = model(pixel_values, noise=noise, gumbel_noise=gumbel)
    b = model(pixel_values, noise=noise, gumbel_noise=gumbel)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.mask_probs, b.mask_probs)


def test_gumbel_tau_changes_the_relaxation_not_the_sampled_mask():
    # top-K of softmax((log p + g) / tau) is top-K of (log p + g) for every tau: tau sharpens what D sees and the
    # straight-through gradient, never which patches are masked (why the tau ablation moves so little).
    model = tiny_model(32).eval()
    pixel_values = images(2, 32)
    noise, gumbel = torch.rand(2, 64), -torch.log(-torch.log(torch.rand(2, 64)))
    outputs = {}
    for tau in (1.0, 0.3):
        model.config.gumbel_tau = tau
        outputs[tau] = model(pixel_values, noise=noise, gumbel_noise=gumbel)
    assert torch.equal(outputs[1.0].mask, outputs[0.3].mask)
    assert outputs[0.3].mask_probs.max() > outputs[1.0].mask_probs.max()  # sharper relaxation


@pytest.mark.parametrize("grid", ["7x7", "14x14"])
def test_gumbel_noise_scale_zero_masks_the_scores_top_k(grid):
    size = GRIDS[grid]
    model = tiny_model(size, gumbel_noise_scale=0.0).eval()
    pixel_values = images(3, size)
    attention = model.mask_generator.teacher_attention(pixel_values)
    logits = model.mask_generator.score_head(attention)
    num_visible = logits.shape[1] - int(model(pixel_values, teacher_attention=attention).mask[0].sum())
    for seed in range(3):  # whatever the noise: the K best-scored patches are the top-K, and masked
        output = model(pixel_values, teacher_attention=attention, generator=torch.Generator().manual_seed(seed))
        top = logits.topk(num_visible, dim=1).indices
        assert torch.equal(output.mask_probs.topk(num_visible, dim=1).indices.sort(1).values, top.sort(1).values)
        assert output.mask.gather(1, top).bool().all()
    with pytest.raises(ValueError, match="gumbel_noise_scale"):
        AutoMAEConfig(**tiny_kwargs(size, gumbel_noise_scale=-1.0))


def test_teacher_is_frozen_and_stays_in_eval_mode():
    model = tiny_model(32, hidden_dropout_prob=0.5).train()
    assert not model.mask_generator.teacher.training
    assert not any(p.requires_grad for p in model.mask_generator.teacher.parameters())
    pixel_values = images(2, 32)
    first = model.mask_generator.teacher_attention(pixel_values)
    second = model.mask_generator.teacher_attention(pixel_values)
    assert torch.equal(first, second)


# ---- box prior and discriminator on every grid -----------------------------------------------------------------------
@pytest.mark.parametrize("grid_size", [(4, 4), (7, 7), (8, 8), (14, 14), (16, 16), (6, 10)])
def test_box_prior_and_discriminator_work_on_every_grid(grid_size):
    generator = torch.Generator().manual_seed(0)
    probs, boxes = sample_box_prior(64, grid_size, alpha=0.5, generator=generator, return_boxes=True)
    assert probs.shape == (64, grid_size[0] * grid_size[1])
    torch.testing.assert_close(probs.sum(-1), torch.ones(64))
    top, left, height, width = boxes.unbind(1)
    assert torch.all(top >= 0) and torch.all(left >= 0) and torch.all(height >= 1) and torch.all(width >= 1)
    assert torch.all(top + height <= grid_size[0]) and torch.all(left + width <= grid_size[1])
    # cells inside the rectangle have higher mean probability (alpha raises their logits)
    grid = probs.view(64, *grid_size)
    inside = torch.zeros_like(grid, dtype=torch.bool)
    for i in range(64):
        inside[i, top[i] : top[i] + height[i], left[i] : left[i] + width[i]] = True
    assert grid[inside].mean() > grid[~inside].mean()
    again = sample_box_prior(64, grid_size, alpha=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(probs, again), "seeded by torch's generator"
    scores = AutoMAEDiscriminator(grid_size)(probs)
    assert scores.shape == (64,) and torch.isfinite(scores).all()


def test_box_prior_matches_reference_statistics_on_14x14():
    _, boxes = sample_box_prior(4000, (14, 14), generator=torch.Generator().manual_seed(0), return_boxes=True)
    width, height = boxes[:, 3], boxes[:, 2]
    assert width.min() == 4 and width.max() == 10
    area_upper = height * width
    assert area_upper.min() >= 40 and height.max() <= 14


def test_discriminator_keeps_reference_stack_at_14x14():
    discriminator = AutoMAEDiscriminator((14, 14))
    hidden = torch.rand(2, 1, 14, 14)
    hidden = discriminator.conv2(discriminator.conv1(hidden))
    assert hidden.shape[-2:] == (3, 3), "adaptive pooling is the identity on the reference grid"
    with pytest.raises(ValueError, match="4x4"):
        AutoMAEDiscriminator((3, 3))


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (4, 4), (5, 5), (2, 4), (8, 7)])  # 1x1: the 7x7 grid
def test_discriminator_pool_equals_adaptive_average_pool(shape):
    discriminator = AutoMAEDiscriminator((8, 8))
    hidden = torch.randn(6, 32, *shape, requires_grad=True)
    reference = torch.nn.functional.adaptive_avg_pool2d(hidden, 3)
    pooled = discriminator.pool_to_3x3(hidden)
    torch.testing.assert_close(pooled, reference)
    weights = torch.randn_like(reference)
    (grad,) = torch.autograd.grad((pooled * weights).sum(), hidden)
    (reference_grad,) = torch.autograd.grad((reference * weights).sum(), hidden)
    torch.testing.assert_close(grad, reference_grad)


# ---- plain-MAE baseline and teacher-free attention ---------------------------------------------------------------
def test_random_masking_is_plain_vitmae_without_generator(tmp_path):
    kwargs = tiny_kwargs(32)
    torch.manual_seed(0)
    reference = ViTMAEForPreTraining(ViTMAEConfig(**kwargs)).eval()
    reference.save_pretrained(tmp_path)
    model = AutoMAEForPreTraining.from_pretrained(tmp_path, masking="random").eval()
    assert model.mask_generator is None and model.discriminator is None
    pixel_values, noise = images(2, 32), torch.rand(2, 64)
    with torch.no_grad():
        expected, actual = reference(pixel_values, noise=noise), model(pixel_values, noise=noise)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(actual.mask, expected.mask) and actual.generator_loss is None
    with pytest.raises(ValueError, match="random"):
        model.discriminator_loss(pixel_values)


def test_student_encoder_serves_as_its_own_teacher():
    from automae_hf.teacher import teacher_cls_attention

    model = tiny_model(32).eval()
    pixel_values = images(2, 32)
    attention = teacher_cls_attention(model.vit, pixel_values)
    model.set_attn_implementation("eager")  # attention weights are only materialised by eager attention
    eager = model.vit(pixel_values, output_attentions=True).attentions[-1][:, :, 0, 1:]
    torch.testing.assert_close(attention, eager.reshape(2, 2, 8, 8), atol=1e-5, rtol=1e-4)
    output = model(pixel_values, teacher_attention=attention)
    assert torch.isfinite(output.loss)


def test_discriminator_weights_start_spectrally_normalised(tmp_path):
    model = tiny_model(56).eval()
    ViTMAEForPreTraining(ViTMAEConfig(**tiny_kwargs(56))).save_pretrained(tmp_path)
    loaded = AutoMAEForPreTraining.from_pretrained(tmp_path).eval()  # D missing from the checkpoint
    for candidate in (model, loaded):
        for conv in (candidate.discriminator.conv1, candidate.discriminator.conv2, candidate.discriminator.conv3):
            weight = conv.weight.detach()
            sigma = torch.linalg.matrix_norm(weight.flatten(1), ord=2)
            assert abs(sigma.item() - 1.0) < 0.05, sigma
        assert candidate(images(2, 56)).generator_loss < 10


def test_a_random_masking_checkpoint_of_ours_serves_as_teacher(tmp_path):
    from transformers import AutoConfig

    torch.manual_seed(0)
    mae = AutoMAEForPreTraining(AutoMAEConfig(**tiny_kwargs(28, num_channels=1), masking="random"))
    mae.save_pretrained(tmp_path / "mae")
    teacher_config = AutoConfig.from_pretrained(tmp_path / "mae").to_dict()
    model = AutoMAEForPreTraining(AutoMAEConfig(**tiny_kwargs(28, num_channels=1), teacher_config=teacher_config))
    model.load_teacher(str(tmp_path / "mae"))
    assert isinstance(model.mask_generator.teacher, AutoMAEModel)
    pixel_values = torch.randn(2, 1, 28, 28)
    from automae_hf.teacher import teacher_cls_attention

    torch.testing.assert_close(model.mask_generator.teacher_attention(pixel_values), teacher_cls_attention(mae.vit, pixel_values))
    model.save_pretrained(tmp_path / "automae")
    reloaded, info = AutoMAEForPreTraining.from_pretrained(tmp_path / "automae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(reloaded.mask_generator.teacher, AutoMAEModel)
    assert not any(p.requires_grad for p in reloaded.mask_generator.teacher.parameters())

"""Artefact tokens: `teacher_outlier_norm_factor` leaves high-norm patch tokens out of the teacher's CLS attention."""

import pytest
import torch
from transformers import ViTMAEConfig, ViTMAEModel

from automae_hf.teacher import outlier_token_share, teacher_cls_attention
from conftest import make_tiny_config


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    config = ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=4, mask_ratio=0.0)
    return ViTMAEModel(config).eval()


def test_a_high_norm_token_is_left_out_and_takes_the_heads_median(teacher):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x[:, :, :4, :4] *= 1000  # patch 0: a token whose norm dwarfs the others'
    plain = teacher_cls_attention(teacher, x)
    cleaned = teacher_cls_attention(teacher, x, outlier_norm_factor=3.0)
    assert torch.all(outlier_token_share(teacher, x, 3.0) == 1 / 64)
    rest_plain, rest_cleaned = plain.flatten(2)[..., 1:], cleaned.flatten(2)[..., 1:]
    # The others keep their order and gain the outlier's mass: one factor per head and image.
    ratio = rest_cleaned / rest_plain
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))
    assert torch.all(ratio[..., 0] >= 1)
    torch.testing.assert_close(cleaned.flatten(2)[..., 0], rest_cleaned.median(dim=-1).values)


def test_no_outlier_no_change_and_the_default_is_the_reference(teacher):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(teacher_cls_attention(teacher, x, outlier_norm_factor=1e6), teacher_cls_attention(teacher, x))
    assert make_tiny_config().teacher_outlier_norm_factor is None
    with pytest.raises(ValueError, match="teacher_outlier_norm_factor"):
        make_tiny_config(teacher_outlier_norm_factor=0.5)


def test_the_mask_generator_saved_alone_keeps_the_factor(tmp_path):
    from automae_hf import AutoMAEForPreTraining, AutoMAEMaskGenerator

    model = AutoMAEForPreTraining(make_tiny_config(teacher_outlier_norm_factor=4.0))
    model.mask_generator.save_pretrained(tmp_path)
    assert AutoMAEMaskGenerator.from_pretrained(tmp_path).config.teacher_outlier_norm_factor == 4.0

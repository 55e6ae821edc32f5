"""How the teacher's attention reaches the mask: the resolution the teacher reads, grayscale data under an RGB
teacher, the score head's input normalisation and scale, and the logged statistics of how much the scores (rather
than the Gumbel noise) decide the mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import ViTConfig

from automae_hf import AutoMAEForPreTraining
from automae_hf.masking import mask_signal_statistics
from automae_hf.teacher import teacher_cls_attention
from conftest import make_tiny_config

VIT_TEACHER = dict(model_type="vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   image_size=64, patch_size=8, num_channels=3)


def teacher_model(**overrides):
    torch.manual_seed(0)
    return AutoMAEForPreTraining(make_tiny_config(teacher_config=dict(VIT_TEACHER), **overrides)).eval()


def images(batch=2, channels=3, size=32, seed=1):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_teacher_reads_the_student_resolution_by_default_and_its_own_patch_grid_with_match_grid():
    x = images()
    default, matched = teacher_model(), teacher_model(teacher_image_size="match_grid")
    teacher = matched.mask_generator.teacher
    # default: a patch-8 teacher on 32 px gives a 4x4 map, resized up to the student's 8x8 grid
    assert teacher_cls_attention(teacher, x).shape[-2:] == (4, 4)
    # match_grid: the teacher reads 8 x 8 = 64 px, so its own map is already the student's grid, no resampling
    bigger = F.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(matched.teacher_attention(x), teacher_cls_attention(teacher, bigger))
    assert default.teacher_attention(x).shape == matched.teacher_attention(x).shape == (2, 4, 8, 8)


def test_an_rgb_teacher_reads_grayscale_data_with_the_channel_repeated():
    model = teacher_model(num_channels=1)
    x = images(channels=1)
    attention = model.teacher_attention(x)  # a 3-channel teacher: no "Expected 3 but got 1"
    expected = teacher_cls_attention(model.mask_generator.teacher, x.expand(-1, 3, -1, -1))
    torch.testing.assert_close(attention, F.interpolate(expected, size=(8, 8), mode="bilinear", antialias=True))
    assert torch.isfinite(model(x).loss)


def test_standardised_attention_makes_the_scores_ignore_each_maps_offset_and_scale():
    attention = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    shifted = attention * torch.tensor([3.0, 0.5, 10.0, 1.0]).view(1, 4, 1, 1) + 7.0
    reference = teacher_model().mask_generator
    standardised = teacher_model(attention_normalization="standardize").mask_generator
    torch.testing.assert_close(standardised.scores(attention), standardised.scores(shifted), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(reference.scores(attention), reference.scores(shifted), atol=1e-3)


def test_score_scale_multiplies_the_logit_spread():
    attention = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    plain = teacher_model().mask_generator.scores(attention)
    scaled = teacher_model(score_scale=5.0).mask_generator.scores(attention)
    torch.testing.assert_close(scaled, torch.log_softmax(5.0 * plain, dim=-1), atol=1e-5, rtol=1e-5)
    assert torch.allclose(scaled.exp().sum(-1), torch.ones(2))


@pytest.mark.parametrize("field, value", [("teacher_image_size", "huge"), ("attention_normalization", "l2"),
                                          ("score_scale", 0.0)])
def test_the_new_knobs_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        make_tiny_config(**{field: value})


def test_signal_statistics_tell_scores_from_noise():
    batch, num_patches, num_visible = 4, 64, 16
    attention = torch.rand(batch, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    logits = torch.log_softmax(attention.mean(1).flatten(1) * 50, dim=-1)  # the scores follow the teacher
    decided = mask_signal_statistics(logits, logits.exp(), attention, num_visible)  # no noise: scores decide
    assert decided["topk_in_teacher_topk"] == 1 and decided["topk_in_score_topk"] == 1
    noise = torch.rand(batch, num_patches, generator=torch.Generator().manual_seed(6))
    random = mask_signal_statistics(torch.zeros(batch, num_patches), noise, attention, num_visible)
    assert random["topk_in_teacher_topk"] < 0.6 and random["score_spread"] == 0
    assert random["topk_chance"] == pytest.approx(0.25) and random["gumbel_spread"] == pytest.approx(1.2825, abs=1e-4)


def test_pretraining_logs_the_signal_every_logging_step(tmp_path):
    from conftest import common, run  # noqa: F401  (data set built below)
    import datasets
    from conftest import synthetic_images

    data = tmp_path / "data"
    datasets.Dataset.from_dict({"img": synthetic_images(8)}).cast_column("img", datasets.Image()).save_to_disk(data)
    from automae_hf.training import pretraining

    pretraining.main([str(a) for a in common(data, tmp_path / "run", 2, "--per_device_train_batch_size", 4)])
    import json

    last = json.loads((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[-1])
    for key in ("score_spread", "gumbel_spread", "topk_in_teacher_topk", "topk_in_score_topk", "topk_chance",
                "d_real_accuracy", "d_fake_accuracy"):
        assert key in last, key
    assert last["gumbel_spread"] == pytest.approx(1.2825, abs=1e-3)


def test_a_teacher_with_other_heads_gets_a_head_that_follows_it_with_the_preset(tmp_path, caplog):
    from transformers import ViTModel

    from automae_hf import AUTOMAE_PRESETS

    torch.manual_seed(0)
    ViTModel(ViTConfig(**{k: v for k, v in VIT_TEACHER.items() if k != "model_type"}), add_pooling_layer=False
             ).save_pretrained(tmp_path / "teacher")
    model = AutoMAEForPreTraining(make_tiny_config(**AUTOMAE_PRESETS["follow_teacher"], teacher_image_size="match_grid"))
    model.load_teacher(str(tmp_path / "teacher"), fresh=True)
    head = model.mask_generator.score_head
    assert head[0].in_channels == 4 and "re-initialised" not in caplog.text  # a fresh model: resized quietly
    assert torch.allclose(head[0].weight[0, :, 1, 1], torch.full((4,), 0.25))  # hidden channel 0 = mean of heads
    x = images()
    attention = model.teacher_attention(x)
    scores = model.mask_generator.scores(attention)[0]
    flat = attention[0].flatten(1)
    mean_map = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).mean(0)
    assert torch.corrcoef(torch.stack([scores, mean_map]))[0, 1] > 0.5  # the first scores rank patches as the teacher

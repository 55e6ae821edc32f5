"""The model's API does what it is asked or says why not: one config, no unknown arguments, no I/O in constructors,
a coarse teacher map named, bf16 models reading float32 pixels, the preset's score-head learning rate, and the
teacher's own input normalisation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Dinov2Config, ViTConfig, ViTModel

from automae_hf import AUTOMAE_PRESETS, AutoMAEForImageClassification, AutoMAEForPreTraining, AutoMAEMaskGenerator
from automae_hf.teacher import teacher_cls_attention
from conftest import make_tiny_config

GRID = 8  # the tiny student: 32 px, 4-px patches
PATCH8_TEACHER = dict(model_type="vit", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64, image_size=64, patch_size=8, num_channels=3)


def images(batch=2, channels=3, seed=1):
    return torch.randn(batch, channels, 32, 32, generator=torch.Generator().manual_seed(seed))


def fixed_noise(batch=2, seed=2):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, GRID * GRID, generator=generator)
    gumbel = -torch.log(-torch.log(torch.rand(batch, GRID * GRID, generator=generator).clamp(1e-6, 1 - 1e-6)))
    return dict(noise=noise, gumbel_noise=gumbel)


def seeded_model(**overrides):
    torch.manual_seed(0)
    return AutoMAEForPreTraining(make_tiny_config(**overrides)).eval()


# ---- one config --------------------------------------------------------------------------------------------------
EDITS = {"score_scale": 5.0, "attention_normalization": "standardize", "teacher_image_size": "match_grid",
         "mask_factor": 0.0}


def test_editing_model_config_takes_effect_and_survives_save_and_reload(tmp_path):
    model = seeded_model(teacher_config=dict(PATCH8_TEACHER))
    x, noise = images(), fixed_noise()
    with torch.no_grad():
        before = model(x, **noise)
        for field, value in EDITS.items():
            setattr(model.config, field, value)
            edited = model(x, **noise)
            assert getattr(model.mask_generator.config, field) == value
            what = "mask" if field == "mask_factor" else "mask_logits"
            assert not torch.equal(getattr(edited, what), getattr(before, what)), field
            before = edited
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {field: saved[field] for field in EDITS} == EDITS
    with torch.no_grad():
        reloaded = AutoMAEForPreTraining.from_pretrained(tmp_path).eval()(x, **noise)
    assert torch.equal(reloaded.mask, edited.mask)
    for name in ("mask_logits", "loss"):
        torch.testing.assert_close(getattr(reloaded, name), getattr(edited, name), atol=1e-6, rtol=1e-6, msg=name)


def test_the_mask_generator_saved_alone_keeps_its_own_config_type(tmp_path):
    model = seeded_model(score_scale=2.0)
    model.mask_generator.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "automae_mask_generator" and saved["score_scale"] == 2.0
    assert model.mask_generator.config is model.config  # restored after saving
    loaded = AutoMAEMaskGenerator.from_pretrained(tmp_path)
    attention = torch.rand(2, 2, GRID, GRID, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded.scores(attention), model.mask_generator.scores(attention))


# ---- forward arguments ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_class", [AutoMAEForPreTraining, AutoMAEForImageClassification])
def test_an_unknown_forward_argument_raises_naming_it(model_class):
    model = model_class(make_tiny_config(num_labels=3)).eval()
    with pytest.raises(TypeError, match="teacher_atention"):
        model(images(), teacher_atention=torch.zeros(2, 2, GRID, GRID))


@pytest.mark.parametrize("masking", ["learned", "random", "box_prior", "attention"])
def test_mask_ratio_per_call_is_honoured(masking):
    model = seeded_model(masking=masking)
    with torch.no_grad():
        assert (model(images(), mask_ratio=0.5).mask.sum(1) == 32).all()
        assert (model(images()).mask.sum(1) == 48).all()  # the config's 0.75
    with pytest.raises(ValueError, match="mask_ratio"):
        model(images(), mask_ratio=1.0)


def test_the_mask_generator_honours_return_dict():
    generator = seeded_model().mask_generator
    attention = torch.rand(2, 2, GRID, GRID, generator=torch.Generator().manual_seed(3))
    as_tuple = generator(teacher_attention=attention, return_dict=False, **fixed_noise())
    as_output = generator(teacher_attention=attention, **fixed_noise())
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_output.mask)


@pytest.mark.parametrize("model_class", [AutoMAEForPreTraining, AutoMAEForImageClassification])
def test_the_trainer_passes_no_loss_kwargs_and_scales_the_loss_for_accumulation_itself(model_class, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = model_class(make_tiny_config(num_labels=3))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert Trainer(model=model, args=args).model_accepts_loss_kwargs is False


# ---- a teacher map coarser than the student's grid ------------------------------------------------------------------
def test_a_coarser_teacher_map_warns_once_per_model_naming_match_grid(caplog):
    model = seeded_model(teacher_config=dict(PATCH8_TEACHER))  # patch 8 on 32 px: 4x4, the student's grid is 8x8
    with caplog.at_level("WARNING"):
        model.teacher_attention(images())
        model.teacher_attention(images())
    warnings = [r for r in caplog.records if "match_grid" in r.getMessage()]
    assert len(warnings) == 1 and "4x4" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING"):
        seeded_model(teacher_config=dict(PATCH8_TEACHER), teacher_image_size="match_grid").teacher_attention(images())
        seeded_model().teacher_attention(images())  # a teacher on the student's own grid
    assert "match_grid" not in caplog.text


# ---- bf16 model, float32 pixels -----------------------------------------------------------------------------------
TEACHERS = {
    "vit_mae": None,  # the reference: a ViTMAE shaped like the student
    "dinov2": dict(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                image_size=32, patch_size=4).to_dict()),
}


@pytest.mark.parametrize("family", list(TEACHERS))
def test_a_bfloat16_model_reads_float32_pixels_and_agrees_with_float32(family, tmp_path):
    reference = seeded_model(teacher_config=TEACHERS[family])
    reference.save_pretrained(tmp_path)
    model = AutoMAEForPreTraining.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.mask_generator.teacher.dtype == torch.bfloat16
    x, noise = images(), fixed_noise()  # float32, as an image processor gives them
    with torch.no_grad():
        output, expected = model(x, **noise), reference(x, **noise)
        d_loss = model.discriminator_loss(pixel_values=x).loss
    assert torch.isfinite(d_loss)
    torch.testing.assert_close(output.teacher_attention, expected.teacher_attention, atol=2e-3, rtol=5e-2)
    torch.testing.assert_close(output.mask_logits, expected.mask_logits, atol=2e-3, rtol=1e-3)
    assert torch.equal(output.mask, expected.mask)
    torch.testing.assert_close(output.logits.float(), expected.logits, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(output.loss.float(), expected.loss, atol=0, rtol=2e-2)


# ---- the follow_teacher preset's score-head learning rate ------------------------------------------------------------
def test_the_follow_teacher_preset_carries_its_score_head_learning_rate():
    assert AUTOMAE_PRESETS["follow_teacher"]["score_head_lr_scale"] == 0.1
    assert AUTOMAE_PRESETS["reference"]["score_head_lr_scale"] == make_tiny_config().score_head_lr_scale == 1.0
    with pytest.raises(ValueError, match="score_head_lr_scale"):
        make_tiny_config(score_head_lr_scale=-0.5)


def test_optimizer_param_groups_decay_matrices_only_and_scale_the_score_head():
    from transformers import get_scheduler

    model = seeded_model(**AUTOMAE_PRESETS["follow_teacher"])
    groups = model.optimizer_param_groups(0.05, 2e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.student_parameters())  # each once, no D, no teacher
    head = {id(p) for p in model.mask_generator.score_head.parameters()}
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        assert group["lr"] == pytest.approx(2e-4 if in_head == {True} else 2e-3)
        for param in group["params"]:
            name = names[id(param)]
            no_decay = param.ndim <= 1 or any(word in name for word in ("bias", "norm", "token", "position"))
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert [g.get("lr_scale") for g in model.optimizer_param_groups(0.05)] == [None, None, 0.1, 0.1]
    assert len(seeded_model().optimizer_param_groups(0.05, 1e-3)) == 2  # reference: the head in the student groups

    optimizer = torch.optim.AdamW(groups)  # every group carries its rate: AdamW's default 1e-3 plays no part
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    rates = [group["lr"] for group in optimizer.param_groups]
    assert rates[2] == pytest.approx(0.1 * rates[0]) and rates[0] > 0


# ---- the teacher's own input normalisation --------------------------------------------------------------------------
@pytest.fixture
def teacher_with_processor(tmp_path):
    """A patch-4 ViT teacher folder whose preprocessor_config.json says how it normalises pixels."""
    torch.manual_seed(5)
    teacher = ViTModel(ViTConfig(**{**PATCH8_TEACHER, "patch_size": 4, "image_size": 32}), add_pooling_layer=False)
    teacher.save_pretrained(tmp_path / "teacher")
    processor = {"image_processor_type": "ViTImageProcessor", "image_mean": [0.485, 0.456, 0.406],
                 "image_std": [0.229, 0.224, 0.225]}
    (tmp_path / "teacher" / "preprocessor_config.json").write_text(json.dumps(processor))
    return tmp_path / "teacher", processor


@pytest.mark.parametrize("channels", [3, 1])
def test_the_teacher_reads_the_batch_normalised_as_its_processor_says(teacher_with_processor, channels, caplog):
    folder, processor = teacher_with_processor
    mean, std = [0.5] * channels, [0.25] * channels
    model = seeded_model(num_channels=channels, image_mean=mean, image_std=std)
    with caplog.at_level("INFO"):
        model.load_teacher(str(folder), fresh=True)
    assert model.config.teacher_image_mean == processor["image_mean"]
    assert model.config.teacher_image_std == processor["image_std"]
    assert "preprocessor_config.json" in caplog.text
    x = images(channels=channels)
    raw = (x * 0.25 + 0.5).expand(-1, 3, -1, -1)  # the images before the student's normalisation
    expected_input = (raw - torch.tensor(processor["image_mean"]).view(1, 3, 1, 1)) / torch.tensor(
        processor["image_std"]).view(1, 3, 1, 1)
    teacher_input = model.mask_generator.teacher_input(x, (GRID, GRID))
    torch.testing.assert_close(teacher_input, expected_input, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.teacher_attention(x), teacher_cls_attention(model.mask_generator.teacher,
                                                                                 expected_input), atol=1e-6, rtol=1e-5)


def test_without_both_normalisations_the_teacher_reads_the_students_pixels_and_a_warning_names_the_fields(
    teacher_with_processor, tmp_path, caplog
):
    folder, _ = teacher_with_processor
    model = seeded_model()  # image_mean / image_std unset
    model.load_teacher(str(folder), fresh=True)
    x = images()
    with caplog.at_level("WARNING"):
        attention = model.teacher_attention(x)
    torch.testing.assert_close(attention, teacher_cls_attention(model.mask_generator.teacher, x))
    assert "image_mean" in caplog.text and "teacher_image_mean" in caplog.text
    # A teacher folder without a processor config: the teacher's fields stay unset, and the log says so.
    bare = tmp_path / "bare"
    ViTModel.from_pretrained(folder, add_pooling_layer=False).save_pretrained(bare)
    caplog.clear()
    with caplog.at_level("INFO"):
        model.load_teacher(str(bare), fresh=True)
    assert model.config.teacher_image_mean is None and "no preprocessor_config.json" in caplog.text


def test_normalisation_fields_are_validated():
    with pytest.raises(ValueError, match="image_std"):
        make_tiny_config(image_mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="image_mean"):
        make_tiny_config(image_mean=[0.5, 0.5], image_std=[0.2, 0.2])
    with pytest.raises(ValueError, match="teacher_image_std"):
        make_tiny_config(teacher_image_mean=[0.5], teacher_image_std=[0.0])


def test_default_teacher_input_is_bit_identical_to_the_students_pixels():
    model = seeded_model()
    x = images()
    assert model.mask_generator.teacher_input(x, (GRID, GRID)) is x
    same = seeded_model(image_mean=[0.5] * 3, image_std=[0.2] * 3, teacher_image_mean=[0.5], teacher_image_std=[0.2])
    assert same.mask_generator.teacher_input(x, (GRID, GRID)) is x

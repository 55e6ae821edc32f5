"""AutoMAEConfig (ViTMAE compatibility, validation), the encoder at inference, and the classification head."""

import pytest
import torch
from transformers import PreTrainedConfig, Trainer, TrainingArguments, ViTMAEConfig
from transformers.utils import logging

from automae_hf import AutoMAEConfig, AutoMAEForImageClassification, AutoMAEMaskGeneratorConfig, AutoMAEModel

logging.set_verbosity_error()

from conftest import make_tiny_config  # noqa: E402  (the shared tiny architecture)


def test_every_vitmae_field_has_the_same_name_and_default():
    generic = set(PreTrainedConfig().to_dict())
    vitmae = {k: v for k, v in ViTMAEConfig().to_dict().items() if k not in generic and k != "model_type"}
    ours = AutoMAEConfig().to_dict()
    assert len(vitmae) >= 19
    for name, default in vitmae.items():
        assert name in ours, name
        assert ours[name] == default, name
    config = AutoMAEConfig()
    assert (config.mask_factor, config.adversarial_weight, config.gumbel_tau, config.box_prior_alpha) == (
        0.5,
        0.2,
        1.0,
        0.5,
    )
    assert AutoMAEConfig.model_type == "automae"


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mask_ratio=0.0), "mask_ratio"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=-0.2), "mask_ratio"),
        (dict(mask_ratio=0.99), "mask_ratio"),  # 64 patches: no visible patch left
        (dict(patch_size=5), "patch_size"),
        (dict(image_size=30), "patch_size"),
        (dict(hidden_size=33), "hidden_size"),
        (dict(decoder_hidden_size=15), "decoder_hidden_size"),
        (dict(mask_factor=-1.0), "mask_factor"),
        (dict(gumbel_tau=0.0), "gumbel_tau"),
        (dict(adversarial_weight=-0.1), "adversarial_weight"),
        (dict(num_channels=0), "num_channels"),
        (dict(pooling="max"), "pooling"),
        (dict(teacher_config={"model_type": "bert"}), "teacher_config"),
    ],
)
def test_impossible_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        make_tiny_config(**overrides)


def test_mask_generator_config_validates_too():
    with pytest.raises(ValueError, match="`mask_ratio`"):
        AutoMAEMaskGeneratorConfig(image_size=32, patch_size=4, mask_ratio=1.5)


def test_config_round_trip_and_loading_from_a_vitmae_folder(tmp_path):
    config = make_tiny_config(mask_factor=0.3, teacher_config={"model_type": "vit", "hidden_size": 48})
    config.save_pretrained(tmp_path / "ours")
    loaded = AutoMAEConfig.from_pretrained(tmp_path / "ours")
    assert loaded.mask_factor == 0.3 and loaded.teacher_config["hidden_size"] == 48
    ViTMAEConfig(hidden_size=64, num_attention_heads=4, mask_ratio=0.6).save_pretrained(tmp_path / "vitmae")
    from_vitmae = AutoMAEConfig.from_pretrained(tmp_path / "vitmae")
    assert from_vitmae.model_type == "automae" and from_vitmae.to_dict()["model_type"] == "automae"
    assert from_vitmae.hidden_size == 64 and from_vitmae.mask_ratio == 0.6 and from_vitmae.mask_factor == 0.5


def test_encoder_at_inference_masks_nothing_and_is_deterministic():
    torch.manual_seed(0)
    model = AutoMAEModel(make_tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    second = model(pixel_values)
    assert torch.equal(second.last_hidden_state, model(pixel_values).last_hidden_state)
    model.set_attn_implementation("eager")  # attention weights are only materialised by eager attention
    first = model(pixel_values, output_hidden_states=True, output_attentions=True)
    assert first.last_hidden_state.shape == (2, 1 + 64, 32)
    assert torch.equal(first.pooler_output, first.last_hidden_state[:, 0])
    assert len(first.hidden_states) == 3 and len(first.attentions) == 2
    assert first.attentions[0].shape == (2, 2, 65, 65)
    # eager attention (weights requested) and SDPA agree
    torch.testing.assert_close(first.last_hidden_state, second.last_hidden_state, atol=1e-5, rtol=1e-5)
    model.set_attn_implementation("sdpa")
    tuple_output = model(pixel_values, return_dict=False)
    assert torch.equal(tuple_output[0], second.last_hidden_state)


def test_mean_pooling():
    torch.manual_seed(0)
    model = AutoMAEModel(make_tiny_config(pooling="mean")).eval()
    output = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state[:, 1:].mean(1))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classification_trains_with_the_hf_trainer(tmp_path, pooling):
    torch.manual_seed(0)
    config = make_tiny_config(pooling=pooling, num_labels=3)
    model = AutoMAEForImageClassification(config)
    pixel_values = torch.randn(12, 3, 32, 32)
    labels = torch.arange(12) % 3
    dataset = [{"pixel_values": pixel_values[i], "labels": labels[i]} for i in range(12)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    before = model.classifier.weight.detach().clone()
    result = Trainer(model=model, args=args, train_dataset=dataset).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.classifier.weight.detach())
    output = model(pixel_values[:2], labels=labels[:2])
    assert output.logits.shape == (2, 3) and output.loss.ndim == 0

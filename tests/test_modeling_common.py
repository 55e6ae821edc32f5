"""The `PreTrainedModel` contract, checked the same way for every class (in the spirit of transformers'
`ModelTesterMixin`): the encoder, pretraining with each masking strategy, the mask generator and classification.

Every case is a tiny model (hidden 32, 8x8 grid) with fixed seeds and explicit noise, so outputs are comparable
across save / load, attention backends, gradient checkpointing, dtypes, batch sizes and `torch.compile`.
"""

from __future__ import annotations

import pytest
import torch

from automae_hf import (
    AutoMAEForImageClassification,
    AutoMAEForPreTraining,
    AutoMAEMaskGenerator,
    AutoMAEModel,
)
from conftest import make_tiny_config

BATCH, SIZE, PATCH = 3, 32, 4
CASES = ["encoder", "pretraining-learned", "pretraining-random", "pretraining-box_prior", "pretraining-attention",
         "mask_generator", "classification"]  # fmt: skip
WITH_ENCODER = [case for case in CASES if case != "mask_generator"]


def build(case: str, **config_overrides):
    torch.manual_seed(0)
    if case.startswith("pretraining-"):
        config = make_tiny_config(masking=case.split("-", 1)[1], **config_overrides)
        return AutoMAEForPreTraining(config).eval()
    if case == "mask_generator":
        return AutoMAEMaskGenerator(make_tiny_config(**config_overrides).mask_generator_config()).eval()
    config = make_tiny_config(num_labels=5, **config_overrides)
    model_class = AutoMAEModel if case == "encoder" else AutoMAEForImageClassification
    return model_class(config).eval()


def inputs_for(case: str, batch: int = BATCH, size: int = SIZE, seed: int = 0, dtype=torch.float32) -> dict:
    """Keyword arguments of one forward pass, every random draw explicit."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, size, size, generator=generator).to(dtype)
    num_patches = (size // PATCH) ** 2
    noise = torch.rand(batch, num_patches, generator=generator)
    gumbel = -torch.log(-torch.log(torch.rand(batch, num_patches, generator=generator).clamp(1e-6, 1 - 1e-6)))
    if case in ("pretraining-learned", "mask_generator"):
        return dict(pixel_values=pixel_values, noise=noise, gumbel_noise=gumbel)
    if case == "pretraining-box_prior":
        boxes = [torch.tensor([[0.0, 0.0, size / 2, size / 2]])] * batch
        return dict(pixel_values=pixel_values, noise=noise, boxes=boxes)
    if case.startswith("pretraining-"):
        return dict(pixel_values=pixel_values, noise=noise)
    if case == "classification":
        return dict(pixel_values=pixel_values, labels=torch.arange(batch) % 5)
    return dict(pixel_values=pixel_values)


def slice_inputs(inputs: dict, rows: slice) -> dict:
    return {
        key: value[rows] if isinstance(value, (torch.Tensor, list)) else value for key, value in inputs.items()
    }


def main_outputs(case: str, output) -> dict[str, torch.Tensor]:
    """The tensors that must agree between two equivalent runs."""
    if case.startswith("pretraining-"):
        names = ["loss", "logits", "mask"] + (["mask_probs", "generator_loss"] if case.endswith("learned") else [])
    elif case == "mask_generator":
        names = ["mask", "mask_probs", "mask_logits"]
    elif case == "classification":
        names = ["loss", "logits"]
    else:
        names = ["last_hidden_state", "pooler_output"]
    return {name: getattr(output, name) for name in names}


def assert_outputs_close(case, first, second, atol=1e-5, rtol=1e-4):
    first, second = main_outputs(case, first), main_outputs(case, second)
    for name in first:
        torch.testing.assert_close(first[name].float(), second[name].float(), atol=atol, rtol=rtol, msg=name)


def differentiable_loss(case: str, output) -> torch.Tensor:
    if case == "encoder":
        return output.last_hidden_state.float().pow(2).mean()
    if case == "mask_generator":
        return output.raised_noise.float().pow(2).mean() + output.mask_probs.float().pow(2).sum()
    return output.loss.float()


# ---- save / load ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_save_and_load_round_trip(case, tmp_path):
    model = build(case)
    model.save_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    inputs = inputs_for(case)
    with torch.no_grad():
        assert_outputs_close(case, model(**inputs), loaded.eval()(**inputs), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_loading_with_bfloat16_reads_float32_pixels_agrees_with_float32_and_keeps_the_mask_in_float32(case, tmp_path):
    reference = build(case)
    reference.save_pretrained(tmp_path)
    model = type(reference).from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    inputs = inputs_for(case)  # float32 pixel_values, as an image processor gives them
    with torch.no_grad():
        output, expected = model(**inputs), reference(**inputs)
    # bf16 keeps 8 bits of mantissa: a few percent on outputs of two blocks; the masks are the same ones.
    assert_outputs_close(case, output, expected, atol=5e-2, rtol=5e-2)
    generator = getattr(model, "mask_generator", model if case == "mask_generator" else None)
    if generator is not None:
        assert generator.score_head[0].weight.dtype == torch.float32  # kept in float32 by from_pretrained
    if case == "pretraining-learned":
        assert output.mask_probs.dtype == torch.float32
        d_step = model.discriminator_loss(pixel_values=inputs["pixel_values"])
        assert torch.isfinite(d_step.loss)


# ---- outputs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", WITH_ENCODER)
def test_hidden_states_and_attentions_have_the_right_shapes(case):
    model = build(case, attn_implementation="eager")
    with torch.no_grad():
        output = model(**inputs_for(case), output_hidden_states=True, output_attentions=True)
    layers, tokens = 2, 1 + (SIZE // PATCH) ** 2
    if case.startswith("pretraining-"):
        tokens = 1 + int((SIZE // PATCH) ** 2 * 0.25)  # the encoder sees CLS + the visible patches
    assert len(output.hidden_states) == layers + 1 and len(output.attentions) == layers
    assert all(h.shape == (BATCH, tokens, 32) for h in output.hidden_states)
    assert all(a.shape == (BATCH, 2, tokens, tokens) for a in output.attentions)
    torch.testing.assert_close(output.attentions[0].sum(-1), torch.ones(BATCH, 2, tokens))


@pytest.mark.parametrize("case", WITH_ENCODER)
def test_return_dict_false_gives_transformers_tuple_order(case):
    model = build(case)
    inputs = inputs_for(case)
    with torch.no_grad():
        as_dict, as_tuple = model(**inputs), model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = {
        "encoder": ["last_hidden_state", "pooler_output"],
        "classification": ["loss", "logits"],
    }.get(case, ["loss", "logits", "mask", "ids_restore"])  # ViTMAEForPreTraining's order
    for index, name in enumerate(expected):
        assert torch.equal(as_tuple[index], getattr(as_dict, name)), (index, name)


# ---- attention backends ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", WITH_ENCODER)
def test_eager_and_sdpa_attention_agree(case):
    eager, sdpa = build(case, attn_implementation="eager"), build(case, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    inputs = inputs_for(case)
    with torch.no_grad():
        assert_outputs_close(case, eager(**inputs), sdpa(**inputs))


def test_eager_attention_is_what_runs_when_asked(monkeypatch):
    """The config's backend is honoured, not silently replaced by SDPA."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or original(*a, **k))  # fmt: skip
    with torch.no_grad():
        build("encoder", attn_implementation="eager")(**inputs_for("encoder"))
        assert not calls
        build("encoder", attn_implementation="sdpa")(**inputs_for("encoder"))
        assert calls
        calls.clear()
        model = build("pretraining-random")  # encoder and decoder, switched after construction
        model.set_attn_implementation("eager")
        model(**inputs_for("pretraining-random"))
        assert not calls


# ---- gradient checkpointing -----------------------------------------------------------------------------------------
def _counted(forward, calls):
    def counted_forward(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    return counted_forward


@pytest.mark.parametrize("case", WITH_ENCODER)
def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes_every_block(case):
    inputs = inputs_for(case)
    gradients, block_calls = [], []
    for checkpointing in (False, True):
        model = build(case).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        calls = {"n": 0}
        blocks = list(model.vit.encoder.layer if hasattr(model, "vit") else model.encoder.layer)
        blocks += list(model.decoder.decoder_layers) if hasattr(model, "decoder") else []
        for block in blocks:  # count MLP runs (module hooks do not fire in the backward's recompute)
            block.mlp.forward = _counted(block.mlp.forward, calls)
        differentiable_loss(case, model(**inputs)).backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        block_calls.append(calls["n"])
    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert block_calls[1] == 2 * block_calls[0], "every encoder and decoder block must run again in backward"


# ---- dtypes ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_half_precision_weights_forward_and_backward_are_finite(case, dtype):
    model = build(case).to(dtype).train()
    inputs = inputs_for(case)  # float32 pixel_values into half-precision weights: the model casts them
    output = model(**inputs)
    loss = differentiable_loss(case, output)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g.float()).all() for g in grads)
    if case == "pretraining-learned":
        assert output.mask_probs.dtype == torch.float32  # the score head and top-K compute in float32
        assert (output.mask.sum(1) == (SIZE // PATCH) ** 2 - int((SIZE // PATCH) ** 2 * 0.25)).all()
        d_loss = model.discriminator_loss(pixel_values=inputs["pixel_values"]).loss
        d_loss.backward()
        assert torch.isfinite(d_loss)


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_autocast_forward_and_backward_are_finite(case):
    model = build(case).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**inputs_for(case))
        loss = differentiable_loss(case, output)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if case == "pretraining-learned":
        assert output.mask_probs.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d_loss = model.discriminator_loss(pixel_values=inputs_for(case)["pixel_values"]).loss
        assert d_loss.dtype == torch.float32 and torch.isfinite(d_loss)


# ---- batch independence and resolution ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_each_image_is_independent_of_the_rest_of_the_batch(case):
    model = build(case)
    inputs = inputs_for(case)
    with torch.no_grad():
        whole, alone = model(**inputs), model(**slice_inputs(inputs, slice(0, 1)))
    for name, tensor in main_outputs(case, whole).items():
        if tensor.ndim == 0:  # batch means (losses) differ by definition
            continue
        torch.testing.assert_close(tensor[:1], main_outputs(case, alone)[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("size", [48, 64])  # 1.5x and 2x the config's 32 px
@pytest.mark.parametrize("case", CASES)
def test_other_resolutions_with_interpolated_positions(case, size):
    model = build(case)
    inputs = inputs_for(case, size=size)
    num_patches = (size // PATCH) ** 2
    with torch.no_grad():
        if case == "mask_generator":
            output = model(**inputs)  # the mask generator reads the teacher at any size
        else:
            with pytest.raises(ValueError, match="interpolate_pos_encoding"):
                model(**inputs)
            output = model(**inputs, interpolate_pos_encoding=True)
    if case == "encoder":
        assert output.last_hidden_state.shape == (BATCH, 1 + num_patches, 32)
    elif case == "classification":
        assert output.logits.shape == (BATCH, 5) and torch.isfinite(output.loss)
    else:
        assert output.mask.shape == (BATCH, num_patches)
        assert (output.mask.sum(1) == num_patches - int(num_patches * 0.25)).all()
    if case.startswith("pretraining-"):
        assert output.logits.shape == (BATCH, num_patches, PATCH * PATCH * 3) and torch.isfinite(output.loss)
    if case == "pretraining-learned":
        d_step = model.discriminator_loss(pixel_values=inputs["pixel_values"])
        assert torch.isfinite(d_step.loss) and d_step.real_scores.shape == (BATCH,)


# ---- configs the model cannot run -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(patch_size=(4, 8)), "patch_size"),
        (dict(image_size=12, patch_size=4), "image_size"),  # a 3x3 grid: under D's 4x4
    ],
)
def test_configs_the_model_cannot_run_are_rejected_with_the_field_name(overrides, field):
    with pytest.raises(ValueError, match=field):
        make_tiny_config(**overrides)


def test_rectangular_images_and_square_patch_pairs_run():
    config = make_tiny_config(image_size=(32, 48), patch_size=[4, 4])
    assert config.patch_size == 4 and config.grid_size == (8, 12)
    model = AutoMAEForPreTraining(config).eval()
    with torch.no_grad():
        output = model(torch.randn(2, 3, 32, 48))
    assert output.logits.shape == (2, 96, 48) and torch.isfinite(output.loss)
    assert make_tiny_config(image_size=12, patch_size=4, masking="random").grid_size == (3, 3)  # no D: allowed


# ---- torch.compile ----------------------------------------------------------------------------------------------------
def test_encoder_compiles_with_fullgraph_at_inference():
    model = build("encoder")
    inputs = inputs_for("encoder")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_outputs_close("encoder", compiled(**inputs), model(**inputs))


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]  # inductor: ~1 min of C++ builds
)
def test_compiled_training_step_matches_eager_without_graph_breaks(backend):
    inputs = inputs_for("pretraining-learned")
    losses, gradients = [], []
    for compile_it in (False, True):
        model = build("pretraining-learned").train()
        step = torch.compile(model, fullgraph=True, backend=backend) if compile_it else model
        output = step(**inputs)
        output.loss.backward()
        losses.append(output.loss.detach())
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-5, rtol=1e-4, msg=name)

"""The reference-checkpoint converter against a tiny hand-written MAE-style reference (timm `Block` semantics,
fused qkv) and an old-API spectral-norm discriminator."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automae_hf import AutoMAEForPreTraining
from automae_hf.convert_reference_checkpoint import (
    convert_checkpoint,
    convert_discriminator_state_dict,
    convert_reference_state_dict,
    convert_teacher_state_dict,
    load_state_dict_file,
    main,
)

HIDDEN, LAYERS, HEADS, MLP = 32, 2, 2, 64
DEC_HIDDEN, DEC_LAYERS, DEC_HEADS, DEC_MLP = 16, 1, 2, 32
PATCH, IMAGE, CHANNELS = 2, 28, 3  # a 14x14 grid: the reference discriminator's
GRID = IMAGE // PATCH
NUM_PATCHES = GRID * GRID
SCORE_HIDDEN = 6
EPS = 1e-6
HEAD_ARGS = dict(num_attention_heads=HEADS, decoder_num_attention_heads=DEC_HEADS)
HEAD_FLAGS = ["--num_attention_heads", str(HEADS), "--decoder_num_attention_heads", str(DEC_HEADS)]


# ---------------------------------------------------------------------------------------------------------------
# A tiny reference in the MAE code base's layout
# ---------------------------------------------------------------------------------------------------------------
def _randn(generator, *shape, scale=0.2):
    return torch.randn(*shape, generator=generator) * scale


def _block_weights(sd, prefix, dim, mlp, generator):
    for norm in ("norm1", "norm2"):
        sd[f"{prefix}{norm}.weight"] = 1 + _randn(generator, dim, scale=0.1)
        sd[f"{prefix}{norm}.bias"] = _randn(generator, dim, scale=0.1)
    shapes = {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim), "mlp.fc1": (mlp, dim), "mlp.fc2": (dim, mlp)}
    for name, (out_dim, in_dim) in shapes.items():
        sd[f"{prefix}{name}.weight"] = _randn(generator, out_dim, in_dim, scale=in_dim**-0.5)
        sd[f"{prefix}{name}.bias"] = _randn(generator, out_dim, scale=0.05)


def make_encoder_state_dict(seed: int, hidden=HIDDEN, layers=LAYERS, mlp=MLP) -> dict:
    generator = torch.Generator().manual_seed(seed)
    sd = {
        "cls_token": _randn(generator, 1, 1, hidden),
        "pos_embed": _randn(generator, 1, NUM_PATCHES + 1, hidden),  # random, to catch any recomputed table
        "patch_embed.proj.weight": _randn(generator, hidden, CHANNELS, PATCH, PATCH, scale=0.3),
        "patch_embed.proj.bias": _randn(generator, hidden, scale=0.05),
        "norm.weight": 1 + _randn(generator, hidden, scale=0.1),
        "norm.bias": _randn(generator, hidden, scale=0.1),
    }
    for index in range(layers):
        _block_weights(sd, f"blocks.{index}.", hidden, mlp, generator)
    return sd


def make_reference_state_dict(seed: int = 0, teacher_heads: int = HEADS) -> dict:
    generator = torch.Generator().manual_seed(seed + 100)
    sd = make_encoder_state_dict(seed)
    sd.update(
        {
            "decoder_embed.weight": _randn(generator, DEC_HIDDEN, HIDDEN, scale=HIDDEN**-0.5),
            "decoder_embed.bias": _randn(generator, DEC_HIDDEN, scale=0.05),
            "mask_token": _randn(generator, 1, 1, DEC_HIDDEN),
            "decoder_pos_embed": _randn(generator, 1, NUM_PATCHES + 1, DEC_HIDDEN),
            "decoder_norm.weight": 1 + _randn(generator, DEC_HIDDEN, scale=0.1),
            "decoder_norm.bias": _randn(generator, DEC_HIDDEN, scale=0.1),
            "decoder_pred.weight": _randn(generator, PATCH * PATCH * CHANNELS, DEC_HIDDEN, scale=DEC_HIDDEN**-0.5),
            "decoder_pred.bias": _randn(generator, PATCH * PATCH * CHANNELS, scale=0.05),
            "scorer_pred.main.0.weight": _randn(generator, SCORE_HIDDEN, teacher_heads, 3, 3),
            "scorer_pred.main.0.bias": _randn(generator, SCORE_HIDDEN, scale=0.05),
            "scorer_pred.main.2.weight": _randn(generator, 1, SCORE_HIDDEN, 3, 3),
            "scorer_pred.main.2.bias": _randn(generator, 1, scale=0.05),
        }
    )
    for index in range(DEC_LAYERS):
        _block_weights(sd, f"decoder_blocks.{index}.", DEC_HIDDEN, DEC_MLP, generator)
    return sd


def reference_attention(x, sd, prefix, heads):
    """timm `Attention` with fused qkv; also returns the post-softmax weights."""
    batch, length, dim = x.shape
    qkv = F.linear(x, sd[f"{prefix}attn.qkv.weight"], sd[f"{prefix}attn.qkv.bias"])
    q, k, v = qkv.reshape(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
    return F.linear(out, sd[f"{prefix}attn.proj.weight"], sd[f"{prefix}attn.proj.bias"]), weights


def reference_block(x, sd, prefix, heads):
    """timm `Block`: x = x + proj(attn(norm1(x))); x = x + fc2(gelu(fc1(norm2(x))))."""
    dim = x.shape[-1]

    def norm(t, name):
        return F.layer_norm(t, (dim,), sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"], EPS)

    x = x + reference_attention(norm(x, "norm1"), sd, prefix, heads)[0]
    hidden = F.gelu(F.linear(norm(x, "norm2"), sd[f"{prefix}mlp.fc1.weight"], sd[f"{prefix}mlp.fc1.bias"]))
    return x + F.linear(hidden, sd[f"{prefix}mlp.fc2.weight"], sd[f"{prefix}mlp.fc2.bias"])


def reference_tokens(sd, images):
    patches = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    return patches.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:], sd["cls_token"] + sd["pos_embed"][:, :1]


def reference_encoder(sd, images, ids_keep=None, heads=HEADS):
    """MAE's forward_encoder (visible patches given by ids_keep; all patches when None)."""
    patches, cls = reference_tokens(sd, images)
    if ids_keep is not None:
        patches = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    x = torch.cat([cls.expand(patches.shape[0], -1, -1), patches], dim=1)
    for index in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        x = reference_block(x, sd, f"blocks.{index}.", heads)
    return F.layer_norm(x, (x.shape[-1],), sd["norm.weight"], sd["norm.bias"], EPS)


def reference_decoder(sd, latent, ids_restore):
    """MAE's forward_decoder."""
    x = F.linear(latent, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    masks = sd["mask_token"].repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], masks], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + sd["decoder_pos_embed"]
    for index in range(DEC_LAYERS):
        x = reference_block(x, sd, f"decoder_blocks.{index}.", DEC_HEADS)
    x = F.layer_norm(x, (DEC_HIDDEN,), sd["decoder_norm.weight"], sd["decoder_norm.bias"], EPS)
    return F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]


def reference_cls_attention(sd, images, heads=HEADS):
    """The teacher's last-block CLS attention over patches, `[B, heads, grid, grid]`."""
    patches, cls = reference_tokens(sd, images)
    x = torch.cat([cls.expand(patches.shape[0], -1, -1), patches], dim=1)
    for index in range(LAYERS - 1):
        x = reference_block(x, sd, f"blocks.{index}.", heads)
    prefix = f"blocks.{LAYERS - 1}."
    normed = F.layer_norm(x, (HIDDEN,), sd[f"{prefix}norm1.weight"], sd[f"{prefix}norm1.bias"], EPS)
    weights = reference_attention(normed, sd, prefix, heads)[1]
    return weights[:, :, 0, 1:].reshape(x.shape[0], heads, GRID, GRID)


class ReferenceDiscriminator(nn.Module):
    """The reference D with the old `torch.nn.utils.spectral_norm` (keys `convK.0.weight_orig` / `_u` / `_v`)."""

    def __init__(self):
        super().__init__()
        sn = nn.utils.spectral_norm
        self.conv1 = nn.Sequential(sn(nn.Conv2d(1, 16, 4, 2, 1, bias=False)), nn.LeakyReLU(0.2))
        self.conv2 = nn.Sequential(sn(nn.Conv2d(16, 32, 4, 2, 1, bias=False)), nn.LeakyReLU(0.2))
        self.conv3 = nn.Sequential(sn(nn.Conv2d(32, 1, 3, bias=False)))

    def forward(self, mask_probs):
        return self.conv3(self.conv2(self.conv1(mask_probs.view(-1, 1, GRID, GRID)))).flatten()


def make_reference_discriminator():
    torch.manual_seed(0)
    reference = ReferenceDiscriminator()
    with torch.no_grad():  # a few power iterations, so the stored u, v are not the initial ones
        for _ in range(3):
            reference(torch.rand(2, NUM_PATCHES))
    return reference.eval()


def make_images(batch=2, seed=1):
    return torch.randn(batch, CHANNELS, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# One conversion (through the command line), shared by the tests
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    student, teacher = make_reference_state_dict(seed=0), make_encoder_state_dict(seed=7)
    teacher_checkpoint = {**teacher, **{k: v for k, v in make_reference_state_dict(7).items() if "decoder" in k}}
    reference_d = make_reference_discriminator()
    # MAE's misc.save_model also stores the argparse namespace and the epoch next to the weights.
    torch.save({"model": student, "epoch": 3, "args": argparse.Namespace(lr=1e-4)}, root / "ckpt.pth")
    torch.save({"model": teacher_checkpoint}, root / "teacher.pth")
    torch.save(reference_d.state_dict(), root / "disc.pth")
    output = root / "converted"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(
            ["--checkpoint", str(root / "ckpt.pth"), "--output_dir", str(output), "--discriminator",
             str(root / "disc.pth"), "--teacher_checkpoint", str(root / "teacher.pth"), *HEAD_FLAGS]
        )  # fmt: skip
    assert code == 0
    model = AutoMAEForPreTraining.from_pretrained(output).eval()
    return dict(model=model, student=student, teacher=teacher, reference_d=reference_d, root=root, output=output)


def test_every_reference_key_is_consumed_and_every_model_key_filled():
    student = make_reference_state_dict()
    ours = convert_reference_state_dict(student)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_checkpoint(student, None, **HEAD_ARGS)
    model_keys = {k for k in model.state_dict() if not k.startswith(("mask_generator.teacher.", "discriminator."))}
    assert set(ours) == model_keys
    # 16 tensors per block (q, k, v split) and the top-level ones: nothing dropped, nothing invented.
    top_level = len(student) - 12 * (LAYERS + DEC_LAYERS)
    assert len(ours) == top_level + 16 * (LAYERS + DEC_LAYERS)
    hidden = HIDDEN
    fused = student["blocks.1.attn.qkv.weight"]
    assert torch.equal(ours["vit.encoder.layer.1.attention.q_proj.weight"], fused[:hidden])
    assert torch.equal(ours["vit.encoder.layer.1.attention.k_proj.weight"], fused[hidden : 2 * hidden])
    assert torch.equal(ours["vit.encoder.layer.1.attention.v_proj.weight"], fused[2 * hidden :])
    teacher = convert_teacher_state_dict(make_reference_state_dict(3))  # decoder and score-head keys ignored
    assert "layers.1.attention.q_proj.weight" in teacher and not any("decoder" in k for k in teacher)
    assert len(convert_discriminator_state_dict(make_reference_discriminator().state_dict())) == 9


def test_config_inferred_from_shapes(converted):
    config = converted["model"].config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (HIDDEN, LAYERS, MLP)
    assert (config.image_size, config.patch_size, config.num_channels) == (IMAGE, PATCH, CHANNELS)
    assert (config.decoder_hidden_size, config.decoder_num_hidden_layers) == (DEC_HIDDEN, DEC_LAYERS)
    assert (config.decoder_intermediate_size, config.decoder_num_attention_heads) == (DEC_MLP, DEC_HEADS)
    assert config.layer_norm_eps == EPS and config.norm_pix_loss is True and config.qkv_bias is True
    assert config.score_hidden_channels == SCORE_HIDDEN and config.teacher_config["num_attention_heads"] == HEADS


def test_encoder_matches_reference_on_full_image(converted):
    images = make_images()
    with torch.no_grad():
        ours = converted["model"].vit(images).last_hidden_state
    expected = reference_encoder(converted["student"], images)
    assert ours.shape == (2, 1 + NUM_PATCHES, HIDDEN)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_masked_encoder_and_decoder_match_reference(converted):
    model, student = converted["model"], converted["student"]
    images = make_images(seed=2)
    noise = torch.rand(2, NUM_PATCHES, generator=torch.Generator().manual_seed(3))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore, ids_keep = ids_shuffle.argsort(dim=1), ids_shuffle[:, : NUM_PATCHES // 4]
    with torch.no_grad():
        latent = model.vit(images, visible_ids=ids_keep).last_hidden_state
        pred = model.decoder(latent, ids_restore)
    expected_latent = reference_encoder(student, images, ids_keep)
    torch.testing.assert_close(latent, expected_latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred, reference_decoder(student, expected_latent, ids_restore), atol=1e-5, rtol=1e-5)


def test_score_head_and_teacher(converted):
    model, student = converted["model"], converted["student"]
    head = model.mask_generator.score_head
    for index in (0, 2):
        assert torch.equal(head[index].weight, student[f"scorer_pred.main.{index}.weight"])
        assert torch.equal(head[index].bias, student[f"scorer_pred.main.{index}.bias"])
    images = make_images(seed=4)
    teacher_maps = model.mask_generator.teacher_attention(images)
    expected = reference_cls_attention(converted["teacher"], images)
    torch.testing.assert_close(teacher_maps, expected, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in model.mask_generator.teacher.parameters())


def test_discriminator_scores_match_reference_in_eval_mode(converted):
    reference = converted["reference_d"]
    logits = torch.randn(4, NUM_PATCHES, generator=torch.Generator().manual_seed(5))
    probs = logits.softmax(dim=-1)
    with torch.no_grad():
        expected = reference(probs)
        ours = converted["model"].discriminator.eval()(probs)  # saved and reloaded: the _u/_v keys round-trip
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # The stored singular vectors are used as they are (no power iteration in eval mode, old or new API).
    with torch.no_grad():
        assert torch.equal(converted["model"].discriminator(probs), ours)


def test_without_teacher_the_folder_has_no_teacher_weights(tmp_path):
    from safetensors.torch import load_file

    with pytest.warns(UserWarning, match="teacher"):
        convert_checkpoint(make_reference_state_dict(), tmp_path / "out", **HEAD_ARGS, norm_pix_loss=False)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(k.startswith("mask_generator.teacher.") for k in saved)
    assert any(k.startswith("mask_generator.score_head.") for k in saved)
    assert AutoMAEForPreTraining.config_class.from_pretrained(tmp_path / "out").norm_pix_loss is False


def test_teacher_name_or_path_is_loaded_by_from_pretrained(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEModel

    teacher_config = ViTMAEConfig(
        hidden_size=24, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=48, image_size=IMAGE,
        patch_size=PATCH, layer_norm_eps=EPS,
    )  # fmt: skip
    teacher = ViTMAEModel(teacher_config)
    teacher.save_pretrained(tmp_path / "teacher")
    with pytest.warns(UserWarning, match="teacher_name_or_path"):
        convert_checkpoint(
            make_reference_state_dict(), tmp_path / "out", teacher_name_or_path=str(tmp_path / "teacher"), **HEAD_ARGS
        )
    model = AutoMAEForPreTraining.from_pretrained(tmp_path / "out")
    for name, value in teacher.state_dict().items():
        assert torch.equal(model.mask_generator.teacher.state_dict()[name], value), name
    # The stored teacher_config is the named teacher's, so the model re-saves and reloads with its teacher.
    model.save_pretrained(tmp_path / "resaved")
    reloaded = AutoMAEForPreTraining.from_pretrained(tmp_path / "resaved")
    assert reloaded.mask_generator.teacher.config.hidden_size == 24
    name = "layers.0.attention.q_proj.weight"
    assert torch.equal(reloaded.mask_generator.teacher.state_dict()[name], teacher.state_dict()[name])


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_state_dict_file(missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"corrupt\.pth.*corrupt"):
        load_state_dict_file(corrupt)
    assert main(["--checkpoint", str(missing), "--output_dir", str(tmp_path / "o")]) == 1


class _NotATensor:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("unpickled!",))


def test_arbitrary_objects_are_not_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": make_reference_state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(ValueError, match=r"evil\.pth.*never unpickled"):
        load_state_dict_file(path)
    assert "unpickled!" not in capsys.readouterr().out


def test_unexpected_missing_and_misshaped_keys(tmp_path):
    student = make_reference_state_dict()
    with pytest.raises(ValueError, match=r"unexpected.*head\.weight"):
        convert_reference_state_dict({**student, "head.weight": torch.zeros(2)})
    incomplete = {k: v for k, v in student.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing.*blocks\.1\.mlp\.fc2\.bias"):
        convert_reference_state_dict(incomplete)
    misshaped = {**student, "blocks.1.mlp.fc2.weight": torch.zeros(HIDDEN, MLP + 1)}
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.weight.*\(32, 65\).*\(32, 64\)"):
        convert_checkpoint(misshaped, None, **HEAD_ARGS)
    bad_d = {**make_reference_discriminator().state_dict(), "conv4.0.weight_orig": torch.zeros(1)}
    with pytest.raises(ValueError, match="conv4"):
        convert_discriminator_state_dict(bad_d)
    path = tmp_path / "extra.safetensors"
    from safetensors.torch import save_file

    save_file({**student, "head.weight": torch.zeros(2)}, str(path))
    assert main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "o"), *HEAD_FLAGS]) == 1


# ---------------------------------------------------------------------------------------------------------------
# The released discriminator as it is saved
# ---------------------------------------------------------------------------------------------------------------
class ReferenceDiscriminatorRegisteredTwice(ReferenceDiscriminator):
    """Like the released D: its first convolution also registered as `features.0`, so the state dict holds it twice."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(self.conv1[0], self.conv1[1])


def test_discriminator_with_its_first_conv_registered_twice_converts():
    torch.manual_seed(0)
    reference = ReferenceDiscriminatorRegisteredTwice().eval()
    state = reference.state_dict()
    assert {"features.0.weight_orig", "features.0.weight_u", "features.0.weight_v"} <= set(state)
    converted = convert_discriminator_state_dict(state)
    assert len(converted) == 9 and not any(k.startswith("features.") for k in converted)
    tampered = {**state, "features.0.weight_orig": state["features.0.weight_orig"] + 1}
    with pytest.raises(ValueError, match=r"features\.0\.weight_orig differs from conv1\.0\.weight_orig"):
        convert_discriminator_state_dict(tampered)


def test_discriminator_is_found_inside_a_combined_checkpoint(tmp_path):
    reference_d = ReferenceDiscriminatorRegisteredTwice().eval()
    combined = {"model": make_reference_state_dict(), "discriminator": reference_d.state_dict(), "epoch": 1}
    torch.save(combined, tmp_path / "checkpoint-799.pth")
    probs = torch.softmax(torch.randn(3, NUM_PATCHES, generator=torch.Generator().manual_seed(2)), dim=-1)
    with torch.no_grad():
        expected = reference_d(probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        as_flag = convert_checkpoint(tmp_path / "checkpoint-799.pth", None, discriminator=tmp_path / "checkpoint-799.pth", **HEAD_ARGS)
        by_default = convert_checkpoint(tmp_path / "checkpoint-799.pth", None, **HEAD_ARGS)
    for model in (as_flag, by_default):
        with torch.no_grad():
            torch.testing.assert_close(model.discriminator.eval()(probs), expected, atol=1e-6, rtol=1e-5)


def test_cli_says_where_the_discriminator_came_from(tmp_path, capsys):
    combined = {"model": make_reference_state_dict(), "discriminator": make_reference_discriminator().state_dict()}
    torch.save(combined, tmp_path / "combined.pth")
    torch.save({"model": make_reference_state_dict()}, tmp_path / "student.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("combined", "student"):
            assert main(["--checkpoint", str(tmp_path / f"{name}.pth"), "--output_dir", str(tmp_path / name),
                         *HEAD_FLAGS]) == 0
    combined_line, student_line = [line for line in capsys.readouterr().out.splitlines() if "discriminator" in line]
    assert combined_line.endswith("discriminator converted from the checkpoint's 'discriminator' entry")
    assert student_line.endswith("discriminator initialised")


class _RunsCode:
    def __reduce__(self):  # a REDUCE of a blocked module's function, refused by weights_only
        import os

        return (os.getcwd, ())


def test_refused_pickles_name_the_reason_not_corruption(tmp_path):
    path = tmp_path / "reduce.pth"
    torch.save({"model": make_reference_state_dict(), "x": _RunsCode()}, path)
    with pytest.raises(ValueError, match=r"never unpickled here for safety") as raised:
        load_state_dict_file(path)
    assert "corrupt" not in str(raised.value)

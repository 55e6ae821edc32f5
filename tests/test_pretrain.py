"""training/pretrain.py end to end on tiny synthetic data (CPU, subprocesses, < 3 minutes on 2 cores)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from automae_hf import AUTOMAE_PRESETS
from conftest import (
    ENV,
    REPO_ROOT,
    TINY,
    common,
    load_weights,
    pretrain_in_process,
    run,
    save_corrupt_image_dataset,
    synthetic_images,
)

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("pretrain_data")
    clean = datasets.Dataset.from_dict({"img": synthetic_images(24)}).cast_column("img", datasets.Image())
    clean.save_to_disk(str(root / "clean"))
    save_corrupt_image_dataset(root / "corrupt")  # one entry's bytes are no image
    return root


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """6 uninterrupted steps (2 epochs of 3 batches), checkpoints every 2, workers on, picture grid every 3."""
    out = tmp_path_factory.mktemp("full")
    result = run(common(data_dir / "clean", out, 6, "--checkpointing_steps", 2, "--dataloader_num_workers", 1,
                        "--image_log_steps", 3, "--norm_pix_loss"))
    return out, result


def test_run_writes_loadable_model(full_run):
    import automae_hf  # noqa: F401
    from automae_hf import AutoMAEForPreTraining

    out, _ = full_run
    model = AutoMAEForPreTraining.from_pretrained(str(out))
    assert model.config.hidden_size == 32 and model.config.norm_pix_loss
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    processor = json.loads((out / "preprocessor_config.json").read_text())
    # How the pixels were normalised is saved with the model, so the teacher can re-normalise them as it expects.
    assert (model.config.image_mean, model.config.image_std) == (processor["image_mean"], processor["image_std"])
    saved = load_weights(out)
    assert all(torch.isfinite(v).all() for v in saved.values())
    logs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 7))
    for key in ("loss", "reconstruction_loss", "generator_loss", "d_loss", "d_real_accuracy", "d_fake_accuracy",
                "d_real_score", "d_fake_score", "mask_entropy", "gumbel_sample_entropy", "topk_in_teacher_topk", "lr",
                "images_per_second", "skipped_images",
                "data_wait_ms", "train_step_ms", "loop_other_ms"):
        assert all(key in row for row in logs), key
    assert all(row["train_step_ms"] > 0 and row["data_wait_ms"] >= 0 for row in logs)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]


def test_teacher_none_is_plain_mae(data_dir, tmp_path, capsys):
    printed = pretrain_in_process(common(data_dir / "clean", tmp_path, 2, "--teacher_name_or_path", "none",
                                         "--image_log_steps", 2), capsys)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["masking"] == "random"
    last = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])
    assert "d_loss" not in last and last["loss"] == pytest.approx(last["reconstruction_loss"])
    assert "Done: 2 steps" in printed


def test_corrupt_image_is_skipped_and_counted(data_dir, tmp_path, capsys):
    printed = pretrain_in_process(common(data_dir / "corrupt", tmp_path, 2, "--per_device_train_batch_size", 6), capsys)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["skipped_images"] == 1
    assert "skipped 1 undecodable image" in printed


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=4)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--image_column_name", "pixels"], "--image_column_name 'pixels'"),
        (["--train_dir", "/nonexistent/images"], "--train_dir '/nonexistent/images'"),
        (["--config_overrides", "mask_ratio=1.5"], "mask_ratio"),
        (["--max_train_steps", "0"], "--max_train_steps must be a positive number"),
        (["--teacher_name_or_path", "./no/such/teacher"], "--teacher_name_or_path './no/such/teacher': no such folder"),
        (["--lr_scheduler_type", "cosine_please"], "--lr_scheduler_type must be one of"),
        (["--model_name_or_path", "DINOV2"], "is a 'dinov2' checkpoint; expected one of"),
        (["--config_overrides", TINY + ",image_size=64"], "--image_size 32 conflicts with image_size=64 in --config_overrides"),
        (["--masking", "random", "--config_overrides", TINY + ",masking=learned"], "--masking random conflicts with"),
        (["--image_processor_name", "CLEAN_DATA"], "--image_processor_name"),
        (["--teacher_name_or_path", "self", "--cache_teacher_attention"], "--cache_teacher_attention needs a fixed"),
        (["--per_device_train_batch_size", "32"], "smaller than one batch per process (32 x 1)"),
    ],
)
def test_bad_inputs_exit_with_one_line_error(data_dir, tmp_path, dinov2_folder, capsys, extra, needle):
    """In process: every refusal is one `error:` line that names the flag, before any training."""
    from automae_hf.training import pretraining

    args = [str(a) for a in common(data_dir / "clean", tmp_path, 2)]
    extra = [{"DINOV2": str(dinov2_folder), "CLEAN_DATA": str(data_dir / "clean")}.get(value, value) for value in extra]
    for flag in ("--train_dir", "--config_overrides", "--max_train_steps"):
        if flag in extra and flag in args:
            i = args.index(flag)
            del args[i : i + 2]
    if extra[0] == "--train_dir":
        i = args.index("--dataset_name")
        del args[i : i + 2]
    with pytest.raises(SystemExit) as raised:
        pretraining.main(args + extra)
    assert raised.value.code != 0
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and needle in error_lines[0], error_lines
    assert not (tmp_path / "train_log.jsonl").exists()


def test_hf_example_flags_pretrained_teacher_and_a_push_without_teacher_or_local_paths(data_dir, tmp_path):
    """--learning_rate / --lr_scheduler_type / --num_warmup_steps as the HF examples; a ViTMAE checkpoint without a
    teacher plus --teacher_name_or_path gives no "randomly initialised teacher" warning; --push_to_hub (dry run)
    uploads a folder without the teacher's weights and without local paths."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    start = tmp_path / "vitmae"
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4,
                 image_size=32, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                 decoder_intermediate_size=64)
    ViTMAEForPreTraining(ViTMAEConfig(**sizes)).save_pretrained(start)
    args = common(data_dir / "clean", tmp_path / "run", 3)
    for flag in ("--config_overrides", "--warmup_steps", "--base_learning_rate"):
        i = args.index(flag)
        del args[i : i + 2]
    result = run(args + ["--model_name_or_path", start, "--teacher_name_or_path", start, "--learning_rate", 0.02,
                         "--lr_scheduler_type", "constant_with_warmup", "--num_warmup_steps", 1,
                         "--push_to_hub", "--hub_model_id", "org/automae-test", "--dry_run"])
    output = result.stdout + result.stderr
    assert "randomly initialised" not in output and f"teacher={start}" in output
    logs = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [round(entry["lr"], 6) for entry in logs] == [0.02, 0.02, 0.02]  # warm-up of 1 step, then constant
    assert any(k.startswith("mask_generator.teacher.") for k in load_weights(tmp_path / "run"))  # the run keeps it
    pushed = tmp_path / "run" / "hub"
    assert not any(k.startswith("mask_generator.teacher.") for k in load_weights(pushed))
    for name in ("config.json", "README.md", "train_summary.json"):
        assert str(tmp_path) not in (pushed / name).read_text(), name
    assert json.loads((pushed / "config.json").read_text())["teacher_name_or_path"] is None


def preempted(args, kill: str, step: int):
    """`training/pretrain.py ARGS` killed by SIGKILL at `kill` ("after_step" or "before_commit") of `step`, through
    the loop's own hooks (tests/preempted_pretrain.py)."""
    command = [sys.executable, str(REPO_ROOT / "tests" / "preempted_pretrain.py"), f"--kill_{kill}", str(step),
               *map(str, args)]
    return subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_to_identical_weights(full_run, data_dir, tmp_path):
    full_out, _ = full_run
    args = common(data_dir / "clean", tmp_path, 6, "--checkpointing_steps", 2, "--dataloader_num_workers", 1,
                  "--image_log_steps", 3, "--norm_pix_loss")
    # 1. SIGKILL mid-run, right after step 3 (step_2 is the last complete checkpoint)
    killed = preempted(args, "after_step", 3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2"]
    # 2. resumed, then SIGKILLed while writing the step-4 checkpoint (after save_state, before the atomic rename)
    killed = preempted(args + ["--resume_from_checkpoint", "latest"], "before_commit", 4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = checkpoints / ".tmp-step_4"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step_4", "step_2"]
    (partial / "model.safetensors").write_bytes(b"truncated")  # as if cut off mid-file
    from automae_hf.training.checkpointing import latest_checkpoint

    assert latest_checkpoint(checkpoints).name == "step_2"
    # 3. resumed again to the end: the same weights and loss as the uninterrupted run
    run(args + ["--resume_from_checkpoint", "latest"])
    expected, got = load_weights(full_out), load_weights(tmp_path)
    assert expected.keys() == got.keys()
    worst = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert worst <= 1e-6, worst
    full_log = [json.loads(line) for line in (full_out / "train_log.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in resumed_log] == list(range(1, 7))  # the killed runs' steps after step 2: dropped
    assert resumed_log[-1]["loss"] == pytest.approx(full_log[-1]["loss"], abs=1e-6)
    assert not partial.exists()


def test_crop_attention_follows_the_image_crop_and_flip():
    from PIL import Image

    from automae_hf.training.data import apply_geometry, available_backends

    rows, columns = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
    ramp = np.stack([columns, rows]).astype(np.float32)  # channel 0: column index, channel 1: row index
    image = Image.new("L", (32, 32))
    for backend in available_backends():
        def crop(geometry):
            return apply_geometry(image, geometry, 16, [0], [1], attention=ramp, backend=backend)["teacher_attention"]

        np.testing.assert_allclose(crop((0, 0, 32, 32, False)), ramp, atol=1e-6)
        np.testing.assert_allclose(crop((0, 0, 32, 32, True)), ramp[:, :, ::-1], atol=1e-6)
        right_half = crop((16, 0, 16, 32, False)).numpy()  # the right half, stretched to 8 columns
        np.testing.assert_allclose(right_half[0, 0], np.minimum(3.75 + 0.5 * np.arange(8), 7), atol=1e-6)  # edges clamp
        np.testing.assert_allclose(right_half[1], ramp[1], atol=1e-6)


def test_cached_teacher_attention_mode(data_dir, tmp_path, capsys):
    """--cache_teacher_attention: the maps the run cached are the live teacher's on the same (resized, normalised)
    images, as the saved model computes them ('self' is refused: `test_bad_inputs_exit_with_one_line_error`)."""
    import shutil

    import datasets
    from transformers import ViTImageProcessor, ViTMAEConfig, ViTMAEModel

    from automae_hf import AutoMAEForPreTraining
    from automae_hf.training.data import decode_image

    teacher = tmp_path / "teacher"
    torch.manual_seed(0)
    vit = ViTMAEModel(ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   image_size=32, patch_size=8, initializer_range=0.5))
    vit.embeddings.cls_token.data.normal_()  # initialised to 0, its one-layer CLS attention is uniform: nothing to compare
    vit.save_pretrained(teacher)
    data = tmp_path / "data"
    shutil.copytree(data_dir / "clean", data)  # its own copy: the cache written next to it is this run's alone
    out = tmp_path / "run"
    pretrain_in_process(common(data, out, 2, "--teacher_name_or_path", teacher, "--cache_teacher_attention",
                               "--image_log_steps", 2), capsys)
    last = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    assert "d_loss" in last and "mask_entropy" in last

    caches = [datasets.Dataset.from_file(str(path)) for path in sorted(data.glob("cache-*.arrow"))]
    cached = [cache for cache in caches if "teacher_attention" in cache.column_names]
    assert len(cached) == 1, [cache.column_names for cache in caches]
    cached = cached[0].with_format("torch")
    model = AutoMAEForPreTraining.from_pretrained(str(out)).eval()
    processor = ViTImageProcessor.from_pretrained(str(out))
    mean = torch.tensor(processor.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std).view(1, -1, 1, 1)
    images = [decode_image(value, "RGB").resize((32, 32), 3) for value in datasets.load_from_disk(str(data))["img"][:6]]
    pixels = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
                          for image in images])
    with torch.no_grad():
        live = model.teacher_attention((pixels - mean) / std)
    stored = cached["teacher_attention"][:6].float()
    assert stored.shape == live.shape
    torch.testing.assert_close(stored, live, atol=2e-3, rtol=2e-3)  # float16 storage
    assert live.flatten(1).std(1).min() > 1e-4  # maps that vary, so the comparison says something


@pytest.mark.parametrize("name", ["reference", *sorted(set(AUTOMAE_PRESETS) - {"reference"})])
def test_preset_sets_the_knobs_and_explicit_settings_win(name):
    from automae_hf.training import pretraining as pretrain

    parser = pretrain.build_parser()
    args = parser.parse_args(["--output_dir", "unused", "--preset", name, "--teacher_name_or_path", "self",
                              "--config_overrides", TINY + ",gumbel_tau=0.7", "--adversarial_weight", "0.3",
                              "--image_size", "32"])
    model, mode = pretrain.build_model(args, parser)
    expected = {**AUTOMAE_PRESETS[name], "gumbel_tau": 0.7, "adversarial_weight": 0.3}
    assert {key: getattr(model.config, key) for key in expected} == expected and mode == "self"
    assert model.mask_generator.config.gumbel_noise_scale == expected.get("gumbel_noise_scale", 1.0)
    with pytest.raises(SystemExit):
        pretrain.build_model(parser.parse_args(["--output_dir", "unused", "--preset", "nonexistent"]), parser)


@pytest.mark.slow  # two full runs: run with --runslow
def test_fused_optimizers_by_default_and_per_tensor_adamw_on_request(data_dir, tmp_path):
    """--optim as TrainingArguments.optim: fused AdamW (student) and Adam (D) by default, the per-tensor kernels on
    request; both compute the same update."""
    weights = {}
    for optim in ("adamw_torch_fused", "adamw_torch"):
        out = tmp_path / optim
        extra = ["--checkpointing_steps", 2] + ([] if optim == "adamw_torch_fused" else ["--optim", optim])
        run(common(data_dir / "clean", out, 2, *extra))
        # student (prepared by accelerate), D (registered for checkpointing after the state and the two schedules)
        for name in ("optimizer.bin", "custom_checkpoint_3.pkl"):
            state = torch.load(out / "checkpoints" / "step_2" / name, weights_only=True)
            assert all(bool(group["fused"]) == (optim == "adamw_torch_fused") for group in state["param_groups"])
            assert all(tuple(group["betas"]) == (0.9, 0.95) for group in state["param_groups"])  # D too, as MAE
        weights[optim] = load_weights(out)
    fused, per_tensor = weights.values()
    worst = max((fused[k] - per_tensor[k]).abs().max().item() for k in fused)
    assert worst <= 1e-4, worst


@pytest.mark.filterwarnings("error::FutureWarning")  # transformers 5.24+ deprecate gradient_checkpointing_enable
def test_activation_checkpointing_uses_the_current_api(data_dir, tmp_path, capsys):
    printed = pretrain_in_process(common(data_dir / "clean", tmp_path, 1, "--activation_checkpointing"), capsys)
    assert "Done: 1 steps" in printed


@pytest.mark.slow  # a torch.compile: run with --runslow
def test_gradient_checkpointing_torch_compile_and_checkpoints_total_limit(data_dir, tmp_path, caplog):
    """The HF examples' flags, in process: the same weights with recomputed blocks and regionally compiled layers (the
    D step's D and score head too), and only the newest N checkpoints kept."""
    import logging

    from automae_hf.training import pretraining

    caplog.set_level(logging.INFO, logger="automae.pretrain")

    plain = [str(a) for a in common(data_dir / "clean", tmp_path / "plain", 3)]
    flagged = [str(a) for a in common(data_dir / "clean", tmp_path / "flagged", 3, "--gradient_checkpointing",
                                      "--torch_compile", "--torch_compile_backend", "aot_eager",
                                      "--checkpointing_steps", "1", "--checkpoints_total_limit", "2")]
    pretraining.main(plain)
    pretraining.main(flagged)
    first, second = load_weights(tmp_path / "plain"), load_weights(tmp_path / "flagged")
    assert first.keys() == second.keys()
    worst = max((first[k].float() - second[k].float()).abs().max().item() for k in first)
    assert worst < 1e-4, worst
    assert sorted(p.name for p in (tmp_path / "flagged" / "checkpoints").iterdir()) == ["step_2", "step_3"]
    # By region: the student's 2 encoder layers, the decoder's 1, the self teacher's none (it is the student)
    assert ("torch.compile (aot_eager), by region: 3 layers (ViTMAELayer), AutoMAEDiscriminator, AutoMAEScoreHead"
            in caplog.text)


def test_noise_streams_are_independent_per_rank_and_reproducible():
    from automae_hf.training.pretraining import noise_seed

    seeds = {(rank, step): noise_seed(0, rank, step) for rank in range(4) for step in range(50)}
    assert len(set(seeds.values())) == len(seeds)  # no two (rank, micro-batch) share a stream
    assert noise_seed(0, 1, 7) == noise_seed(0, 1, 7) and noise_seed(1, 1, 7) != noise_seed(0, 1, 7)
    # rank r's stream is not rank 0's shifted by a constant (the old linear seeding's flaw)
    assert len({noise_seed(0, 1, step + 1) - noise_seed(0, 0, step) for step in range(10)}) == 10


def test_score_head_learning_rate_follows_the_config(tmp_path):
    """The score head's groups learn at lr * config.score_head_lr_scale: 1 by default, the follow_teacher preset's
    0.1, or what --config_overrides sets; the student's groups at lr."""
    from automae_hf.training import pretraining

    parser = pretraining.build_parser()
    for extra, scale in (([], 1.0), (["--preset", "follow_teacher"], 0.1),
                         (["--preset", "follow_teacher", "--config_overrides", TINY + ",score_head_lr_scale=0.5"], 0.5)):
        args = parser.parse_args(["--output_dir", str(tmp_path), "--config_overrides", TINY, "--image_size", "32",
                                  "--learning_rate", "1e-3", *extra])
        model, _ = pretraining.build_model(args, parser)
        lr, optimizer, _ = pretraining.build_optimizers(args, model, 256)
        head = {id(p) for p in model.mask_generator.score_head.parameters()}
        rates = {"head": set(), "rest": set()}
        for group in optimizer.param_groups:
            for param in group["params"]:
                rates["head" if id(param) in head else "rest"].add(group["lr"])
        assert rates["rest"] == {1e-3} and len(rates["head"]) == 1, (extra, rates)
        assert rates["head"].pop() == pytest.approx(1e-3 * scale), extra


def test_fp16_scaler_steps_and_updates_once_per_iteration(data_dir, tmp_path, capsys, monkeypatch):
    """Under fp16 one GradScaler scales the student's loss; D's optimizer is not accelerate's, so the scaler steps
    and updates once per optimizer step, not once per optimizer. (accelerate makes no scaler on the CPU: a CPU
    GradScaler stands in, installed where accelerate keeps its own.)"""
    from automae_hf.training import pretraining

    calls = {"step": 0, "update": 0}

    class CountingScaler(torch.amp.GradScaler):
        def step(self, *args, **kwargs):
            calls["step"] += 1
            return super().step(*args, **kwargs)

        def update(self, *args, **kwargs):
            calls["update"] += 1
            return super().update(*args, **kwargs)

    make_accelerator = pretraining.make_accelerator

    def with_scaler(args):
        accelerator = make_accelerator(args)
        assert accelerator.scaler is None
        accelerator.scaler, accelerator.native_amp = CountingScaler("cpu", init_scale=2.0**8), True
        return accelerator

    monkeypatch.setattr(pretraining, "make_accelerator", with_scaler)
    pretrain_in_process(common(data_dir / "clean", tmp_path, 3, "--mixed_precision", "fp16",
                               "--gradient_accumulation_steps", 2), capsys)
    assert calls == {"step": 3, "update": 3}
    weights = load_weights(tmp_path)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_d_and_teacher_leave_the_student_while_accelerate_wraps_it(tiny_config):
    """What DDP / FSDP see while `prepare_student` wraps the model: the student alone (no D, no frozen teacher);
    afterwards the model is whole again, the same modules in the same places."""
    from automae_hf import AutoMAEForPreTraining
    from automae_hf.training.pretraining import outside_the_student

    model = AutoMAEForPreTraining(tiny_config())
    before = dict(model.state_dict())
    discriminator, teacher = model.discriminator, model.mask_generator.teacher
    with outside_the_student(model) as outside:
        assert outside == [discriminator, teacher]
        names = [name for name, _ in model.named_parameters()]
        assert names and not any(name.startswith(("discriminator.", "mask_generator.teacher.")) for name in names)
        assert any(name.startswith("mask_generator.score_head.") for name in names)  # the score head is the student's
    assert model.discriminator is discriminator and model.mask_generator.teacher is teacher
    assert list(model.state_dict()) == list(before)


def test_streaming_imagefolder_run(tmp_path, capsys):
    """--streaming over an imagefolder: the map transform ships uint8 crops, the loop normalises them, the run ends."""
    import datasets

    from automae_hf.training.data import collate, make_stream_transform

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for index, image in enumerate(synthetic_images(12)):
        image.save(folder / f"{index}.png")
    stream = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "images"), split="train", streaming=True)
    stream = stream.map(make_stream_transform("image", 32, None, None, "RGB"), remove_columns=["image", "label"])
    assert collate([example for _, example in zip(range(2), stream)])["pixel_values"].dtype == torch.uint8
    printed = pretrain_in_process(["--train_dir", tmp_path / "images", "--streaming", "--output_dir", tmp_path / "out",
                                   "--image_size", 32, "--config_overrides", TINY, "--per_device_train_batch_size", 4,
                                   "--max_train_steps", 3, "--warmup_steps", 1, "--dataloader_num_workers", 0,
                                   "--seed", 3], capsys)
    assert "Done: 3 steps" in printed
    logs = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert logs[-1]["step"] == 3 and np.isfinite(logs[-1]["loss"])

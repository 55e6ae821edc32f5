"""Pretraining runs that do what was asked or refuse: the warm-up, reused output folders and resumes, non-finite
losses, full batches, epochs under gradient accumulation, the logged mask entropy and metrics over processes (in process, tiny data, seconds each)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from conftest import TINY, common, pretrain_in_process, synthetic_images


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 images: two full batches of 8 and 4 left over."""
    import datasets

    root = tmp_path_factory.mktemp("runs_data") / "images"
    datasets.Dataset.from_dict({"img": synthetic_images(20)}).cast_column("img", datasets.Image()).save_to_disk(root)
    return root


def mae(data, out, steps, *extra):
    """Plain MAE (no teacher, no D): the fastest run of the command line."""
    return common(data, out, steps, "--teacher_name_or_path", "none", *extra)


def without(args, flag):
    args = list(args)
    i = args.index(flag)
    del args[i : i + 2]
    return args


def refusal(args, capsys) -> str:
    """The one `error:` line of a refused run."""
    with pytest.raises(SystemExit) as raised:
        pretrain_in_process(args, capsys)
    assert raised.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


def log_rows(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_a_warmup_over_most_of_the_run_is_named(data, tmp_path, capsys, caplog):
    """MAE's 40 warm-up epochs on a 3-step run: the learning rate only climbs, and a warning names --warmup_steps.
    Streaming has no epochs to count them in: --warmup_steps is required."""
    caplog.set_level(logging.WARNING, logger="automae.pretrain")
    pretrain_in_process(without(mae(data, tmp_path / "run", 3), "--warmup_steps"), capsys)
    warnings = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert len(warnings) == 1 and "--warmup_epochs 40 = 80 steps" in warnings[0] and "--warmup_steps" in warnings[0]
    lrs = [row["lr"] for row in log_rows(tmp_path / "run")]
    assert lrs == sorted(lrs)  # what the warning is about
    error = refusal(without(mae(data, tmp_path / "stream", 3, "--streaming"), "--warmup_steps"), capsys)
    assert "--streaming needs --warmup_steps" in error


def test_a_used_output_dir_is_refused_unless_overwritten(data, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain_in_process(mae(data, out, 1), capsys)
    (out / "left_over.txt").write_text("from another run")
    error = refusal(mae(data, out, 2), capsys)
    assert "is not empty" in error and "--overwrite_output_dir" in error
    assert [row["step"] for row in log_rows(out)] == [1]  # the refused run wrote nothing

    pretrain_in_process(mae(data, out, 2, "--overwrite_output_dir"), capsys)
    assert not (out / "left_over.txt").exists()
    assert [row["step"] for row in log_rows(out)] == [1, 2]  # not appended to the first run's log
    saved = json.loads((out / "run_args.json").read_text())
    assert saved["arguments"]["max_train_steps"] == 2 and "output_dir" not in saved["arguments"]
    assert saved["fingerprint"] == json.loads((out / "train_summary.json").read_text())["run_fingerprint"]


def test_a_resume_continues_only_its_own_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain_in_process(mae(data, out, 2, "--checkpointing_steps", 1), capsys)
    saved = (out / "run_args.json").read_text()
    assert json.loads((out / "checkpoints" / "step_1" / "run_args.json").read_text()) == json.loads(saved)

    error = refusal(mae(data, out, 2, "--seed", 4, "--resume_from_checkpoint", "latest"), capsys)
    assert "--seed 3 there, 4 here" in error
    error = refusal(mae(data, tmp_path / "elsewhere", 2, "--mask_ratio", 0.5, "--resume_from_checkpoint",
                        out / "checkpoints" / "step_1"), capsys)
    assert "checkpoint" in error and "--mask_ratio None there, 0.5 here" in error
    error = refusal(mae(data, out, 1, "--resume_from_checkpoint", "latest"), capsys)  # step_2 is the latest
    assert "is at step 2, past the 1 steps asked for" in error
    assert (out / "run_args.json").read_text() == saved  # refusals write nothing

    printed = pretrain_in_process(mae(data, out, 2, "--resume_from_checkpoint", out / "checkpoints" / "step_1",
                                      "--logging_steps", 2), capsys)  # a flag that leaves the weights alone
    assert "Done: 2 steps" in printed and [row["step"] for row in log_rows(out)] == [1, 2]


def test_a_nonfinite_loss_stops_the_run_before_its_weights_are_saved(data, tmp_path, capsys, monkeypatch):
    from automae_hf import AutoMAEForPreTraining

    forward, calls = AutoMAEForPreTraining.forward, []

    def nan_at_the_second_step(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(AutoMAEForPreTraining, "forward", nan_at_the_second_step)
    with pytest.raises(FloatingPointError, match="at optimizer step 2"):
        pretrain_in_process(mae(data, tmp_path, 3, "--checkpointing_steps", 1, "--logging_steps", 10), capsys)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_1"]
    assert not (tmp_path / "model.safetensors").exists()


def test_batches_are_full(data, tmp_path, capsys):
    """drop_last, as MAE: 20 images in batches of 8 are 2 steps per epoch, the last 4 images wait for the next."""
    printed = pretrain_in_process(without(mae(data, tmp_path, 1, "--num_train_epochs", 1), "--max_train_steps"), capsys)
    assert "Done: 2 steps" in printed


def test_an_epochs_last_micro_batch_ends_an_optimizer_step(data, tmp_path, capsys):
    """20 images in batches of 4, accumulating 2: an epoch's 5 micro-batches make steps of 2, 2 and 1, and the next
    epoch starts a step of its own, though one loader iterator spans the epochs; a run resumed mid-epoch (step 2,
    before the short step) ends with the same weights."""
    from conftest import load_weights

    accumulate = ("--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--dataloader_num_workers", 1)
    pretrain_in_process(mae(data, tmp_path / "full", 5, *accumulate, "--checkpointing_steps", 2), capsys)
    assert [row["epoch"] for row in log_rows(tmp_path / "full")] == [0, 0, 0, 1, 1]
    pretrain_in_process(mae(data, tmp_path / "resumed", 5, *accumulate, "--checkpointing_steps", 2,
                            "--resume_from_checkpoint", tmp_path / "full" / "checkpoints" / "step_2"), capsys)
    expected, got = load_weights(tmp_path / "full"), load_weights(tmp_path / "resumed")
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_mask_entropy_is_the_score_heads_distribution_not_the_gumbel_sample(data, tmp_path, capsys):
    """Scores squeezed to nothing (score_scale 1e-6): p is uniform, so `mask_entropy` is log L; the Gumbel sample
    that picked the top-K stays far below it (`gumbel_sample_entropy`)."""
    from automae_hf.masking import mask_entropy

    uniform = torch.log_softmax(torch.zeros(2, 64), dim=-1)
    assert mask_entropy(uniform).item() == pytest.approx(math.log(64))
    pretrain_in_process(common(data, tmp_path, 1, "--config_overrides", TINY + ",score_scale=1e-6"), capsys)
    last = log_rows(tmp_path)[-1]
    assert last["mask_entropy"] == pytest.approx(math.log(64), abs=1e-4)
    assert last["gumbel_sample_entropy"] < math.log(64) - 0.5


def test_logged_metrics_are_means_over_all_processes():
    """One all-reduce per logging window: metric means over every process's micro-batches, diagnostics averaged
    over processes, counters summed (here a second process, stood in by its reduced values)."""
    from automae_hf.training.pretraining import window_over_processes

    class OneProcess:
        device, num_processes = torch.device("cpu"), 2

        def reduce(self, tensor, reduction):
            self.sent = tensor
            return tensor

    other = OneProcess()
    window_over_processes(other, {"loss": torch.tensor(9.0)}, 3, {"mask_entropy": torch.tensor(3.0)}, [24, 1])

    class TwoProcesses(OneProcess):
        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor + other.sent

    means, diagnostics, counters = window_over_processes(
        TwoProcesses(), {"loss": torch.tensor(3.0)}, 3, {"mask_entropy": torch.tensor(1.0)}, [24, 0])
    assert means == {"loss": 2.0} and diagnostics == {"mask_entropy": 2.0} and counters == [48, 1]


def test_the_log_carries_the_masked_region_size_and_its_random_reference(data, tmp_path, capsys):
    """Every logged step has the mean size of the sampled masks' 4-connected masked regions and the same for random
    masks of each image's count; `discriminator_input_scale` from --config_overrides is the one the model saves."""
    pretrain_in_process(common(data, tmp_path, 2, "--config_overrides", TINY + ",discriminator_input_scale=num_patches"),
                        capsys)
    masked = 64 - int(64 * 0.25)
    for row in log_rows(tmp_path):
        assert 1 <= row["mask_region_size"] <= masked and 1 <= row["random_mask_region_size"] <= masked, row
    assert json.loads((tmp_path / "config.json").read_text())["discriminator_input_scale"] == "num_patches"

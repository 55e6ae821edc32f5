"""training/pretrain.py over several CPU processes (gloo): DDP on one machine, FSDP, and two "machines" on 127.0.0.1.

Each run is the same 3 steps (batch 4 per process, 2 micro-batches per step, teacher "self", D on), so the
distributed layouts are compared with each other bit for bit. Slow (several launches): run with --runslow.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import (
    ENV,
    REPO_ROOT,
    common,
    load_weights,
    path_without_python,
    save_corrupt_image_dataset,
    synthetic_images,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU process-group tests")
# `accelerate launch` of this interpreter's accelerate, whatever PATH holds (its workers run sys.executable too).
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
PRETRAIN = REPO_ROOT / "training" / "pretrain.py"
FSDP_ON_CPU = REPO_ROOT / "tests" / "fsdp_on_cpu.py"  # accelerate's FSDP, which it enables only on accelerators
FSDP_CONFIG = REPO_ROOT / "training" / "accelerate_configs" / "fsdp.yaml"
# `--multi_gpu` without GPUs: torchrun workers, and the script picks gloo on the CPU.
TWO_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no"]


def launch(launcher_args, script, args, port, path, wait=True):
    """`accelerate launch` with `path` as PATH (one whose `python` and `accelerate` fail: nothing is taken from it)."""
    command = [*ACCELERATE_LAUNCH, *launcher_args, "--main_process_port", str(port), str(script),
               *[str(a) for a in args]]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env={**ENV, "PATH": path}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    return finish(process) if wait else process


def finish(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise AssertionError(f"exit {process.returncode}\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return stdout + stderr


def run_args(data, out, *extra):
    return common(data, out, 3, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2,
                  "--debug_dump_weights", "--checkpointing_steps", 2, "--image_log_steps", 3, *extra)


def assert_same_weights(expected: dict, got: dict):
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.fixture(scope="module")
def no_python(tmp_path_factory):
    return path_without_python(tmp_path_factory.mktemp("no_python"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("distributed_data") / "clean"
    datasets.Dataset.from_dict({"img": synthetic_images(24)}).cast_column("img", datasets.Image()).save_to_disk(root)
    return root


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory, no_python):
    out = tmp_path_factory.mktemp("ddp")
    log = launch(TWO_PROCESSES, PRETRAIN, run_args(data, out), 29517, no_python)
    return out, log


def test_launcher_needs_nothing_on_path(no_python):
    """The launch command is this interpreter's: it runs where PATH has no (or another) `python` / `accelerate`."""
    env = {**ENV, "PATH": no_python}
    result = subprocess.run([*ACCELERATE_LAUNCH, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--num_processes" in result.stdout, result.stderr[-2000:]


@pytest.mark.slow  # several launches: run with --runslow
def test_ddp_ranks_agree_and_d_syncs_once(ddp_run):
    out, log = ddp_run
    assert "2 processes" in log
    rank0, rank1 = torch.load(out / "weights_rank0.pt"), torch.load(out / "weights_rank1.pt")
    assert_same_weights(rank0, rank1)  # D included: its gradients are averaged by hand, outside the student's DDP
    assert any(key.startswith("discriminator.") for key in rank0)
    assert "unused parameters" not in log and "marked ready" not in log
    at_step_2 = load_weights(out / "checkpoints" / "step_2")  # accelerate's copy of the state, runtime key names
    assert any(not torch.equal(at_step_2[k], rank0[k]) for k in at_step_2 if k.startswith("discriminator.")), \
        "D did not train"


@pytest.mark.slow
def test_fsdp_config_trains_like_ddp_and_resumes(data, ddp_run, tmp_path, no_python):
    """The shipped fsdp.yaml (FSDP2, full shard per ViTMAELayer): D and the teacher outside the student's unit,
    the same weights as DDP, sharded checkpoints, and a resume that ends where the uninterrupted run did."""
    ddp_out, _ = ddp_run
    fsdp = ["--config_file", FSDP_CONFIG, "--num_processes", "2", "--mixed_precision", "no"]
    out = tmp_path / "fsdp"
    launch(fsdp, FSDP_ON_CPU, run_args(data, out), 29518, no_python)
    assert (out / "checkpoints" / "step_2" / "pytorch_model_fsdp_0").is_dir()  # sharded, as the config asks
    assert_same_weights(load_weights(ddp_out), load_weights(out))
    assert not list(out.glob("_fsdp*.py")), "save_pretrained copied torch's FSDP sources"
    assert (out / "images" / "step_0000003.png").exists()  # picture grids gather the sharded student

    resumed = tmp_path / "resumed"
    launch(fsdp, FSDP_ON_CPU, run_args(data, resumed, "--resume_from_checkpoint", out / "checkpoints" / "step_2"),
           29519, no_python)
    assert_same_weights(load_weights(out), load_weights(resumed))


@pytest.mark.slow
def test_two_machines_on_localhost_end_bit_identical(data, ddp_run, tmp_path, no_python):
    """`--num_machines 2 --machine_rank R --main_process_ip`: one process per "machine", the same ranks and
    weights as two processes on one machine."""
    ddp_out, _ = ddp_run
    machines = [launch(["--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2",
                        "--main_process_ip", "127.0.0.1", "--mixed_precision", "no", "--dynamo_backend", "no"],
                       PRETRAIN, run_args(data, tmp_path), 29520, no_python, wait=False) for rank in (0, 1)]
    logs = [finish(process) for process in machines]
    assert "2 processes" in logs[0]
    rank0, rank1 = torch.load(tmp_path / "weights_rank0.pt"), torch.load(tmp_path / "weights_rank1.pt")
    assert_same_weights(rank0, rank1)
    assert_same_weights(torch.load(ddp_out / "weights_rank0.pt"), rank0)


@pytest.mark.slow
def test_skip_count_is_summed_over_processes_across_a_resume(tmp_path, no_python):
    """One undecodable image in 12, two processes, two epochs: it is skipped once per epoch, by whichever process
    draws it. A run resumed at the epoch boundary reports the same 2: the count is summed over the processes before
    each save (every process reloads rank 0's copy), and the logged metrics are means over both processes."""
    import json

    data = tmp_path / "corrupt"
    save_corrupt_image_dataset(data)

    def two_epochs(out, *extra):  # 12 images = 2 steps of 2 x 3 per epoch
        return common(data, out, 4, "--per_device_train_batch_size", 3, "--checkpointing_steps", 2, *extra)

    launch(TWO_PROCESSES, PRETRAIN, two_epochs(tmp_path / "whole"), 29521, no_python)
    launch(TWO_PROCESSES, PRETRAIN, two_epochs(tmp_path / "resumed", "--resume_from_checkpoint",
                                              tmp_path / "whole" / "checkpoints" / "step_2"), 29522, no_python)
    logs = {}
    for name in ("whole", "resumed"):
        assert json.loads((tmp_path / name / "train_summary.json").read_text())["skipped_images"] == 2, name
        logs[name] = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        assert logs[name][-1]["skipped_images"] == 2, name
    assert logs["resumed"][-1]["loss"] == pytest.approx(logs["whole"][-1]["loss"], abs=1e-6)

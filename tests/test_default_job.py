"""The main job's arms: a finished run is reused only when its saved arguments are the ones asked for now."""

import shutil

import numpy as np
import pytest

from automae_hf.training import default_job

# The main job's 28 x 28 grayscale, patch 4 model, narrower: seconds per run.
SMALL = ("image_size=28,patch_size=4,num_channels=1,hidden_size=32,num_hidden_layers=1,num_attention_heads=2,"
         "intermediate_size=64,decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,"
         "decoder_intermediate_size=32")


def run_in_process(command, check, env, record=None):
    """`subprocess.run` of a `python -m automae_hf.training.pretraining ...` command, in this process and without
    DataLoader workers (not a run argument); `record` gets the command's extra flags (after --seed S)."""
    from accelerate.state import AcceleratorState

    from automae_hf.training import pretraining

    if record is not None:
        record.append(command[command.index("--seed") + 2:])
    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process's accelerate
    pretraining.main([*command[3:], "--dataloader_num_workers", "0"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """16 grayscale images as a `save_to_disk` folder, and a finished 2-step MAE arm of the main job on them."""
    from datasets import Dataset, Features, Image
    from PIL import Image as PILImage

    root = tmp_path_factory.mktemp("default_job")
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L") for _ in range(16)]
    Dataset.from_dict({"image": images}, Features({"image": Image()})).save_to_disk(str(root / "data"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(default_job, "MODEL", SMALL)
        patch.setattr(default_job.subprocess, "run", run_in_process)
        default_job.pretrain(root / "data", root / "mae", "none", 2, 8, 0)
    return root / "data", root / "mae"


@pytest.fixture
def job(finished_run, tmp_path, monkeypatch):
    """`default_job.pretrain(steps, **kwargs)` of the small model into a copy of the finished 2-step arm; its
    subprocess runs in this process, and each command's extra flags are recorded."""
    data, template = finished_run
    run_dir = tmp_path / "mae"
    shutil.copytree(template, run_dir)  # the data path, a run argument, stays the same
    monkeypatch.setattr(default_job, "MODEL", SMALL)
    commands = []
    monkeypatch.setattr(default_job.subprocess, "run",
                        lambda command, check, env: run_in_process(command, check, env, commands))

    def pretrain(steps, **kwargs):
        return default_job.pretrain(data, run_dir, "none", steps, 8, 0, **kwargs)

    return pretrain, commands, run_dir


def test_a_finished_arm_is_reused_only_for_its_own_arguments(job, monkeypatch):
    pretrain, commands, run_dir = job
    assert pretrain(2) is None and commands == [], "the same arguments: reused, nothing trained"
    with pytest.raises(SystemExit, match=r"max_train_steps 2 there, 3 now.*--overwrite_output_dir"):
        pretrain(3)  # before: resumed the 2-step run, trained nothing and reported it as 3 steps
    assert pretrain(3, overwrite=True) is not None and commands[-1] == ["--overwrite_output_dir"]
    assert default_job.mask_learning_statistics(run_dir) is None and (run_dir / "images" / "step_0000003.png").is_file()
    assert pretrain(3) is None
    monkeypatch.setattr(default_job.subprocess, "run", lambda command, check, env: commands.append(command))
    pretrain(3, teacher_retrained=True)  # its teacher is new: trained again, not reused
    assert commands[-1][-1] == "--overwrite_output_dir"


def test_a_killed_arm_is_resumed_and_an_unknown_folder_refused(job, monkeypatch):
    pretrain, commands, run_dir = job
    (run_dir / "model.safetensors").unlink()  # as if killed after its last checkpoint
    monkeypatch.setattr(default_job.subprocess, "run", lambda command, check, env: commands.append(command))
    pretrain(2)
    assert commands[-1][-2:] == ["--resume_from_checkpoint", "latest"]
    (run_dir / "run_args.json").unlink()  # a folder of an older version, or of something else
    with pytest.raises(SystemExit, match="saved no arguments.*--overwrite_output_dir"):
        pretrain(2)


def test_runs_of_other_arguments_get_their_own_folders():
    names = {default_job.run_folder_name(steps, batch, seed) for steps in (100, 500) for batch in (64, 128)
             for seed in (0, 1)}
    assert len(names) == 8 and default_job.run_folder_name(500, 128, 0) == "steps500"


def test_quality_benchmark_reuses_a_folder_only_for_its_own_run(finished_run, job, monkeypatch):
    """benchmarks/quality.py used to reuse any folder holding `model.safetensors`; the main job's run is not its."""
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("quality", REPO_ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    data, _ = finished_run
    _, _, run_dir = job
    with pytest.raises(SystemExit, match="per_device_train_batch_size 8 there, 128 now.*--overwrite_output_dir"):
        quality.pretrain(data, run_dir, 2, 0, ["--teacher_name_or_path", "none"])
    ran = []
    monkeypatch.setattr(quality, "run_quietly", lambda command, threads, hide_stderr: ran.append(command))
    quality.pretrain(data, run_dir, 2, 0, ["--teacher_name_or_path", "none"], overwrite=True)
    assert ran[-1][-1] == "--overwrite_output_dir"

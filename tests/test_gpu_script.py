"""benchmarks/gpu.sh on the CPU with tiny settings: what it writes into $OUT, and nothing more (the GPU lease hands
back only the plain files there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY, path_without_python

SCRIPT = REPO_ROOT / "benchmarks" / "gpu.sh"
MAX_FILES = 8

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_script(tmp_path, mode=None, **settings):
    """gpu.sh with this interpreter as PYTHON, and `python` on PATH one that fails."""
    env = {**os.environ, "PATH": path_without_python(tmp_path / "no_python"), "PYTHON": sys.executable,
           "DEVICE": "cpu", "SETUP": "0", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
           "OUT": str(tmp_path / "out"), "QUALITY_DIR": str(tmp_path / "quality_runs"), "PYTHONPATH": str(REPO_ROOT),
           **{key: str(value) for key, value in settings.items()}}
    command = ["bash", str(SCRIPT)] + ([mode] if mode else [])
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def plain_files(out):
    entries = sorted(out.iterdir())
    assert all(entry.is_file() for entry in entries), entries  # no folders: they would not come back
    assert len(entries) <= MAX_FILES, entries
    return {entry.name for entry in entries}


@pytest.mark.slow  # gpu.sh end to end on the CPU, ~40 s: run with --runslow
def test_default_mode_speed_loop_and_loader(tmp_path):
    result = run_script(tmp_path, SIZES="tiny", BATCHES=8, STEPS=2, PROFILE_SIZE="tiny", PROFILE_BATCH=8,
                        PROFILE_STEPS=1, LOOP_CONFIG=TINY, LOOP_IMAGE_SIZE=32,
                        LOOP_SOURCE_SIZE=40, LOOP_IMAGES=32, LOOP_BATCH=8, LOOP_STEPS=4, LOOP_LOGGING_STEPS=1,
                        LOOP_WORKERS=1, LOOP_SPEED_SIZE="tiny", LOOP_COMPILE_BACKEND="aot_eager",
                        LOADER_ARGS="--images 16 --workers 1 --batch_size 8 --size 32 --source_size 40 --epochs 1 "
                                    "--sources arrow")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    assert plain_files(out) == {"summary.txt", "speed_tiny_bs8.json", "profile.json", "loop.json", "loop.log",
                                "loader.json"}
    profile = json.loads((out / "profile.json").read_text())
    assert set(profile) == {"args", "MAE", "AutoMAE cached", "AutoMAE cached, D + score head compiled"}
    assert profile["AutoMAE cached"]["ops"] > profile["AutoMAE cached, D + score head compiled"]["ops"]
    loop = json.loads((out / "loop.json").read_text())["arms"]
    assert set(loop) == {"MAE", "AutoMAE", "AutoMAE cached", "AutoMAE cached, compiled"}
    assert all(row["compile_seconds"] is not None for row in loop.values())
    for arm, row in loop.items():
        assert len(row["windows_images_per_s"]) == 4, arm  # every step logged: all three runs finished
        assert row["loop_images_per_s"] > 0 and row["model_images_per_s"] > 0 and row["loop_over_model"] > 0, arm
        assert len(row["windows_data_wait_ms"]) == len(row["windows_images_per_s"]) > 0, arm  # the host's split
        assert all(value is not None for value in row["windows_train_step_ms"] + row["windows_epoch"]), arm
    summary = (out / "summary.txt").read_text()
    assert "failed" not in summary and "loop AutoMAE cached" in summary and "cores per GPU" in summary
    assert "kernel launches: not measurable on the CPU" in summary
    per_arm = summary.split("per arm |", 1)[1].splitlines()[1:5]  # loop, model, compile s, launches (CPU: op calls)
    assert [line.split("|")[0].strip() for line in per_arm] == list(loop)
    launches = {line.split("|")[0].strip(): line.split("|")[4].strip() for line in per_arm}
    assert launches["AutoMAE"] == "-" and all(launches[name] != "-" for name in launches if name != "AutoMAE")
    assert json.loads((out / "loader.json").read_text())["per_core_rate"] > 0
    assert not list(tmp_path.glob("automae-gpu.*"))  # the scratch folder (JPEGs, teacher, runs) is gone


@pytest.mark.parametrize("data, folder", [("subset", "subset_N2"), (
    "cluttered", "cluttered_canvas64_scale1.5_fragments0_noise0_background160_N2")])  # the default cluttered settings
def test_quality_mode_out_of_time_hands_back_its_log_only(tmp_path, data, folder):
    stale = tmp_path / "quality_runs" / folder
    stale.mkdir(parents=True)
    (stale / "report.md").write_text("an older call's report")
    result = run_script(tmp_path, "quality", QUALITY_STEPS=2, QUALITY_DATA=data, QUALITY_TIMEOUT=2)
    assert result.returncode == 124, result.stdout[-3000:] + result.stderr[-3000:]
    assert plain_files(tmp_path / "out") == {"quality.txt"}
    assert "over QUALITY_TIMEOUT" in (tmp_path / "out" / "quality.txt").read_text()
    assert not (stale / "report.md").exists()


@pytest.mark.slow  # pretraining two arms and probing them on the CPU: minutes
def test_quality_mode_writes_the_report(tmp_path):
    result = run_script(tmp_path, "quality", QUALITY_STEPS=20, QUALITY_DATA="subset", QUALITY_ARMS="MAE N,AutoMAE",
                        WORKERS=1, QUALITY_TIMEOUT=850, QUALITY_ARGS="--quick --no_finetune")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    assert plain_files(out) == {"quality.txt", "quality_report.md", "quality_report.json"}
    assert "| AutoMAE |" in (out / "quality_report.md").read_text()
    assert "seconds.json" in (out / "quality.txt").read_text()

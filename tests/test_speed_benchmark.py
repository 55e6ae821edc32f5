"""benchmarks/speed.py runs end to end on a tiny model and writes every figure the results tables quote.
Its timings are not checked here: benchmarks print ratios, tests do not time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "speed.py"
TRAINING_RATIOS = ("ratio AutoMAE / MAE", "floor 1 + t_teacher / t_MAE", "overhead beyond the teacher",
                   "ratio AutoMAE cached / MAE", "ratio teacher / ViTModel inference")


@pytest.mark.slow  # the benchmark script end to end: run with --runslow
@pytest.mark.parametrize("inference_only", [False, True])
def test_speed_script_writes_its_figures(tmp_path, inference_only):
    output = tmp_path / "speed.json"
    command = [sys.executable, str(SCRIPT), "--size", "tiny", "--batch_size", "2", "--steps", "2", "--warmup", "1",
               "--device", "cpu", "--output_json", str(output)] + (["--inference_only"] if inference_only else [])
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(output.read_text())
    inference_arms = {"ViTModel inference", "AutoMAEModel inference"}
    training_arms = {"MAE", "AutoMAE", "AutoMAE cached", "teacher"}
    assert set(figures["ms"]) == inference_arms | (set() if inference_only else training_arms)
    assert all(value > 0 for value in figures["ms"].values())
    assert figures["ratio inference AutoMAEModel / ViTModel"] > 0
    assert all((key in figures) != inference_only for key in TRAINING_RATIOS)
    assert "ratio inference AutoMAEModel / ViTModel" in result.stdout


def test_memory_with_inference_only_is_refused(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed", SCRIPT)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    with pytest.raises(SystemExit) as raised:
        speed.main(["--inference_only", "--memory"])
    assert raised.value.code == 2 and "--memory measures the training arms" in capsys.readouterr().err

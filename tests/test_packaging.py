"""The installed package is complete: the model-card templates are package data, so a wheel install can write cards
(export, finetune, push) without the repository beside it."""

from __future__ import annotations

import importlib.resources
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from automae_hf.training import model_card

from conftest import make_tiny_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_card_templates_are_package_data():
    templates = importlib.resources.files("automae_hf") / "model_cards"
    for kind in model_card.KINDS:
        assert (templates / f"{kind}.md").is_file(), kind
    from distutils.core import run_setup  # setuptools' copy: reads setup.py's arguments without building

    patterns = run_setup(str(REPO_ROOT / "setup.py"), stop_after="init").package_data["automae_hf"]
    package = REPO_ROOT / "automae_hf"
    declared = {path for pattern in patterns for path in package.glob(pattern)}
    assert {package / "model_cards" / f"{kind}.md" for kind in model_card.KINDS} <= declared


def test_the_tools_are_packaged_and_their_command_line_imports_them():
    """`automae_hf.tools` ships in the wheel, and `training/build_dinov2_teacher.py` runs its `main`."""
    from distutils.core import run_setup

    from automae_hf.tools import dinov2_teacher

    assert "automae_hf.tools" in run_setup(str(REPO_ROOT / "setup.py"), stop_after="init").packages
    script = (REPO_ROOT / "training" / "build_dinov2_teacher.py").read_text()
    assert "from automae_hf.tools.dinov2_teacher import main" in script and callable(dinov2_teacher.main)


@pytest.mark.slow  # builds and installs a wheel (about 20 s)
def test_export_works_from_an_installed_wheel(tmp_path):
    from transformers import ViTImageProcessor

    from automae_hf import AutoMAEForPreTraining

    source = tmp_path / "source"  # a copy: building in the working tree would leave build/ and egg-info there
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "automae_hf", source / "automae_hf", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(source), "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("automae_hf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"automae_hf/model_cards/{kind}.md" for kind in model_card.KINDS} <= set(names)

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    AutoMAEForPreTraining(make_tiny_config()).save_pretrained(tmp_path / "pretrain")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "pretrain")
    script = ("import automae_hf, sys; from automae_hf.training.export import main; "
              "print(automae_hf.__file__); main(sys.argv[1:])")
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, "--model_name_or_path", str(tmp_path / "pretrain"),
                             "--output_dir", str(tmp_path / "encoder")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].startswith(str(site))  # the installed copy, not the repository's
    assert "The **encoder** of an AutoMAE pretraining run" in (tmp_path / "encoder" / "README.md").read_text()

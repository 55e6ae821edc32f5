"""Shared fixtures: tiny AutoMAE configs (CPU, seconds)."""

from __future__ import annotations

import os

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests must never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import automae_hf  # noqa: F401  (registers the Auto classes; scripts/setup.sh installs the package)
from automae_hf import AutoMAEConfig

TINY_ENCODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=4,
    num_channels=3,
)
TINY_DECODER = dict(
    decoder_hidden_size=16,
    decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2,
    decoder_intermediate_size=32,
)


def make_tiny_config(**overrides) -> AutoMAEConfig:
    """An `AutoMAEConfig` with hidden 32, 2 layers, 2 heads, intermediate 64, 32x32 images, 4x4 patches (8x8 grid),
    a 16-wide 1-layer decoder; keyword arguments override any field."""
    return AutoMAEConfig(**{**TINY_ENCODER, **TINY_DECODER, **overrides})


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow (minutes, or large downloads)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes of CPU or a large download; run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config():
    """Factory fixture: `tiny_config(**overrides)` -> `AutoMAEConfig`."""
    return make_tiny_config


@pytest.fixture
def pixel_values():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=generator)


# ---- pretraining runs (the `training/pretrain.py` command line in a subprocess) ----------------------------------
REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "training" / "pretrain.py"
TINY = (
    "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,patch_size=4,"
    "decoder_hidden_size=32,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,decoder_intermediate_size=64"
)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def synthetic_images(n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = (int(rng.integers(20, 48)), int(rng.integers(20, 48)))
        array = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        mode = ("RGB", "L", "RGBA")[i % 3]  # grayscale and RGBA get converted to RGB
        out.append(Image.fromarray(array).convert(mode))
    return out



def save_corrupt_image_dataset(folder, seed=1) -> None:
    """12 synthetic PNGs as undecoded `image` bytes, the sixth replaced by bytes that are no image (a `save_to_disk`
    folder)."""
    import io

    import datasets

    items = []
    for image in synthetic_images(12, seed=seed):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        items.append({"bytes": buffer.getvalue(), "path": None})
    items[5] = {"bytes": b"\x89PNG\r\n\x1a\n this is not a png", "path": None}
    corrupt = datasets.Dataset.from_dict({"image": items}).cast_column("image", datasets.Image(decode=False))
    corrupt.save_to_disk(str(folder))

def run(args, launcher=None, check=True, timeout=300):
    command = (launcher or [sys.executable]) + [str(SCRIPT)] + [str(a) for a in args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def common(data, out, steps=6, *extra):
    return ["--dataset_name", data, "--output_dir", out, "--image_size", 32, "--config_overrides", TINY,
            "--per_device_train_batch_size", 8, "--max_train_steps", steps, "--warmup_steps", 2,
            "--base_learning_rate", 1e-2, "--dataloader_num_workers", 0, "--seed", 3, *extra]


def load_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))




def path_without_python(folder: Path) -> str:
    """PATH with `python`, `python3` and `accelerate` shadowed by commands that fail (in `folder`): a subprocess that
    still reaches for them there, rather than this interpreter (`sys.executable`), fails instead of silently running
    another environment's Python (or being skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3", "accelerate"):
        fake = folder / name
        fake.write_text(f"#!/bin/sh\necho '{name} taken from PATH, not sys.executable' >&2\nexit 97\n")
        fake.chmod(0o755)
    return os.pathsep.join([str(folder), os.environ.get("PATH", "")])


def pretrain_in_process(args, capsys) -> str:
    """`training/pretrain.py ARGS` in this process (no interpreter start-up); returns what it printed."""
    from accelerate.state import AcceleratorState

    from automae_hf.training import pretraining

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process's accelerate: its own mixed precision
    pretraining.main([str(a) for a in args])
    captured = capsys.readouterr()
    return captured.out + captured.err


def assert_box_frames_the_bright_square(bright: np.ndarray, box, seed) -> None:
    """An augmented box (xyxy pixels) and the augmented image's bright-square mask `bright` `[H, W]` agree: the
    pixels inside the box are bright, none beyond a 2-pixel margin around it is."""
    x0, y0, x1, y1 = box
    inside = np.zeros_like(bright)
    inside[int(np.ceil(y0)) : int(np.floor(y1)), int(np.ceil(x0)) : int(np.floor(x1))] = True
    margin = np.zeros_like(bright)
    margin[max(0, int(y0) - 2) : int(np.ceil(y1)) + 2, max(0, int(x0) - 2) : int(np.ceil(x1)) + 2] = True
    if inside.sum() >= 4:
        assert bright[inside].mean() > 0.9, seed
    assert not bright[~margin].any(), seed

"""Shared fixtures: tiny AutoMAE configs (CPU, seconds)."""

from __future__ import annotations

import os

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

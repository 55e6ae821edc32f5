"""The README's "Use the models" snippet, run as written on a tiny model saved in the main job's format."""

import re

import torch

from conftest import REPO_ROOT

from automae_hf import AutoMAEConfig, AutoMAEForPreTraining


def readme_snippet(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = (REPO_ROOT / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


def test_use_the_models_snippet_runs_on_a_batch(tmp_path, monkeypatch):
    """The main job's checkpoint format (28x28 grayscale, patch 4) with a tiny width: the snippet's batch keeps its
    size through the processor, the pretraining model and the encoder."""
    from transformers import ViTImageProcessor

    torch.manual_seed(0)
    config = AutoMAEConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16,
                           decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
                           norm_pix_loss=True)
    AutoMAEForPreTraining(config).save_pretrained(tmp_path / "automae")
    ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.29], image_std=[0.35]).save_pretrained(
        tmp_path / "automae")
    code = readme_snippet("## Use the models")
    assert 'folder = "outputs/default' in code
    code = re.sub(r'folder = "[^"]*"', f"folder = {str(tmp_path / 'automae')!r}", code)
    monkeypatch.chdir(REPO_ROOT)  # the snippet reads the embedded data set by its repository path
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    batch = len(namespace["pixel_values"])
    assert batch >= 2, "the snippet shows a batch"
    assert namespace["pixel_values"].shape == (batch, 1, 28, 28)
    assert namespace["out"].mask.shape == (batch, 49) and namespace["out"].logits.shape == (batch, 49, 16)
    assert namespace["reconstruction"].shape == (batch, 1, 28, 28)
    assert namespace["features"].shape == (batch, 32)

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="automae-hf",
    version="0.1.0",
    description="AutoMAE (masked autoencoders that learn where to mask) for Hugging Face transformers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["automae_hf", "automae_hf.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch >= 2.4: fused AdamW on CPU and GPU. scripts/setup.sh installs 2.13.0 only where no torch is present.
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
    ],
    extras_require={
        "training": ["accelerate>=1.0", "datasets>=3.0", "pillow", "numpy", "tqdm", "evaluate"],
        "tracking": ["tensorboard"],
        "dev": ["pytest>=8", "accelerate>=1.0", "datasets>=3.0", "pillow", "numpy", "tqdm", "evaluate"],
    },
    entry_points={
        "console_scripts": ["automae-convert-reference=automae_hf.convert_reference_checkpoint:main"],
    },
)

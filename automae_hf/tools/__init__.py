"""Tools beside the model and its training: `dinov2_teacher` builds a real pretrained DINOv2 ViT-S/14 teacher folder
offline from a PyPI wheel's ONNX model (`training/build_dinov2_teacher.py`)."""

#!/usr/bin/env python
"""Export the encoder of a pretraining run (AutoMAE format with remote code, or plain ViT) and push it (`--help`).
The code lives in `automae_hf.training.export`."""

from automae_hf.training.export import main

if __name__ == "__main__":
    main()
